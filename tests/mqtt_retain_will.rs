//! MQTT conformance: retained messages and wills (MQTT 3.1.1 §3.1.2.5-3.1.2.7,
//! §3.3.1.3, §3.14; MQTT 5.0 §3.1.3.2, §3.3.1.3, §3.8.3.1, §3.14).

mod common;

use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------------
// Retained messages
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn mqtt_3_3_1_6_retained_message_is_sent_on_subscribe_with_retain_1() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("ret-pub", true)).await;
    publ.publish("ret/a", 1, true, 1, b"v1").await;

    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("ret-sub", true)).await;
    sub.subscribe(1, &[("ret/a", 1)]).await;
    let p = sub.expect_publish().await;
    assert_eq!(p.topic, "ret/a");
    assert_eq!(p.payload, b"v1");
    assert!(
        p.retain,
        "MQTT-3.3.1-8: RETAIN=1 when sent for a new subscription"
    );
    sub.ack(&p).await;

    // MQTT-3.3.1-9: a live delivery to an existing subscription has RETAIN=0 (v3).
    publ.publish("ret/a", 1, true, 2, b"v2").await;
    let p = sub.expect_publish().await;
    assert_eq!(p.payload, b"v2");
    assert!(!p.retain, "MQTT-3.3.1-9: RETAIN=0 on normal delivery");
}

#[tokio::test]
async fn mqtt_3_3_1_7_retained_message_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("rep-pub", true)).await;
    publ.publish("rep/a", 1, true, 1, b"old").await;
    publ.publish("rep/a", 2, true, 2, b"new").await;
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("rep-sub", true)).await;
    sub.subscribe(1, &[("rep/#", 2)]).await;
    let got = sub.drain_publishes(QUIET).await;
    assert_eq!(got.len(), 1, "one retained message per topic: {got:?}");
    assert_eq!(got[0].payload, b"new");
    assert_eq!(got[0].qos, 2, "the retained message keeps its QoS");
}

#[tokio::test]
async fn mqtt_3_3_1_10_empty_retained_payload_deletes_the_retained_message() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("del-pub", true)).await;
    publ.publish("del/a", 1, true, 1, b"here").await;
    publ.publish("del/b", 1, true, 2, b"stays").await;
    publ.publish("del/a", 1, true, 3, b"").await;
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("del-sub", true)).await;
    sub.subscribe(1, &[("del/+", 1)]).await;
    let got = sub.drain_publishes(QUIET).await;
    let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(topics, vec!["del/b"], "MQTT-3.3.1-10/11: del/a was deleted");
}

#[tokio::test]
async fn mqtt_3_3_1_retained_messages_match_wildcard_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("rw-pub", true)).await;
    for (i, t) in ["rw/a", "rw/b/c", "rw", "other/a", "$SYS/rw"]
        .iter()
        .enumerate()
    {
        publ.publish(t, 1, true, i as u16 + 1, t.as_bytes()).await;
    }
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("rw-sub", true)).await;
    sub.subscribe(1, &[("rw/#", 1)]).await;
    let mut topics: Vec<String> = sub
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| {
            assert!(p.retain);
            p.topic
        })
        .collect();
    topics.sort();
    assert_eq!(topics, vec!["rw", "rw/a", "rw/b/c"]);

    let (mut all, _) = Raw::connect_ok(addr, &ConnectOpts::v3("rw-all", true)).await;
    all.subscribe(1, &[("#", 1)]).await;
    let got = all.drain_publishes(QUIET).await;
    assert!(
        got.iter().all(|p| !p.topic.starts_with('$')),
        "MQTT-4.7.2-1: `#` gets no retained $ topics: {got:?}"
    );
    assert_eq!(got.len(), 4);
}

#[tokio::test]
async fn mqtt_3_3_1_retained_delivery_qos_is_the_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("rq-pub", true)).await;
    publ.publish("rq/t", 2, true, 1, b"q2").await;
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("rq-sub", true)).await;
    sub.subscribe(1, &[("rq/t", 1)]).await;
    let p = sub.expect_publish().await;
    assert_eq!(p.qos, 1);
    assert!(p.retain);
}

#[tokio::test]
async fn mqtt5_3_8_3_1_retain_handling_2_sends_no_retained_messages() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rh-pub", true)).await;
    publ.publish("rh/t", 1, true, 1, b"kept").await;
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rh-sub", true)).await;
    // QoS 1, Retain Handling 2.
    assert_eq!(sub.subscribe(1, &[("rh/t", 1 | (2 << 4))]).await, vec![1]);
    assert!(
        sub.try_publish(QUIET).await.is_none(),
        "Retain Handling 2: no retained messages"
    );
    // Live messages still flow.
    publ.publish("rh/t", 1, false, 2, b"live").await;
    assert_eq!(sub.expect_publish().await.payload, b"live");
}

