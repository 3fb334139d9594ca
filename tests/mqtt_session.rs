//! MQTT conformance: persistent sessions, offline messages, session expiry, and state
//! that survives a node restart (MQTT 3.1.1 §3.1.2.4, §4.1; MQTT 5.0 §3.1.2.4,
//! §3.1.2.11.2, §4.1).

mod common;

use std::time::Duration;

use common::*;

fn v3(id: &str, clean: bool) -> ConnectOpts {
    ConnectOpts::v3(id, clean)
}

fn v5_expiry(id: &str, clean: bool, expiry: u32) -> ConnectOpts {
    ConnectOpts::v5(id, clean).props(Props::new().u32(P_SESSION_EXPIRY, expiry))
}

async fn publish_from(addr: std::net::SocketAddr, id: &str, topic: &str, payloads: &[&[u8]]) {
    let (mut p, _) = Raw::connect_ok(addr, &v3(id, true)).await;
    for (i, payload) in payloads.iter().enumerate() {
        p.publish(topic, 1, false, i as u16 + 1, payload).await;
    }
    p.disconnect().await;
}

async fn persistent_session_keeps_subscriptions(opts: ConnectOpts) {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut c, ack) = Raw::connect_ok(addr, &opts).await;
    assert!(!ack.session_present, "first connection: no session");
    c.subscribe(1, &[("ps/t", 1)]).await;
    c.disconnect().await;

    publish_from(addr, "ps-pub", "ps/t", &[b"while-away-1", b"while-away-2"]).await;

    let (mut c, ack) = Raw::connect_ok(addr, &opts).await;
    assert!(ack.session_present, "MQTT-3.2.2-2: session present");
    // No SUBSCRIBE: the subscription was kept, and the offline messages are delivered.
    let got: Vec<Vec<u8>> = c
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| p.payload)
        .collect();
    assert_eq!(
        got,
        vec![b"while-away-1".to_vec(), b"while-away-2".to_vec()]
    );

    publish_from(addr, "ps-pub", "ps/t", &[b"online"]).await;
    assert_eq!(c.expect_publish().await.payload, b"online");
}

#[tokio::test]
async fn mqtt_3_1_2_4_clean_session_0_keeps_subscriptions_and_offline_messages_v3() {
    persistent_session_keeps_subscriptions(v3("ps3", false)).await;
}

#[tokio::test]
async fn mqtt5_3_1_2_11_2_session_expiry_keeps_subscriptions_and_offline_messages() {
    persistent_session_keeps_subscriptions(v5_expiry("ps5", false, 300)).await;
}

async fn session_survives_restart(opts: ConnectOpts) {
    let dir = tempfile::tempdir().unwrap();
    {
        let node = node(dir.path());
        let addr = node.mqtt_addr();
        let (mut c, _) = Raw::connect_ok(addr, &opts).await;
        c.subscribe(1, &[("rs/a", 1), ("rs/b/#", 2)]).await;
        c.disconnect().await;
        publish_from(addr, "rs-pub", "rs/a", &[b"before-restart"]).await;
        node.stop();
    }
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    publish_from(addr, "rs-pub", "rs/b/c", &[b"after-restart"]).await;
    let (mut c, ack) = Raw::connect_ok(addr, &opts).await;
    assert!(ack.session_present, "the session survived the restart");
    let mut got: Vec<(String, Vec<u8>, u8)> = c
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| (p.topic, p.payload, p.qos))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("rs/a".into(), b"before-restart".to_vec(), 1),
            ("rs/b/c".into(), b"after-restart".to_vec(), 1),
        ]
    );
}

#[tokio::test]
async fn persistent_session_v3_survives_a_node_restart() {
    session_survives_restart(v3("rs3", false)).await;
}

#[tokio::test]
async fn persistent_session_v5_survives_a_node_restart() {
    session_survives_restart(v5_expiry("rs5", false, 300)).await;
}

