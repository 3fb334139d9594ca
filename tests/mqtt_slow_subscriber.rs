//! A subscriber that never reads must not make the node's memory grow: its session
//! stops pulling when its write buffer is full, and the backlog stays in the log
//! (issue #3, "Slow devices"). A well-behaved subscriber on the same topic keeps
//! receiving everything meanwhile.
//!
//! The node runs in this test process, so the process's VmRSS is the node's memory
//! (plus the test's own, which is small and constant).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use actimq::testing::TestNode;

mod common;
use common::{packet, put_str as str16};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A v3.1.1 client on a blocking socket: CONNECT, wait for CONNACK, SUBSCRIBE.
fn client(addr: SocketAddr, id: &str, sub: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut body = Vec::new();
    str16(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    str16(&mut body, id);
    s.write_all(&packet(0x10, &body)).expect("write connect");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("connack");
    assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK accepted");
    if let Some(filter) = sub {
        let mut body = vec![0, 1];
        str16(&mut body, filter);
        body.push(0);
        s.write_all(&packet(0x82, &body)).expect("write subscribe");
        let mut suback = [0u8; 5];
        s.read_exact(&mut suback).expect("suback");
        assert_eq!(suback[0], 0x90);
    }
    s
}

#[test]
fn subscriber_that_never_reads_keeps_memory_bounded() {
    const MESSAGES: usize = 40_000;
    // 80 MB in all: more than the storage's bounded message cache.
    const PAYLOAD: usize = 2048;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(dir.path(), |_| {});
    let addr = node.mqtt_addr();

    // The stuck subscriber: a tiny receive buffer, and it never reads.
    let stuck = client(addr, "stuck", Some("flood/#"));
    let sock = socket2::SockRef::from(&stuck);
    sock.set_recv_buffer_size(4096).ok();

    // A healthy subscriber that counts everything on another thread.
    let mut healthy = client(addr, "healthy", Some("flood/#"));
    let reader = std::thread::spawn(move || {
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let mut pending = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while got < MESSAGES && Instant::now() < deadline {
            let n = match healthy.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            // Count whole PUBLISH packets.
            let mut at = 0;
            loop {
                if pending.len() < at + 2 {
                    break;
                }
                let (mut len, mut mul, mut i) = (0usize, 1usize, at + 1);
                let mut complete = false;
                while i < pending.len() {
                    let b = pending[i];
                    len += (b & 0x7f) as usize * mul;
                    mul *= 128;
                    i += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                }
                if !complete || pending.len() < i + len {
                    break;
                }
                if pending[at] & 0xf0 == 0x30 {
                    got += 1;
                }
                at = i + len;
            }
            pending.drain(..at);
        }
        got
    });

    // Two halves: the first warms up every bounded buffer (the storage's message
    // cache, write batches, allocator arenas); the second must add almost nothing,
    // although the stuck subscriber falls 40 MiB further behind.
    let mut publisher = client(addr, "flooder", None);
    let mut body = Vec::new();
    str16(&mut body, "flood/data");
    body.extend(std::iter::repeat_n(b'x', PAYLOAD));
    let one = packet(0x30, &body);
    let mut batch = Vec::with_capacity(one.len() * 100);
    for _ in 0..100 {
        batch.extend_from_slice(&one);
    }
    let start = rss_kib();
    let mut half = 0;
    for i in 0..MESSAGES / 100 {
        publisher.write_all(&batch).expect("publish");
        if i == MESSAGES / 200 {
            std::thread::sleep(Duration::from_millis(500));
            half = rss_kib();
        }
    }
    let got = reader.join().expect("reader");
    let end = rss_kib();
    let second_half_mib = end.saturating_sub(half) / 1024;
    let half_mib = (MESSAGES / 2 * PAYLOAD) >> 20;
    println!(
        "published {} MiB; healthy subscriber got {got}/{MESSAGES}; RSS start {} MiB, \
         after first half {} MiB, end {} MiB: second half added {second_half_mib} MiB",
        2 * half_mib,
        start / 1024,
        half / 1024,
        end / 1024
    );
    assert_eq!(got, MESSAGES, "the healthy subscriber is served throughout");
    assert!(
        second_half_mib < half_mib as u64 / 4,
        "memory grew {second_half_mib} MiB while {half_mib} MiB more were published: \
         the stuck subscriber's backlog must stay in the log"
    );
    drop(stuck);
    node.stop();
}
