//! MQTT 5.0 conformance: PUBLISH properties (§3.3.2.3), topic aliases (§3.3.2.3.4),
//! subscription identifiers (§3.8.2.1.2), message expiry (§3.3.2.3.3) and the
//! client's Maximum Packet Size (§3.1.2.11.4).

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn mqtt5_3_3_2_3_application_properties_are_forwarded_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v5("fw-sub", true)).await;
    sub.subscribe(1, &[("fw/t", 1)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("fw-pub", true)).await;
    let props = Props::new()
        .byte(P_PAYLOAD_FORMAT, 1)
        .str(P_CONTENT_TYPE, "text/plain; charset=utf-8")
        .str(P_RESPONSE_TOPIC, "fw/reply/42")
        .bin(P_CORRELATION_DATA, &[0, 1, 2, 0xff])
        .pair(P_USER_PROPERTY, "b", "2")
        .pair(P_USER_PROPERTY, "a", "1")
        .pair(P_USER_PROPERTY, "a", "1 again");
    publ.publish_props("fw/t", 1, false, 1, &props, "héllo".as_bytes())
        .await;
    let p = sub.expect_publish().await;
    assert_eq!(p.payload, "héllo".as_bytes());
    assert_eq!(p.props.byte(P_PAYLOAD_FORMAT), Some(1), "MQTT-3.3.2-4");
    assert_eq!(
        p.props.str(P_CONTENT_TYPE),
        Some("text/plain; charset=utf-8"),
        "MQTT-3.3.2-20"
    );
    assert_eq!(
        p.props.str(P_RESPONSE_TOPIC),
        Some("fw/reply/42"),
        "MQTT-3.3.2-15"
    );
    assert_eq!(
        p.props.bin(P_CORRELATION_DATA),
        Some(&[0u8, 1, 2, 0xff][..]),
        "MQTT-3.3.2-16"
    );
    assert_eq!(
        p.props.pairs(),
        vec![
            ("b".to_string(), "2".to_string()),
            ("a".to_string(), "1".to_string()),
            ("a".to_string(), "1 again".to_string()),
        ],
        "MQTT-3.3.2-17/18: user properties in order, duplicates kept"
    );
    assert!(p.props.get(P_TOPIC_ALIAS).is_none());
}

#[tokio::test]
async fn mqtt5_properties_through_rumqttc_v5() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = V5::connect(addr, "fw5-sub", true).await;
    sub.subscribe(m5::Filter::new("fw5/t", m5::QoS::AtLeastOnce))
        .await;
    let (mut publ, _) = V5::connect(addr, "fw5-pub", true).await;
    let props = m5::PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("fw5/reply".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr")),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    publ.publish("fw5/t", m5::QoS::AtLeastOnce, false, Some(props), b"{}")
        .await;
    let p = sub.next_publish().await;
    let got = p.properties.expect("properties forwarded");
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.response_topic.as_deref(), Some("fw5/reply"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"corr"[..]));
    assert_eq!(got.user_properties, vec![("k".into(), "v".into())]);
}

#[tokio::test]
async fn mqtt5_3_3_2_3_4_inbound_topic_alias() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v5("ta-sub", true)).await;
    sub.subscribe(1, &[("ta/#", 1)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("ta-pub", true)).await;
    // Set alias 1 -> ta/x, use it with an empty topic, then remap it.
    publ.publish_props(
        "ta/x",
        1,
        false,
        1,
        &Props::new().u16(P_TOPIC_ALIAS, 1),
        b"set",
    )
    .await;
    publ.publish_props("", 1, false, 2, &Props::new().u16(P_TOPIC_ALIAS, 1), b"use")
        .await;
    publ.publish_props(
        "ta/y",
        1,
        false,
        3,
        &Props::new().u16(P_TOPIC_ALIAS, 1),
        b"remap",
    )
    .await;
    publ.publish_props(
        "",
        1,
        false,
        4,
        &Props::new().u16(P_TOPIC_ALIAS, 1),
        b"use2",
    )
    .await;
    let got: Vec<(String, Vec<u8>)> = sub
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| {
            assert!(
                p.props.get(P_TOPIC_ALIAS).is_none(),
                "aliases are per connection"
            );
            (p.topic, p.payload)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("ta/x".into(), b"set".to_vec()),
            ("ta/x".into(), b"use".to_vec()),
            ("ta/y".into(), b"remap".to_vec()),
            ("ta/y".into(), b"use2".to_vec()),
        ]
    );
}

async fn alias_error(alias: u16, topic: &str) -> Option<u8> {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut c, ack) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("ta-bad", true)).await;
    assert_eq!(ack.props.u16(P_TOPIC_ALIAS_MAXIMUM), Some(64));
    c.send(&publish_packet(
        true,
        topic,
        1,
        false,
        false,
        1,
        &Props::new().u16(P_TOPIC_ALIAS, alias),
        b"x",
    ))
    .await;
    c.expect_closed().await
}

