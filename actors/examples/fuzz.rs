//! Long local fuzz runs of the decoders (stable Rust; see FUZZING.md).
//!
//! ```text
//! cargo run --release -p actimq-actors --example fuzz -- <mqtt|service|record> [secs] [seed]
//! cargo run --release -p actimq-actors --example fuzz -- gen-corpus
//! cargo run --release -p actimq-actors --example fuzz -- repro <target> <file>
//! ```
//! Crashing inputs are written to `fuzz/crashes/<target>/` (not committed); turn each
//! into a regression by moving it to `fuzz/regressions/<target>/`.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("");
    match cmd {
        "gen-corpus" => {
            for t in harness::TARGETS {
                let dir = harness::fuzz_dir().join("corpus").join(t);
                std::fs::create_dir_all(&dir).unwrap();
                let seeds = harness::seeds(t);
                for (name, data) in &seeds {
                    std::fs::write(dir.join(format!("{name}.bin")), data).unwrap();
                }
                println!("{t}: {} seeds in {}", seeds.len(), dir.display());
            }
        }
        "validate" => {
            for t in harness::TARGETS {
                for (p, d) in harness::load_dir("corpus", t) {
                    println!(
                        "{t} {}: {:?}",
                        p.file_name().unwrap().to_string_lossy(),
                        harness::seed_items(t, &d)
                    );
                }
            }
        }
        "repro" => {
            let (t, f) = (&args[1], &args[2]);
            let data = std::fs::read(f).unwrap();
            println!("{:?}", harness::run(t, &data));
        }
        t if harness::TARGETS.contains(&t) => {
            let secs: u64 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(60);
            let seed: u64 = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(1);
            let corpus: Vec<Vec<u8>> = harness::load_dir("corpus", t)
                .into_iter()
                .map(|(_, d)| d)
                .collect();
            println!(
                "target {t}: {} corpus files, {secs} s, seed {seed}",
                corpus.len()
            );
            harness::quiet_panics();
            let start = Instant::now();
            let st = harness::fuzz(
                t,
                corpus,
                seed,
                start + Duration::from_secs(secs),
                u64::MAX,
                |st| {
                    println!(
                    "  {:>5.0}s  iters {:>11}  exec/s {:>8.0}  pool {:>5}  sigs {:>5}  crashes {}",
                    start.elapsed().as_secs_f64(),
                    st.iterations,
                    st.iterations as f64 / start.elapsed().as_secs_f64(),
                    st.pool,
                    st.signatures,
                    st.crashes.len()
                );
                },
            );
            let el = start.elapsed().as_secs_f64();
            println!(
                "done: target {t}  iterations {}  ({:.0}/s over {:.0} s)  pool {}  signatures {}  slowest input {:?} ({} bytes)  crashes {}",
                st.iterations,
                st.iterations as f64 / el,
                el,
                st.pool,
                st.signatures,
                st.slowest,
                st.slowest_input.len(),
                st.crashes.len()
            );
            let dir = harness::fuzz_dir().join("crashes").join(t);
            // The slowest input, to look at for algorithmic blow-ups (not a crash).
            let slow = std::env::temp_dir().join(format!("actimq-fuzz-{t}-slowest.bin"));
            std::fs::write(&slow, &st.slowest_input).unwrap();
            println!("slowest input saved to {}", slow.display());
            for (i, c) in st.crashes.iter().enumerate() {
                std::fs::create_dir_all(&dir).unwrap();
                let p = dir.join(format!("crash-{seed}-{i}.bin"));
                std::fs::write(&p, &c.input).unwrap();
                println!("CRASH {}: {}", p.display(), c.message);
            }
            if !st.crashes.is_empty() {
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("usage: fuzz <mqtt|service|record> [secs] [seed] | gen-corpus | repro <target> <file>");
            std::process::exit(2);
        }
    }
}
