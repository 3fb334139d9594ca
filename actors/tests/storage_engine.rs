//! Integration tests of the storage engine: roll + reopen, recovery, torn tails, corrupt
//! sealed segments, retention, 100k queues, group commit, kv and offsets.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actimq_actors::storage::kv::{KvPut as Put, KvStatsQuery};
use actimq_actors::storage::*;
use bytes::Bytes;

/// A slog drain that keeps every line (level, message, key=values) for assertions.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

struct Ser<'a>(&'a mut String);
impl slog::Serializer for Ser<'_> {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for Capture {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, r: &slog::Record, kv: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        let mut s = format!("{} {}", r.level().as_short_str(), r.msg());
        let _ = r.kv().serialize(r, &mut Ser(&mut s));
        let _ = kv.serialize(r, &mut Ser(&mut s));
        if std::env::var("STORAGE_TEST_LOG").is_ok() {
            eprintln!("{s}");
        }
        if let Ok(mut v) = self.0.lock() {
            v.push(s);
        }
        Ok(())
    }
}

impl Capture {
    fn logger(&self) -> slog::Logger {
        slog::Logger::root(slog::Fuse(self.clone()), slog::o!())
    }
    fn lines(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

fn msg(i: usize, size: usize) -> Message {
    let mut payload = format!("m{i:08}-").into_bytes();
    payload.resize(size.max(payload.len()), b'a' + (i % 26) as u8);
    Message {
        topic: format!("home/room{}/temp", i % 7),
        payload: Bytes::from(payload),
        qos: 1,
        retain: false,
        publisher: "tester".into(),
        timestamp_ms: 1_700_000_000_000 + i as u64,
        props: MessageProps::default(),
    }
}

fn cfg(dir: &std::path::Path) -> StorageConfig {
    StorageConfig {
        dir: dir.to_path_buf(),
        segment_bytes: 16 * 1024,
        index_shards: 2,
        notifier_shards: 2,
        ..Default::default()
    }
}

async fn pull_all(s: &Storage, q: &QueueName) -> Vec<PulledMessage> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let p = s
            .pull(Pull {
                queue: q.clone(),
                from,
                max: 97,
                max_bytes: 1 << 20,
            })
            .await
            .expect("pull");
        if p.messages.is_empty() && p.next >= p.max_offset {
            return out;
        }
        assert!(
            p.next > from || !p.messages.is_empty(),
            "pull made no progress"
        );
        from = p.next;
        out.extend(p.messages);
    }
}

async fn append_n(
    s: &Storage,
    range: std::ops::Range<usize>,
    size: usize,
    queues: impl Fn(usize) -> Vec<QueueName>,
) -> Vec<Position> {
    // Many appends in flight at once (as a gateway with many sessions would do).
    let mut out = Vec::new();
    let idx: Vec<usize> = range.collect();
    for chunk in idx.chunks(256) {
        let futs = chunk.iter().map(|&i| s.append(msg(i, size), queues(i)));
        for r in futures::future::join_all(futs).await {
            out.push(r.expect("append"));
        }
    }
    out
}

