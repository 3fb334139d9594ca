//! MQTT conformance: bad input closes the offending connection (MQTT 3.1.1 §4.8,
//! MQTT 5.0 §4.13: DISCONNECT 0x81 Malformed Packet / 0x82 Protocol Error / 0x95
//! Packet too large ...), while a well-behaved client connected at the same time
//! keeps working.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// A well-behaved client, subscribed to its own topic.
struct Good {
    raw: Raw,
    n: u16,
}

impl Good {
    async fn connect(addr: SocketAddr) -> Good {
        let (mut raw, _) = Raw::connect_ok(addr, &ConnectOpts::v5("good", true)).await;
        raw.subscribe(1, &[("good/t", 1)]).await;
        Good { raw, n: 1 }
    }

    /// Publish to itself and receive it.
    async fn still_works(&mut self) {
        self.n += 1;
        let payload = self.n.to_be_bytes();
        self.raw.publish("good/t", 1, false, self.n, &payload).await;
        let p = self.raw.expect_publish().await;
        assert_eq!(p.payload, payload, "the good client's message");
        self.raw.ack(&p).await;
    }
}

/// Start a node and a good client, send `bad` on a connection that first sent
/// `connect` (unless `None`), and return the v5 DISCONNECT reason the bad connection
/// got before being closed, after checking the good client still works.
async fn bad_connection(
    tweak: impl FnOnce(&mut actimq::config::Config),
    connect: Option<ConnectOpts>,
    bad: &[u8],
) -> Option<u8> {
    let dir = tempfile::tempdir().unwrap();
    let node = actimq::testing::TestNode::start(dir.path(), tweak);
    let addr = node.mqtt_addr();
    let mut good = Good::connect(addr).await;
    let mut raw = match connect {
        Some(opts) => Raw::connect_ok(addr, &opts).await.0,
        None => Raw::open(addr).await,
    };
    raw.send(bad).await;
    let reason = raw.expect_closed().await;
    good.still_works().await;
    // And new connections are still accepted.
    let (mut fresh, _) = Raw::connect_ok(addr, &ConnectOpts::v3("fresh", true)).await;
    assert!(fresh.is_alive().await);
    reason
}

fn v3() -> Option<ConnectOpts> {
    Some(ConnectOpts::v3("bad3", true))
}

fn v5() -> Option<ConnectOpts> {
    Some(ConnectOpts::v5("bad5", true))
}

/// Assert a v5 close reason is `want` (a server may also just close, without
/// DISCONNECT: MQTT 5 §4.13.1 "MAY send a DISCONNECT").
fn assert_reason(got: Option<u8>, want: &[u8]) {
    if let Some(r) = got {
        assert!(
            want.contains(&r),
            "DISCONNECT reason {r:#04x}, expected one of {want:02x?}"
        );
    }
}

#[tokio::test]
async fn mqtt_3_8_1_1_subscribe_with_wrong_fixed_header_flags_is_malformed_v3() {
    // SUBSCRIBE must have flags 0b0010.
    let mut bad = subscribe_packet(false, 1, &[("a/b", 0)], &Props::new());
    bad[0] = 0x80;
    bad_connection(|_| {}, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt5_3_8_1_1_subscribe_with_wrong_fixed_header_flags_is_malformed() {
    let mut bad = subscribe_packet(true, 1, &[("a/b", 0)], &Props::new());
    bad[0] = 0x80;
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x81]);
}

#[tokio::test]
async fn mqtt5_1_5_4_truncated_string_is_malformed() {
    // PUBLISH whose topic length (0x00ff) runs past the end of the packet.
    let bad = packet(0x30, &[0x00, 0xff, b'a', b'b', 0x00]);
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x81]);
}

#[tokio::test]
async fn mqtt_2_2_unknown_packet_type_0_closes_v3() {
    bad_connection(|_| {}, v3(), &[0x00, 0x00]).await;
}

#[tokio::test]
async fn mqtt_2_2_unknown_packet_type_15_closes_v3() {
    // 0xF0 is AUTH in v5 but reserved in 3.1.1.
    bad_connection(|_| {}, v3(), &[0xF0, 0x00]).await;
}

#[tokio::test]
async fn mqtt5_2_1_2_reserved_packet_type_0_is_malformed() {
    let r = bad_connection(|_| {}, v5(), &[0x00, 0x00]).await;
    assert_reason(r, &[0x81, 0x82]);
}

#[tokio::test]
async fn mqtt_2_2_3_remaining_length_over_four_bytes_closes_v3() {
    bad_connection(|_| {}, v3(), &[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f]).await;
}

