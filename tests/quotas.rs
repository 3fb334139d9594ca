//! Quotas and limits (issue #6): each one is hit through real sockets and holds.
//!
//! | limit | config key | test |
//! |---|---|---|
//! | connections, node-wide | `listener.max_connections` | here |
//! | connections, per listener | `listener.*.max_connections` | `node.rs`, `transport_ws.rs` |
//! | connections a second | `listener.*.max_connection_rate` | here |
//! | PUBLISHes a second per client | `mqtt.max_inbound_messages_per_sec` | here |
//! | bytes a second per client | `mqtt.max_inbound_bytes_per_sec` | here |
//! | subscriptions per client | `mqtt.max_subscriptions` | here |
//! | retained messages, payload, bytes | `mqtt.max_retained*` | here |
//! | in-flight window | `mqtt.max_inflight` | `mqtt_publish.rs` (MQTT-4.9) |
//! | packet size | `mqtt.max_packet_size` | `mqtt_bad_input.rs`, `mqtt_connect.rs` |
//!
//! Rates are throttled, never disconnected: the tests check both that the limited
//! client is slowed to about the configured rate and that it is still connected and
//! lost nothing, and that a well-behaved client next to it is not slowed.

mod common;

use std::time::{Duration, Instant};

use actimq::testing::TestNode;
use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn v5(id: &str) -> ConnectOpts {
    ConnectOpts::v5(id, true)
}

fn v3(id: &str) -> ConnectOpts {
    ConnectOpts::v3(id, true)
}

/// Whether the server closes a fresh TCP connection within `wait` (a refused slot)
/// instead of waiting for CONNECT.
async fn refused(addr: std::net::SocketAddr, wait: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return true;
    };
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn subscriptions_beyond_max_subscriptions_get_quota_exceeded_v5() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |c| c.mqtt.max_subscriptions = 3);
    let (mut c, _) = Raw::connect_ok(node.mqtt_addr(), &v5("subs5")).await;
    // One SUBSCRIBE of four new filters: the fourth is over the quota (0x97).
    let codes = c
        .subscribe(1, &[("a/1", 1), ("a/2", 1), ("a/3", 0), ("a/4", 1)])
        .await;
    assert_eq!(codes, vec![1, 1, 0, 0x97]);
    // Replacing a held subscription is not a new one.
    assert_eq!(c.subscribe(2, &[("a/1", 0)]).await, vec![0]);
    assert_eq!(c.subscribe(3, &[("a/5", 0)]).await, vec![0x97]);
    // Unsubscribing frees a place.
    c.send(&unsubscribe_packet(true, 4, &["a/2"])).await;
    c.expect(UNSUBACK).await;
    assert_eq!(c.subscribe(5, &[("a/5", 0)]).await, vec![0]);
    // The refused filter really is not subscribed; the held ones work.
    let (mut p, _) = Raw::connect_ok(node.mqtt_addr(), &v5("pub5")).await;
    p.send(&publish_packet(
        true,
        "a/4",
        0,
        false,
        false,
        0,
        &Props::new(),
        b"no",
    ))
    .await;
    p.send(&publish_packet(
        true,
        "a/5",
        0,
        false,
        false,
        0,
        &Props::new(),
        b"yes",
    ))
    .await;
    let got = c.expect_publish().await;
    assert_eq!(
        (got.topic.as_str(), got.payload.as_slice()),
        ("a/5", &b"yes"[..])
    );
    assert!(c.try_publish(QUIET).await.is_none());
    assert!(
        c.is_alive().await,
        "a refused filter does not end the connection"
    );
    node.stop();
}

#[tokio::test]
async fn subscriptions_beyond_max_subscriptions_get_failure_v3() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |c| c.mqtt.max_subscriptions = 2);
    let (mut c, _) = Raw::connect_ok(node.mqtt_addr(), &v3("subs3")).await;
    // MQTT-3.9.3-2 allows 0x80 for any filter the server does not accept.
    assert_eq!(
        c.subscribe(1, &[("b/1", 1), ("b/+", 2), ("b/#", 1)]).await,
        vec![1, 2, 0x80]
    );
    assert!(c.is_alive().await);
    node.stop();
}

