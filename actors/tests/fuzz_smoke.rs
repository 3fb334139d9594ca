//! Bounded runs of the stable fuzz harness (`fuzz/harness.rs`, see FUZZING.md): the
//! committed seed corpus must decode, every saved crash in `fuzz/regressions/` must no
//! longer panic, and each target survives a few seconds of mutations. Longer runs:
//! `cargo run --release -p actimq-actors --example fuzz -- <target> <secs>`.
//! `FUZZ_SECS` / `FUZZ_SEED` override the budget and the seed.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn committed_corpus_is_current_and_valid() {
    for t in harness::TARGETS {
        let committed = harness::load_dir("corpus", t);
        let seeds = harness::seeds(t);
        assert_eq!(
            committed.len(),
            seeds.len(),
            "{t}: regenerate with `--example fuzz -- gen-corpus`"
        );
        for (name, data) in seeds {
            let path = harness::fuzz_dir()
                .join("corpus")
                .join(t)
                .join(format!("{name}.bin"));
            let on_disk =
                std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(on_disk, data, "{} is stale: run gen-corpus", path.display());
            let (items, err) = harness::seed_items(t, &data);
            if name.contains("garbage") {
                assert!(items > 0, "{t}/{name}: no valid item before the garbage");
            } else {
                assert!(
                    items > 0 && err.is_none(),
                    "{t}/{name}: seed does not decode: {items} items, {err:?}"
                );
            }
        }
    }
}

#[test]
fn regressions_do_not_panic() {
    for t in harness::TARGETS {
        for (path, data) in harness::load_dir("regressions", t) {
            // Unwinding here fails the test with the path in the message.
            let r = std::panic::catch_unwind(|| harness::run(t, &data));
            assert!(r.is_ok(), "regression {} panics again", path.display());
        }
    }
}

fn smoke(target: &str) {
    let secs = env_u64("FUZZ_SECS", 3);
    let seed = env_u64("FUZZ_SEED", 0x5eed);
    let corpus = harness::load_dir("corpus", target)
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    harness::quiet_panics();
    let st = harness::fuzz(
        target,
        corpus,
        seed,
        Instant::now() + Duration::from_secs(secs),
        2_000_000,
        |_| {},
    );
    println!(
        "{target}: {} iterations, {} signatures, seed {seed}",
        st.iterations, st.signatures
    );
    assert!(st.iterations > 0);
    if let Some(c) = st.crashes.first() {
        panic!(
            "{target}: {} crash(es); first: {}\ninput (hex): {}\nsave it under fuzz/regressions/{target}/",
            st.crashes.len(),
            c.message,
            hex(&c.input)
        );
    }
}

#[test]
fn fuzz_mqtt_decoder() {
    smoke("mqtt");
}

#[test]
fn fuzz_service_decoder() {
    smoke("service");
}

#[test]
fn fuzz_record_decoder() {
    smoke("record");
}