#[tokio::test]
async fn mqtt5_2_1_4_remaining_length_over_four_bytes_is_malformed() {
    let r = bad_connection(|_| {}, v5(), &[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f]).await;
    assert_reason(r, &[0x81, 0x95]);
}

#[tokio::test]
async fn mqtt_2_2_3_remaining_length_shorter_than_the_contents_closes_v3() {
    // A PINGREQ must have remaining length 0; here it says 2 and the next "packet"
    // is garbage.
    bad_connection(|_| {}, v3(), &[0xC0, 0x02, 0xff, 0xff]).await;
}

#[tokio::test]
async fn mqtt_1_5_3_1_invalid_utf8_in_a_topic_closes_v3() {
    let mut bad = publish_packet(false, "ab", 0, false, false, 0, &Props::new(), b"x");
    // Replace "ab" with an ill-formed sequence (0xC0 0x80 is an overlong NUL).
    bad[4] = 0xC0;
    bad[5] = 0x80;
    bad_connection(|_| {}, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt5_1_5_4_1_invalid_utf8_in_a_topic_is_malformed() {
    let mut bad = publish_packet(true, "ab", 0, false, false, 0, &Props::new(), b"x");
    bad[4] = 0xff;
    bad[5] = 0xfe;
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x81]);
}

#[tokio::test]
async fn mqtt5_1_5_4_2_nul_in_a_topic_is_malformed() {
    let bad = publish_packet(true, "a\0b", 0, false, false, 0, &Props::new(), b"x");
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x81, 0x90]);
}

#[tokio::test]
async fn mqtt_3_3_2_2_wildcard_in_publish_topic_closes_v3() {
    let bad = publish_packet(false, "a/+/b", 1, false, false, 1, &Props::new(), b"x");
    bad_connection(|_| {}, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt5_3_3_2_2_wildcard_in_publish_topic_is_topic_name_invalid() {
    let bad = publish_packet(true, "a/#", 1, false, false, 1, &Props::new(), b"x");
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x90, 0x82]);
}

#[tokio::test]
async fn mqtt_3_3_1_4_publish_with_qos_3_closes_v3() {
    let mut bad = publish_packet(false, "a/b", 1, false, false, 1, &Props::new(), b"x");
    bad[0] |= 0x06;
    bad_connection(|_| {}, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt5_3_3_1_4_publish_with_qos_3_is_malformed() {
    let mut bad = publish_packet(true, "a/b", 1, false, false, 1, &Props::new(), b"x");
    bad[0] |= 0x06;
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x81]);
}

#[tokio::test]
async fn mqtt5_3_2_2_3_6_packet_over_the_maximum_size_is_packet_too_large() {
    let bad = publish_packet(
        true,
        "big/t",
        0,
        false,
        false,
        0,
        &Props::new(),
        &[0u8; 4000],
    );
    let r = bad_connection(|c| c.mqtt.max_packet_size = 1024, v5(), &bad).await;
    assert_eq!(r, Some(0x95), "Packet too large");
}

#[tokio::test]
async fn mqtt_packet_over_the_maximum_size_closes_v3() {
    let bad = publish_packet(
        false,
        "big/t",
        0,
        false,
        false,
        0,
        &Props::new(),
        &[0u8; 4000],
    );
    bad_connection(|c| c.mqtt.max_packet_size = 1024, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt_packet_over_the_maximum_size_announced_by_its_header_closes() {
    // Only the fixed header of a 200 MB packet: the server must not wait for it.
    let mut bad = vec![0x30];
    put_varint(&mut bad, 200 * 1024 * 1024);
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x95]);
}

#[tokio::test]
async fn mqtt_flood_of_bytes_before_connect_closes() {
    let mut noise = vec![0u8; 1 << 20];
    for (i, b) in noise.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    // Make sure the first byte is not a CONNECT.
    noise[0] = 0x37;
    bad_connection(|_| {}, None, &noise).await;
}

#[tokio::test]
async fn mqtt_3_1_connect_garbage_protocol_name_closes() {
    let mut bad = ConnectOpts::v3("pn", true).bytes();
    bad[4..8].copy_from_slice(b"XQTT");
    bad_connection(|_| {}, None, &bad).await;
}

#[tokio::test]
async fn mqtt5_3_3_2_3_subscription_identifier_in_publish_is_a_protocol_error() {
    let bad = publish_packet(
        true,
        "a/b",
        0,
        false,
        false,
        0,
        &Props::new().varint(P_SUBSCRIPTION_ID, 3),
        b"x",
    );
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x82]);
}

