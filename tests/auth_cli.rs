//! Issue #6, as an operator sees it: SIGHUP makes a running `actimq` re-read its
//! password file, so a new user can connect without a restart, and a connected client
//! stays connected.

mod common;
mod process;

use std::process::Command;
use std::time::Duration;

use actimq::auth::password::hash_password;
use common::*;
use process::{clear_actimq_env, NodeProcess, BIN};

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
    clear_actimq_env(&mut cmd);
    cmd.env("ACTIMQ__NODE__DATA_DIR", dir.path().join("data"))
        .env("ACTIMQ__NODE__IO_THREADS", "1")
        .env("ACTIMQ__LISTENER__TCP__BIND", "127.0.0.1:0")
        .env("ACTIMQ__LISTENER__WS__ENABLED", "false")
        .env("ACTIMQ__LISTENER__SERVICE__ENABLED", "false")
        .env("ACTIMQ__AUTH__PASSWORD_FILE", &pw)
        .env("ACTIMQ__AUTH__ALLOW_ANONYMOUS", "false")
        .env("ACTIMQ__LOG__LEVEL", "info");
    let node = NodeProcess::spawn(cmd, &[]);
    let addr = node.tcp_addr(Duration::from_secs(60));

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