#[tokio::test]
async fn mqtt5_3_3_2_8_topic_alias_0_is_invalid() {
    // MQTT-3.3.2-8 forbids 0 without naming a code: Topic Alias invalid, Protocol
    // Error, or (the codec's view of a zero value) Malformed Packet.
    let r = alias_error(0, "ta/z").await;
    assert!(
        matches!(r, Some(0x94) | Some(0x82) | Some(0x81)),
        "DISCONNECT reason {r:02x?}"
    );
}

#[tokio::test]
async fn mqtt5_3_3_2_9_topic_alias_above_the_maximum_is_invalid() {
    assert_eq!(
        alias_error(65, "ta/z").await,
        Some(0x94),
        "Topic Alias invalid"
    );
}

#[tokio::test]
async fn mqtt5_3_3_4_unknown_topic_alias_is_a_protocol_error() {
    assert_eq!(alias_error(5, "").await, Some(0x82), "Protocol Error");
}

#[tokio::test]
async fn mqtt5_3_8_2_1_2_subscription_identifiers_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v5("sid-sub", true)).await;
    sub.subscribe_props(
        1,
        &[("sid/#", 1)],
        &Props::new().varint(P_SUBSCRIPTION_ID, 7),
    )
    .await;
    sub.subscribe_props(
        2,
        &[("sid/deep/+", 1)],
        &Props::new().varint(P_SUBSCRIPTION_ID, 300_000),
    )
    .await;
    sub.subscribe(3, &[("other/t", 1)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("sid-pub", true)).await;
    publ.publish("sid/a", 1, false, 1, b"a").await;
    let p = sub.expect_publish().await;
    assert_eq!(p.props.varints(P_SUBSCRIPTION_ID), vec![7], "MQTT-3.3.4-3");
    sub.ack(&p).await;

    publ.publish("other/t", 1, false, 2, b"none").await;
    let p = sub.expect_publish().await;
    assert!(
        p.props.varints(P_SUBSCRIPTION_ID).is_empty(),
        "no identifier for a subscription without one"
    );
    sub.ack(&p).await;

    // Overlapping subscriptions: one message carrying both ids, or one per
    // subscription carrying its own (MQTT-3.3.4-4/5).
    publ.publish("sid/deep/x", 1, false, 3, b"both").await;
    let got = sub.drain_publishes(QUIET).await;
    let mut ids: Vec<u32> = got
        .iter()
        .flat_map(|p| p.props.varints(P_SUBSCRIPTION_ID))
        .collect();
    ids.sort();
    assert_eq!(ids, vec![7, 300_000], "{got:?}");
}

#[tokio::test]
async fn mqtt5_3_8_2_1_2_subscription_identifier_through_rumqttc_v5() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = V5::connect(addr, "sid5-sub", true).await;
    sub.client
        .subscribe_with_properties(
            "sid5/t",
            m5::QoS::AtLeastOnce,
            m5::SubscribeProperties {
                id: Some(42),
                user_properties: vec![],
            },
        )
        .await
        .unwrap();
    sub.wait(|p| matches!(p, m5::Packet::SubAck(_)).then_some(()))
        .await;
    let (mut publ, _) = V5::connect(addr, "sid5-pub", true).await;
    publ.publish("sid5/t", m5::QoS::AtLeastOnce, false, None, b"x")
        .await;
    let p = sub.next_publish().await;
    let props = p.properties.expect("properties");
    assert_eq!(props.subscription_identifiers, vec![42]);
}

#[tokio::test]
async fn mqtt5_3_3_2_3_3_expired_message_is_not_delivered_to_an_offline_session() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let opts = ConnectOpts::v5("mx-sub", false).props(Props::new().u32(P_SESSION_EXPIRY, 300));
    let (mut sub, _) = Raw::connect_ok(addr, &opts).await;
    sub.subscribe(1, &[("mx/t", 1)]).await;
    sub.disconnect().await;

    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("mx-pub", true)).await;
    publ.publish_props(
        "mx/t",
        1,
        false,
        1,
        &Props::new().u32(P_MESSAGE_EXPIRY, 1),
        b"short",
    )
    .await;
    publ.publish_props(
        "mx/t",
        1,
        false,
        2,
        &Props::new().u32(P_MESSAGE_EXPIRY, 100),
        b"long",
    )
    .await;
    publ.publish("mx/t", 1, false, 3, b"forever").await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (mut sub, ack) = Raw::connect_ok(addr, &opts).await;
    assert!(ack.session_present);
    let got = sub.drain_publishes(QUIET).await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| p.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        vec![&b"long"[..], &b"forever"[..]],
        "MQTT-3.3.2-5: an expired message is not delivered"
    );
    let left = got[0]
        .props
        .u32(P_MESSAGE_EXPIRY)
        .expect("MQTT-3.3.2-6: the remaining expiry interval is sent");
    assert!(
        (90..=98).contains(&left),
        "remaining interval {left} (100 minus ~3 s waited)"
    );
    assert!(got[1].props.u32(P_MESSAGE_EXPIRY).is_none());
}