#[tokio::test]
async fn mqtt5_3_8_3_1_retain_handling_1_sends_only_for_a_new_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rh1-pub", true)).await;
    publ.publish("rh1/t", 1, true, 1, b"kept").await;
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rh1-sub", true)).await;
    sub.subscribe(1, &[("rh1/t", 1 | (1 << 4))]).await;
    let p = sub.expect_publish().await;
    assert!(p.retain);
    sub.ack(&p).await;
    // Same filter again: it exists, so no retained message.
    sub.subscribe(2, &[("rh1/t", 1 | (1 << 4))]).await;
    assert!(sub.try_publish(QUIET).await.is_none());
    // Retain Handling 0 sends it on every SUBSCRIBE (MQTT-3.3.1-9 v5).
    sub.subscribe(3, &[("rh1/t", 1)]).await;
    assert_eq!(sub.expect_publish().await.payload, b"kept");
}

#[tokio::test]
async fn mqtt5_3_8_3_1_retain_as_published() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut rap, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rap-1", true)).await;
    rap.subscribe(1, &[("rap/t", 1 | 0x08)]).await;
    let (mut plain, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rap-0", true)).await;
    plain.subscribe(1, &[("rap/t", 1)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rap-pub", true)).await;
    publ.publish("rap/t", 1, true, 1, b"r").await;
    publ.publish("rap/t", 1, false, 2, b"n").await;

    let a = rap.drain_publishes(QUIET).await;
    let flags: Vec<(Vec<u8>, bool)> = a.iter().map(|p| (p.payload.clone(), p.retain)).collect();
    assert_eq!(
        flags,
        vec![(b"r".to_vec(), true), (b"n".to_vec(), false)],
        "MQTT-3.3.1-13: Retain As Published keeps the RETAIN flag"
    );
    let b = plain.drain_publishes(QUIET).await;
    let flags: Vec<bool> = b.iter().map(|p| p.retain).collect();
    assert_eq!(flags, vec![false, false], "MQTT-3.3.1-12: RETAIN cleared");
}

#[tokio::test]
async fn mqtt5_3_8_3_3_no_local_does_not_echo_own_messages() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut me, _) = Raw::connect_ok(addr, &ConnectOpts::v5("nl-me", true)).await;
    me.subscribe(1, &[("nl/t", 1 | 0x04)]).await;
    let (mut other, _) = Raw::connect_ok(addr, &ConnectOpts::v5("nl-other", true)).await;
    other.subscribe(1, &[("nl/t", 1)]).await;
    me.publish("nl/t", 1, false, 2, b"mine").await;
    assert_eq!(other.expect_publish().await.payload, b"mine");
    assert!(
        me.try_publish(QUIET).await.is_none(),
        "MQTT-3.8.3-3: No Local: not sent back to the publisher"
    );
    // Others' messages still arrive.
    other.publish("nl/t", 1, false, 3, b"theirs").await;
    assert_eq!(me.expect_publish().await.payload, b"theirs");
}

#[tokio::test]
async fn mqtt5_3_8_3_4_no_local_on_a_shared_subscription_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut c, _) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("nl-share", true)).await;
    c.send(&subscribe_packet(
        true,
        1,
        &[("$share/g/t", 1 | 0x04)],
        &Props::new(),
    ))
    .await;
    let reason = c.expect_closed().await;
    if let Some(r) = reason {
        assert_eq!(r, 0x82);
    }
}

#[tokio::test]
async fn retained_messages_survive_a_node_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let node = node(dir.path());
        let (mut publ, _) =
            Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v3("rr-pub", true)).await;
        publ.publish("rr/a", 1, true, 1, b"durable-a").await;
        publ.publish("rr/b", 2, true, 2, b"durable-b").await;
        publ.publish("rr/c", 1, true, 3, b"gone").await;
        publ.publish("rr/c", 1, true, 4, b"").await;
        publ.disconnect().await;
        node.stop();
    }
    let node = node(dir.path());
    let (mut sub, _) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v3("rr-sub", true)).await;
    sub.subscribe(1, &[("rr/#", 2)]).await;
    let mut got: Vec<(String, Vec<u8>, u8)> = sub
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| (p.topic, p.payload, p.qos))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("rr/a".into(), b"durable-a".to_vec(), 1),
            ("rr/b".into(), b"durable-b".to_vec(), 2)
        ]
    );
}

#[tokio::test]
async fn mqtt_3_3_1_retained_through_rumqttc_v4() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut publ, _) = V4::connect(addr, "rr4-pub", true).await;
    publ.publish("rr4/t", rumqttc::QoS::AtLeastOnce, true, b"r4")
        .await;
    let (mut sub, _) = V4::connect(addr, "rr4-sub", true).await;
    sub.subscribe("rr4/t", rumqttc::QoS::AtLeastOnce).await;
    let p = sub.next_publish().await;
    assert!(p.retain);
    assert_eq!(&p.payload[..], b"r4");
}

