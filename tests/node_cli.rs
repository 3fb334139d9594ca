//! The `actimq` binary as an operator uses it: print-config, a bad value in the
//! environment, and a graceful stop on SIGTERM / SIGINT that leaves the data readable.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use actimq_actors::storage::{Pull, QueueName, Storage};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const BIN: &str = env!("CARGO_BIN_EXE_actimq");

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

/// Keep the caller's own ACTIMQ__* settings out of the tests.
fn clear_actimq_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ACTIMQ__") {
            cmd.env_remove(k);
        }
    }
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

/// A node process on a temporary data dir, with its stderr collected by a thread.
struct NodeProcess {
    /// The process.
    child: Child,
    /// The bound MQTT address, read from the "listening" log line.
    addr: SocketAddr,
    /// Every later stderr line, for diagnostics.
    lines: mpsc::Receiver<String>,
}

impl NodeProcess {
    fn start(data_dir: &Path) -> NodeProcess {
        let mut cmd = Command::new(BIN);
        clear_actimq_env(&mut cmd);
        cmd.env("ACTIMQ__NODE__DATA_DIR", data_dir)
            .env("ACTIMQ__NODE__IO_THREADS", "2")
            .env("ACTIMQ__LISTENER__TCP__BIND", "127.0.0.1:0")
            .env("ACTIMQ__LISTENER__WS__ENABLED", "false")
            .env("ACTIMQ__LISTENER__SERVICE__ENABLED", "false")
            .env("ACTIMQ__LOG__LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn actimq");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if line.contains("listening") && line.contains("listener: tcp") {
                        break parse_addr(&line).unwrap_or_else(|| panic!("no addr in {line:?}"));
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "node did not report its address; stderr:\n{}",
                        seen.join("\n")
                    );
                }
            }
        };
        NodeProcess { child, addr, lines }
    }

    /// Send `signal` and wait for the exit status.
    fn signal_and_wait(mut self, signal: &str) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for actimq") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let rest: Vec<String> = self.lines.try_iter().collect();
                panic!(
                    "node did not stop after {signal}; stderr:\n{}",
                    rest.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in a slog-term line such as `... INFO listening, addr: 127.0.0.1:4000, ...`.
fn parse_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("addr: ")? + "addr: ".len()..];
    rest.split([',', ' ']).next()?.parse().ok()
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
    let node = NodeProcess::start(dir.path());
    runtime().block_on(publish_retained(node.addr, "cli/sigterm", b"kept"));
    let status = node.signal_and_wait("TERM");
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
    let node = NodeProcess::start(dir.path());
    let (retain, payload) = runtime().block_on(first_message(node.addr, "cli/sigterm"));
    assert!(retain);
    assert_eq!(payload, b"kept");
    let status = node.signal_and_wait("INT");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn sigint_on_an_idle_node_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path());
    let status = node.signal_and_wait("INT");
    assert!(status.success(), "exit status {status:?}");
}
