//! MQTT conformance: PUBLISH and its QoS flows (MQTT 3.1.1 §3.3-3.7, §4.3-4.6;
//! MQTT 5.0 §3.3-3.7, §4.3-4.9).

mod common;

use std::time::Duration;

use common::*;
use rumqttc::QoS;
use tokio::io::AsyncWriteExt;

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

#[tokio::test]
async fn mqtt_4_3_qos_0_1_2_flows_through_rumqttc_v4() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = V4::connect(addr, "flows-sub", true).await;
    sub.subscribe("flows/#", QoS::ExactlyOnce).await;
    let (mut publ, _) = V4::connect(addr, "flows-pub", true).await;
    for q in 0..=2u8 {
        let topic = format!("flows/{q}");
        publ.publish(&topic, qos_of(q), false, format!("m{q}").as_bytes())
            .await;
        let got = sub.next_publish().await;
        assert_eq!(got.topic, topic);
        assert_eq!(got.payload, format!("m{q}").as_bytes());
        assert_eq!(got.qos, qos_of(q), "delivered at the publish QoS");
        assert!(!got.retain);
    }
}

#[tokio::test]
async fn mqtt5_4_3_qos_0_1_2_flows_through_rumqttc_v5() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = V5::connect(addr, "flows5-sub", true).await;
    sub.subscribe(m5::Filter::new("flows5/#", m5::QoS::ExactlyOnce))
        .await;
    let (mut publ, _) = V5::connect(addr, "flows5-pub", true).await;
    for (q, qos) in [
        m5::QoS::AtMostOnce,
        m5::QoS::AtLeastOnce,
        m5::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        let topic = format!("flows5/{q}");
        publ.publish(&topic, qos, false, None, b"v5").await;
        let got = sub.next_publish().await;
        assert_eq!(&got.topic[..], topic.as_bytes());
        assert_eq!(got.qos, qos);
        assert_eq!(&got.payload[..], b"v5");
    }
}

#[tokio::test]
async fn mqtt_4_3_3_raw_qos2_both_directions_full_flow() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("q2-sub", true)).await;
    assert_eq!(sub.subscribe(1, &[("q2/t", 2)]).await, vec![2]);
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("q2-pub", true)).await;
    publ.publish("q2/t", 2, false, 10, b"exactly").await;

    let p = sub.expect_publish().await;
    assert_eq!(
        (p.qos, p.dup, p.payload.as_slice()),
        (2, false, &b"exactly"[..])
    );
    assert_ne!(p.pid, 0, "MQTT-2.3.1-1: non-zero packet id");
    // PUBREC -> PUBREL (flags 0b0010, MQTT-3.6.1-1) -> PUBCOMP.
    sub.send(&ack_packet(PUBREC, p.pid)).await;
    let rel = sub.expect(PUBREL).await;
    assert_eq!(rel.flags(), 0x02, "MQTT-3.6.1-1: PUBREL flags");
    assert_eq!(parse_ack(&rel).0, p.pid);
    sub.send(&ack_packet(PUBCOMP, p.pid)).await;
    assert!(sub.try_publish(QUIET).await.is_none(), "delivered once");
}

#[tokio::test]
async fn mqtt_3_8_4_6_delivered_qos_is_the_minimum_of_publish_and_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut subs = Vec::new();
    for sq in 0..=2u8 {
        let (mut s, _) = Raw::connect_ok(addr, &ConnectOpts::v3(&format!("min-{sq}"), true)).await;
        assert_eq!(s.subscribe(1, &[("min/t", sq)]).await, vec![sq]);
        subs.push(s);
    }
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("min-pub", true)).await;
    for pq in 0..=2u8 {
        publ.publish("min/t", pq, false, 100 + pq as u16, &[pq])
            .await;
        for (sq, s) in subs.iter_mut().enumerate() {
            let p = s.expect_publish().await;
            assert_eq!(p.payload, vec![pq]);
            assert_eq!(
                p.qos,
                pq.min(sq as u8),
                "publish QoS {pq}, subscription QoS {sq}"
            );
            s.ack(&p).await;
        }
    }
}