// ---------------------------------------------------------------------------------
// Wills
// ---------------------------------------------------------------------------------

fn will(topic: &str, payload: &[u8], qos: u8, retain: bool) -> WillOpts {
    WillOpts {
        topic: topic.into(),
        payload: payload.to_vec(),
        qos,
        retain,
        props: Props::new(),
    }
}

async fn watcher(addr: std::net::SocketAddr, id: &str, filter: &str, v5: bool) -> Raw {
    let opts = if v5 {
        ConnectOpts::v5(id, true)
    } else {
        ConnectOpts::v3(id, true)
    };
    let (mut w, _) = Raw::connect_ok(addr, &opts).await;
    w.subscribe(1, &[(filter, 1)]).await;
    w
}

#[tokio::test]
async fn mqtt_3_1_2_8_will_is_published_on_abnormal_close() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut w = watcher(addr, "will-watch", "will/#", false).await;
    let (dying, _) = Raw::connect_ok(
        addr,
        &ConnectOpts::v3("will-dying", true).will(will("will/dying", b"gone", 1, false)),
    )
    .await;
    drop(dying);
    let p = w.expect_publish().await;
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        ("will/dying", &b"gone"[..])
    );
    assert_eq!(p.qos, 1);
    assert!(!p.retain);
}

#[tokio::test]
async fn mqtt_3_14_4_3_no_will_after_a_normal_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut w = watcher(addr, "nowill-watch", "nowill/#", false).await;
    let (polite, _) = Raw::connect_ok(
        addr,
        &ConnectOpts::v3("nowill", true).will(will("nowill/x", b"gone", 1, false)),
    )
    .await;
    polite.disconnect().await;
    assert!(
        w.try_publish(Duration::from_millis(1000)).await.is_none(),
        "MQTT-3.14.4-3: the will is discarded on DISCONNECT"
    );

    // Same for v5 DISCONNECT 0x00.
    let (polite, _) = Raw::connect_ok(
        addr,
        &ConnectOpts::v5("nowill5", true).will(will("nowill/y", b"gone", 1, false)),
    )
    .await;
    polite.disconnect().await;
    assert!(w.try_publish(Duration::from_millis(1000)).await.is_none());
}

#[tokio::test]
async fn mqtt5_3_14_2_1_disconnect_0x04_publishes_the_will() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut w = watcher(addr, "w04-watch", "w04/#", true).await;
    let (mut c, _) = Raw::connect_ok(
        addr,
        &ConnectOpts::v5("w04", true).will(will("w04/x", b"with-will", 0, false)),
    )
    .await;
    c.send(&disconnect_packet(Some(0x04))).await;
    let _ = c.closed_within(WAIT).await;
    let p = w.expect_publish().await;
    assert_eq!(p.payload, b"with-will");
}

#[tokio::test]
async fn mqtt_3_1_2_17_will_retain_flag_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (dying, _) = Raw::connect_ok(
        addr,
        &ConnectOpts::v3("wr", true).will(will("wr/status", b"offline", 1, true)),
    )
    .await;
    drop(dying);
    // A subscriber arriving later gets it as a retained message.
    let deadline = Instant::now() + WAIT;
    loop {
        let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("wr-late", true)).await;
        sub.subscribe(1, &[("wr/status", 1)]).await;
        if let Some(p) = sub.try_publish(Duration::from_millis(500)).await {
            assert_eq!(p.payload, b"offline");
            assert!(p.retain, "MQTT-3.1.2-17: the will is retained");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the retained will never appeared"
        );
        sub.disconnect().await;
    }
}

#[tokio::test]
async fn mqtt_3_1_2_8_will_is_published_on_a_protocol_violation() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut w = watcher(addr, "wpv-watch", "wpv/#", false).await;
    let (mut bad, _) = Raw::connect_ok(
        addr,
        &ConnectOpts::v3("wpv", true).will(will("wpv/x", b"violated", 0, false)),
    )
    .await;
    // A second CONNECT is a protocol violation.
    bad.send(&ConnectOpts::v3("wpv", true).bytes()).await;
    bad.expect_closed().await;
    assert_eq!(w.expect_publish().await.payload, b"violated");
}

#[tokio::test]
async fn mqtt_3_1_2_8_will_is_published_on_keep_alive_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut w = watcher(addr, "wka-watch", "wka/#", false).await;
    let (_silent, _) = Raw::connect_ok(
        addr,
        &ConnectOpts::v3("wka", true)
            .keep_alive(1)
            .will(will("wka/x", b"timed-out", 0, false)),
    )
    .await;
    let p = w.expect_publish().await;
    assert_eq!(p.payload, b"timed-out");
}

