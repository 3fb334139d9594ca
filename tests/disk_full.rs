//! A full disk: the publisher whose message cannot be stored is told so (v5 PUBACK 0x97
//! Quota exceeded; v3, which has no negative acknowledgement, is disconnected so that
//! its client resends later), every other client is served as before, nothing
//! acknowledged is lost, and the node resumes by itself once there is room again.
//!
//! The node runs as a child process whose file size limit (`RLIMIT_FSIZE`, with
//! `SIGXFSZ` ignored) stands in for the full disk: a write past it fails with `EFBIG`,
//! which the log treats as it treats `ENOSPC` and `EDQUOT`. Raising the limit with
//! `prlimit(2)` then stands in for freeing space. A restart on the same data directory
//! shows what was stored.

mod common;
mod process;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use process::{node_command, NodeProcess};

/// The file size limit: the active segment reaches it after about 120 of our messages.
const LIMIT: u64 = 2 << 20;
const PAYLOAD: usize = 16 * 1024;

fn start(data_dir: &Path, limit: Option<u64>) -> (NodeProcess, std::net::SocketAddr) {
    let mut cmd = node_command(data_dir);
    if let Some(limit) = limit {
        // SAFETY: between fork and exec only async-signal-safe calls (setrlimit,
        // signal) are made, on the child's own process.
        unsafe {
            cmd.pre_exec(move || {
                let rl = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Without this, the first write past the limit kills the process.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let node = NodeProcess::spawn(cmd, &["no space for the log", "space for the log again"]);
    let addr = node.tcp_addr(Duration::from_secs(60));
    (node, addr)
}

/// Lift the node's file size limit, as freeing disk space would.
fn make_room(node: &NodeProcess) {
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit(2) on our own child, with a valid rlimit and no old-value pointer.
    let rc = unsafe {
        libc::prlimit(
            node.pid() as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &rl,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn payload(i: u16) -> Vec<u8> {
    let mut p = vec![(i % 251) as u8; PAYLOAD];
    p[..2].copy_from_slice(&i.to_be_bytes());
    p
}

fn persistent(id: &str) -> ConnectOpts {
    ConnectOpts::v5(id, false).props(Props::new().u32(P_SESSION_EXPIRY, 600))
}

/// QoS 1 PUBLISH of message `i`; the PUBACK's reason code.
async fn publish1(c: &mut Raw, pid: u16, i: u16) -> u8 {
    c.send(&publish_packet(
        true,
        "disk/x",
        1,
        false,
        false,
        pid,
        &Props::new(),
        &payload(i),
    ))
    .await;
    let (got, reason) = parse_ack(&c.expect(PUBACK).await);
    assert_eq!(got, pid);
    reason
}

#[test]
fn a_full_disk_refuses_only_what_it_cannot_store_and_the_node_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut node, addr) = start(&data, Some(LIMIT));
    let (acked, refused) = rt.block_on(async {
        // A persistent subscriber, offline: what is acknowledged waits in its queue.
        let (mut sub, _) = Raw::connect_ok(addr, &persistent("keeper")).await;
        assert_eq!(sub.subscribe(1, &[("disk/#", 1)]).await, vec![1]);
        sub.disconnect().await;
        // A live subscriber and an idle bystander.
        let (mut live, _) = Raw::connect_ok(addr, &ConnectOpts::v5("live", true)).await;
        assert_eq!(live.subscribe(1, &[("disk/#", 0)]).await, vec![0]);
        let (mut bystander, _) = Raw::connect_ok(addr, &ConnectOpts::v5("bystander", true)).await;

        let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("filler", true)).await;
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        let mut i = 0u16;
        while refused.len() < 5 {
            assert!(i < 1000, "the disk never filled up");
            match publish1(&mut publ, i % 60_000 + 1, i).await {
                0 => acked.push(i),
                // MQTT 5 §3.4.2.1: 0x97 Quota exceeded.
                0x97 => refused.push(i),
                other => panic!("PUBACK reason {other:#04x} for message {i}"),
            }
            i += 1;
        }
        assert!(
            acked.len() > 50,
            "only {} stored before the disk filled",
            acked.len()
        );
        assert!(
            publ.is_alive().await,
            "a v5 publisher is told, not disconnected"
        );
        assert!(bystander.is_alive().await, "the other clients are served");
        // The live subscriber got exactly the acknowledged messages.
        let got: Vec<u16> = live
            .drain_publishes(QUIET)
            .await
            .iter()
            .map(|p| u16::from_be_bytes([p.payload[0], p.payload[1]]))
            .collect();
        assert_eq!(got, acked);

        // MQTT 3.1.1 has no negative PUBACK: the connection is closed unanswered, so
        // the client keeps the message and sends it again after reconnecting.
        let (mut v3, _) = Raw::connect_ok(addr, &ConnectOpts::v3("filler-v3", true)).await;
        v3.send(&publish_packet(
            false,
            "disk/x",
            1,
            false,
            false,
            1,
            &Props::new(),
            &payload(9999),
        ))
        .await;
        let seen = v3
            .closed_within(WAIT)
            .await
            .expect("the v3 publisher is closed");
        assert!(
            seen.iter().all(|p| p.kind() != PUBACK),
            "no PUBACK: {seen:?}"
        );

        // Room again: the same connection goes on storing.
        make_room(&node);
        let after = i;
        assert_eq!(publish1(&mut publ, 60_001, after).await, 0);
        acked.push(after);
        let got = live.expect_publish().await;
        assert_eq!(got.payload[..2], after.to_be_bytes());
        (acked, refused)
    });
    node.signal("TERM");
    assert!(node.wait_exit(Duration::from_secs(30)).success());
    assert!(node.panics().is_empty(), "{:?}", node.panics());
    // Counted once the node has exited: its log is asynchronous.
    assert_eq!(
        node.count("no space for the log"),
        1,
        "logged once, not per message"
    );
    assert_eq!(node.count("space for the log again"), 1);

    // After a restart: every acknowledged message, in order, and none of the refused.
    let (_node, addr) = start(&data, None);
    rt.block_on(async {
        let (mut sub, ack) = Raw::connect_ok(addr, &persistent("keeper")).await;
        assert!(ack.session_present);
        let mut got = Vec::new();
        while let Some(p) = sub.try_publish(Duration::from_secs(2)).await {
            assert_eq!(p.payload.len(), PAYLOAD);
            let i = u16::from_be_bytes([p.payload[0], p.payload[1]]);
            assert_eq!(p.payload, payload(i), "message {i} intact");
            got.push(i);
            sub.ack(&p).await;
        }
        assert_eq!(got, acked, "refused: {refused:?}");
    });
}
