//! Issue #6: the built-in password file (`[auth] password_file`, `allow_anonymous`),
//! the per-IP failure limit, reloading without dropping connections, certificate CNs
//! as user names, and the `actimq passwd` command.

mod common;

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use actimq::auth::password::{hash_password, PasswordAuth, PasswordAuthConfig, Users};
use actimq::testing::test_config;
use actimq::{Node, NodeHandle};
use actimq_actors::mqtt::hooks::{AuthDecision, Authenticate};
use common::*;

/// Write a password file with `users` (name, password).
fn write_users(path: &Path, users: &[(&str, &str)]) {
    let mut text = String::from("# test users\n");
    for (u, p) in users {
        text.push_str(&format!("{u}:{}\n", hash_password(p.as_bytes()).unwrap()));
    }
    std::fs::write(path, text).unwrap();
}

/// Run `test` with a node whose `[auth]` is set by `tweak`, with a password file at
/// `dir/passwd` holding `users`.
fn with_node<F, Fut>(users: &[(&str, &str)], tweak: impl FnOnce(&mut actimq::Config), test: F)
where
    F: FnOnce(NodeHandle, std::path::PathBuf) -> Fut,
    Fut: Future<Output = NodeHandle>,
{
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    write_users(&pw, users);
    let mut config = test_config(&dir.path().join("data"));
    config.auth.password_file = pw.clone();
    tweak(&mut config);
    actix_rt::System::new().block_on(async move {
        let node = Node::builder(config).start().await.unwrap();
        let node = test(node, pw).await;
        node.stop().await;
    });
}

fn addr(node: &NodeHandle) -> SocketAddr {
    node.mqtt_addr().unwrap()
}

async fn code(a: SocketAddr, o: &ConnectOpts) -> u8 {
    Raw::connect(a, o).await.1.code
}

#[test]
fn wrong_password_is_refused_and_right_one_accepted() {
    with_node(
        &[("alice", "wonderland")],
        |c| {
            c.auth.allow_anonymous = false;
            c.auth.max_failures = 0;
        },
        |node, _| async move {
            let a = addr(&node);
            // Wrong password: v3 5 (not authorized), v5 0x86.
            assert_eq!(
                code(a, &ConnectOpts::v3("c1", true).login("alice", "x")).await,
                5
            );
            assert_eq!(
                code(a, &ConnectOpts::v5("c1", true).login("alice", "x")).await,
                0x86
            );
            // Unknown user: the same answers.
            assert_eq!(
                code(a, &ConnectOpts::v5("c1", true).login("bob", "x")).await,
                0x86
            );
            // No credentials while anonymous is off: 0x87 / 5.
            assert_eq!(code(a, &ConnectOpts::v5("c1", true)).await, 0x87);
            assert_eq!(code(a, &ConnectOpts::v3("c1", true)).await, 5);
            // The right password.
            let good3 = ConnectOpts::v3("c3", true).login("alice", "wonderland");
            let (mut c3, _) = Raw::connect_ok(a, &good3).await;
            let good5 = ConnectOpts::v5("c5", true).login("alice", "wonderland");
            let (mut c5, _) = Raw::connect_ok(a, &good5).await;
            assert!(c3.is_alive().await);
            assert!(c5.is_alive().await);
            node
        },
    );
}

#[test]
fn anonymous_clients_connect_when_allowed_but_bad_passwords_do_not() {
    with_node(
        &[("alice", "wonderland")],
        |_| {},
        |node, _| async move {
            let a = addr(&node);
            Raw::connect_ok(a, &ConnectOpts::v5("anon", true)).await;
            assert_eq!(
                code(a, &ConnectOpts::v5("c1", true).login("alice", "no")).await,
                0x86
            );
            node
        },
    );
}

