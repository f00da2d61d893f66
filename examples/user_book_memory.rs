//! What a million remembered users cost in resident memory: RSS before and
//! after one bot's user book takes them, read from /proc/self/status.
//!
//! `cargo run --release --example user_book_memory [users]`

use botmetrics::metrics::users::{BookLimits, UserBook};

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

fn main() {
    let users: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let before = rss_kib();
    let book = UserBook::new(BookLimits {
        max_users: usize::try_from(users).unwrap_or(usize::MAX),
        ..BookLimits::DEFAULT
    });
    let now = 1_800_000_000i64;
    for u in 1..=users {
        let ts = now - (u % 30) as i64 * 86_400;
        book.touch(
            u.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ts,
            (ts / 86_400) as u32,
            true,
        );
    }
    let after = rss_kib();
    let bytes = (after - before) * 1024;
    println!(
        "{users} users: RSS {before} KiB -> {after} KiB, {} bytes per user (table {} bytes, {} per user)",
        bytes as f64 / users as f64,
        book.bytes(),
        book.bytes() as f64 / users as f64
    );
}