#[tokio::test]
async fn unacked_qos1_survives_a_node_restart_and_is_resent_with_dup() {
    let dir = tempfile::tempdir().unwrap();
    let opts = v3("ua-sub", false);
    let pid;
    {
        let node = node(dir.path());
        let addr = node.mqtt_addr();
        let (mut c, _) = Raw::connect_ok(addr, &opts).await;
        c.subscribe(1, &[("ua/t", 1)]).await;
        publish_from(addr, "ua-pub", "ua/t", &[b"unacked"]).await;
        let p = c.expect_publish().await;
        pid = p.pid;
        // Not acknowledged; the node stops under it.
        node.stop();
    }
    let node = node(dir.path());
    let (mut c, ack) = Raw::connect_ok(node.mqtt_addr(), &opts).await;
    assert!(ack.session_present);
    let p = c.expect_publish().await;
    assert_eq!(
        p.payload, b"unacked",
        "an unacknowledged QoS 1 message is not lost"
    );
    assert_eq!(p.pid, pid, "MQTT-4.4.0-1: same packet id");
    assert!(p.dup, "MQTT-4.4.0-1: DUP=1");
    c.ack(&p).await;
    assert!(c.try_publish(QUIET).await.is_none());
}

#[tokio::test]
async fn mqtt_3_1_2_6_clean_session_1_discards_the_previous_session() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut c, _) = Raw::connect_ok(addr, &v3("cs", false)).await;
    c.subscribe(1, &[("cs/t", 1)]).await;
    c.disconnect().await;
    publish_from(addr, "cs-pub", "cs/t", &[b"stale"]).await;

    let (mut c, ack) = Raw::connect_ok(addr, &v3("cs", true)).await;
    assert!(
        !ack.session_present,
        "MQTT-3.2.2-1: clean session: session present 0"
    );
    assert!(
        c.try_publish(QUIET).await.is_none(),
        "the old session's queue is gone"
    );
    c.disconnect().await;

    // MQTT-3.1.2-6: the clean session ended with its connection, so nothing remains.
    let (mut c, ack) = Raw::connect_ok(addr, &v3("cs", false)).await;
    assert!(!ack.session_present);
    publish_from(addr, "cs-pub", "cs/t", &[b"unsubscribed"]).await;
    assert!(
        c.try_publish(QUIET).await.is_none(),
        "no subscription remains"
    );
}

#[tokio::test]
async fn mqtt5_3_1_2_11_2_session_expiry_0_ends_the_session_at_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut c, _) = Raw::connect_ok(addr, &ConnectOpts::v5("se0", false)).await;
    c.subscribe(1, &[("se0/t", 1)]).await;
    c.disconnect().await;
    let (_c, ack) = Raw::connect_ok(addr, &ConnectOpts::v5("se0", false)).await;
    assert!(
        !ack.session_present,
        "expiry 0 (absent): no session after close"
    );
}

#[tokio::test]
async fn mqtt5_3_1_2_11_2_session_expires_after_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut c, _) = Raw::connect_ok(addr, &v5_expiry("se1", false, 1)).await;
    c.subscribe(1, &[("se1/t", 1)]).await;
    c.disconnect().await;
    publish_from(addr, "se1-pub", "se1/t", &[b"too-late"]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut c, ack) = Raw::connect_ok(addr, &v5_expiry("se1", false, 1)).await;
    assert!(!ack.session_present, "the session expired after 1 s");
    assert!(
        c.try_publish(QUIET).await.is_none(),
        "an expired session has no queue"
    );
}

#[tokio::test]
async fn mqtt5_3_1_2_11_2_session_is_present_within_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut c, _) = Raw::connect_ok(addr, &v5_expiry("se5", false, 5)).await;
    c.subscribe(1, &[("se5/t", 1)]).await;
    c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_c, ack) = Raw::connect_ok(addr, &v5_expiry("se5", false, 5)).await;
    assert!(ack.session_present);
}