async fn dup_on_resend(v5: bool) {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let id = if v5 { "dup5" } else { "dup3" };
    let opts = if v5 {
        ConnectOpts::v5(id, false).props(Props::new().u32(P_SESSION_EXPIRY, 300))
    } else {
        ConnectOpts::v3(id, false)
    };
    let (mut sub, _) = Raw::connect_ok(addr, &opts).await;
    assert_eq!(sub.subscribe(1, &[("dup/t", 1)]).await, vec![1]);
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("dup-pub", true)).await;
    publ.publish("dup/t", 1, false, 1, b"first").await;
    publ.publish("dup/t", 1, false, 2, b"second").await;
    let a = sub.expect_publish().await;
    let b = sub.expect_publish().await;
    assert!(!a.dup && !b.dup, "first delivery has DUP=0 (MQTT-3.3.1-2)");
    assert_ne!(a.pid, b.pid, "MQTT-2.3.1-2: in-flight ids are distinct");
    // Ack the second only, then vanish without DISCONNECT.
    sub.send(&ack_packet(PUBACK, b.pid)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(sub);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut sub, ack) = Raw::connect_ok(addr, &opts).await;
    assert!(ack.session_present, "persistent session resumed");
    let again = sub.expect_publish().await;
    assert_eq!(
        again.pid, a.pid,
        "MQTT-4.4.0-1: resent with the original packet id"
    );
    assert!(
        again.dup,
        "MQTT-4.4.0-1 / MQTT-3.3.1-1: DUP=1 on redelivery"
    );
    assert_eq!(again.payload, b"first");
    sub.ack(&again).await;
    assert!(
        sub.try_publish(QUIET).await.is_none(),
        "the acknowledged message is not resent"
    );
}

#[tokio::test]
async fn mqtt_4_4_0_1_unacked_qos1_is_resent_with_dup_after_reconnect_v3() {
    dup_on_resend(false).await;
}

#[tokio::test]
async fn mqtt5_4_4_0_1_unacked_qos1_is_resent_with_dup_after_reconnect_v5() {
    dup_on_resend(true).await;
}

#[tokio::test]
async fn mqtt_4_4_0_1_pubrel_is_resent_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let opts = ConnectOpts::v3("rel-sub", false);
    let (mut sub, _) = Raw::connect_ok(addr, &opts).await;
    assert_eq!(sub.subscribe(1, &[("rel/t", 2)]).await, vec![2]);
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("rel-pub", true)).await;
    publ.publish("rel/t", 2, false, 1, b"q2").await;
    let p = sub.expect_publish().await;
    sub.send(&ack_packet(PUBREC, p.pid)).await;
    assert_eq!(parse_ack(&sub.expect(PUBREL).await).0, p.pid);
    // Vanish before PUBCOMP.
    drop(sub);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (mut sub, ack) = Raw::connect_ok(addr, &opts).await;
    assert!(ack.session_present);
    // The server resends the PUBREL, not the PUBLISH.
    let rel = sub.expect(PUBREL).await;
    assert_eq!(parse_ack(&rel).0, p.pid);
    sub.send(&ack_packet(PUBCOMP, p.pid)).await;
    assert!(
        sub.try_publish(QUIET).await.is_none(),
        "MQTT-4.3.3: a PUBREC'd message is not delivered again"
    );
}

#[tokio::test]
async fn mqtt_4_6_0_per_topic_order_of_1000_qos1_messages() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = V4::connect(addr, "order-sub", true).await;
    sub.subscribe("order/t", QoS::AtLeastOnce).await;
    let (publ, _) = V4::connect(addr, "order-pub", true).await;
    let n = 1000u32;
    let sender = tokio::spawn({
        let client = publ.client.clone();
        async move {
            for i in 0..n {
                client
                    .publish("order/t", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
                    .await
                    .unwrap();
            }
        }
    });
    let got = tokio::time::timeout(Duration::from_secs(60), async {
        let mut got = Vec::with_capacity(n as usize);
        while got.len() < n as usize {
            let p = sub.next_publish().await;
            got.push(u32::from_be_bytes(p.payload[..4].try_into().unwrap()));
        }
        got
    })
    .await
    .expect("1000 messages within 60 s");
    sender.await.unwrap();
    let want: Vec<u32> = (0..n).collect();
    assert_eq!(got, want, "MQTT-4.6.0-5: per-topic order kept");
    drop(publ);
}