/// Publish a retained QoS 1 message over v5 and return the PUBACK reason code.
async fn retain(c: &mut Raw, pid: u16, topic: &str, payload: &[u8]) -> u8 {
    c.send(&publish_packet(
        true,
        topic,
        1,
        true,
        false,
        pid,
        &Props::new(),
        payload,
    ))
    .await;
    parse_ack(&c.expect(PUBACK).await).1
}

/// The retained messages a fresh subscriber to `filter` receives, as (topic, length).
async fn retained(addr: std::net::SocketAddr, filter: &str) -> Vec<(String, usize)> {
    let (mut c, _) = Raw::connect_ok(addr, &v5("retained-reader")).await;
    c.subscribe(1, &[(filter, 0)]).await;
    let mut out = Vec::new();
    while let Some(p) = c.try_publish(QUIET).await {
        assert!(p.retain);
        out.push((p.topic, p.payload.len()));
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_retained_payload_over_max_retained_payload_is_delivered_but_not_retained() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |c| c.mqtt.max_retained_payload = 100);
    let addr = node.mqtt_addr();
    let (mut live, _) = Raw::connect_ok(addr, &v5("live")).await;
    live.subscribe(1, &[("r/#", 0)]).await;
    let (mut p, _) = Raw::connect_ok(addr, &v5("retainer")).await;

    assert_eq!(retain(&mut p, 1, "r/small", &[1; 50]).await, 0);
    // Over the limit: acknowledged and delivered, not retained; the topic keeps its
    // previous retained message.
    assert_eq!(retain(&mut p, 2, "r/small", &[2; 200]).await, 0);
    assert_eq!(retain(&mut p, 3, "r/big", &[3; 101]).await, 0);
    let lens: Vec<usize> = [
        live.expect_publish().await,
        live.expect_publish().await,
        live.expect_publish().await,
    ]
    .iter()
    .map(|m| m.payload.len())
    .collect();
    assert_eq!(lens, vec![50, 200, 101]);
    assert_eq!(retained(addr, "r/#").await, vec![("r/small".into(), 50)]);
    node.stop();
}

#[tokio::test]
async fn retained_messages_are_bounded_in_count_and_total_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |c| {
        c.mqtt.max_retained = 3;
        c.mqtt.max_retained_bytes = 250;
    });
    let addr = node.mqtt_addr();
    let (mut p, _) = Raw::connect_ok(addr, &v5("retainer")).await;
    retain(&mut p, 1, "q/1", &[0; 100]).await;
    retain(&mut p, 2, "q/2", &[0; 100]).await;
    // 300 bytes would be over max_retained_bytes.
    retain(&mut p, 3, "q/3", &[0; 100]).await;
    assert_eq!(
        retained(addr, "q/#").await,
        vec![("q/1".into(), 100), ("q/2".into(), 100)]
    );
    // A smaller replacement makes room.
    retain(&mut p, 4, "q/1", &[0; 50]).await;
    retain(&mut p, 5, "q/3", &[0; 100]).await;
    // Three messages: a fourth topic is over max_retained, whatever its size.
    retain(&mut p, 6, "q/4", &[0; 1]).await;
    assert_eq!(
        retained(addr, "q/#").await,
        vec![("q/1".into(), 50), ("q/2".into(), 100), ("q/3".into(), 100)]
    );
    // Deleting one (an empty retained payload) frees its place and bytes.
    retain(&mut p, 7, "q/2", b"").await;
    retain(&mut p, 8, "q/4", &[0; 1]).await;
    assert_eq!(
        retained(addr, "q/#").await,
        vec![("q/1".into(), 50), ("q/3".into(), 100), ("q/4".into(), 1)]
    );
    node.stop();
}

/// Send `n` QoS 0 PUBLISHes of `payload` to `topic` in one write, then return how long
/// `sub` took to receive them all (in order).
async fn flood(pub_: &mut Raw, sub: &mut Raw, topic: &str, n: u16, payload: &[u8]) -> Duration {
    let mut bytes = Vec::new();
    for i in 0..n {
        let mut body = i.to_be_bytes().to_vec();
        body.extend_from_slice(payload);
        bytes.extend(publish_packet(
            pub_.v5,
            topic,
            0,
            false,
            false,
            0,
            &Props::new(),
            &body,
        ));
    }
    let start = Instant::now();
    pub_.send(&bytes).await;
    for i in 0..n {
        let m = sub.expect_publish().await;
        assert_eq!(m.payload[..2], i.to_be_bytes(), "in order, nothing lost");
    }
    start.elapsed()
}

