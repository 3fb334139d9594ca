//! Storage engine benchmark: `cargo run --release --example storage_bench [dir]`.
//!
//! * async appends of 100 B and 1 KiB records (one queue each), driven by one task that
//!   keeps `INFLIGHT` `Append` futures in flight (`buffer_unordered`), the way a gateway
//!   with many sessions would;
//! * sync appends with 1 appender and with 64 concurrent appenders, each appender awaiting
//!   its append before sending the next one (so group commit comes only from concurrency
//!   across appenders);
//! * pull throughput of the 100 B queue from offset 0 (`max` = 1000 per pull), once with the
//!   index shards' message cache holding the tail, and the rest read from segments.

use std::time::{Duration, Instant};

use actimq_actors::storage::*;
use bytes::Bytes;
use futures::StreamExt;

const INFLIGHT: usize = 4096;

fn message(topic: &str, payload: &Bytes, i: u64) -> Message {
    Message {
        topic: topic.to_owned(),
        payload: payload.clone(),
        qos: 1,
        retain: false,
        publisher: "bench".into(),
        timestamp_ms: i,
        props: MessageProps::default(),
    }
}

async fn async_appends(s: &Storage, q: &QueueName, size: usize, n: u64) -> f64 {
    let payload = Bytes::from(vec![b'x'; size]);
    let t0 = Instant::now();
    let mut st = futures::stream::iter(0..n)
        .map(|i| s.append(message("bench/topic", &payload, i), vec![q.clone()]))
        .buffer_unordered(INFLIGHT);
    let mut ok = 0u64;
    while let Some(r) = st.next().await {
        r.expect("append");
        ok += 1;
    }
    ok as f64 / t0.elapsed().as_secs_f64()
}

/// Appends in `AppendBatch`es of `batch` records (as a gateway session does with the
/// publishes it decoded from one read), keeping `INFLIGHT` records in flight in all.
async fn async_batches(s: &Storage, q: &QueueName, size: usize, n: u64, batch: usize) -> f64 {
    let payload = Bytes::from(vec![b'x'; size]);
    let t0 = Instant::now();
    let batches = n.div_ceil(batch as u64);
    let mut st = futures::stream::iter(0..batches)
        .map(|b| {
            let items = (0..batch as u64)
                .map(|i| Append {
                    message: message("bench/topic", &payload, b * batch as u64 + i),
                    queues: vec![q.clone()],
                })
                .collect();
            s.append_batch(items)
        })
        .buffer_unordered((INFLIGHT / batch).max(1));
    let mut ok = 0u64;
    while let Some(rs) = st.next().await {
        for r in rs {
            r.expect("append");
            ok += 1;
        }
    }
    ok as f64 / t0.elapsed().as_secs_f64()
}

async fn sync_appenders(s: &Storage, appenders: usize, dur: Duration) -> (f64, u64, u64) {
    let payload = Bytes::from(vec![b'y'; 100]);
    let f0 = s.log_fsyncs();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..appenders)
        .map(|w| {
            let (s, payload) = (s.clone(), payload.clone());
            actix_rt::spawn(async move {
                let q = QueueName::topic(&format!("sync{w}"), 0);
                let mut n = 0u64;
                while t0.elapsed() < dur {
                    s.append(message("bench/sync", &payload, n), vec![q.clone()])
                        .await
                        .expect("append");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    let secs = t0.elapsed().as_secs_f64();
    (total as f64 / secs, total, s.log_fsyncs() - f0)
}

async fn pull_all(s: &Storage, q: &QueueName) -> (u64, u64, f64) {
    let t0 = Instant::now();
    let (mut msgs, mut bytes, mut from) = (0u64, 0u64, 0u64);
    loop {
        let p = s
            .pull(Pull {
                queue: q.clone(),
                from,
                max: 1000,
                max_bytes: 4 << 20,
            })
            .await
            .expect("pull");
        msgs += p.messages.len() as u64;
        bytes += p
            .messages
            .iter()
            .map(|m| m.message.payload.len() as u64)
            .sum::<u64>();
        if p.next >= p.max_offset {
            break;
        }
        from = p.next;
    }
    (msgs, bytes, t0.elapsed().as_secs_f64())
}

fn main() {
    let base = std::env::args().nth(1).map(std::path::PathBuf::from);
    let tmp = tempfile_dir(base);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let dir = tmp.clone();
    actix_rt::System::new().block_on(async move {
        let tmp = dir;
        let mut cfg = StorageConfig {
            dir: tmp.join("async"),
            ..Default::default()
        };
        let s = Storage::open(cfg.clone(), log.clone()).await.expect("open");
        let q100 = QueueName::topic("b100", 0);
        let q1k = QueueName::topic("b1k", 0);
        // Warm-up.
        async_appends(&s, &QueueName::topic("warm", 0), 100, 50_000).await;
        let r100 = async_appends(&s, &q100, 100, 2_000_000).await;
        println!(
            "async append 100 B : {:>10.0} appends/s ({:.1} MB/s payload)",
            r100,
            r100 * 100.0 / 1e6
        );
        let rb = async_batches(&s, &QueueName::topic("b100b", 0), 100, 2_000_000, 256).await;
        println!(
            "async batch 100 B  : {:>10.0} appends/s ({:.1} MB/s payload; AppendBatch of 256)",
            rb,
            rb * 100.0 / 1e6
        );
        let r1k = async_appends(&s, &q1k, 1024, 500_000).await;
        println!(
            "async append 1 KiB : {:>10.0} appends/s ({:.1} MB/s payload)",
            r1k,
            r1k * 1024.0 / 1e6
        );
        let (m, b, secs) = pull_all(&s, &q100).await;
        println!(
            "pull 100 B queue   : {:>10.0} msgs/s, {:.1} MB/s payload ({m} msgs in {secs:.2} s)",
            m as f64 / secs,
            b as f64 / secs / 1e6
        );
        let (m, b, secs) = pull_all(&s, &q1k).await;
        println!(
            "pull 1 KiB queue   : {:>10.0} msgs/s, {:.1} MB/s payload ({m} msgs in {secs:.2} s)",
            m as f64 / secs,
            b as f64 / secs / 1e6
        );
        let st = s.stats().await.expect("stats");
        println!(
            "  (cache hits {}, misses {}, segments {})",
            st.cache_hits, st.cache_misses, st.segments
        );
        s.shutdown().await;

        cfg.dir = tmp.join("sync");
        cfg.flush = FlushMode::Sync;
        let s = Storage::open(cfg, log.clone()).await.expect("open");
        let (r1, n1, f1) = sync_appenders(&s, 1, Duration::from_secs(3)).await;
        println!("sync, 1 appender   : {r1:>10.0} appends/s ({n1} appends, {f1} fsyncs)");
        let (r64, n64, f64_) = sync_appenders(&s, 64, Duration::from_secs(5)).await;
        println!("sync, 64 appenders : {r64:>10.0} appends/s ({n64} appends, {f64_} fsyncs)");
        let (r256, n256, f256) = sync_appenders(&s, 256, Duration::from_secs(5)).await;
        println!("sync, 256 appenders: {r256:>10.0} appends/s ({n256} appends, {f256} fsyncs)");
        s.shutdown().await;
    });
    let _ = std::fs::remove_dir_all(&tmp);
}

fn tempfile_dir(base: Option<std::path::PathBuf>) -> std::path::PathBuf {
    let base = base.unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("actimq-storage-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("bench dir");
    d
}
