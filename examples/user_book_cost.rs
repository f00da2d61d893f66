//! What the user book costs, one figure per mode:
//!
//! * `memory [users]`: resident memory (RSS, from /proc/self/status) before
//!   and after one bot's book takes a million users;
//! * `restore [users]`: the time to restore that many stored rows (in key
//!   order, as the store returns them) into an empty book, and to scan it;
//! * `ingest on|off [batches]`: parse, check and count batches of 1,000
//!   mixed events (every one with a user, from 50,000) with the book on or
//!   off: run it under `valgrind --tool=callgrind` for instruction counts
//!   that a busy machine does not move.
//!
//! `cargo run --release --example user_book_cost -- memory`

use std::sync::Arc;
use std::time::{Duration, Instant};

use botmetrics::dedupe::Dedupe;
use botmetrics::event::{BodyFormat, UserKey, parse_batch};
use botmetrics::ingest::Ingest;
use botmetrics::metrics::Metrics;
use botmetrics::metrics::users::{BookLimits, UserBook};

const NOW: i64 = 1_800_000_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn filled(users: u64) -> UserBook {
    let book = UserBook::new(BookLimits {
        max_users: usize::try_from(users).unwrap_or(usize::MAX),
        ..BookLimits::DEFAULT
    });
    for u in 1..=users {
        let ts = NOW - (u % 30) as i64 * 86_400;
        book.touch(
            u.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ts,
            (ts / 86_400) as u32,
            true,
        );
    }
    book
}

fn batch() -> Vec<u8> {
    let mut out = String::from("[");
    for i in 0..1000usize {
        if i > 0 {
            out.push(',');
        }
        let user = 100_000 + (i * 7919) % 50_000;
        let body = match i % 4 {
            0 | 1 => r#""type":"message","role":"user""#.to_owned(),
            2 => r#""type":"message","role":"assistant""#.to_owned(),
            _ => r#""type":"response","status":"success","duration_ms":1200"#.to_owned(),
        };
        out.push_str(&format!(r#"{{{body},"user_id":{user}}}"#));
    }
    out.push(']');
    out.into_bytes()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("memory") => {
            let users = n(1, 1_000_000);
            let before = rss_kib();
            let book = filled(users);
            let after = rss_kib();
            println!(
                "{users} users: RSS +{} KiB = {:.1} bytes per user (table {} bytes = {:.1} per user)",
                after - before,
                ((after - before) * 1024) as f64 / users as f64,
                book.bytes(),
                book.bytes() as f64 / users as f64
            );
        }
        Some("restore") => {
            let users = n(1, 1_000_000);
            let mut rows = filled(users).cut().changed;
            rows.sort_by_key(|r| r.key);
            let mut best = (Duration::MAX, Duration::MAX);
            for _ in 0..5 {
                let fresh = UserBook::new(BookLimits::DEFAULT);
                let t = Instant::now();
                fresh.restore(&rows);
                let restored = t.elapsed();
                let t = Instant::now();
                let scanned = fresh.scan(NOW, (NOW / 86_400) as u32);
                let scan = t.elapsed();
                assert_eq!(scanned.users as u64, users);
                best = (best.0.min(restored), best.1.min(scan));
            }
            println!(
                "{users} users, best of 5: restore {:?}, scan {:?}",
                best.0, best.1
            );
        }
        Some("ingest") => {
            let limits = match args.get(1).map(String::as_str) {
                Some("off") => BookLimits::OFF,
                _ => BookLimits::DEFAULT,
            };
            let batches = n(2, 200);
            let metrics = Arc::new(
                Metrics::new(&[Arc::from("b")], 1000, chrono_tz::UTC, 0.0, limits)
                    .expect("registry"),
            );
            let bot = metrics.bot("b").expect("bot");
            let ingest = Ingest::new(Dedupe::new(Duration::ZERO, 16), None);
            let key = UserKey::legacy();
            let body = batch();
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            for _ in 0..batches {
                let events =
                    parse_batch(&body, BodyFormat::Json, 10_000, NOW, &key).expect("valid");
                rt.block_on(ingest.apply(&bot, &events, NOW * 1000))
                    .expect("applied");
            }
            println!(
                "{} events, book {}",
                batches * 1000,
                args.get(1).map_or("on", String::as_str)
            );
        }
        _ => eprintln!(
            "usage: user_book_cost memory [users] | restore [users] | ingest on|off [batches]"
        ),
    }
}
