//! Crash durability: a child process appends in `sync` mode and prints every acknowledged
//! position; the parent SIGKILLs it at a random moment, reopens the storage and checks that
//! every acknowledged record is there and intact. Several rounds on the same directory, so
//! recovery also runs on top of earlier recoveries.
//!
//! The child is this same test binary, re-executed with `--exact child_appender --ignored`
//! and `STORAGE_CRASH_DIR` set; without that variable the child test does nothing.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use actimq_actors::storage::*;
use bytes::Bytes;
use rand::Rng;

const ENV_DIR: &str = "STORAGE_CRASH_DIR";
const ENV_ROUND: &str = "STORAGE_CRASH_ROUND";

fn payload(round: u32, writer: u32, seq: u64) -> Bytes {
    let mut p = format!("r{round}-w{writer}-s{seq}-").into_bytes();
    let fill = (seq % 200) as usize + 20;
    p.extend((0..fill).map(|i| b'a' + ((i as u64 + seq) % 26) as u8));
    Bytes::from(p)
}

fn message(round: u32, writer: u32, seq: u64) -> Message {
    Message {
        topic: format!("crash/w{writer}"),
        payload: payload(round, writer, seq),
        qos: 1,
        retain: false,
        publisher: format!("w{writer}"),
        timestamp_ms: seq,
        props: MessageProps::default(),
    }
}

fn config(dir: &str) -> StorageConfig {
    StorageConfig {
        dir: dir.into(),
        segment_bytes: 256 * 1024, // several rolls per round
        flush: FlushMode::Sync,
        index_shards: 2,
        notifier_shards: 1,
        ..Default::default()
    }
}

fn queue_of(writer: u32) -> QueueName {
    QueueName::topic(&format!("w{writer}"), 0)
}

/// The child: appends forever from 8 concurrent writers, printing `ACK writer seq position`.
#[actix_rt::test]
#[ignore]
async fn child_appender() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let round: u32 = std::env::var(ENV_ROUND)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let s = Storage::open(config(&dir), log).await.expect("open");
    println!("READY");
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let s = s.clone();
        tasks.push(actix_rt::spawn(async move {
            for seq in 0u64.. {
                let pos = s
                    .append(
                        message(round, w, seq),
                        vec![queue_of(w), QueueName::filter("crash/+")],
                    )
                    .await
                    .expect("append");
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "ACK {w} {seq} {pos}");
                let _ = out.flush();
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[actix_rt::test]
async fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().to_str().unwrap().to_owned();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    // (round, writer) -> acknowledged (seq, position), across rounds.
    let mut acked: HashMap<(u32, u32), Vec<(u64, Position)>> = HashMap::new();
    for round in 0..5u32 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_appender",
                "--nocapture",
                "--ignored",
                "--test-threads=1",
            ])
            .env(ENV_DIR, &dir_s)
            .env(ENV_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => lines.push(l),
                    Err(_) => break,
                }
            }
            lines
        });
        // Wait for READY by time (the reader owns stdout), then kill at a random moment.
        let kill_after = Duration::from_millis(rng.gen_range(300..1200));
        let t0 = Instant::now();
        std::thread::sleep(kill_after);
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        let lines = reader.join().unwrap();
        let mut n = 0;
        for l in &lines {
            let mut it = l.split_whitespace();
            if it.next() != Some("ACK") {
                continue;
            }
            // Only complete lines count (the last one may be cut by the kill).
            let (Some(w), Some(seq), Some(pos), None) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                continue;
            };
            let (Ok(w), Ok(seq), Ok(pos)) =
                (w.parse::<u32>(), seq.parse::<u64>(), pos.parse::<u64>())
            else {
                continue;
            };
            acked.entry((round, w)).or_default().push((seq, pos));
            n += 1;
        }
        println!(
            "round {round}: killed after {:?}, {n} acknowledged appends",
            t0.elapsed()
        );

        // Reopen in this process and check every acknowledged record.
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let s = Storage::open(config(&dir_s), log).await.unwrap();
        for w in 0..8u32 {
            let q = queue_of(w);
            let mut by_pos: HashMap<Position, Bytes> = HashMap::new();
            let mut from = 0;
            loop {
                let p = s
                    .pull(Pull {
                        queue: q.clone(),
                        from,
                        max: 1000,
                        max_bytes: 16 << 20,
                    })
                    .await
                    .unwrap();
                for m in &p.messages {
                    by_pos.insert(m.position, m.message.payload.clone());
                }
                if p.next >= p.max_offset {
                    break;
                }
                from = p.next;
            }
            for r in 0..=round {
                for (seq, pos) in acked.get(&(r, w)).map(|v| v.as_slice()).unwrap_or(&[]) {
                    let got = by_pos.get(pos).unwrap_or_else(|| {
                        panic!("round {round}: acknowledged record r{r} w{w} s{seq} at {pos} is missing")
                    });
                    assert_eq!(*got, payload(r, w, *seq), "record at {pos} is not intact");
                }
            }
        }
        s.shutdown().await;
    }
    assert!(
        acked.values().map(|v| v.len()).sum::<usize>() > 0,
        "the child never acknowledged anything"
    );
}
