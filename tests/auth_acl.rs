//! Issue #6: the built-in ACL (`[auth] acl_file`, `acl_default`) on real connections:
//! publish, subscribe, retained messages and wills, with `%u` and `%c` patterns, and
//! reloading the file.

mod common;

use std::net::SocketAddr;

use actimq::testing::TestNode;
use actimq::{config::AclDefault, Node};
use common::*;

const ACL: &str = "\
# alice owns alice/#, reads shared/#; carol reads everything
user alice
topic readwrite alice/#
topic read shared/#
user carol
topic read #
client sensor-1
topic write shared/sensors/1
pattern readwrite devices/%u/#
pattern write clients/%c/will
";

fn start(acl: &str) -> (tempfile::TempDir, TestNode) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acl");
    std::fs::write(&file, acl).unwrap();
    let node = TestNode::start(&dir.path().join("data"), |c| {
        c.auth.acl_file = file;
        c.auth.acl_default = AclDefault::Deny;
    });
    (dir, node)
}

fn as_user(v5: bool, id: &str, user: &str) -> ConnectOpts {
    let o = if v5 {
        ConnectOpts::v5(id, true)
    } else {
        ConnectOpts::v3(id, true)
    };
    o.login(user, "unchecked (no password file)")
}

/// QoS 1 PUBLISH; the PUBACK's reason code.
async fn publish1(c: &mut Raw, topic: &str, retain: bool, pid: u16, payload: &[u8]) -> u8 {
    let v5 = c.v5;
    c.send(&publish_packet(
        v5,
        topic,
        1,
        retain,
        false,
        pid,
        &Props::new(),
        payload,
    ))
    .await;
    let (got, reason) = parse_ack(&c.expect(PUBACK).await);
    assert_eq!(got, pid);
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_follow_the_rules() {
    let (_dir, node) = start(ACL);
    let a: SocketAddr = node.mqtt_addr();
    let (mut alice, _) = Raw::connect_ok(a, &as_user(true, "a1", "alice")).await;
    // Covered filters are granted; others (and wildcard supersets) refused.
    let codes = alice
        .subscribe(
            1,
            &[("alice/#", 1), ("shared/+/1", 1), ("other/#", 1), ("#", 0)],
        )
        .await;
    assert_eq!(codes, vec![1, 1, 0x87, 0x87]);
    let (mut carol, _) = Raw::connect_ok(a, &as_user(false, "c1", "carol")).await;
    assert_eq!(carol.subscribe(1, &[("#", 0), ("x", 0)]).await, vec![0, 0]);

    // v5: a denied PUBLISH gets 0x87; read access does not grant write.
    assert_eq!(publish1(&mut alice, "alice/a", false, 2, b"ok").await, 0);
    assert_eq!(
        publish1(&mut alice, "shared/x", false, 3, b"no").await,
        0x87
    );
    assert_eq!(publish1(&mut alice, "other/x", false, 4, b"no").await, 0x87);
    // v3: acknowledged and dropped.
    let (mut dave, _) = Raw::connect_ok(a, &as_user(false, "d1", "dave")).await;
    assert_eq!(publish1(&mut dave, "alice/a", false, 5, b"dave").await, 0);
    // Client-id section.
    let (mut sensor, _) = Raw::connect_ok(a, &ConnectOpts::v5("sensor-1", true)).await;
    assert_eq!(
        publish1(&mut sensor, "shared/sensors/1", false, 6, b"21C").await,
        0
    );
    assert_eq!(
        sensor.subscribe(7, &[("shared/sensors/1", 0)]).await,
        vec![0x87]
    );

    // carol (reads #) sees exactly the allowed messages, in order.
    let got: Vec<_> = carol
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| (p.topic, p.payload))
        .collect();
    assert_eq!(
        got,
        vec![
            ("alice/a".to_string(), b"ok".to_vec()),
            ("shared/sensors/1".to_string(), b"21C".to_vec()),
        ]
    );
    // alice got her own message and the sensor's (shared/+/1 granted).
    let got: Vec<_> = alice
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| p.topic)
        .collect();
    assert_eq!(got, vec!["alice/a", "shared/sensors/1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_substitute_user_and_client_id_and_cover_retained_and_wills() {
    let (_dir, node) = start(ACL);
    let a = node.mqtt_addr();
    // %u: bob may use devices/bob/#, not devices/eve/#.
    let (mut bob, _) = Raw::connect_ok(a, &as_user(true, "b1", "bob")).await;
    assert_eq!(
        publish1(&mut bob, "devices/bob/t", true, 1, b"mine").await,
        0
    );
    assert_eq!(
        publish1(&mut bob, "devices/eve/t", true, 2, b"theirs").await,
        0x87
    );
    assert_eq!(
        bob.subscribe(3, &[("devices/bob/#", 1), ("devices/+/t", 1)])
            .await,
        vec![1, 0x87]
    );
    // Retained: only the allowed retained message was stored.
    let (mut carol, _) = Raw::connect_ok(a, &as_user(true, "c1", "carol")).await;
    carol.subscribe(1, &[("devices/#", 1)]).await;
    let got: Vec<_> = carol
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| (p.topic, p.retain))
        .collect();
    assert_eq!(got, vec![("devices/bob/t".to_string(), true)]);

    // %c: a will on clients/<own id>/will is allowed, someone else's refuses CONNECT.
    let will = |topic: &str| WillOpts {
        topic: topic.into(),
        payload: b"gone".to_vec(),
        qos: 1,
        retain: false,
        props: Props::new(),
    };
    let bad = ConnectOpts::v5("dev7", true).will(will("clients/dev8/will"));
    assert_eq!(Raw::connect(a, &bad).await.1.code, 0x87);
    let bad3 = ConnectOpts::v3("dev7", true).will(will("clients/dev8/will"));
    assert_eq!(Raw::connect(a, &bad3).await.1.code, 5);
    carol.subscribe(2, &[("clients/+/will", 1)]).await;
    let good = ConnectOpts::v5("dev7", true).will(will("clients/dev7/will"));
    let (dev7, _) = Raw::connect_ok(a, &good).await;
    drop(dev7); // no DISCONNECT: the will is published
    let p = carol.expect_publish().await;
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        ("clients/dev7/will", &b"gone"[..])
    );
}

