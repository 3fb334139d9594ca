//! MQTT conformance: CONNECT / CONNACK, client ids, takeover, keep-alive
//! (MQTT 3.1.1 §3.1-3.2, MQTT 5.0 §3.1-3.2).

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn mqtt_3_1_0_1_publish_before_connect_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let mut raw = Raw::open(node.mqtt_addr()).await;
    raw.send(&publish_packet(
        false,
        "a/b",
        0,
        false,
        false,
        0,
        &Props::new(),
        b"x",
    ))
    .await;
    let seen = raw
        .closed_within(WAIT)
        .await
        .expect("a PUBLISH before CONNECT must close the connection");
    assert!(
        seen.iter()
            .all(|p| p.kind() != CONNACK && p.kind() != PUBACK),
        "nothing may be answered before CONNECT: {seen:?}"
    );
}

#[tokio::test]
async fn mqtt_3_1_0_1_subscribe_before_connect_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let mut raw = Raw::open(node.mqtt_addr()).await;
    raw.send(&subscribe_packet(false, 1, &[("a/#", 0)], &Props::new()))
        .await;
    let seen = raw.closed_within(WAIT).await.expect("closed");
    assert!(seen.iter().all(|p| p.kind() != SUBACK), "{seen:?}");
}

#[tokio::test]
async fn mqtt_3_1_0_2_second_connect_closes_the_connection_v3() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut raw, _) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v3("twice", true)).await;
    raw.send(&ConnectOpts::v3("twice", true).bytes()).await;
    let seen = raw.closed_within(WAIT).await.expect("closed");
    assert!(seen.iter().all(|p| p.kind() != CONNACK), "{seen:?}");
}

#[tokio::test]
async fn mqtt_3_1_0_2_second_connect_is_a_protocol_error_v5() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut raw, _) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("twice5", true)).await;
    raw.send(&ConnectOpts::v5("twice5", true).bytes()).await;
    let reason = raw.expect_closed().await;
    if let Some(r) = reason {
        assert_eq!(r, 0x82, "v5 DISCONNECT reason for a second CONNECT");
    }
}

#[tokio::test]
async fn mqtt_3_1_3_8_empty_client_id_with_clean_session_0_gets_connack_0x02() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut raw, ack) = Raw::connect(node.mqtt_addr(), &ConnectOpts::v3("", false)).await;
    assert_eq!(ack.code, 0x02, "identifier rejected");
    assert!(
        !ack.session_present,
        "MQTT-3.2.2-4: session present 0 on refusal"
    );
    // MQTT-3.1.3-9: ... and then close the network connection.
    raw.expect_closed().await;
}

#[tokio::test]
async fn mqtt_3_1_3_6_empty_client_id_with_clean_session_1_is_accepted_v3() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut raw, ack) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v3("", true)).await;
    assert!(!ack.session_present);
    assert!(raw.is_alive().await);
    // And it works: subscribe and get its own message.
    assert_eq!(raw.subscribe(1, &[("anon/t", 1)]).await, vec![1]);
    raw.publish("anon/t", 1, false, 2, b"hi").await;
    let p = raw.expect_publish().await;
    assert_eq!(p.payload, b"hi");
}

#[tokio::test]
async fn mqtt5_3_2_2_3_7_empty_client_id_gets_an_assigned_client_identifier() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut raw, ack) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("", true)).await;
    let id = ack
        .props
        .str(P_ASSIGNED_CLIENT_ID)
        .expect("CONNACK carries an Assigned Client Identifier");
    assert!(!id.is_empty());
    assert!(raw.is_alive().await);

    // Two anonymous clients get different ids.
    let (_raw2, ack2) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("", true)).await;
    let id2 = ack2.props.str(P_ASSIGNED_CLIENT_ID).unwrap();
    assert_ne!(id, id2);
}

#[tokio::test]
async fn mqtt5_3_1_3_5_empty_client_id_is_refused_0x85_when_disallowed() {
    let dir = tempfile::tempdir().unwrap();
    let node = actimq::testing::TestNode::start(dir.path(), |c| {
        c.mqtt.allow_empty_client_id = false;
    });
    let (mut raw, ack) = Raw::connect(node.mqtt_addr(), &ConnectOpts::v5("", true)).await;
    assert_eq!(ack.code, 0x85, "Client Identifier not valid");
    raw.expect_closed().await;
}

