//! The `actimq` binary as an operator uses it: print-config, a bad value in the
//! environment, and a graceful stop on SIGTERM / SIGINT that leaves the data readable.

mod process;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use actimq_actors::storage::{Pull, QueueName, Storage};
use process::{clear_actimq_env, node_command, NodeProcess, BIN};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Run the binary to completion with `args` and extra environment `env`.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    clear_actimq_env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run actimq")
}

#[test]
fn print_config_prints_the_built_in_default() {
    let out = run(&["print-config"], &[]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        include_str!("../conf/actimq.toml")
    );
}

#[test]
fn help_and_version() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("print-config"));
    let out = run(&["--version"], &[]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("actimq {}", env!("CARGO_PKG_VERSION"))
    );
    let out = run(&["--bogus"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_value_in_the_environment_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &[],
        &[
            ("ACTIMQ__NODE__DATA_DIR", dir.path().to_str().unwrap()),
            ("ACTIMQ__STORAGE__SEGMENT_BYTES", "0"),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("storage.segment_bytes"), "{err}");
    assert!(err.contains("4096"), "{err}");
    // Nothing was opened: validation comes first.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let out = run(&[], &[("ACTIMQ__LISTENER__TCP__BIND", "nowhere")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listener.tcp.bind"), "{err}");
}

#[test]
fn missing_config_file_is_named() {
    let out = run(&["--config", "/nonexistent/actimq.toml"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/actimq.toml"), "{err}");
}

/// A node process on a temporary data dir; answers it and its MQTT address.
fn start(data_dir: &Path) -> (NodeProcess, SocketAddr) {
    let node = NodeProcess::spawn(node_command(data_dir), &[]);
    let addr = node.tcp_addr(Duration::from_secs(60));
    (node, addr)
}

/// Send `signal` and wait for the exit status.
fn signal_and_wait(mut node: NodeProcess, signal: &str) -> ExitStatus {
    node.signal(signal);
    node.wait_exit(Duration::from_secs(30))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Publish one retained QoS 1 message and wait for its PUBACK.
async fn publish_retained(addr: SocketAddr, topic: &str, payload: &[u8]) {
    let mut opts = MqttOptions::new("cli-publisher", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
        .await
        .unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("publisher: {e}"),
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "no PUBACK");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), events.poll()).await;
}

/// Subscribe to `topic` and return the first message's retain flag and payload.
async fn first_message(addr: SocketAddr, topic: &str) -> (bool, Vec<u8>) {
    let mut opts = MqttOptions::new("cli-subscriber", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 10);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => return (p.retain, p.payload.to_vec()),
                Ok(_) => {}
                Err(e) => panic!("subscriber: {e}"),
            }
        }
    })
    .await
    .expect("no message");
    let _ = client.disconnect().await;
    got
}

/// The commitlog segments (`{data_dir}/log/{base:020}.log`) with their sizes.
fn segments(data_dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    std::fs::read_dir(data_dir.join("log"))
        .expect("a log/ directory")
        .map(|e| e.unwrap())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| (e.path(), e.metadata().unwrap().len()))
        .collect()
}

/// Open the storage in `data_dir` directly and read the first-level queue `first`.
fn stored_payloads(data_dir: &Path, first: &str) -> Vec<Vec<u8>> {
    let mut cfg = actimq::Config::default();
    cfg.node.data_dir = data_dir.to_path_buf();
    let log = slog::Logger::root(slog::Discard, slog::o!());
    actix_rt::System::new().block_on(async move {
        let storage = Storage::open(cfg.storage_config(), log)
            .await
            .expect("reopen storage");
        // A publisher's messages are in one partition of the first-level topic.
        let mut out = Vec::new();
        for p in 0..cfg.service.partitions {
            let pulled = storage
                .pull(Pull {
                    queue: QueueName::topic(first, p),
                    from: 0,
                    max: 100,
                    max_bytes: 1 << 20,
                })
                .await
                .expect("pull");
            out.extend(pulled.messages.iter().map(|m| m.message.payload.to_vec()));
        }
        storage.shutdown().await;
        out
    })
}

#[test]
fn sigterm_stops_gracefully_and_the_log_is_readable_after() {
    let dir = tempfile::tempdir().unwrap();
    let (node, addr) = start(dir.path());
    runtime().block_on(publish_retained(addr, "cli/sigterm", b"kept"));
    let status = signal_and_wait(node, "TERM");
    assert!(status.success(), "exit status {status:?}");

    let segs = segments(dir.path());
    assert!(
        segs.iter().any(|(_, len)| *len > 0),
        "no non-empty segment in {segs:?}"
    );
    // The storage engine reopens what the stopped node left and finds the message in
    // the first-level topic queue.
    assert_eq!(stored_payloads(dir.path(), "cli"), vec![b"kept".to_vec()]);

    // Reopening recovers the log, and the message written before the stop is there.
    let (node, addr) = start(dir.path());
    let (retain, payload) = runtime().block_on(first_message(addr, "cli/sigterm"));
    assert!(retain);
    assert_eq!(payload, b"kept");
    let status = signal_and_wait(node, "INT");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn sigint_on_an_idle_node_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _) = start(dir.path());
    let status = signal_and_wait(node, "INT");
    assert!(status.success(), "exit status {status:?}");
}