#[tokio::test]
async fn a_client_over_max_inbound_messages_per_sec_is_throttled_not_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |c| c.mqtt.max_inbound_messages_per_sec = 20);
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &v3("sub")).await;
    sub.subscribe(1, &[("rate/#", 0)]).await;
    let (mut fast, _) = Raw::connect_ok(addr, &v3("fast")).await;
    let (mut calm, _) = Raw::connect_ok(addr, &v3("calm")).await;
    let (mut calm_sub, _) = Raw::connect_ok(addr, &v3("calm-sub")).await;
    calm_sub.subscribe(1, &[("calm/#", 0)]).await;

    // 60 at once: a burst of 20 (one second's worth), then 40 at 20 a second.
    let flooding = async { flood(&mut fast, &mut sub, "rate/x", 60, b"m").await };
    // Meanwhile another client publishes within its own rate, unhindered.
    let calm_side = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        flood(&mut calm, &mut calm_sub, "calm/x", 10, b"c").await
    };
    let (slowed, calm_took) = tokio::join!(flooding, calm_side);
    assert!(
        slowed >= Duration::from_millis(1500),
        "60 messages at 20/s (burst 20) took {slowed:?}"
    );
    assert!(
        slowed < Duration::from_secs(10),
        "throttled far too much: {slowed:?}"
    );
    assert!(
        calm_took < Duration::from_secs(1),
        "the other client waited {calm_took:?}"
    );
    assert!(fast.is_alive().await, "throttled, not disconnected");
    node.stop();
}

#[tokio::test]
async fn a_client_over_max_inbound_bytes_per_sec_is_throttled_not_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |c| c.mqtt.max_inbound_bytes_per_sec = 20_000);
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &v5("sub")).await;
    sub.subscribe(1, &[("bytes/#", 0)]).await;
    let (mut fast, _) = Raw::connect_ok(addr, &v5("fast")).await;
    // 60 × ~1 KiB = ~61 KB: a burst of 20 KB, then ~41 KB at 20 KB/s.
    let took = flood(&mut fast, &mut sub, "bytes/x", 60, &[7; 1000]).await;
    assert!(took >= Duration::from_millis(1500), "took {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(fast.is_alive().await, "throttled, not disconnected");
    node.stop();
}

#[tokio::test]
async fn connections_over_max_connection_rate_wait_instead_of_being_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |c| c.listener.tcp.max_connection_rate = 5);
    let addr = node.mqtt_addr();
    let start = Instant::now();
    // 15 at once: 5 (one second's worth) at once, then 10 at 5 a second.
    let conns = (0..15).map(|i| async move {
        let (c, ack) = Raw::connect(addr, &v3(&format!("rate-{i}"))).await;
        assert_eq!(ack.code, 0, "every connection is accepted in the end");
        (c, start.elapsed())
    });
    let done = futures::future::join_all(conns).await;
    let mut times: Vec<Duration> = done.iter().map(|(_, t)| *t).collect();
    times.sort();
    assert!(
        times[4] < Duration::from_millis(1000),
        "the burst waits: {times:?}"
    );
    assert!(
        times[14] >= Duration::from_millis(1500),
        "15 connections at 5/s came in {times:?}"
    );
    node.stop();
}

#[tokio::test]
async fn listener_max_connections_caps_every_listener_together() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |c| {
        c.listener.max_connections = 2;
        c.mqtt.connect_timeout_secs = 60;
    });
    let (mut a, _) = Raw::connect_ok(node.mqtt_addr(), &v3("a")).await;
    let (mut b, _) = Raw::connect_ok(node.mqtt_addr(), &v3("b")).await;
    // Both listeners are full, though each is far below its own max_connections.
    assert!(refused(node.mqtt_addr(), WAIT).await, "tcp is refused");
    assert!(refused(node.ws_addr(), WAIT).await, "ws is refused");
    assert!(a.is_alive().await && b.is_alive().await);
    // A closed connection frees its place (once its session has noticed).
    drop(a);
    let deadline = Instant::now() + WAIT;
    while refused(node.ws_addr(), Duration::from_millis(300)).await {
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop();
}
