//! Service producers and consumers on the messages devices exchange, through real
//! sockets: device → consumer group, service → devices, and one stored copy.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use actimq::client::{message, Consumer, Delivered, ProduceMessageExt, Producer, Props};
use actimq_actors::storage::{Pull, QueueName, Storage};
use common::{m5, V4, V5};
use rumqttc::QoS;

/// Poll until `n` messages arrived (panics after 10 s).
async fn poll_n(c: &mut Consumer, n: usize) -> Vec<Delivered> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "got {} of {n} messages",
            got.len()
        );
        let batch = c.poll(500, Duration::from_millis(300)).await.unwrap();
        c.commit(&batch).await.unwrap();
        got.extend(batch);
    }
    got
}

#[tokio::test]
async fn a_device_publish_reaches_a_consumer_group_with_its_properties() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::node(dir.path());
    let mut consumer = Consumer::connect(node.service_addr(), "analytics", "home")
        .await
        .unwrap();
    assert_eq!(consumer.partitions(), &[0, 1, 2, 3]);

    let (mut dev, _) = V5::connect(node.mqtt_addr(), "sensor-1", true).await;
    for i in 0..20u32 {
        let props = m5::PublishProperties {
            content_type: Some("text/plain".into()),
            response_topic: Some("home/sensor-1/reply".into()),
            correlation_data: Some(vec![i as u8].into()),
            user_properties: vec![("unit".into(), "C".into())],
            ..Default::default()
        };
        let qos = if i % 2 == 0 {
            m5::QoS::AtLeastOnce
        } else {
            m5::QoS::AtMostOnce
        };
        dev.publish(
            &format!("home/room{}/temp", i % 3),
            qos,
            false,
            Some(props),
            format!("{i}").as_bytes(),
        )
        .await;
    }
    let got = poll_n(&mut consumer, 20).await;
    assert_eq!(got.len(), 20);
    // One publisher: one partition, in order.
    let p = got[0].partition;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.partition, p);
        assert_eq!(m.offset, i as u64);
        assert_eq!(m.payload, format!("{i}").into_bytes());
        assert_eq!(m.topic, format!("home/room{}/temp", i % 3));
        assert_eq!(m.qos, if i % 2 == 0 { 1 } else { 0 });
        assert_eq!(m.publisher, "sensor-1");
        assert!(!m.retain);
        assert!(m.timestamp_ms > 0);
        assert_eq!(m.props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            m.props.response_topic.as_deref(),
            Some("home/sensor-1/reply")
        );
        assert_eq!(m.props.correlation_data.as_deref(), Some(&[i as u8][..]));
        assert_eq!(
            m.props.user_properties,
            vec![("unit".to_string(), "C".to_string())]
        );
    }
    // Nothing more.
    let more = consumer.poll(10, Duration::from_millis(200)).await.unwrap();
    assert!(more.is_empty(), "{more:?}");
}

#[tokio::test]
async fn a_service_produce_reaches_devices_at_the_right_qos() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::node(dir.path());
    let (mut d1, _) = V4::connect(node.mqtt_addr(), "d1", true).await;
    let (mut d2, _) = V4::connect(node.mqtt_addr(), "d2", true).await;
    let (mut d3, _) = V4::connect(node.mqtt_addr(), "d3", true).await;
    let (mut d5, _) = V5::connect(node.mqtt_addr(), "d5", true).await;
    d1.subscribe("a/+/c", QoS::AtLeastOnce).await;
    d2.subscribe("a/#", QoS::AtMostOnce).await;
    d3.subscribe("a/b/c", QoS::ExactlyOnce).await;
    d5.subscribe(m5::Filter::new("a/b/c", m5::QoS::ExactlyOnce))
        .await;

    let mut p = Producer::connect(node.service_addr(), "backend")
        .await
        .unwrap();
    let props = Props {
        response_topic: Some("svc/replies".into()),
        correlation_data: Some(b"req-1".to_vec()),
        user_properties: vec![("k".into(), "v".into())],
        ..Props::default()
    };
    let pos = p
        .send(message("a/b/c", b"cmd".to_vec()).qos(1).props(props))
        .await
        .unwrap();
    let pos2 = p.send(message("a", b"top".to_vec()).qos(2)).await.unwrap();
    assert!(pos2 > pos);

    let m = d1.next_publish().await;
    assert_eq!((m.topic.as_str(), m.qos), ("a/b/c", QoS::AtLeastOnce));
    assert_eq!(&m.payload[..], b"cmd");
    let m = d2.next_publish().await;
    assert_eq!((m.topic.as_str(), m.qos), ("a/b/c", QoS::AtMostOnce));
    let m = d2.next_publish().await;
    assert_eq!(
        (m.topic.as_str(), m.qos),
        ("a", QoS::AtMostOnce),
        "a/# matches a"
    );
    let m = d3.next_publish().await;
    assert_eq!((m.topic.as_str(), m.qos), ("a/b/c", QoS::AtLeastOnce));
    let m = d5.next_publish().await;
    assert_eq!(m.qos, m5::QoS::AtLeastOnce);
    let props = m.properties.expect("v5 properties");
    assert_eq!(props.response_topic.as_deref(), Some("svc/replies"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"req-1"[..]));
    assert_eq!(props.user_properties, vec![("k".into(), "v".into())]);
    assert!(d1.try_publish(Duration::from_millis(300)).await.is_none());
    assert!(d3.try_publish(Duration::from_millis(100)).await.is_none());

    // A bad topic is refused, the connection stays usable.
    let err = p.send(message("a/+", b"x".to_vec())).await.unwrap_err();
    assert!(err.to_string().contains("Invalid"), "{err}");
    p.send(message("a/b/c", b"again".to_vec())).await.unwrap();
    assert_eq!(&d1.next_publish().await.payload[..], b"again");
}