#[tokio::test]
async fn mqtt5_3_1_3_2_2_will_delay_interval_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut w = watcher(addr, "wd-watch", "wd/#", true).await;
    let mut wl = will("wd/x", b"late", 1, false);
    wl.props = Props::new().u32(P_WILL_DELAY, 2);
    // The session outlives the delay, so the delay decides.
    let opts = ConnectOpts::v5("wd", true)
        .props(Props::new().u32(P_SESSION_EXPIRY, 30))
        .will(wl);
    let (dying, _) = Raw::connect_ok(addr, &opts).await;
    let t0 = Instant::now();
    drop(dying);
    assert!(
        w.try_publish(Duration::from_millis(1500)).await.is_none(),
        "the will came before its 2 s delay"
    );
    let p = w
        .try_publish(Duration::from_millis(3500))
        .await
        .expect("the will comes after its delay");
    assert_eq!(p.payload, b"late");
    assert!(
        t0.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn mqtt5_3_1_3_2_2_will_is_published_when_the_session_ends_before_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut w = watcher(addr, "wse-watch", "wse/#", true).await;
    let mut wl = will("wse/x", b"session-ended", 0, false);
    wl.props = Props::new().u32(P_WILL_DELAY, 30);
    // Session Expiry 0: the session ends at once, so the will goes at once.
    let (dying, _) = Raw::connect_ok(addr, &ConnectOpts::v5("wse", true).will(wl)).await;
    drop(dying);
    let p = w
        .try_publish(Duration::from_secs(3))
        .await
        .expect("MQTT 5 §3.1.3.2.2: published when the session ends, whichever first");
    assert_eq!(p.payload, b"session-ended");
}

#[tokio::test]
async fn mqtt5_3_1_3_9_will_is_cancelled_by_a_reconnect_within_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut w = watcher(addr, "wc-watch", "wc/#", true).await;
    let mut wl = will("wc/x", b"never", 1, false);
    wl.props = Props::new().u32(P_WILL_DELAY, 2);
    let opts = ConnectOpts::v5("wc", false)
        .props(Props::new().u32(P_SESSION_EXPIRY, 30))
        .will(wl);
    let (dying, _) = Raw::connect_ok(addr, &opts).await;
    drop(dying);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let back = ConnectOpts::v5("wc", false).props(Props::new().u32(P_SESSION_EXPIRY, 30));
    let (mut again, ack) = Raw::connect_ok(addr, &back).await;
    assert!(ack.session_present);
    assert!(
        w.try_publish(Duration::from_millis(3000)).await.is_none(),
        "MQTT-3.1.3-9: reconnecting within the delay cancels the will"
    );
    assert!(again.is_alive().await);
}

#[tokio::test]
async fn mqtt5_3_1_3_2_will_properties_are_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut w = watcher(addr, "wp-watch", "wp/#", true).await;
    let mut wl = will("wp/x", b"{}", 1, false);
    wl.props = Props::new()
        .byte(P_PAYLOAD_FORMAT, 1)
        .str(P_CONTENT_TYPE, "application/json")
        .str(P_RESPONSE_TOPIC, "wp/reply")
        .bin(P_CORRELATION_DATA, b"\x01\x02")
        .pair(P_USER_PROPERTY, "k", "v");
    let (dying, _) = Raw::connect_ok(addr, &ConnectOpts::v5("wp", true).will(wl)).await;
    drop(dying);
    let p = w.expect_publish().await;
    assert_eq!(p.props.byte(P_PAYLOAD_FORMAT), Some(1));
    assert_eq!(p.props.str(P_CONTENT_TYPE), Some("application/json"));
    assert_eq!(p.props.str(P_RESPONSE_TOPIC), Some("wp/reply"));
    assert_eq!(p.props.bin(P_CORRELATION_DATA), Some(&b"\x01\x02"[..]));
    assert_eq!(p.props.pairs(), vec![("k".to_string(), "v".to_string())]);
}

#[tokio::test]
async fn mqtt_3_1_2_8_will_through_rumqttc_v4() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut w, _) = V4::connect(addr, "w4-watch", true).await;
    w.subscribe("w4/#", rumqttc::QoS::AtLeastOnce).await;
    let mut opts = v4_options(addr, "w4-dying", true);
    opts.set_last_will(rumqttc::LastWill::new(
        "w4/dying",
        "bye",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (dying, _) = V4::connect_with(opts).await;
    // Abort the event loop: the socket is dropped without DISCONNECT.
    drop(dying);
    let p = w.next_publish().await;
    assert_eq!(&p.payload[..], b"bye");
}