#[actix_rt::test]
async fn append_and_pull_across_segment_roll_then_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::default();
    let ta = QueueName::topic("home", 0);
    let fx = QueueName::filter("home/+/temp");
    let n = 2000;
    {
        let s = Storage::open(cfg(dir.path()), cap.logger()).await.unwrap();
        let (ta2, fx2) = (ta.clone(), fx.clone());
        let pos = append_n(&s, 0..n, 100, move |i| {
            if i % 2 == 0 {
                vec![ta2.clone(), fx2.clone()]
            } else {
                vec![ta2.clone()]
            }
        })
        .await;
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "positions increase");
        let st = s.stats().await.unwrap();
        assert!(st.segments > 5, "segments rolled: {st:?}");
        let all = pull_all(&s, &ta).await;
        assert_eq!(all.len(), n);
        for (i, m) in all.iter().enumerate() {
            assert_eq!(m.offset, i as u64);
            assert_eq!(m.position, pos[i]);
            assert_eq!(*m.message, msg(i, 100));
        }
        assert_eq!(pull_all(&s, &fx).await.len(), n / 2);
        let b = s.bounds(ta.clone()).await.unwrap();
        assert_eq!(
            b,
            QueueBounds {
                min_offset: 0,
                max_offset: n as u64
            }
        );
        // max_bytes: at least one message, about max_bytes.
        let p = s
            .pull(Pull {
                queue: ta.clone(),
                from: 10,
                max: 1000,
                max_bytes: 1,
            })
            .await
            .unwrap();
        assert_eq!(p.messages.len(), 1);
        assert_eq!(p.next, 11);
        s.shutdown().await;
        s.shutdown().await; // idempotent
    }
    {
        let s = Storage::open(cfg(dir.path()), cap.logger()).await.unwrap();
        let all = pull_all(&s, &ta).await;
        assert_eq!(all.len(), n);
        for (i, m) in all.iter().enumerate() {
            assert_eq!(*m.message, msg(i, 100));
        }
        // Appending after a reopen continues the offsets.
        let ta2 = ta.clone();
        append_n(&s, n..n + 10, 100, move |_| vec![ta2.clone()]).await;
        let b = s.bounds(ta.clone()).await.unwrap();
        assert_eq!(b.max_offset, n as u64 + 10);
        let all = pull_all(&s, &ta).await;
        assert_eq!(*all[n + 9].message, msg(n + 9, 100));
        s.shutdown().await;
    }
    assert!(
        !cap.lines()
            .iter()
            .any(|l| l.starts_with("ERRO") || l.starts_with("CRIT")),
        "{:?}",
        cap.lines()
    );
}