#[test]
fn repeated_failures_block_the_address_without_checking_passwords() {
    with_node(
        &[("alice", "wonderland")],
        |c| {
            c.auth.max_failures = 3;
            c.auth.failure_window_secs = 60;
            c.auth.block_secs = 300;
        },
        |node, _| async move {
            let a = addr(&node);
            for i in 0..3 {
                let o = ConnectOpts::v5(&format!("g{i}"), true).login("alice", "guess");
                assert_eq!(code(a, &o).await, 0x86, "attempt {i}");
            }
            // Blocked now: even the right password is refused (0x9F, v3 3).
            let good = ConnectOpts::v5("ok", true).login("alice", "wonderland");
            assert_eq!(code(a, &good).await, 0x9F);
            let good3 = ConnectOpts::v3("ok", true).login("alice", "wonderland");
            assert_eq!(code(a, &good3).await, 3);
            node
        },
    );
}

#[test]
fn reload_picks_up_a_new_user_and_keeps_connections_and_old_file_on_errors() {
    with_node(
        &[("alice", "wonderland")],
        |c| {
            c.auth.allow_anonymous = false;
            c.auth.max_failures = 0;
        },
        |node, pw| async move {
            let a = addr(&node);
            let alice = ConnectOpts::v5("alice-1", true).login("alice", "wonderland");
            let (mut alice_conn, _) = Raw::connect_ok(a, &alice).await;
            let bob = ConnectOpts::v5("bob-1", true).login("bob", "builder");
            assert_eq!(code(a, &bob).await, 0x86);

            write_users(&pw, &[("alice", "wonderland"), ("bob", "builder")]);
            node.reload_auth().await.unwrap();
            let (_bob_conn, _) = Raw::connect_ok(a, &bob).await;
            assert!(alice_conn.is_alive().await, "reload dropped a connection");

            // A broken file is refused and the old users stay.
            std::fs::write(&pw, "bob\n").unwrap();
            let e = node.reload_auth().await.unwrap_err();
            assert!(e.contains("line 1"), "{e}");
            let bob2 = ConnectOpts::v5("bob-2", true).login("bob", "builder");
            Raw::connect_ok(a, &bob2).await;
            node
        },
    );
}

#[test]
fn a_certificate_user_name_needs_no_password() {
    actix_rt::System::new().block_on(async {
        let cfg = PasswordAuthConfig {
            allow_anonymous: false,
            password_file: None,
            max_failures: 5,
            failure_window: Duration::from_secs(60),
            block: Duration::from_secs(60),
            verify_threads: 1,
            verify_deadline: Duration::from_secs(1),
        };
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let auth = PasswordAuth::start(cfg, log).unwrap();
        let ask = |cert: Option<&str>| Authenticate {
            client_id: "dev".into(),
            username: Some("ignored".into()),
            password: None,
            peer: "127.0.0.1:5000".parse().unwrap(),
            cert_username: cert.map(String::from),
            protocol: 5,
        };
        assert_eq!(
            auth.send(ask(Some("device-7"))).await.unwrap(),
            AuthDecision::Allow
        );
        assert_eq!(
            auth.send(ask(None)).await.unwrap(),
            AuthDecision::Deny(0x86)
        );
    });
}

#[test]
fn passwd_command_writes_a_file_the_node_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    let bin = env!("CARGO_BIN_EXE_actimq");
    let set = |user: &str, password: &str| {
        let mut child = Command::new(bin)
            .args(["passwd", pw.to_str().unwrap(), user])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    set("alice", "first");
    set("bob", "builder");
    set("alice", "second");
    let text = std::fs::read_to_string(&pw).unwrap();
    let users = Users::parse(&text).unwrap();
    assert_eq!(users.len(), 2);
    assert!(actimq::auth::password::verify_password(
        users.get("alice").unwrap(),
        b"second"
    ));
    assert!(!actimq::auth::password::verify_password(
        users.get("alice").unwrap(),
        b"first"
    ));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&pw).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The node accepts what the command wrote.
    let node = actimq::testing::TestNode::start(&dir.path().join("data"), |c| {
        c.auth.password_file = pw.clone();
        c.auth.allow_anonymous = false;
    });
    let a = node.mqtt_addr();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            Raw::connect_ok(a, &ConnectOpts::v3("b", true).login("bob", "builder")).await;
            Raw::connect_ok(a, &ConnectOpts::v5("a", true).login("alice", "second")).await;
            assert_eq!(
                code(a, &ConnectOpts::v5("a", true).login("alice", "first")).await,
                0x86
            );
        });
}
