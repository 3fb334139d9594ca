//! Service-protocol benchmark against an in-process node (a `TestNode` on a temp dir,
//! default configuration: `flush = async`, 4 partitions):
//!
//! ```text
//! cargo run --release --example service_bench -- [MESSAGES] [PAYLOAD_BYTES] [BATCH]
//! # defaults: 200000 100 100
//! ```
//!
//! 1. produce: one `Producer`, `send_batch` of BATCH messages (keys spread over 64, so
//!    every partition gets some), to `bench/x`; msg/s until the last batch is durable;
//! 2. consume, 1 group: one `Consumer` polls (max 1000) and commits every batch;
//! 3. consume, 4 groups at once: four consumers in four groups, each reads everything;
//! 4. device → service latency: a rumqttc device (TCP_NODELAY) publishes QoS 0
//!    messages one at a time (payload: send time) to `lat/x`; a consumer blocked in a
//!    long poll receives them; p50/p99/max over 2000 messages.

use std::time::{Duration, Instant};

use actimq::client::{message, Consumer, ProduceMessageExt, Producer};
use actimq::testing::TestNode;

async fn consume_all(addr: std::net::SocketAddr, group: String, topic: &str, n: usize) -> f64 {
    let mut c = Consumer::connect(addr, &group, topic).await.unwrap();
    let t = Instant::now();
    let mut seen = 0;
    while seen < n {
        let b = c.poll(1000, Duration::from_secs(5)).await.unwrap();
        c.commit(&b).await.unwrap();
        seen += b.len();
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let n = args.first().copied().unwrap_or(200_000);
    let size = args.get(1).copied().unwrap_or(100);
    let batch = args.get(2).copied().unwrap_or(100).max(1);
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |_| {});
    let addr = node.service_addr();
    let mqtt = node.mqtt_addr();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut p = Producer::connect(addr, "bench").await.unwrap();
        let payload = vec![b'x'; size];
        let t = Instant::now();
        let mut sent = 0;
        while sent < n {
            let k = batch.min(n - sent);
            let msgs = (sent..sent + k)
                .map(|i| message("bench/x", payload.clone()).key(format!("k{}", i % 64)))
                .collect();
            p.send_batch(msgs).await.unwrap();
            sent += k;
        }
        let s = t.elapsed().as_secs_f64();
        println!("RESULT scenario=produce messages={n} payload={size} batch={batch} secs={s:.3} msg_per_s={:.0}", n as f64 / s);

        let s = consume_all(addr, "one".into(), "bench", n).await;
        println!("RESULT scenario=consume_1_group messages={n} secs={s:.3} msg_per_s={:.0}", n as f64 / s);

        let t = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|g| tokio::spawn(consume_all(addr, format!("four-{g}"), "bench", n)))
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "RESULT scenario=consume_4_groups messages_per_group={n} secs={s:.3} msg_per_s_total={:.0}",
            4.0 * n as f64 / s
        );

        // Latency: device → service.
        const LAT: usize = 2000;
        let mut opts = rumqttc::MqttOptions::new("lat-dev", mqtt.ip().to_string(), mqtt.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 100);
        // rumqttc leaves Nagle on: a lone small PUBLISH then waits for the ACK of the one
        // before, which the node delays up to 40 ms (it sends nothing back at QoS 0).
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        tokio::spawn(async move { while events.poll().await.is_ok() {} });
        let mut c = Consumer::connect(addr, "lat", "lat").await.unwrap();
        let epoch = Instant::now();
        let reader = tokio::spawn(async move {
            let mut lat = Vec::with_capacity(LAT);
            while lat.len() < LAT {
                for m in c.poll(100, Duration::from_secs(5)).await.unwrap() {
                    let sent = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
                    lat.push(epoch.elapsed().as_micros() as u64 - sent);
                }
            }
            lat
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..LAT {
            let now = epoch.elapsed().as_micros() as u64;
            client
                .publish("lat/x", rumqttc::QoS::AtMostOnce, false, now.to_le_bytes().to_vec())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut lat = reader.await.unwrap();
        lat.sort_unstable();
        println!(
            "RESULT scenario=device_to_service_latency messages={LAT} p50_us={} p99_us={} max_us={}",
            lat[LAT / 2],
            lat[LAT * 99 / 100],
            lat[LAT - 1]
        );
    });
    node.stop();
}
