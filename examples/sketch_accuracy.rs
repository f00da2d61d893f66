//! Active-user sketches: estimate error by cardinality, and memory growth
//! with 1M and 10M distinct users (resident set size, from /proc).
//!
//! Run: `cargo run --release --example sketch_accuracy`

use std::time::Instant;

use botmetrics::event::UserId;
use botmetrics::metrics::active::ActiveUsers;

const NOW: i64 = 1_800_000_000;

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    println!("| distinct users | 1d estimate | error |");
    println!("| ---: | ---: | ---: |");
    for n in [1u64, 10, 100, 1_000, 10_000, 100_000, 1_000_000] {
        // A different id range per row, so rows are independent samples.
        let active = ActiveUsers::new();
        for i in 0..n {
            active.insert(&UserId::Int(i128::from(n * 1_000_000_000 + i)), NOW);
        }
        let [(_, estimate), _, _] = active.estimates_at(NOW);
        let error = (estimate as f64 - n as f64) / n as f64 * 100.0;
        println!("| {n} | {estimate} | {error:+.2} % |");
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
            active.insert(&UserId::Str(id.as_str().into()), NOW);
            inserted += 1;
        }
        let per = started.elapsed().as_nanos() as f64 / (inserted - before) as f64;
        let growth = rss_kib().unwrap_or(0).saturating_sub(base);
        let [(_, estimate), _, _] = active.estimates_at(NOW);
        println!(
            "| {target} (estimate {estimate}, {:+.2} %) | {:.1} MiB | {per:.0} ns |",
            (estimate as f64 - target as f64) / target as f64 * 100.0,
            growth as f64 / 1024.0
        );
    }
}