#[tokio::test]
async fn mqtt5_3_14_2_2_disconnect_may_shorten_the_session_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut c, _) = Raw::connect_ok(addr, &v5_expiry("sed", false, 300)).await;
    c.subscribe(1, &[("sed/t", 1)]).await;
    // DISCONNECT with Session Expiry Interval 0: the session ends now.
    let mut body = vec![0x00];
    let props = Props::new().u32(P_SESSION_EXPIRY, 0);
    put_varint(&mut body, props.0.len());
    body.extend_from_slice(&props.0);
    c.send(&packet(0xE0, &body)).await;
    let _ = c.closed_within(WAIT).await;
    let (_c, ack) = Raw::connect_ok(addr, &v5_expiry("sed", false, 300)).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn persistent_session_through_rumqttc_v4() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut c, present) = V4::connect(addr, "rp4", false).await;
    assert!(!present);
    c.subscribe("rp4/#", rumqttc::QoS::AtLeastOnce).await;
    c.disconnect().await;
    let (mut p, _) = V4::connect(addr, "rp4-pub", true).await;
    p.publish("rp4/x", rumqttc::QoS::AtLeastOnce, false, b"queued")
        .await;
    let (mut c, present) = V4::connect(addr, "rp4", false).await;
    assert!(present);
    assert_eq!(&c.next_publish().await.payload[..], b"queued");
}

#[tokio::test]
async fn persistent_session_through_rumqttc_v5() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut opts = v5_options(addr, "rp5", false);
    opts.set_session_expiry_interval(Some(300));
    let (mut c, ack) = V5::connect_with(opts.clone()).await;
    assert!(!ack.session_present);
    c.subscribe(m5::Filter::new("rp5/#", m5::QoS::AtLeastOnce))
        .await;
    c.disconnect().await;
    let (mut p, _) = V5::connect(addr, "rp5-pub", true).await;
    p.publish("rp5/x", m5::QoS::AtLeastOnce, false, None, b"queued5")
        .await;
    let (mut c, ack) = V5::connect_with(opts).await;
    assert!(ack.session_present);
    assert_eq!(&c.next_publish().await.payload[..], b"queued5");
}

// ---------------------------------------------------------------------------------
// Crash resilience of inbound QoS 2 state
// ---------------------------------------------------------------------------------

async fn qos2_inbound_state_survives_restart(v5: bool) {
    let dir = tempfile::tempdir().unwrap();
    let sub_opts = if v5 {
        v5_expiry("q2r-sub", false, 300)
    } else {
        v3("q2r-sub", false)
    };
    let pub_opts = if v5 {
        v5_expiry("q2r-pub", false, 300)
    } else {
        v3("q2r-pub", false)
    };
    let publish = publish_packet(v5, "q2r/t", 2, false, false, 77, &Props::new(), b"once");
    let publish_dup = publish_packet(v5, "q2r/t", 2, false, true, 77, &Props::new(), b"once");
    {
        let node = node(dir.path());
        let addr = node.mqtt_addr();
        let (mut sub, _) = Raw::connect_ok(addr, &sub_opts).await;
        sub.subscribe(1, &[("q2r/t", 2)]).await;
        sub.disconnect().await;
        let (mut publ, _) = Raw::connect_ok(addr, &pub_opts).await;
        publ.send(&publish).await;
        assert_eq!(parse_ack(&publ.expect(PUBREC).await).0, 77);
        // The node stops after the PUBREC, before the PUBREL.
        node.stop();
    }
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut publ, ack) = Raw::connect_ok(addr, &pub_opts).await;
    assert!(ack.session_present, "the publisher's session survived");
    publ.send(&publish_dup).await;
    let (pid, reason) = parse_ack(&publ.expect(PUBREC).await);
    assert_eq!(pid, 77);
    assert!(reason < 0x80, "PUBREC reason {reason:#x}");
    publ.send(&ack_packet(PUBREL, 77)).await;
    let (pid, reason) = parse_ack(&publ.expect(PUBCOMP).await);
    assert_eq!((pid, reason), (77, 0), "PUBCOMP for a known packet id");

    let (mut sub, ack) = Raw::connect_ok(addr, &sub_opts).await;
    assert!(ack.session_present);
    let got = sub.drain_publishes(Duration::from_millis(1000)).await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| p.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        vec![&b"once"[..]],
        "MQTT-4.3.3: exactly one copy across the restart"
    );
}

#[tokio::test]
async fn mqtt_4_3_3_inbound_qos2_state_survives_a_node_restart_v3() {
    qos2_inbound_state_survives_restart(false).await;
}

#[tokio::test]
async fn mqtt5_4_3_3_inbound_qos2_state_survives_a_node_restart_v5() {
    qos2_inbound_state_survives_restart(true).await;
}

