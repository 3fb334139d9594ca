//! MQTT conformance: SUBSCRIBE / UNSUBSCRIBE, topic filters and wildcards, shared
//! subscriptions (MQTT 3.1.1 §3.8-3.11, §4.7; MQTT 5.0 §3.8-3.11, §4.7-4.8).

mod common;

use std::collections::HashSet;

use common::*;

/// Publish each topic (QoS 1) from a fresh client and return the topics `sub` receives.
async fn route(addr: std::net::SocketAddr, sub: &mut Raw, topics: &[&str]) -> Vec<String> {
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("router-pub", true)).await;
    for (i, t) in topics.iter().enumerate() {
        publ.publish(t, 1, false, i as u16 + 1, t.as_bytes()).await;
    }
    let mut got: Vec<String> = sub
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| p.topic)
        .collect();
    got.sort();
    got
}

#[tokio::test]
async fn mqtt_4_7_1_3_single_level_wildcard() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("plus", true)).await;
    assert_eq!(sub.subscribe(1, &[("s/+/t", 1)]).await, vec![1]);
    let got = route(
        addr,
        &mut sub,
        &["s/a/t", "s/b/t", "s//t", "s/a/b/t", "s/a", "x/a/t"],
    )
    .await;
    assert_eq!(got, vec!["s//t", "s/a/t", "s/b/t"]);
}

#[tokio::test]
async fn mqtt_4_7_1_2_multi_level_wildcard_matches_the_parent_too() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = Raw::connect_ok(addr, &ConnectOpts::v3("hash", true)).await;
    assert_eq!(sub.subscribe(1, &[("h/#", 1)]).await, vec![1]);
    let got = route(addr, &mut sub, &["h", "h/a", "h/a/b", "h/", "hh/a", "x/h"]).await;
    assert_eq!(got, vec!["h", "h/", "h/a", "h/a/b"]);
}

#[tokio::test]
async fn mqtt_4_7_2_1_dollar_topics_are_not_matched_by_leading_wildcards() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut all, _) = Raw::connect_ok(addr, &ConnectOpts::v3("d-hash", true)).await;
    all.subscribe(1, &[("#", 1)]).await;
    let (mut plus, _) = Raw::connect_ok(addr, &ConnectOpts::v3("d-plus", true)).await;
    plus.subscribe(1, &[("+/x", 1)]).await;
    let (mut sys, _) = Raw::connect_ok(addr, &ConnectOpts::v3("d-sys", true)).await;
    sys.subscribe(1, &[("$SYS/#", 1)]).await;

    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("d-pub", true)).await;
    publ.publish("$SYS/x", 1, false, 1, b"sys").await;
    publ.publish("a/x", 1, false, 2, b"plain").await;

    let p = sys.expect_publish().await;
    assert_eq!(p.topic, "$SYS/x", "an explicit $SYS/# subscription matches");
    let got: Vec<String> = all
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| p.topic)
        .collect();
    assert_eq!(got, vec!["a/x"], "`#` must not match $SYS/x");
    let got: Vec<String> = plus
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| p.topic)
        .collect();
    assert_eq!(got, vec!["a/x"], "`+/x` must not match $SYS/x");
}

#[tokio::test]
async fn mqtt_3_8_3_invalid_filters_get_suback_failure_0x80_v3() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut c, _) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v3("badf", true)).await;
    let codes = c
        .subscribe(
            1,
            &[
                ("ok/+", 1),
                ("a/#/b", 1),
                ("a+/b", 0),
                ("#a", 2),
                ("ok2/#", 2),
            ],
        )
        .await;
    assert_eq!(
        codes,
        vec![1, 0x80, 0x80, 0x80, 2],
        "MQTT-3.9.3-1: one code per filter, in order; 0x80 for invalid filters"
    );
    assert!(
        c.is_alive().await,
        "an invalid filter fails the filter, not the connection"
    );
}

#[tokio::test]
async fn mqtt5_3_9_3_invalid_filters_get_suback_0x8f() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut c, _) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("badf5", true)).await;
    let codes = c
        .subscribe(1, &[("a/#/b", 1), ("ok/#", 1), ("x/y+", 0)])
        .await;
    assert_eq!(codes, vec![0x8F, 1, 0x8F], "Topic Filter invalid");
    assert!(c.is_alive().await);
}