#[tokio::test]
async fn mqtt_3_1_2_2_unsupported_protocol_level_is_refused_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let mut bytes = ConnectOpts::v3("lvl", true).bytes();
    // Protocol level byte: after 0x10, remaining length (1 byte), "MQTT" (6 bytes).
    assert_eq!(bytes[8], 4);
    bytes[8] = 9;
    let mut raw = Raw::open(node.mqtt_addr()).await;
    raw.send(&bytes).await;
    let seen = raw.closed_within(WAIT).await.expect("closed");
    if let Some(p) = seen.iter().find(|p| p.kind() == CONNACK) {
        // 3.1.1: 0x01 unacceptable protocol version; a v5 server may use 0x84.
        assert!(
            p.body.get(1) == Some(&0x01) || p.body.get(1) == Some(&0x84),
            "CONNACK {p:?}"
        );
    }
}

#[tokio::test]
async fn mqtt_3_1_2_3_reserved_connect_flag_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let mut bytes = ConnectOpts::v3("resv", true).bytes();
    // Connect flags follow the protocol level.
    bytes[9] |= 0x01;
    let mut raw = Raw::open(node.mqtt_addr()).await;
    raw.send(&bytes).await;
    let seen = raw.closed_within(WAIT).await.expect("closed");
    assert!(
        seen.iter()
            .all(|p| p.kind() != CONNACK || p.body.get(1) != Some(&0)),
        "no successful CONNACK: {seen:?}"
    );
}

#[tokio::test]
async fn mqtt_3_1_4_2_takeover_closes_the_old_connection_v3() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut old, _) = Raw::connect_ok(addr, &ConnectOpts::v3("same-id", true)).await;
    let (mut new, _) = Raw::connect_ok(addr, &ConnectOpts::v3("same-id", true)).await;
    old.expect_closed().await;
    assert!(new.is_alive().await, "the new connection keeps working");
}

#[tokio::test]
async fn mqtt5_3_1_4_3_takeover_sends_disconnect_0x8e_to_the_old_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut old, _) = Raw::connect_ok(addr, &ConnectOpts::v5("same-id5", true)).await;
    let (mut new, _) = Raw::connect_ok(addr, &ConnectOpts::v5("same-id5", true)).await;
    assert_eq!(old.expect_closed().await, Some(0x8E), "Session taken over");
    assert!(new.is_alive().await);
}

#[tokio::test]
async fn mqtt_3_1_4_2_takeover_by_a_rumqttc_client_keeps_the_persistent_session() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut old, _) = Raw::connect_ok(addr, &ConnectOpts::v3("taker", false)).await;
    assert_eq!(old.subscribe(1, &[("take/#", 1)]).await, vec![1]);
    let (mut c, present) = V4::connect(addr, "taker", false).await;
    assert!(present, "takeover of a persistent session: session present");
    old.expect_closed().await;

    let (mut p, _) = V4::connect(addr, "taker-pub", true).await;
    p.publish("take/x", rumqttc::QoS::AtLeastOnce, false, b"after")
        .await;
    let got = c.next_publish().await;
    assert_eq!(&got.payload[..], b"after");
}

#[tokio::test]
async fn mqtt_3_1_2_24_keep_alive_is_enforced_at_one_and_a_half_times() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut raw, _) =
        Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v3("ka", true).keep_alive(1)).await;
    let t0 = Instant::now();
    raw.closed_within(Duration::from_millis(2800))
        .await
        .expect("keep-alive 1 s: closed within 1.5 s (+ timer granularity)");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "closed too early, after {took:?} (the allowance is 1.5 x keep-alive)"
    );
}

#[tokio::test]
async fn mqtt_3_1_2_23_pingreq_keeps_the_connection_alive() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut raw, _) = Raw::connect_ok(
        node.mqtt_addr(),
        &ConnectOpts::v5("ka-ping", true).keep_alive(1),
    )
    .await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        raw.send(&pingreq_packet()).await;
        assert!(
            raw.try_expect(PINGRESP, WAIT).await.is_some(),
            "MQTT-3.12.4-1: PINGRESP"
        );
    }
}

#[tokio::test]
async fn mqtt5_keep_alive_timeout_sends_disconnect_0x8d() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut raw, _) = Raw::connect_ok(
        node.mqtt_addr(),
        &ConnectOpts::v5("ka5", true).keep_alive(1),
    )
    .await;
    let seen = raw
        .closed_within(Duration::from_millis(3000))
        .await
        .expect("closed on keep-alive timeout");
    if let Some(d) = seen.iter().find(|p| p.kind() == DISCONNECT) {
        assert_eq!(disconnect_reason(d), 0x8D, "Keep Alive timeout");
    }
}

#[tokio::test]
async fn connect_timeout_closes_a_silent_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = actimq::testing::TestNode::start(dir.path(), |c| {
        c.mqtt.connect_timeout_secs = 1;
    });
    let mut raw = Raw::open(node.mqtt_addr()).await;
    raw.closed_within(Duration::from_secs(4))
        .await
        .expect("no CONNECT within connect_timeout_secs: closed");
}

