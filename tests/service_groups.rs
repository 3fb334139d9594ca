//! Consumer groups through real sockets: partitions split among members, take-over
//! from committed offsets, independent groups, offsets across a restart, seek.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use actimq::client::{message, Consumer, Delivered, ProduceMessageExt, Producer, SeekTo};

/// Produce `n` messages to `topic`/x keyed over 16 keys (so every partition gets some);
/// payloads are `"{tag}-{i}"`.
async fn produce(p: &mut Producer, topic: &str, tag: &str, n: usize) {
    let batch = (0..n)
        .map(|i| {
            message(format!("{topic}/x"), format!("{tag}-{i}").into_bytes())
                .key(format!("key{}", i % 16))
                .qos(1)
        })
        .collect();
    p.send_batch(batch).await.unwrap();
}

fn payload(m: &Delivered) -> String {
    String::from_utf8(m.payload.clone()).unwrap()
}

/// Poll (committing) until `n` distinct payloads arrived or `wait` passes.
async fn drain(c: &mut Consumer, n: usize, wait: Duration) -> Vec<Delivered> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < deadline {
        let b = c.poll(1000, Duration::from_millis(200)).await.unwrap();
        c.commit(&b).await.unwrap();
        got.extend(b);
    }
    got
}

#[tokio::test]
async fn two_members_split_partitions_and_one_takes_over_from_committed_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::node(dir.path());
    let addr = node.service_addr();
    let mut c1 = Consumer::connect(addr, "workers", "jobs").await.unwrap();
    let mut c2 = Consumer::connect(addr, "workers", "jobs").await.unwrap();
    let mut p = Producer::connect(addr, "producer").await.unwrap();
    produce(&mut p, "jobs", "a", 400).await;

    // Each member sees only its partitions; together they see every message once.
    let (mut b1, mut b2) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b1.len() + b2.len() < 400 && tokio::time::Instant::now() < deadline {
        b1.extend(c1.poll(1000, Duration::from_millis(100)).await.unwrap());
        b2.extend(c2.poll(1000, Duration::from_millis(100)).await.unwrap());
    }
    let (p1, p2) = (c1.partitions().to_vec(), c2.partitions().to_vec());
    assert_eq!(p1.len(), 2, "{p1:?}");
    assert_eq!(p2.len(), 2, "{p2:?}");
    assert!(p1.iter().all(|p| !p2.contains(p)));
    assert!(b1.iter().all(|m| p1.contains(&m.partition)));
    assert!(b2.iter().all(|m| p2.contains(&m.partition)));
    assert_eq!(b1.len() + b2.len(), 400);
    let all: HashSet<String> = b1.iter().chain(&b2).map(payload).collect();
    assert_eq!(all.len(), 400);

    // c1 commits; c2 does not, and goes away.
    c1.commit(&b1).await.unwrap();
    let uncommitted: HashSet<String> = b2.iter().map(payload).collect();
    drop(c2);

    // c1 takes over c2's partitions from their committed offsets (0): it gets c2's
    // uncommitted messages again, then new ones, and none of its own again.
    produce(&mut p, "jobs", "b", 100).await;
    let got = drain(&mut c1, uncommitted.len() + 100, Duration::from_secs(10)).await;
    assert_eq!(c1.partitions(), &[0, 1, 2, 3]);
    let got: Vec<String> = got.iter().map(payload).collect();
    let set: HashSet<&String> = got.iter().collect();
    assert_eq!(set.len(), got.len(), "no duplicates");
    for m in &uncommitted {
        assert!(set.contains(m), "redelivered {m}");
    }
    for m in b1.iter().map(payload) {
        assert!(!set.contains(&m), "{m} was committed by c1");
    }
    assert_eq!(got.iter().filter(|m| m.starts_with("b-")).count(), 100);
}

#[tokio::test]
async fn every_group_sees_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::node(dir.path());
    let addr = node.service_addr();
    let mut groups = Vec::new();
    for g in ["g1", "g2", "g3"] {
        groups.push(Consumer::connect(addr, g, "fan").await.unwrap());
    }
    let mut p = Producer::connect(addr, "producer").await.unwrap();
    produce(&mut p, "fan", "m", 300).await;
    for c in &mut groups {
        let got = drain(c, 300, Duration::from_secs(10)).await;
        let set: HashSet<String> = got.iter().map(payload).collect();
        assert_eq!(set.len(), 300);
        assert_eq!(got.len(), 300);
        // Per key (partition), offsets come in order.
        let mut last: HashMap<u32, u64> = HashMap::new();
        for m in &got {
            if let Some(prev) = last.insert(m.partition, m.offset) {
                assert!(m.offset > prev);
            }
        }
    }
}