#[actix_rt::test]
async fn recovery_rebuilds_indexes_keeps_offsets_and_kv() {
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::default();
    let mut c = cfg(dir.path());
    c.flush = FlushMode::Sync;
    let q = QueueName::topic("svc", 3);
    {
        let s = Storage::open(c.clone(), cap.logger()).await.unwrap();
        let q2 = q.clone();
        append_n(&s, 0..500, 50, move |_| vec![q2.clone()]).await;
        s.commit_offset("group-a".into(), q.clone(), 123)
            .await
            .unwrap();
        s.commit_offset("group-b".into(), q.clone(), 7)
            .await
            .unwrap();
        s.offsets
            .send(DropOwner {
                owner: "group-b".into(),
            })
            .await
            .unwrap()
            .unwrap();
        // Enough overwrites for the kv journal to be compacted (> 1 MiB, > 2x live).
        for i in 0..300 {
            s.kv.send(Put {
                key: format!("retain/t{}", i % 5),
                value: Some(vec![i as u8; 8 * 1024]),
            })
            .await
            .unwrap()
            .unwrap();
        }
        s.kv.send(Put {
            key: "session/c1".into(),
            value: Some(b"sess".to_vec()),
        })
        .await
        .unwrap()
        .unwrap();
        s.kv.send(Put {
            key: "retain/t0".into(),
            value: None,
        })
        .await
        .unwrap()
        .unwrap();
        let ks = s.kv.send(KvStatsQuery).await.unwrap();
        assert!(ks.compactions >= 1, "kv compacted: {ks:?}");
        s.shutdown().await;
    }
    // Lose every index file and the checkpoint: recovery must rebuild from the log.
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
    {
        let s = Storage::open(c.clone(), cap.logger()).await.unwrap();
        let all = pull_all(&s, &q).await;
        assert_eq!(all.len(), 500);
        for (i, m) in all.iter().enumerate() {
            assert_eq!(*m.message, msg(i, 50));
        }
        assert_eq!(
            s.load_offset("group-a".into(), q.clone()).await.unwrap(),
            Some(123)
        );
        assert_eq!(
            s.load_offset("group-b".into(), q.clone()).await.unwrap(),
            None
        );
        let retained =
            s.kv.send(KvScan {
                prefix: "retain/".into(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(retained.len(), 4);
        assert_eq!(retained[0].0, "retain/t1");
        assert_eq!(retained[3].1, vec![299u32 as u8; 8 * 1024]);
        assert_eq!(
            s.kv.send(KvGet {
                key: "session/c1".into()
            })
            .await
            .unwrap()
            .unwrap(),
            Some(b"sess".to_vec())
        );
        s.shutdown().await;
    }
    // Reopen once more with the index intact: replay must not duplicate entries.
    {
        let s = Storage::open(c, cap.logger()).await.unwrap();
        assert_eq!(s.bounds(q.clone()).await.unwrap().max_offset, 500);
        s.shutdown().await;
    }
}

fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v.pop().unwrap()
}

#[actix_rt::test]
async fn torn_tail_is_truncated_and_every_complete_record_survives() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::default();
    let q = QueueName::topic("torn", 0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let mut total = 0;
    for round in 0..4 {
        let s = Storage::open(cfg(dir.path()), cap.logger()).await.unwrap();
        assert_eq!(
            s.bounds(q.clone()).await.unwrap().max_offset,
            total as u64,
            "round {round}"
        );
        let q2 = q.clone();
        append_n(&s, total..total + 150, 80, move |_| vec![q2.clone()]).await;
        total += 150;
        s.shutdown().await;
        // Garbage at the end of the last segment (sometimes a plausible header).
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(last_segment(dir.path()))
            .unwrap();
        let n = rng.gen_range(1..3000);
        let mut junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        if round % 2 == 1 && junk.len() > 10 {
            junk[0..4].copy_from_slice(&100u32.to_le_bytes());
            junk[8] = 1;
            junk[9] = 0;
        }
        f.write_all(&junk).unwrap();
    }
    let s = Storage::open(cfg(dir.path()), cap.logger()).await.unwrap();
    let all = pull_all(&s, &q).await;
    assert_eq!(all.len(), total);
    for (i, m) in all.iter().enumerate() {
        assert_eq!(*m.message, msg(i, 80));
    }
    s.shutdown().await;
    assert!(cap
        .lines()
        .iter()
        .any(|l| l.contains("truncating torn tail")));
}

#[actix_rt::test]
async fn crc_mismatch_in_a_sealed_segment_is_reported_and_the_rest_is_readable() {
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::default();
    let q = QueueName::topic("crc", 0);
    let n = 600;
    let positions = {
        let s = Storage::open(cfg(dir.path()), cap.logger()).await.unwrap();
        let q2 = q.clone();
        let pos = append_n(&s, 0..n, 100, move |_| vec![q2.clone()]).await;
        assert!(s.stats().await.unwrap().segments >= 3);
        s.shutdown().await;
        pos
    };
    // Flip a payload byte of record 5 (in the first, sealed, segment).
    let first = dir.path().join("log").join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&first).unwrap();
    let at = (positions[5] + 40) as usize;
    bytes[at] ^= 0xFF;
    std::fs::write(&first, &bytes).unwrap();

    // 1. Indexes intact: the pull skips the bad record (error logged), everything else reads.
    {
        let s = Storage::open(cfg(dir.path()), cap.logger()).await.unwrap();
        let all = pull_all(&s, &q).await;
        assert_eq!(all.len(), n - 1);
        assert!(all.iter().all(|m| m.offset != 5));
        s.shutdown().await;
    }
    assert!(cap
        .lines()
        .iter()
        .any(|l| l.starts_with("ERRO") && l.contains("skipped by pull")));
    // 2. Rebuild from the log: the scan reports file and position and skips to the next record.
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
    {
        let s = Storage::open(cfg(dir.path()), cap.logger()).await.unwrap();
        let all = pull_all(&s, &q).await;
        assert_eq!(all.len(), n - 1);
        for m in &all {
            assert_ne!(m.position, positions[5]);
        }
        assert_eq!(*all[5].message, msg(6, 100));
        s.shutdown().await;
    }
    let lines = cap.lines();
    let report = lines
        .iter()
        .find(|l| l.contains("corrupt record in a sealed segment"))
        .unwrap_or_else(|| panic!("no report in {lines:?}"));
    assert!(
        report.contains(&format!("position={}", positions[5])),
        "{report}"
    );
    assert!(report.contains("00000000000000000000.log"), "{report}");
}

#[actix_rt::test]
async fn retention_deletes_old_segments_and_moves_min_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::default();
    let mut c = cfg(dir.path());
    c.segment_bytes = 8 * 1024;
    c.retention_bytes = Some(32 * 1024);
    let q = QueueName::topic("ret", 0);
    let s = Storage::open(c.clone(), cap.logger()).await.unwrap();
    let q2 = q.clone();
    append_n(&s, 0..1000, 100, move |_| vec![q2.clone()]).await;
    let start = s.run_retention().await.unwrap();
    let st = s.stats().await.unwrap();
    assert!(start > 0 && st.log_bytes <= 32 * 1024 + 8 * 1024, "{st:?}");
    let files = std::fs::read_dir(dir.path().join("log")).unwrap().count();
    assert_eq!(files, st.segments);
    let b = s.bounds(q.clone()).await.unwrap();
    assert!(b.min_offset > 0 && b.max_offset == 1000, "{b:?}");
    let p = s
        .pull(Pull {
            queue: q.clone(),
            from: 0,
            max: 10,
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
    assert_eq!(p.min_offset, b.min_offset);
    assert_eq!(p.messages[0].offset, b.min_offset);
    assert_eq!(*p.messages[0].message, msg(b.min_offset as usize, 100));
    assert!(p.messages[0].position >= start);
    s.shutdown().await;
    // After a reopen the min offset is still past the deleted segments.
    let s = Storage::open(c.clone(), cap.logger()).await.unwrap();
    let b2 = s.bounds(q.clone()).await.unwrap();
    assert_eq!(b2, b);
    assert_eq!(pull_all(&s, &q).await.len() as u64, 1000 - b.min_offset);
    s.shutdown().await;

    // Age-based retention: everything sealed is older than 0 s.
    let dir2 = tempfile::tempdir().unwrap();
    let mut c2 = cfg(dir2.path());
    c2.segment_bytes = 8 * 1024;
    c2.retention_secs = Some(0);
    let s = Storage::open(c2, cap.logger()).await.unwrap();
    let q2 = q.clone();
    append_n(&s, 0..300, 100, move |_| vec![q2.clone()]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.run_retention().await.unwrap();
    assert_eq!(s.stats().await.unwrap().segments, 1);
    let b = s.bounds(q.clone()).await.unwrap();
    assert!(b.min_offset > 0 && b.min_offset < 300);
    s.shutdown().await;
}

#[actix_rt::test]
async fn retention_frees_the_disk_blocks_of_dead_index_entries() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::default();
    let mut c = cfg(dir.path());
    c.segment_bytes = 64 * 1024;
    c.retention_bytes = Some(128 * 1024);
    let q = QueueName::topic("dead", 0);
    let s = Storage::open(c.clone(), cap.logger()).await.unwrap();
    let q2 = q.clone();
    append_n(&s, 0..20_000, 16, move |_| vec![q2.clone()]).await;
    s.shutdown().await;
    // Reopened, every entry is in the index file: 20,000 × 20 bytes.
    let s = Storage::open(c.clone(), cap.logger()).await.unwrap();
    let idx = std::fs::read_dir(dir.path().join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "idx"))
        .expect("the queue's index file");
    let before = std::fs::metadata(&idx).unwrap();
    assert!(before.len() >= 400_000, "{}", before.len());
    s.run_retention().await.unwrap();
    let b = s.bounds(q.clone()).await.unwrap();
    assert!(b.min_offset > 15_000, "{b:?}");
    let after = std::fs::metadata(&idx).unwrap();
    // Same length and offsets; the dead prefix no longer takes disk blocks.
    assert_eq!(after.len(), before.len());
    let live = (b.max_offset - b.min_offset) * 20;
    assert!(
        after.blocks() * 512 < live + 64 * 1024,
        "{} bytes allocated for {live} live bytes (was {})",
        after.blocks() * 512,
        before.blocks() * 512
    );
    let kept = pull_all(&s, &q).await;
    assert_eq!(kept.len() as u64, b.max_offset - b.min_offset);
    assert_eq!(kept[0].offset, b.min_offset);
    s.shutdown().await;
    // After a reopen the punched entries read as dead: same bounds, same messages.
    let s = Storage::open(c, cap.logger()).await.unwrap();
    assert_eq!(s.bounds(q.clone()).await.unwrap(), b);
    assert_eq!(pull_all(&s, &q).await.len(), kept.len());
    s.shutdown().await;
}

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[actix_rt::test]
async fn hundred_thousand_queues_with_bounded_files_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::default();
    let mut c = cfg(dir.path());
    c.segment_bytes = 8 << 20;
    c.max_open_files = 64;
    c.index_shards = 4;
    let queues = 100_000;
    let per_msg = 10;
    let t0 = Instant::now();
    let fds_before = count_fds();
    let s = Storage::open(c, cap.logger()).await.unwrap();
    let qn = |i: usize| QueueName::filter(&format!("dev/{i}/cmd"));
    append_n(&s, 0..queues / per_msg, 64, move |m| {
        (0..per_msg).map(|k| qn(m * per_msg + k)).collect()
    })
    .await;
    // Write every index file (checkpoint), then drop all idle queues from memory.
    let end = s.stats().await.unwrap().log_end;
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.stats().await.unwrap().checkpoint < end {
        assert!(Instant::now() < deadline, "checkpoint did not complete");
        s.commitlog
            .send(actimq_actors::storage::commitlog::Checkpoint)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = s.stats().await.unwrap();
    assert!(st.open_index_files <= 64, "{st:?}");
    let fds = count_fds();
    let evicted = s.evict_idle(Some(Duration::ZERO)).await.unwrap();
    let after = s.stats().await.unwrap();
    // Reload a sample of queues on demand.
    for i in (0..queues).step_by(997) {
        let p = s
            .pull(Pull {
                queue: qn(i),
                from: 0,
                max: 10,
                max_bytes: 1 << 20,
            })
            .await
            .unwrap();
        assert_eq!(p.messages.len(), 1, "queue {i}");
        assert_eq!(p.messages[0].message.payload, msg(i / per_msg, 64).payload);
    }
    let st2 = s.stats().await.unwrap();
    let rss = vm_rss_kib();
    println!(
        "100k queues: {:?} total, fds {fds_before} -> {fds} (open index files {}), evicted {evicted}, \
         loaded after eviction {}, after sample {}, VmRSS {} MiB",
        t0.elapsed(),
        st.open_index_files,
        after.queues_loaded,
        st2.queues_loaded,
        rss / 1024
    );
    assert_eq!(evicted, queues);
    assert_eq!(after.queues_loaded, 0);
    assert!(st2.open_index_files <= 64);
    // fds: index LRU (64) + segments, kv files, arbiter threads' epoll/eventfds (other tests
    // in this binary run in parallel, so be generous but far below 100k).
    assert!(fds < fds_before + 64 + 200, "fds {fds_before} -> {fds}");
    assert!(rss < 1024 * 1024, "VmRSS {rss} KiB");
    s.shutdown().await;
}

#[actix_rt::test]
async fn group_commit_64_concurrent_sync_appenders_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::default();
    let mut c = cfg(dir.path());
    c.flush = FlushMode::Sync;
    c.segment_bytes = 64 << 20;
    let s = Storage::open(c, cap.logger()).await.unwrap();
    let before = s.log_fsyncs();
    let per = 20;
    let tasks: Vec<_> = (0..64)
        .map(|w| {
            let s = s.clone();
            actix_rt::spawn(async move {
                let q = QueueName::topic(&format!("w{w}"), 0);
                for i in 0..per {
                    // One at a time per appender: only concurrency across appenders.
                    s.append(msg(w * 1000 + i, 100), vec![q.clone()])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let fsyncs = s.log_fsyncs() - before;
    let appends = 64 * per as u64;
    println!("group commit: {appends} sync appends, {fsyncs} fsyncs");
    assert!(
        fsyncs * 4 < appends,
        "{fsyncs} fsyncs for {appends} appends"
    );
    for w in 0..64 {
        let b = s
            .bounds(QueueName::topic(&format!("w{w}"), 0))
            .await
            .unwrap();
        assert_eq!(b.max_offset, per as u64);
    }
    s.shutdown().await;
}

#[actix_rt::test]
async fn notifier_delivers_arrivals_and_drops_dead_watchers() {
    use actix::prelude::*;
    struct W(Arc<Mutex<Vec<Offset>>>);
    impl Actor for W {
        type Context = Context<Self>;
    }
    impl Handler<Arrived> for W {
        type Result = ();
        fn handle(&mut self, a: Arrived, _: &mut Self::Context) {
            self.0.lock().unwrap().push(a.max_offset);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(cfg(dir.path()), Capture::default().logger())
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let w = W(seen.clone()).start();
    let q = QueueName::filter("a/#");
    s.watch(Watch {
        queue: q.clone(),
        id: 1,
        watcher: w.clone().recipient(),
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.append(msg(1, 10), vec![q.clone()]).await.unwrap();
    s.append(msg(2, 10), vec![q.clone()]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.lock().unwrap().last() != Some(&2) {
        assert!(
            Instant::now() < deadline,
            "no arrival: {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.unwatch(Unwatch {
        queue: q.clone(),
        id: 1,
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.append(msg(3, 10), vec![q.clone()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(seen.lock().unwrap().last(), Some(&2));
    s.shutdown().await;
}

#[actix_rt::test]
async fn too_large_and_closed_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.max_record_bytes = 4096;
    let s = Storage::open(c, Capture::default().logger()).await.unwrap();
    let r = s
        .append(msg(1, 10_000), vec![QueueName::topic("x", 0)])
        .await;
    assert!(matches!(r, Err(StorageError::TooLarge(_))), "{r:?}");
    s.append(msg(1, 100), vec![QueueName::topic("x", 0)])
        .await
        .unwrap();
    s.shutdown().await;
    let r = s.append(msg(2, 100), vec![QueueName::topic("x", 0)]).await;
    assert!(matches!(r, Err(StorageError::Closed)), "{r:?}");
}

/// `AppendBatch` and plain `Append`s sent concurrently are stored in the order they were
/// sent, and every caller gets the position of its own record (the reply channels of the
/// two kinds share one pipeline).
///
/// The requests are polled together in send order (`join_all`): when the mailbox is full,
/// actix keeps a message inside its request future until it is polled, so a caller that
/// polls later requests first would itself reorder them.
#[actix_rt::test]
async fn append_batches_interleaved_with_appends_keep_order_and_replies() {
    use futures::FutureExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(cfg(dir.path()), Capture::default().logger())
        .await
        .expect("open");
    let q = QueueName::topic("mix", 0);
    // (first record index, answers in order)
    let mut requests = Vec::new();
    let mut i = 0usize;
    for round in 0..20 {
        for _ in 0..3 {
            let f = s
                .commitlog
                .send(Append {
                    message: msg(i, 40),
                    queues: vec![q.clone()],
                })
                .map(|r| vec![r.expect("mailbox")]);
            requests.push((i, f.boxed_local()));
            i += 1;
        }
        let items: Vec<Append> = (i..i + 5 + round % 4)
            .map(|k| Append {
                message: msg(k, 40),
                queues: vec![q.clone()],
            })
            .collect();
        let n = items.len();
        let f = s
            .commitlog
            .send(AppendBatch { items })
            .map(|r| r.expect("mailbox"));
        requests.push((i, f.boxed_local()));
        i += n;
    }
    let (firsts, futs): (Vec<usize>, Vec<_>) = requests.into_iter().unzip();
    let mut by_index = std::collections::BTreeMap::new();
    for (first, answers) in firsts
        .into_iter()
        .zip(futures::future::join_all(futs).await)
    {
        for (j, r) in answers.into_iter().enumerate() {
            by_index.insert(first + j, r.expect("append"));
        }
    }
    assert_eq!(by_index.len(), i);
    let positions: Vec<Position> = by_index.values().copied().collect();
    for (k, w) in positions.windows(2).enumerate() {
        assert!(
            w[0] < w[1],
            "log order is send order: record {k} at {} but {} at {}",
            w[0],
            k + 1,
            w[1]
        );
    }
    let pulled = pull_all(&s, &q).await;
    assert_eq!(pulled.len(), i);
    for (k, m) in pulled.iter().enumerate() {
        assert_eq!(m.position, by_index[&k], "reply {k} names its own record");
        assert!(m
            .message
            .payload
            .starts_with(format!("m{k:08}-").as_bytes()));
    }
    assert!(s.append_batch(Vec::new()).await.is_empty());
    s.shutdown().await;
}