#[tokio::test]
async fn mqtt_3_1_4_2_takeover_resends_unacked_messages_to_the_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let opts = v3("to-sub", false);
    let (mut old, _) = Raw::connect_ok(addr, &opts).await;
    old.subscribe(1, &[("to/t", 1)]).await;
    publish_from(addr, "to-pub", "to/t", &[b"inflight"]).await;
    let p = old.expect_publish().await;
    // Not acknowledged; a new connection takes the session over.
    let (mut new, ack) = Raw::connect_ok(addr, &opts).await;
    assert!(ack.session_present);
    old.expect_closed().await;
    let again = new.expect_publish().await;
    assert_eq!((again.pid, again.dup), (p.pid, true), "MQTT-4.4.0-1");
    assert_eq!(again.payload, b"inflight");
    new.ack(&again).await;
    publish_from(addr, "to-pub", "to/t", &[b"next"]).await;
    assert_eq!(new.expect_publish().await.payload, b"next");
}

#[tokio::test]
async fn mqtt_3_10_4_unsubscribe_is_remembered_by_a_persistent_session() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let opts = v3("unsub-ps", false);
    let (mut c, _) = Raw::connect_ok(addr, &opts).await;
    c.subscribe(1, &[("up/a", 1), ("up/b", 1)]).await;
    c.unsubscribe(2, &["up/a"]).await;
    c.disconnect().await;
    publish_from(addr, "up-pub", "up/a", &[b"a"]).await;
    publish_from(addr, "up-pub", "up/b", &[b"b"]).await;
    let (mut c, ack) = Raw::connect_ok(addr, &opts).await;
    assert!(ack.session_present);
    let got: Vec<String> = c
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| p.topic)
        .collect();
    assert_eq!(got, vec!["up/b"]);
}

#[tokio::test]
async fn outbound_qos2_state_survives_a_node_restart() {
    // The subscriber sent PUBREC; the node restarts before PUBCOMP: the server resends
    // PUBREL and never the PUBLISH again (MQTT-4.3.3, MQTT-4.4.0-1).
    let dir = tempfile::tempdir().unwrap();
    let opts = v3("oq2-sub", false);
    let pid;
    {
        let node = node(dir.path());
        let addr = node.mqtt_addr();
        let (mut c, _) = Raw::connect_ok(addr, &opts).await;
        c.subscribe(1, &[("oq2/t", 2)]).await;
        let (mut p, _) = Raw::connect_ok(addr, &v3("oq2-pub", true)).await;
        p.publish("oq2/t", 2, false, 1, b"q2").await;
        let got = c.expect_publish().await;
        pid = got.pid;
        c.send(&ack_packet(PUBREC, pid)).await;
        assert_eq!(parse_ack(&c.expect(PUBREL).await).0, pid);
        // Give the session a moment to record the PUBREC, then stop the node.
        tokio::time::sleep(Duration::from_millis(300)).await;
        node.stop();
    }
    let node = node(dir.path());
    let (mut c, ack) = Raw::connect_ok(node.mqtt_addr(), &opts).await;
    assert!(ack.session_present);
    let rel = c.expect(PUBREL).await;
    assert_eq!(parse_ack(&rel).0, pid);
    c.send(&ack_packet(PUBCOMP, pid)).await;
    assert!(c.try_publish(QUIET).await.is_none(), "not delivered twice");
}

#[tokio::test]
async fn persistent_session_survives_two_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let opts = v5_expiry("two", false, 600);
    for round in 0..2u8 {
        let node = node(dir.path());
        let addr = node.mqtt_addr();
        if round == 0 {
            let (mut c, _) = Raw::connect_ok(addr, &opts).await;
            c.subscribe(1, &[("two/t", 1)]).await;
            c.disconnect().await;
        }
        publish_from(addr, "two-pub", "two/t", &[&[round]]).await;
        node.stop();
    }
    let node = node(dir.path());
    let (mut c, ack) = Raw::connect_ok(node.mqtt_addr(), &opts).await;
    assert!(ack.session_present);
    let got: Vec<Vec<u8>> = c
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| p.payload)
        .collect();
    assert_eq!(got, vec![vec![0], vec![1]]);
}