#[tokio::test]
async fn messages_are_stored_once_for_devices_and_services() {
    const N: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let node = common::node(dir.path());
    let mut consumer = Consumer::connect(node.service_addr(), "g", "s1")
        .await
        .unwrap();
    let mut subs = Vec::new();
    for (i, f) in ["s1/+/x", "s1/#", "s1/a/x"].iter().enumerate() {
        let (mut d, _) = V4::connect(node.mqtt_addr(), &format!("sub{i}"), true).await;
        d.subscribe(f, QoS::AtMostOnce).await;
        subs.push(d);
    }
    let mut p = Producer::connect(node.service_addr(), "bulk")
        .await
        .unwrap();
    let payload = vec![7u8; 1024];
    for chunk in 0..N / 100 {
        let batch = (0..100)
            .map(|i| message("s1/a/x", payload.clone()).key(format!("k{}", (chunk * 100 + i) % 8)))
            .collect();
        p.send_batch(batch).await.unwrap();
    }
    let got = poll_n(&mut consumer, N).await;
    assert_eq!(got.len(), N);
    for d in &mut subs {
        for _ in 0..N {
            d.next_publish().await;
        }
    }
    let positions: HashSet<u64> = got.iter().map(|m| m.position).collect();
    assert_eq!(positions.len(), N);
    drop(subs);
    drop(consumer);
    drop(p);
    node.stop();

    // Reopen the storage: every queue indexes the same N records, and the log holds
    // N records' worth of bytes, not four copies.
    let cfg = {
        let mut c = actimq::Config::default();
        c.node.data_dir = dir.path().to_path_buf();
        c
    };
    let log = slog::Logger::root(slog::Discard, slog::o!());
    // Another thread: actix's System cannot start inside this test's tokio runtime.
    std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let s = Storage::open(cfg.storage_config(), log).await.unwrap();
            let all = |q: QueueName, s: Storage| async move {
                let mut out = Vec::new();
                let mut from = 0;
                loop {
                    let r = s
                        .pull(Pull {
                            queue: q.clone(),
                            from,
                            max: 1000,
                            max_bytes: 64 << 20,
                        })
                        .await
                        .unwrap();
                    if r.messages.is_empty() {
                        return out;
                    }
                    out.extend(r.messages.iter().map(|m| m.position));
                    from = r.next;
                }
            };
            for f in ["s1/+/x", "s1/#", "s1/a/x"] {
                let got: HashSet<u64> = all(QueueName::filter(f), s.clone())
                    .await
                    .into_iter()
                    .collect();
                assert_eq!(got, positions, "filter {f} indexes the same records");
            }
            let stats = s.stats().await.unwrap();
            let bytes = stats.log_end - stats.log_start;
            assert!(
                bytes < (N as u64) * 1024 * 2,
                "{bytes} log bytes for {N} 1 KiB messages"
            );
            assert!(bytes >= (N as u64) * 1024);
            s.shutdown().await;
        })
    })
    .join()
    .unwrap();
}

#[tokio::test]
async fn a_service_addresses_one_device_online_or_offline() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::node(dir.path());
    let addr = node.mqtt_addr();
    // A persistent device subscribes to its own address, then goes offline.
    let (mut dev, _) = V4::connect(addr, "dev-7", false).await;
    dev.subscribe("$client/dev-7/#", QoS::AtLeastOnce).await;
    dev.disconnect().await;
    // Others: a wildcard subscriber and a second device.
    let (mut all, _) = V4::connect(addr, "watcher", true).await;
    all.subscribe("#", QoS::AtLeastOnce).await;
    let (mut other, _) = V4::connect(addr, "dev-8", true).await;
    other.subscribe("$client/dev-8/#", QoS::AtLeastOnce).await;

    let mut p = Producer::connect(node.service_addr(), "backend")
        .await
        .unwrap();
    p.send(actimq::client::message_to_client("dev-7", "cmd/reboot", b"now".to_vec()).qos(1))
        .await
        .unwrap();
    let bad = actimq::client::message_to_client("a/b", "x", b"x".to_vec());
    assert!(p.send(bad).await.is_err());

    let (mut dev, present) = V4::connect(addr, "dev-7", false).await;
    assert!(present);
    let m = dev.next_publish().await;
    assert_eq!(m.topic, "$client/dev-7/cmd/reboot");
    assert_eq!((&m.payload[..], m.qos), (&b"now"[..], QoS::AtLeastOnce));
    // Online now: the next one arrives at once.
    p.send(actimq::client::message_to_client(
        "dev-7",
        "cmd/ping",
        b"1".to_vec(),
    ))
    .await
    .unwrap();
    assert_eq!(dev.next_publish().await.topic, "$client/dev-7/cmd/ping");
    assert!(
        all.try_publish(Duration::from_millis(300)).await.is_none(),
        "# skips $ topics"
    );
    assert!(other
        .try_publish(Duration::from_millis(100))
        .await
        .is_none());
}