#[tokio::test]
async fn mqtt5_3_3_2_3_3_retained_message_expires() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rx-pub", true)).await;
    publ.publish_props(
        "rx/a",
        1,
        true,
        1,
        &Props::new().u32(P_MESSAGE_EXPIRY, 1),
        b"short",
    )
    .await;
    publ.publish_props(
        "rx/b",
        1,
        true,
        2,
        &Props::new().u32(P_MESSAGE_EXPIRY, 60),
        b"long",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rx-sub", true)).await;
    sub.subscribe(1, &[("rx/+", 1)]).await;
    let got = sub.drain_publishes(QUIET).await;
    let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(topics, vec!["rx/b"]);
    let left = got[0].props.u32(P_MESSAGE_EXPIRY).unwrap();
    assert!(left <= 58, "remaining interval {left}");
}

#[tokio::test]
async fn mqtt5_3_1_2_25_client_maximum_packet_size_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let opts = ConnectOpts::v5("mps-sub", true).props(Props::new().u32(P_MAXIMUM_PACKET_SIZE, 256));
    let (mut sub, _) = Raw::connect_ok(addr, &opts).await;
    sub.subscribe(1, &[("mps/t", 1)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("mps-pub", true)).await;
    publ.publish("mps/t", 1, false, 1, &[b'x'; 1000]).await;
    publ.publish("mps/t", 1, false, 2, b"small").await;
    let got = sub.drain_publishes(QUIET).await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| p.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        vec![&b"small"[..]],
        "MQTT-3.1.2-25: a packet over the client's Maximum Packet Size is not sent"
    );
    assert!(sub.is_alive().await);
}

#[tokio::test]
async fn mqtt5_3_3_4_topic_alias_not_used_towards_a_client_without_alias_maximum() {
    // MQTT-3.3.2-10..12: the server must not send aliases the client did not allow.
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v5("noalias", true)).await;
    sub.subscribe(1, &[("na/t", 0)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("noalias-pub", true)).await;
    for i in 0..3u16 {
        publ.publish("na/t", 0, false, i, b"x").await;
    }
    for _ in 0..3 {
        let p = sub.expect_publish().await;
        assert_eq!(p.topic, "na/t");
        assert!(p.props.get(P_TOPIC_ALIAS).is_none());
    }
}

#[tokio::test]
async fn mqtt5_3_3_2_6_live_delivery_carries_the_message_expiry_interval() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v5("mxl-sub", true)).await;
    sub.subscribe(1, &[("mxl/t", 1)]).await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("mxl-pub", true)).await;
    publ.publish_props(
        "mxl/t",
        1,
        false,
        1,
        &Props::new().u32(P_MESSAGE_EXPIRY, 60),
        b"x",
    )
    .await;
    let p = sub.expect_publish().await;
    let left = p.props.u32(P_MESSAGE_EXPIRY).expect("MQTT-3.3.2-6");
    assert!((58..=60).contains(&left), "remaining interval {left}");
}

#[tokio::test]
async fn mqtt5_subscription_options_and_identifiers_are_kept_by_a_persistent_session() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let opts = ConnectOpts::v5("keepopts", false).props(Props::new().u32(P_SESSION_EXPIRY, 300));
    let (mut c, _) = Raw::connect_ok(addr, &opts).await;
    // No Local + Retain As Published, identifier 5.
    c.subscribe_props(
        1,
        &[("ko/t", 1 | 0x04 | 0x08)],
        &Props::new().varint(P_SUBSCRIPTION_ID, 5),
    )
    .await;
    c.disconnect().await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("ko-pub", true)).await;
    publ.publish("ko/t", 1, true, 1, b"offline").await;

    let (mut c, ack) = Raw::connect_ok(addr, &opts).await;
    assert!(ack.session_present);
    let p = c.expect_publish().await;
    assert_eq!(p.payload, b"offline");
    assert_eq!(
        p.props.varints(P_SUBSCRIPTION_ID),
        vec![5],
        "identifier kept"
    );
    assert!(p.retain, "Retain As Published kept");
    c.ack(&p).await;
    c.publish("ko/t", 1, false, 9, b"mine").await;
    assert!(c.try_publish(QUIET).await.is_none(), "No Local kept");
}

#[tokio::test]
async fn mqtt5_3_3_2_3_4_topic_aliases_do_not_survive_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let opts = ConnectOpts::v5("alias-rc", false).props(Props::new().u32(P_SESSION_EXPIRY, 300));
    let (mut c, _) = Raw::connect_ok(addr, &opts).await;
    c.publish_props(
        "ar/t",
        1,
        false,
        1,
        &Props::new().u16(P_TOPIC_ALIAS, 3),
        b"set",
    )
    .await;
    c.disconnect().await;
    let (mut c, _) = Raw::connect_ok(addr, &opts).await;
    c.send(&publish_packet(
        true,
        "",
        1,
        false,
        false,
        2,
        &Props::new().u16(P_TOPIC_ALIAS, 3),
        b"use",
    ))
    .await;
    assert_eq!(
        c.expect_closed().await,
        Some(0x82),
        "MQTT-3.3.2-7: aliases end with the connection"
    );
}