#[tokio::test]
async fn mqtt_4_3_3_inbound_qos2_resent_with_dup_before_pubrel_is_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = V4::connect(addr, "eo-sub", true).await;
    sub.subscribe("eo/t", QoS::ExactlyOnce).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("eo-pub", true)).await;
    let first = publish_packet(false, "eo/t", 2, false, false, 42, &Props::new(), b"once");
    let dup = publish_packet(false, "eo/t", 2, false, true, 42, &Props::new(), b"once");
    publ.send(&first).await;
    assert_eq!(parse_ack(&publ.expect(PUBREC).await).0, 42);
    publ.send(&dup).await;
    assert_eq!(
        parse_ack(&publ.expect(PUBREC).await).0,
        42,
        "a resent PUBLISH is answered with PUBREC again"
    );
    // Even without DUP, the same id before PUBREL is the same message (MQTT-4.3.3-9).
    publ.send(&first).await;
    assert_eq!(parse_ack(&publ.expect(PUBREC).await).0, 42);
    publ.send(&ack_packet(PUBREL, 42)).await;
    assert_eq!(parse_ack(&publ.expect(PUBCOMP).await).0, 42);

    let got = sub.next_publish().await;
    assert_eq!(&got.payload[..], b"once");
    assert!(
        sub.try_publish(QUIET).await.is_none(),
        "MQTT-4.3.3: exactly one copy delivered"
    );

    // After PUBCOMP the id is free: the same id is a new message.
    publ.publish("eo/t", 2, false, 42, b"twice").await;
    assert_eq!(&sub.next_publish().await.payload[..], b"twice");
}

#[tokio::test]
async fn mqtt_4_9_outbound_window_respects_max_inflight() {
    let dir = tempfile::tempdir().unwrap();
    let node = actimq::testing::TestNode::start(dir.path(), |c| c.mqtt.max_inflight = 2);
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("win-sub", true)).await;
    sub.subscribe(1, &[("win/t", 1)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("win-pub", true)).await;
    for i in 0..5u16 {
        publ.publish("win/t", 1, false, i + 1, &[i as u8]).await;
    }
    let a = sub.expect_publish().await;
    let b = sub.expect_publish().await;
    assert!(
        sub.try_publish(QUIET).await.is_none(),
        "no more than max_inflight unacknowledged"
    );
    sub.ack(&a).await;
    sub.ack(&b).await;
    let rest = sub.drain_publishes(QUIET).await;
    let mut all: Vec<u8> = vec![a.payload[0], b.payload[0]];
    all.extend(rest.iter().map(|p| p.payload[0]));
    assert_eq!(all, vec![0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn mqtt5_3_3_4_9_client_receive_maximum_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let opts = ConnectOpts::v5("rm-sub", true).props(Props::new().u16(P_RECEIVE_MAXIMUM, 3));
    let (mut sub, _) = Raw::connect_ok(addr, &opts).await;
    sub.subscribe(1, &[("rm/t", 2)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rm-pub", true)).await;
    for i in 0..6u16 {
        publ.publish("rm/t", 1, false, i + 1, &[i as u8]).await;
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(sub.expect_publish().await);
    }
    assert!(
        sub.try_publish(QUIET).await.is_none(),
        "MQTT-3.3.4-9: at most Receive Maximum unacknowledged QoS 1/2 publishes"
    );
    for p in &first {
        sub.ack(p).await;
    }
    let rest = sub.drain_publishes(QUIET).await;
    assert_eq!(first.len() + rest.len(), 6);
}

#[tokio::test]
async fn mqtt_3_3_5_qos1_publish_without_subscribers_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut publ, _) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("lonely", true)).await;
    publ.send(&publish_packet(
        true,
        "nobody/here",
        1,
        false,
        false,
        5,
        &Props::new(),
        b"x",
    ))
    .await;
    let (pid, reason) = parse_ack(&publ.expect(PUBACK).await);
    assert_eq!(pid, 5);
    // v5: Success or 0x10 No matching subscribers.
    assert!(reason == 0 || reason == 0x10, "PUBACK reason {reason:#x}");
}

#[tokio::test]
async fn a_large_payload_is_delivered_intact() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = V4::connect(addr, "big-sub", true).await;
    sub.subscribe("big/t", QoS::AtLeastOnce).await;
    let (mut publ, _) = V4::connect(addr, "big-pub", true).await;
    let payload: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    publ.publish("big/t", QoS::AtLeastOnce, false, &payload)
        .await;
    let got = sub.next_publish().await;
    assert_eq!(got.payload.len(), payload.len());
    assert!(got.payload[..] == payload[..]);
}