#[tokio::test]
async fn mqtt5_3_11_3_unsuback_reason_codes() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut c, _) = Raw::connect_ok(addr, &ConnectOpts::v5("unsub5", true)).await;
    c.subscribe(1, &[("u/a", 1)]).await;
    let codes = c.unsubscribe(2, &["u/a", "u/none"]).await;
    assert_eq!(codes, vec![0x00, 0x11], "Success, No subscription existed");
    // Unsubscribed: nothing arrives any more.
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("unsub5-pub", true)).await;
    publ.publish("u/a", 1, false, 1, b"x").await;
    assert!(c.try_publish(QUIET).await.is_none());
}

#[tokio::test]
async fn mqtt_3_10_4_unsubscribe_stops_delivery_v3() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut c, _) = Raw::connect_ok(addr, &ConnectOpts::v3("unsub3", true)).await;
    c.subscribe(1, &[("u3/+", 1)]).await;
    // MQTT-3.10.4-4/5: UNSUBACK with the same packet id, even for unknown filters.
    let codes = c.unsubscribe(7, &["u3/+", "never/subscribed"]).await;
    assert!(codes.is_empty(), "v3 UNSUBACK has no payload");
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("unsub3-pub", true)).await;
    publ.publish("u3/x", 1, false, 1, b"x").await;
    assert!(c.try_publish(QUIET).await.is_none());
}

#[tokio::test]
async fn mqtt_3_8_4_3_resubscribing_replaces_the_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut c, _) = Raw::connect_ok(addr, &ConnectOpts::v3("resub", true)).await;
    assert_eq!(c.subscribe(1, &[("rs/t", 0)]).await, vec![0]);
    assert_eq!(c.subscribe(2, &[("rs/t", 1)]).await, vec![1]);
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v3("resub-pub", true)).await;
    publ.publish("rs/t", 1, false, 1, b"one").await;
    let got = c.drain_publishes(QUIET).await;
    assert_eq!(got.len(), 1, "one subscription, one copy: {got:?}");
    assert_eq!(got[0].qos, 1, "the new subscription's QoS");
}

#[tokio::test]
async fn mqtt5_4_8_2_shared_subscription_splits_messages_between_members() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut a, _) = Raw::connect_ok(addr, &ConnectOpts::v5("share-a", true)).await;
    let (mut b, _) = Raw::connect_ok(addr, &ConnectOpts::v5("share-b", true)).await;
    assert_eq!(a.subscribe(1, &[("$share/g/sh/#", 1)]).await, vec![1]);
    assert_eq!(b.subscribe(1, &[("$share/g/sh/#", 1)]).await, vec![1]);
    // A plain subscriber gets everything besides.
    let (mut plain, _) = Raw::connect_ok(addr, &ConnectOpts::v5("share-plain", true)).await;
    plain.subscribe(1, &[("sh/#", 1)]).await;

    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("share-pub", true)).await;
    let n = 40u16;
    for i in 0..n {
        publ.publish(&format!("sh/{}", i % 4), 1, false, i + 1, &i.to_be_bytes())
            .await;
    }
    let (ga, gb) = tokio::join!(a.drain_publishes(QUIET), b.drain_publishes(QUIET));
    let gp = plain.drain_publishes(QUIET).await;
    assert_eq!(gp.len(), n as usize, "the non-shared subscriber gets all");
    assert!(!ga.is_empty(), "member a got none of {n}");
    assert!(!gb.is_empty(), "member b got none of {n}");
    let mut seen = HashSet::new();
    for p in ga.iter().chain(gb.iter()) {
        assert!(
            seen.insert(p.payload.clone()),
            "a shared message went to two members"
        );
    }
    assert_eq!(seen.len(), n as usize, "every message went to one member");
}

