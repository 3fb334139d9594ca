//! Issue #6, as an operator sees it: SIGHUP makes a running `actimq` re-read its
//! password file, so a new user can connect without a restart, and a connected client
//! stays connected.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use actimq::auth::password::hash_password;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_actimq");

struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Wait for a stderr line containing `what`; returns it.
    fn wait_for(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.contains(what) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!("no {what:?} line; stderr:\n{}", seen.join("\n")),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(ok.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn users(list: &[(&str, &str)]) -> String {
    list.iter()
        .map(|(u, p)| format!("{u}:{}\n", hash_password(p.as_bytes()).unwrap()))
        .collect()
}

#[test]
fn sighup_reloads_the_password_file_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    std::fs::write(&pw, users(&[("alice", "wonderland")])).unwrap();
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ACTIMQ__") {
            cmd.env_remove(k);
        }
    }
    cmd.env("ACTIMQ__NODE__DATA_DIR", dir.path().join("data"))
        .env("ACTIMQ__NODE__IO_THREADS", "1")
        .env("ACTIMQ__LISTENER__TCP__BIND", "127.0.0.1:0")
        .env("ACTIMQ__LISTENER__WS__ENABLED", "false")
        .env("ACTIMQ__LISTENER__SERVICE__ENABLED", "false")
        .env("ACTIMQ__AUTH__PASSWORD_FILE", &pw)
        .env("ACTIMQ__AUTH__ALLOW_ANONYMOUS", "false")
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
    let node = Proc { child, lines };
    let line = node.wait_for("listener: tcp");
    let rest = &line[line.find("addr: ").expect("addr in the line") + 6..];
    let addr: SocketAddr = rest.split([',', ' ']).next().unwrap().parse().unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bob = ConnectOpts::v5("bob", true).login("bob", "builder");
    let mut alice = rt.block_on(async {
        let alice = ConnectOpts::v5("alice", true).login("alice", "wonderland");
        let (alice, _) = Raw::connect_ok(addr, &alice).await;
        assert_eq!(Raw::connect(addr, &bob).await.1.code, 0x86);
        alice
    });

    std::fs::write(&pw, users(&[("alice", "wonderland"), ("bob", "builder")])).unwrap();
    node.signal("HUP");
    node.wait_for("password file reloaded");
    rt.block_on(async {
        Raw::connect_ok(addr, &bob).await;
        assert!(alice.is_alive().await, "SIGHUP dropped a connection");
    });

    // A broken file is logged and the users stay.
    std::fs::write(&pw, "not a password line\n").unwrap();
    node.signal("HUP");
    node.wait_for("not reloaded");
    rt.block_on(async {
        let bob2 = ConnectOpts::v3("bob2", true).login("bob", "builder");
        Raw::connect_ok(addr, &bob2).await;
    });
    node.signal("TERM");
    node.wait_for("stopped");
}