#[tokio::test]
async fn mqtt_3_3_4_publisher_receives_its_own_message_without_no_local() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut c, _) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v3("self", true)).await;
    c.subscribe(1, &[("self/t", 1)]).await;
    c.publish("self/t", 1, false, 2, b"echo").await;
    let p = c.expect_publish().await;
    assert_eq!(p.payload, b"echo");
}

async fn publish_then_disconnect(v5: bool) {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("pd-sub", true)).await;
    sub.subscribe(1, &[("pd/#", 1)]).await;
    let opts = if v5 {
        ConnectOpts::v5("pd-pub", true)
    } else {
        ConnectOpts::v3("pd-pub", true)
    };
    let (mut publ, _) = Raw::connect_ok(addr, &opts).await;
    // Like `mosquitto_pub -q 0`: PUBLISHes and DISCONNECT in one write, no waiting.
    let mut bytes = Vec::new();
    for i in 0..5u8 {
        bytes.extend(publish_packet(
            v5,
            "pd/t",
            0,
            false,
            false,
            0,
            &Props::new(),
            &[i],
        ));
    }
    bytes.extend(publish_packet(
        v5,
        "pd/r",
        0,
        true,
        false,
        0,
        &Props::new(),
        b"kept",
    ));
    bytes.extend(disconnect_packet(if v5 { Some(0) } else { None }));
    publ.send(&bytes).await;
    let _ = publ.closed_within(WAIT).await;
    let got: Vec<Vec<u8>> = sub
        .drain_publishes(Duration::from_millis(1500))
        .await
        .into_iter()
        .map(|p| p.payload)
        .collect();
    let want: Vec<Vec<u8>> = vec![
        vec![0],
        vec![1],
        vec![2],
        vec![3],
        vec![4],
        b"kept".to_vec(),
    ];
    assert_eq!(
        got, want,
        "MQTT-4.6.0: publishes before DISCONNECT are processed, in order"
    );
    let (mut late, _) = Raw::connect_ok(addr, &ConnectOpts::v3("pd-late", true)).await;
    late.subscribe(1, &[("pd/r", 1)]).await;
    assert_eq!(
        late.expect_publish().await.payload,
        b"kept",
        "the retained one is stored"
    );
}

#[tokio::test]
async fn mqtt_3_14_qos0_publishes_followed_by_disconnect_are_not_lost_v3() {
    publish_then_disconnect(false).await;
}

#[tokio::test]
async fn mqtt5_3_14_qos0_publishes_followed_by_disconnect_are_not_lost_v5() {
    publish_then_disconnect(true).await;
}