#[tokio::test]
async fn a_long_poll_wakes_on_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::node(dir.path());
    let addr = node.service_addr();
    let mut c = Consumer::connect(addr, "g", "lp").await.unwrap();
    let producer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut p = Producer::connect(addr, "later").await.unwrap();
        p.send(message("lp", b"x".to_vec())).await.unwrap();
    });
    let t = std::time::Instant::now();
    let got = c.poll(10, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    producer.await.unwrap();
}

#[test]
fn consumers_resume_from_committed_offsets_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let node = common::node(dir.path());
    let addr = node.service_addr();
    let first: HashSet<String> = rt.block_on(async {
        let mut c = Consumer::connect(addr, "durable", "rs").await.unwrap();
        let mut p = Producer::connect(addr, "producer").await.unwrap();
        produce(&mut p, "rs", "m", 200).await;
        // Commit only the first half of what arrives.
        let mut got = Vec::new();
        while got.len() < 200 {
            got.extend(c.poll(1000, Duration::from_millis(300)).await.unwrap());
        }
        let mut by_part: HashMap<u32, Vec<&Delivered>> = HashMap::new();
        for m in &got {
            by_part.entry(m.partition).or_default().push(m);
        }
        let mut committed = HashSet::new();
        for ms in by_part.values() {
            let half = &ms[..ms.len() / 2];
            let owned: Vec<Delivered> = half.iter().map(|m| (*m).clone()).collect();
            c.commit(&owned).await.unwrap();
            committed.extend(owned.iter().map(payload));
        }
        committed
    });
    node.stop();

    let node = common::node(dir.path());
    let addr = node.service_addr();
    rt.block_on(async {
        let mut c = Consumer::connect(addr, "durable", "rs").await.unwrap();
        let got = drain(&mut c, 200 - first.len(), Duration::from_secs(10)).await;
        let rest: HashSet<String> = got.iter().map(payload).collect();
        assert_eq!(rest.len(), got.len());
        assert_eq!(rest.len() + first.len(), 200);
        assert!(rest.is_disjoint(&first));

        // Seek: latest leaves nothing; earliest replays everything; a timestamp
        // after the last message leaves nothing.
        c.seek(SeekTo::Latest).await.unwrap();
        assert!(c
            .poll(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty());
        c.seek(SeekTo::Earliest).await.unwrap();
        let again = drain(&mut c, 200, Duration::from_secs(10)).await;
        assert_eq!(again.len(), 200);
        let ts = again.iter().map(|m| m.timestamp_ms).max().unwrap();
        let at = c.seek(SeekTo::Timestamp(ts + 1)).await.unwrap();
        assert_eq!(at.len(), 4);
        assert!(c
            .poll(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty());
        c.seek(SeekTo::Timestamp(0)).await.unwrap();
        assert_eq!(drain(&mut c, 200, Duration::from_secs(10)).await.len(), 200);
    });
    node.stop();
}

#[test]
fn clients_reconnect_after_the_node_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // The restart must reuse the service port, so the port is fixed; a port found free a
    // moment ago may be taken by another test's socket meanwhile, so both starts retry.
    let start_on = |port: u16| {
        actimq::testing::TestNode::try_start(dir.path(), |c| {
            c.listener.service.bind = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        })
    };
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (node, port) = (0..20)
        .find_map(|_| {
            let port = free_port();
            start_on(port).ok().map(|n| (n, port))
        })
        .expect("a free port for the service listener");
    let start = || {
        for _ in 0..50 {
            match start_on(port) {
                Ok(node) => return node,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        panic!("the service port {port} stayed taken for 5 s");
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = node.service_addr();
    let (mut c, mut p) = rt.block_on(async {
        let mut c = Consumer::connect(addr, "rc", "re").await.unwrap();
        let mut p = Producer::connect(addr, "producer").await.unwrap();
        produce(&mut p, "re", "a", 50).await;
        assert_eq!(drain(&mut c, 50, Duration::from_secs(10)).await.len(), 50);
        (c, p)
    });
    node.stop();
    let node = start();
    rt.block_on(async {
        produce(&mut p, "re", "b", 50).await;
        let got = drain(&mut c, 50, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 50);
        assert!(got.iter().all(|m| payload(m).starts_with("b-")));
    });
    node.stop();
}