#[test]
fn reload_applies_new_rules_to_connected_clients() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acl");
    std::fs::write(&file, "user alice\ntopic read a/#\n").unwrap();
    let mut config = actimq::testing::test_config(&dir.path().join("data"));
    config.auth.acl_file = file.clone();
    config.auth.acl_default = AclDefault::Deny;
    actix_rt::System::new().block_on(async move {
        let node = Node::builder(config).start().await.unwrap();
        let a = node.mqtt_addr().unwrap();
        let (mut alice, _) = Raw::connect_ok(a, &as_user(true, "a1", "alice")).await;
        assert_eq!(publish1(&mut alice, "a/x", false, 1, b"1").await, 0x87);
        std::fs::write(&file, "user alice\ntopic readwrite a/#\n").unwrap();
        node.reload_auth().await.unwrap();
        assert_eq!(publish1(&mut alice, "a/x", false, 2, b"2").await, 0);
        // A broken file keeps the rules in force.
        std::fs::write(&file, "user alice\ntopic sometimes a/#\n").unwrap();
        assert!(node.reload_auth().await.is_err());
        assert_eq!(publish1(&mut alice, "a/x", false, 3, b"3").await, 0);
        node.stop().await;
    });
}

#[test]
fn reload_revokes_subscriptions_the_new_rules_deny() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acl");
    std::fs::write(&file, "user alice\ntopic read a/#\ntopic read b/#\n").unwrap();
    let mut config = actimq::testing::test_config(&dir.path().join("data"));
    config.auth.acl_file = file.clone();
    config.auth.acl_default = AclDefault::Allow;
    actix_rt::System::new().block_on(async move {
        let node = Node::builder(config).start().await.unwrap();
        let addr = node.mqtt_addr().unwrap();
        let (mut alice, _) = Raw::connect_ok(addr, &as_user(true, "a1", "alice")).await;
        assert_eq!(
            alice.subscribe(1, &[("a/#", 1), ("b/#", 1)]).await,
            vec![1, 1]
        );
        // A persistent session of alice's, offline while the rules change.
        let persistent = as_user(false, "a2", "alice");
        let persistent = ConnectOpts {
            clean: false,
            ..persistent
        };
        let (mut away, _) = Raw::connect_ok(addr, &persistent).await;
        assert_eq!(away.subscribe(1, &[("b/#", 1)]).await, vec![1]);
        away.send(&disconnect_packet(None)).await;
        drop(away);

        std::fs::write(&file, "user alice\ntopic read a/#\ntopic deny b/#\n").unwrap();
        node.reload_auth().await.unwrap();
        // The re-check runs in the background: publish until `a/` arrives after it.
        let (mut p, _) = Raw::connect_ok(addr, &ConnectOpts::v5("pub", true)).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(publish1(&mut p, "b/1", false, 1, b"revoked").await, 0);
        assert_eq!(publish1(&mut p, "a/1", false, 2, b"kept").await, 0);
        let got = alice.expect_publish().await;
        assert_eq!(got.payload, b"kept", "b/# was revoked by the reload");
        assert!(alice.is_alive().await, "revoking does not disconnect");

        // The offline session re-checks its subscriptions when it resumes.
        let (mut back, ack) = Raw::connect_ok(addr, &persistent).await;
        assert!(ack.session_present);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        // What was queued while it was away was delivered under the old subscription;
        // drain it, then nothing new comes.
        while back.try_publish(QUIET).await.is_some() {}
        assert_eq!(publish1(&mut p, "b/2", false, 3, b"after").await, 0);
        assert!(back.try_publish(QUIET).await.is_none());
        node.stop().await;
    });
}
