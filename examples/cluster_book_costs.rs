//! What the shared user book costs in cluster mode, on a private
//! `redis-server`: Redis memory per remembered user, the bytes and wall time
//! of one sync carrying 10,000 active users (new, then returning), beside
//! the same sync with the book off, and the store rows one flush writes.
//!
//! ```text
//! cargo run --release --example cluster_book_costs [-- <database url>]
//! ```
//!
//! Needs `redis-server` and `redis-cli` on PATH. The store is SQLite in
//! memory unless a database URL (e.g. a PostgreSQL one) is given: the rows
//! a flush writes are the same count on either.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use botmetrics::config::{Config, parse_redis_urls};
use botmetrics::event::{BodyFormat, parse_batch};
use botmetrics::persist::FlushOutcome;
use botmetrics::startup::Application;

const ACTIVE: usize = 10_000;
/// Runs of 10,000 new users each before memory is read.
const FILL_RUNS: usize = 20;
const RUNS: usize = 11;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn redis_server(port: u16) -> Server {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    // Owned first: a start that fails still kills and waits for it.
    let server = Server(child);
    for _ in 0..100 {
        if cli(port, &["PING"]).trim() == "PONG" {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server did not start on port {port}");
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli on PATH");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn info(port: u16, section: &str) -> BTreeMap<String, String> {
    cli(port, &["INFO", section])
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn number(port: u16, section: &str, field: &str) -> u64 {
    info(port, section)
        .get(field)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One message from each of `users` (`u<first>`…), at `ts`.
fn batch(first: usize, users: usize, ts: i64) -> Vec<u8> {
    let body: Vec<String> = (first..first + users)
        .map(|i| format!(r#"{{"type":"message","role":"user","user_id":"u{i}","ts":{ts}}}"#))
        .collect();
    format!("[{}]", body.join(",")).into_bytes()
}

struct Measured {
    sync_ms: f64,
    bytes_in: f64,
}

async fn cluster(port: u16, database: &str, book: bool) -> (Application, u16) {
    let mut config = Config::for_tests("b=t1", database);
    config.redis_url = Some(parse_redis_urls(&format!("redis://127.0.0.1:{port}")).expect("url"));
    if !book {
        config.user_memory = Duration::ZERO;
    }
    (Application::build(config).await.expect("builds"), port)
}

/// `RUNS` syncs each carrying one message of each of `ACTIVE` users, from
/// `first` on (`fresh`: new users each run; else the same users again).
async fn syncs(app: &Application, port: u16, first: usize, fresh: bool) -> Measured {
    let state = app.state().clone();
    let syncer = app.syncer().expect("cluster mode");
    let bot = state.metrics.bot("b").expect("bot").clone();
    let (mut ms, mut bytes) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let now = chrono::Utc::now().timestamp();
        let from = if fresh { first + run * ACTIVE } else { first };
        let body = batch(from, ACTIVE, now);
        let events = parse_batch(
            &body,
            BodyFormat::Json,
            ACTIVE + 1,
            now,
            &botmetrics::event::UserKey::legacy(),
        )
        .expect("valid batch");
        state
            .ingest
            .apply(&bot, &events, now * 1000)
            .await
            .expect("accepted");
        let before = number(port, "stats", "total_net_input_bytes");
        let started = Instant::now();
        syncer.sync_once().await.expect("sync");
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        bytes.push((number(port, "stats", "total_net_input_bytes") - before) as f64);
    }
    Measured {
        sync_ms: median(ms),
        bytes_in: median(bytes),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let database = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "sqlite::memory:".to_owned());
    println!("| measure | value |\n| --- | --- |");
    for book in [false, true] {
        let port = free_port();
        let _redis = redis_server(port);
        let (app, port) = cluster(port, &database, book).await;
        let syncer = app.syncer().expect("cluster mode");
        syncer.sync_once().await.expect("first sync seeds");
        let label = if book { "book on" } else { "book off" };
        let new = syncs(&app, port, 0, true).await;
        println!(
            "| one sync, {ACTIVE} new users, {label}, median of {RUNS} | {:.1} ms, {:.0} bytes sent |",
            new.sync_ms, new.bytes_in
        );
        let back = syncs(&app, port, 0, false).await;
        println!(
            "| one sync, the same {ACTIVE} users again, {label}, median of {RUNS} | {:.1} ms, {:.0} bytes sent |",
            back.sync_ms, back.bytes_in
        );
        if !book {
            continue;
        }
        // Rows of one flush after one more sync of 10,000 returning users.
        let persistence = app.state().persistence.clone();
        // What earlier syncs changed goes first (at most 100,000 users a
        // flush), so the flush measured holds one sync interval's users.
        for _ in 0..10 {
            if let FlushOutcome::Wrote { users: 0, .. } | FlushOutcome::Idle =
                persistence.flush_once().await.expect("flush")
            {
                break;
            }
        }
        let _ = syncs(&app, port, 0, false).await;
        match persistence.flush_once().await.expect("flush") {
            FlushOutcome::Wrote {
                series,
                sketches,
                daily,
                users,
                ..
            } => println!(
                "| store rows of one flush after {ACTIVE} active users ({database}) | {users} user_book rows, {series} series, {sketches} sketches, {daily} daily |"
            ),
            FlushOutcome::Idle => println!("| store rows of one flush | none (idle) |"),
        }
        // Memory per remembered user: the book's hash after FILL_RUNS ×
        // ACTIVE more users, read from INFO memory and MEMORY USAGE.
        let before = number(port, "memory", "used_memory");
        let users_before: u64 = cli(port, &["HLEN", "bm:{b}:book"])
            .trim()
            .parse()
            .unwrap_or(0);
        let state = app.state().clone();
        let bot = state.metrics.bot("b").expect("bot").clone();
        for run in 0..FILL_RUNS {
            let now = chrono::Utc::now().timestamp();
            let body = batch(1_000_000 + run * ACTIVE, ACTIVE, now);
            let events = parse_batch(
                &body,
                BodyFormat::Json,
                ACTIVE + 1,
                now,
                &botmetrics::event::UserKey::legacy(),
            )
            .expect("valid batch");
            state
                .ingest
                .apply(&bot, &events, now * 1000)
                .await
                .expect("accepted");
            syncer.sync_once().await.expect("sync");
        }
        // The store got them, so the changed-users set is empty again.
        let _ = persistence.flush_once().await.expect("flush");
        let _ = persistence.flush_once().await.expect("flush");
        let after = number(port, "memory", "used_memory");
        let users: u64 = cli(port, &["HLEN", "bm:{b}:book"])
            .trim()
            .parse()
            .unwrap_or(0);
        let usage: u64 = cli(port, &["MEMORY", "USAGE", "bm:{b}:book", "SAMPLES", "0"])
            .trim()
            .parse()
            .unwrap_or(0);
        let changed = cli(port, &["SCARD", "bm:{b}:book:changed"]);
        println!(
            "| Redis memory per remembered user ({} users added, {users} held; changed set {} after the flush) | {:.1} B (INFO used_memory), {:.1} B (MEMORY USAGE of the hash) |",
            users - users_before,
            changed.trim(),
            (after.saturating_sub(before)) as f64 / (users - users_before).max(1) as f64,
            usage as f64 / users.max(1) as f64
        );
    }
}