#[tokio::test]
async fn mqtt_3_14_qos0_publishes_before_a_dropped_connection_are_delivered_and_the_will_too() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("eof-sub", true)).await;
    sub.subscribe(1, &[("eof/#", 1)]).await;
    let opts = ConnectOpts::v3("eof-pub", true).will(WillOpts {
        topic: "eof/will".into(),
        payload: b"will".to_vec(),
        qos: 0,
        retain: false,
        props: Props::new(),
    });
    let (mut publ, _) = Raw::connect_ok(addr, &opts).await;
    let mut bytes = Vec::new();
    for i in 0..3u8 {
        bytes.extend(publish_packet(
            false,
            "eof/t",
            0,
            false,
            false,
            0,
            &Props::new(),
            &[i],
        ));
    }
    publ.send(&bytes).await;
    publ.stream.shutdown().await.unwrap();
    drop(publ);
    let mut got: Vec<Vec<u8>> = sub
        .drain_publishes(Duration::from_millis(1500))
        .await
        .into_iter()
        .map(|p| p.payload)
        .collect();
    got.sort();
    assert_eq!(got, vec![vec![0], vec![1], vec![2], b"will".to_vec()]);
}

#[tokio::test]
async fn mqtt_3_3_5_1_overlapping_subscriptions_deliver_at_the_maximum_qos() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("ov-sub", true)).await;
    sub.subscribe(1, &[("ov/#", 0), ("ov/t", 2)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("ov-pub", true)).await;
    publ.publish("ov/t", 2, false, 1, b"x").await;
    let got = sub.drain_publishes(QUIET).await;
    assert!(!got.is_empty());
    assert!(
        got.iter().any(|p| p.qos == 2),
        "MQTT-3.3.5-1: the maximum QoS of the matching subscriptions: {got:?}"
    );
}

#[tokio::test]
async fn mqtt_4_4_0_1_unacked_qos2_publish_is_resent_with_dup_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let opts = ConnectOpts::v3("dup2-sub", false);
    let (mut sub, _) = Raw::connect_ok(addr, &opts).await;
    sub.subscribe(1, &[("dup2/t", 2)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("dup2-pub", true)).await;
    publ.publish("dup2/t", 2, false, 1, b"q2").await;
    let p = sub.expect_publish().await;
    drop(sub);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut sub, _) = Raw::connect_ok(addr, &opts).await;
    let again = sub.expect_publish().await;
    assert_eq!((again.pid, again.dup, again.qos), (p.pid, true, 2));
    sub.ack(&again).await;
    assert!(sub.try_publish(QUIET).await.is_none());
}

#[tokio::test]
async fn mqtt5_4_3_3_pubrel_for_an_unknown_packet_id_gets_pubcomp_0x92() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut c, _) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("rel-unknown", true)).await;
    c.send(&ack_packet(PUBREL, 999)).await;
    let (pid, reason) = parse_ack(&c.expect(PUBCOMP).await);
    assert_eq!((pid, reason), (999, 0x92), "Packet Identifier not found");
    assert!(c.is_alive().await);
}

#[tokio::test]
async fn mqtt5_3_1_2_29_no_reason_string_when_problem_information_is_not_requested() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let opts = ConnectOpts::v5("no-problem", true).props(Props::new().byte(0x17, 0));
    let (mut c, _) = Raw::connect_ok(node.mqtt_addr(), &opts).await;
    c.send(&subscribe_packet(true, 1, &[("a/#/b", 1)], &Props::new()))
        .await;
    let suback = c.expect(SUBACK).await;
    let mut cur = Cur::new(&suback.body);
    cur.u16();
    let props = cur.props();
    assert!(
        props.get(P_REASON_STRING).is_none() && props.get(P_USER_PROPERTY).is_none(),
        "MQTT-3.1.2-29: {props:?}"
    );
}

#[tokio::test]
async fn mqtt5_3_2_2_3_14_server_keep_alive_is_imposed() {
    let dir = tempfile::tempdir().unwrap();
    let node = actimq::testing::TestNode::start(dir.path(), |c| c.mqtt.max_keepalive_secs = 1);
    let opts = ConnectOpts::v5("ska", true).keep_alive(0);
    let (mut c, ack) = Raw::connect_ok(node.mqtt_addr(), &opts).await;
    assert_eq!(
        ack.props.u16(P_SERVER_KEEP_ALIVE),
        Some(1),
        "Server Keep Alive"
    );
    // MQTT-3.2.2-21: the client must use it, and the server enforces it.
    c.closed_within(Duration::from_secs(4))
        .await
        .expect("the imposed keep-alive is enforced");
}