#[tokio::test]
async fn mqtt5_3_2_2_3_connack_properties_are_present() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (_raw, ack) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("props", true)).await;
    let p = &ack.props;
    assert_eq!(
        p.u16(P_RECEIVE_MAXIMUM),
        Some(1024),
        "Receive Maximum: {p:?}"
    );
    assert_eq!(
        p.u32(P_MAXIMUM_PACKET_SIZE),
        Some(1024 * 1024),
        "Maximum Packet Size: {p:?}"
    );
    assert_eq!(
        p.u16(P_TOPIC_ALIAS_MAXIMUM),
        Some(64),
        "Topic Alias Maximum"
    );
    // The "... Available" properties: absent means 1 (MQTT 5 §3.2.2.3.5, .11, .12,
    // .13), and the codec omits values equal to the default; if present, they must be 1.
    for (id, name) in [
        (P_RETAIN_AVAILABLE, "Retain Available"),
        (P_WILDCARD_SUB_AVAILABLE, "Wildcard Subscription Available"),
        (P_SHARED_SUB_AVAILABLE, "Shared Subscription Available"),
        (P_SUB_ID_AVAILABLE, "Subscription Identifiers Available"),
    ] {
        assert_eq!(p.byte(id).unwrap_or(1), 1, "{name}: {p:?}");
    }
    // Maximum QoS: absent means 2; the server supports 2.
    assert_eq!(p.byte(P_MAXIMUM_QOS).unwrap_or(2), 2, "Maximum QoS");
    // Every property at most once (MQTT-3.2.2.3: "protocol error to include ... more
    // than once"), except User Property.
    let mut ids: Vec<u8> =
        p.0.iter()
            .map(|(id, _)| *id)
            .filter(|id| *id != P_USER_PROPERTY)
            .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate CONNACK property: {p:?}");
    assert!(!ack.session_present);
}

#[tokio::test]
async fn mqtt5_connack_properties_follow_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let node = actimq::testing::TestNode::start(dir.path(), |c| {
        c.mqtt.receive_maximum = 10;
        c.mqtt.max_packet_size = 4096;
        c.mqtt.topic_alias_maximum = 3;
        c.mqtt.retain_available = false;
    });
    let (_raw, ack) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("cfg", true)).await;
    let p = &ack.props;
    assert_eq!(p.u16(P_RECEIVE_MAXIMUM), Some(10));
    assert_eq!(p.u32(P_MAXIMUM_PACKET_SIZE), Some(4096));
    assert_eq!(p.u16(P_TOPIC_ALIAS_MAXIMUM), Some(3));
    assert_eq!(p.byte(P_RETAIN_AVAILABLE), Some(0));
}

#[tokio::test]
async fn mqtt5_3_2_2_3_2_session_expiry_is_capped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let node = actimq::testing::TestNode::start(dir.path(), |c| {
        c.mqtt.max_session_expiry_secs = 60;
    });
    let opts = ConnectOpts::v5("cap", true).props(Props::new().u32(P_SESSION_EXPIRY, 3600));
    let (_raw, ack) = Raw::connect_ok(node.mqtt_addr(), &opts).await;
    // The server uses a different value than asked: it must say so in CONNACK.
    assert_eq!(ack.props.u32(P_SESSION_EXPIRY), Some(60), "{:?}", ack.props);
}

#[tokio::test]
async fn rumqttc_v4_and_v5_clients_connect() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (c4, present) = V4::connect(node.mqtt_addr(), "r4", true).await;
    assert!(!present);
    let (c5, ack) = V5::connect(node.mqtt_addr(), "r5", true).await;
    assert!(!ack.session_present);
    let props = ack.properties.expect("v5 CONNACK properties");
    assert_eq!(props.receive_max, Some(1024));
    c4.disconnect().await;
    c5.disconnect().await;
}

#[tokio::test]
async fn mqtt_3_1_protocol_mqisdp_level_3_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let mut b = Vec::new();
    put_str(&mut b, "MQIsdp");
    b.push(3);
    b.push(0x02);
    b.extend_from_slice(&30u16.to_be_bytes());
    put_str(&mut b, "old-client");
    let mut raw = Raw::open(node.mqtt_addr()).await;
    raw.send(&packet(0x10, &b)).await;
    let ack = parse_connack(&raw.expect(CONNACK).await, false);
    assert_eq!(ack.code, 0, "MQTT 3.1 CONNECT accepted");
    assert_eq!(raw.subscribe(1, &[("old/t", 1)]).await, vec![1]);
    raw.publish("old/t", 1, false, 2, b"3.1").await;
    assert_eq!(raw.expect_publish().await.payload, b"3.1");
}
