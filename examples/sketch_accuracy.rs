//! Active-user sketches: estimate error by cardinality (worst case over
//! several independent samples per size, across the sparse/dense switch),
//! sketch memory by cardinality, and memory growth with 1M and 10M
//! distinct users (resident set size, from /proc).
//!
//! Run: `cargo run --release --example sketch_accuracy`

use std::time::Instant;

use botmetrics::event::UserId;
use botmetrics::metrics::active::ActiveUsers;

const NOW: i64 = 1_800_000_000;
/// Independent samples per size (fewer for the largest sizes).
const SAMPLES: u64 = 20;

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn error_percent(estimate: u64, n: u64) -> f64 {
    (estimate as f64 - n as f64) / n as f64 * 100.0
}

fn main() {
    println!(
        "| distinct users | samples | exact | worst error | mean abs error | sketch bytes (hour + day) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let sizes = [
        1u64, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 1_024, 1_025, 1_500, 2_000, 5_000, 10_000,
        100_000, 1_000_000,
    ];
    for n in sizes {
        let samples = if n >= 100_000 { 3 } else { SAMPLES };
        let (mut exact, mut worst, mut total_abs, mut bytes) = (0, 0.0f64, 0.0, 0);
        for sample in 0..samples {
            // A different id range per size and sample: independent draws.
            let active = ActiveUsers::new();
            let base = (n * 100 + sample) * 10_000_000;
            for i in 0..n {
                active.insert_hashed(
                    botmetrics::event::UserKey::legacy().hash(&UserId::Int(i128::from(base + i))),
                    NOW,
                );
            }
            let [(_, estimate), _, _] = active.estimates_at(NOW);
            let error = error_percent(estimate, n);
            exact += u32::from(estimate == n);
            if error.abs() > worst.abs() {
                worst = error;
            }
            total_abs += error.abs();
            bytes = active.heap_bytes();
        }
        println!(
            "| {n} | {samples} | {exact} | {worst:+.2} % | {:.2} % | {bytes} |",
            total_abs / samples as f64
        );
    }
    println!();
    println!("| distinct users | RSS growth | insert time per user |");
    println!("| ---: | ---: | ---: |");
    let active = ActiveUsers::new();
    let base = rss_kib().unwrap_or(0);
    let mut inserted = 0u64;
    for target in [1_000_000u64, 10_000_000] {
        let started = Instant::now();
        let before = inserted;
        while inserted < target {
            // String ids, as many bots use them: the costlier hash input.
            let id = format!("user-{inserted}");
            active.insert_hashed(
                botmetrics::event::UserKey::legacy().hash(&UserId::Str(id.as_str().into())),
                NOW,
            );
            inserted += 1;
        }
        let per = started.elapsed().as_nanos() as f64 / (inserted - before) as f64;
        let growth = rss_kib().unwrap_or(0).saturating_sub(base);
        let [(_, estimate), _, _] = active.estimates_at(NOW);
        println!(
            "| {target} (estimate {estimate}, {:+.2} %) | {:.1} MiB | {per:.0} ns |",
            error_percent(estimate, target),
            growth as f64 / 1024.0
        );
    }
}