#[tokio::test]
async fn mqtt5_4_8_2_one_publisher_on_one_topic_is_spread_over_the_members() {
    // The publisher's route cache must not pin a shared group to the member that was
    // chosen for its first message.
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut a, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rr-a", true)).await;
    let (mut b, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rr-b", true)).await;
    assert_eq!(a.subscribe(1, &[("$share/g/rr/t", 1)]).await, vec![1]);
    assert_eq!(b.subscribe(1, &[("$share/g/rr/t", 1)]).await, vec![1]);
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("rr-pub", true)).await;
    let n = 40u16;
    for i in 0..n {
        // QoS 1, each acknowledged before the next: one message per batch.
        publ.publish("rr/t", 1, false, i + 1, &i.to_be_bytes())
            .await;
    }
    // And a burst in one write: many messages of one batch.
    let mut burst = Vec::new();
    for i in n..2 * n {
        burst.extend(publish_packet(
            true,
            "rr/t",
            0,
            false,
            false,
            0,
            &Props::new(),
            &i.to_be_bytes(),
        ));
    }
    publ.send(&burst).await;
    let (ga, gb) = tokio::join!(a.drain_publishes(QUIET), b.drain_publishes(QUIET));
    assert_eq!(
        ga.len() + gb.len(),
        2 * n as usize,
        "each message to one member"
    );
    let split = |got: &[PublishPkt], lo: u16, hi: u16| {
        got.iter()
            .filter(|p| (lo..hi).contains(&u16::from_be_bytes([p.payload[0], p.payload[1]])))
            .count()
    };
    for (lo, hi) in [(0, n), (n, 2 * n)] {
        let (na, nb) = (split(&ga, lo, hi), split(&gb, lo, hi));
        assert!(
            na >= 10 && nb >= 10,
            "messages {lo}..{hi} split {na} / {nb} between the members"
        );
    }
}

#[tokio::test]
async fn mqtt5_4_8_2_invalid_shared_subscription_filters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let (mut c, _) = Raw::connect_ok(node.mqtt_addr(), &ConnectOpts::v5("share-bad", true)).await;
    let codes = c
        .subscribe(1, &[("$share/g", 1), ("$share//t", 1), ("$share/g+/t", 1)])
        .await;
    for code in codes {
        assert!(code >= 0x80, "invalid shared filter accepted: {code:#x}");
    }
    assert!(c.is_alive().await);
}

#[tokio::test]
async fn mqtt_3_8_4_wildcard_subscriptions_through_rumqttc_v5() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut sub, _) = V5::connect(addr, "w5-sub", true).await;
    let codes = sub
        .subscribe(m5::Filter::new("w5/+/x/#", m5::QoS::AtLeastOnce))
        .await;
    assert_eq!(
        codes,
        vec![m5::SubscribeReasonCode::Success(m5::QoS::AtLeastOnce)]
    );
    let (mut publ, _) = V5::connect(addr, "w5-pub", true).await;
    publ.publish("w5/a/x", m5::QoS::AtLeastOnce, false, None, b"1")
        .await;
    publ.publish("w5/a/y", m5::QoS::AtLeastOnce, false, None, b"2")
        .await;
    publ.publish("w5/b/x/c/d", m5::QoS::AtLeastOnce, false, None, b"3")
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"1");
    assert_eq!(&sub.next_publish().await.payload[..], b"3");
    assert!(sub.try_publish(QUIET).await.is_none());
}

#[tokio::test]
async fn mqtt5_4_8_2_shared_subscription_keeps_flowing_when_a_member_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let (mut a, _) = Raw::connect_ok(addr, &ConnectOpts::v5("leave-a", true)).await;
    let (mut b, _) = Raw::connect_ok(addr, &ConnectOpts::v5("leave-b", true)).await;
    a.subscribe(1, &[("$share/g/lv/t", 1)]).await;
    b.subscribe(1, &[("$share/g/lv/t", 1)]).await;
    b.disconnect().await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("leave-pub", true)).await;
    for i in 0..10u16 {
        publ.publish("lv/t", 1, false, i + 1, &i.to_be_bytes())
            .await;
    }
    let got = a.drain_publishes(QUIET).await;
    assert_eq!(got.len(), 10, "the remaining member gets every message");
}

#[tokio::test]
async fn mqtt5_4_8_2_shared_subscription_of_a_persistent_session_survives_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let addr = node.mqtt_addr();
    let opts = ConnectOpts::v5("share-ps", false).props(Props::new().u32(P_SESSION_EXPIRY, 300));
    let (mut a, _) = Raw::connect_ok(addr, &opts).await;
    a.subscribe(1, &[("$share/g/sp/t", 1)]).await;
    a.disconnect().await;
    let (mut publ, _) = Raw::connect_ok(addr, &ConnectOpts::v5("share-ps-pub", true)).await;
    publ.publish("sp/t", 1, false, 1, b"offline").await;
    let (mut a, ack) = Raw::connect_ok(addr, &opts).await;
    assert!(ack.session_present);
    assert_eq!(a.expect_publish().await.payload, b"offline");
}