#[tokio::test]
async fn mqtt5_2_2_2_2_duplicate_property_is_a_protocol_error() {
    let bad = publish_packet(
        true,
        "a/b",
        0,
        false,
        false,
        0,
        &Props::new()
            .str(P_CONTENT_TYPE, "x")
            .str(P_CONTENT_TYPE, "y"),
        b"x",
    );
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x82, 0x81]);
}

#[tokio::test]
async fn mqtt_2_3_1_1_qos1_publish_with_packet_id_0_closes() {
    let bad = publish_packet(false, "a/b", 1, false, false, 0, &Props::new(), b"x");
    bad_connection(|_| {}, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt_bad_clients_do_not_disturb_a_busy_good_client() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let mut good = Good::connect(addr).await;
    let bads: Vec<Vec<u8>> = vec![
        vec![0x00, 0x00],
        vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
        publish_packet(false, "a/#", 0, false, false, 0, &Props::new(), b"x"),
        vec![0xff; 64],
    ];
    for bad in &bads {
        let (mut raw, _) = Raw::connect_ok(addr, &ConnectOpts::v3("bad-many", true)).await;
        raw.send(bad).await;
        good.still_works().await;
        assert!(
            raw.closed_within(Duration::from_secs(5)).await.is_some(),
            "{bad:02x?} did not close its connection"
        );
    }
    good.still_works().await;
}

#[tokio::test]
async fn mqtt_4_7_3_1_empty_topic_name_closes_v3() {
    let bad = publish_packet(false, "", 0, false, false, 0, &Props::new(), b"x");
    bad_connection(|_| {}, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt5_4_7_3_1_empty_topic_name_without_alias_is_an_error() {
    let bad = publish_packet(true, "", 1, false, false, 1, &Props::new(), b"x");
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x82, 0x90]);
}

#[tokio::test]
async fn mqtt_3_8_3_3_subscribe_without_filters_closes_v3() {
    let bad = subscribe_packet(false, 1, &[], &Props::new());
    bad_connection(|_| {}, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt_3_10_3_2_unsubscribe_without_filters_closes_v3() {
    let bad = unsubscribe_packet(false, 1, &[]);
    bad_connection(|_| {}, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt_3_8_3_4_subscribe_with_qos_3_closes_v3() {
    let bad = subscribe_packet(false, 1, &[("a/b", 3)], &Props::new());
    bad_connection(|_| {}, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt_3_8_3_4_subscribe_with_reserved_qos_bits_closes_v3() {
    // QoS 1 with bit 2 set (0x05), in the second filter: the codec would mask it to 1.
    let bad = subscribe_packet(false, 1, &[("a/b", 0), ("c/d", 0x05)], &Props::new());
    bad_connection(|_| {}, v3(), &bad).await;
}

#[tokio::test]
async fn mqtt5_3_8_3_5_subscription_options_reserved_bits_are_malformed() {
    let bad = subscribe_packet(true, 1, &[("a/b", 0xC1)], &Props::new());
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x81]);
}

#[tokio::test]
async fn mqtt5_3_8_3_1_retain_handling_3_is_a_protocol_error() {
    let bad = subscribe_packet(true, 1, &[("a/b", 0x31)], &Props::new());
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x81, 0x82]);
}

#[tokio::test]
async fn mqtt5_3_8_2_1_2_subscription_identifier_0_is_a_protocol_error() {
    let bad = subscribe_packet(
        true,
        1,
        &[("a/b", 1)],
        &Props::new().varint(P_SUBSCRIPTION_ID, 0),
    );
    let r = bad_connection(|_| {}, v5(), &bad).await;
    assert_reason(r, &[0x81, 0x82]);
}

#[tokio::test]
async fn mqtt5_3_3_4_receive_maximum_exceeded_is_0x93() {
    let dir = tempfile::tempdir().unwrap();
    let node = actimq::testing::TestNode::start(dir.path(), |c| c.mqtt.receive_maximum = 2);
    let addr = node.mqtt_addr();
    let mut good = Good::connect(addr).await;
    let (mut raw, ack) = Raw::connect_ok(addr, &ConnectOpts::v5("greedy", true)).await;
    assert_eq!(ack.props.u16(P_RECEIVE_MAXIMUM), Some(2));
    // QoS 2 publishes stay unacknowledged until PUBREL: the third exceeds the quota.
    for pid in 1..=3u16 {
        raw.send(&publish_packet(
            true,
            "rm/t",
            2,
            false,
            false,
            pid,
            &Props::new(),
            b"x",
        ))
        .await;
    }
    assert_eq!(
        raw.expect_closed().await,
        Some(0x93),
        "Receive Maximum exceeded"
    );
    good.still_works().await;
}
