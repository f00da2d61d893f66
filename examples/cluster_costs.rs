//! What cluster mode costs Redis, measured on a private `redis-server`:
//! one sync of a busy bot (10,000 series changed, 10,000 new users) and of
//! an idle one — time, bytes on the wire, commands — the Redis memory each
//! bot holds, and the time to build a summary from Redis.
//!
//! ```text
//! cargo run --release --example cluster_costs
//! ```
//!
//! Needs `redis-server` on PATH. Bytes are Redis' own counters
//! (`total_net_input_bytes`, `total_net_output_bytes`), commands its
//! `commandstats`, so they include the protocol's framing.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use botmetrics::config::{Config, parse_redis_urls};
use botmetrics::event::{BodyFormat, parse_batch};
use botmetrics::startup::Application;

const SERIES: usize = 10_000;
const USERS: usize = 10_000;
const RUNS: usize = 21;

struct Server(Child, u16);

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

fn redis_server() -> Server {
    let port = free_port();
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
    let server = Server(child, port);
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

/// Redis' INFO fields of one section, by name.
fn info(port: u16, section: &str) -> BTreeMap<String, String> {
    cli(port, &["INFO", section])
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn net_bytes(port: u16) -> (u64, u64) {
    let stats = info(port, "stats");
    let get = |k: &str| stats.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    (get("total_net_input_bytes"), get("total_net_output_bytes"))
}

/// Calls per command since the last `CONFIG RESETSTAT`.
fn commands(port: u16) -> BTreeMap<String, u64> {
    info(port, "commandstats")
        .into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("cmdstat_")?.to_owned();
            let calls = v.split(',').find_map(|p| p.strip_prefix("calls="))?;
            Some((name, calls.parse().ok()?))
        })
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "config"))
        .collect()
}

/// Bytes per key (`MEMORY USAGE`, every element sampled) of the keys
/// matching `pattern`.
fn memory_of(port: u16, pattern: &str) -> BTreeMap<String, u64> {
    cli(port, &["--scan", "--pattern", pattern])
        .lines()
        .filter(|k| !k.is_empty())
        .map(|k| {
            let bytes = cli(port, &["MEMORY", "USAGE", k, "SAMPLES", "0"])
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
            (k.to_owned(), bytes)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let redis = redis_server();
    let port = redis.1;
    let mut config = Config::for_tests("busy=t1,idle=t2", "sqlite::memory:");
    config.redis_url = Some(parse_redis_urls(&format!("redis://127.0.0.1:{port}")).expect("url"));
    config.max_label_values = SERIES as u64 + 10;
    let app = Application::build(config).await.expect("builds");
    let state = app.state().clone();
    let syncer = app.syncer().expect("cluster mode");
    let busy = state.metrics.bot("busy").expect("busy").clone();
    let now = chrono::Utc::now().timestamp();
    syncer.sync_once().await.expect("first sync seeds");

    println!("| measure | value |\n| --- | --- |");
    let mut sync_ms = Vec::new();
    let mut bytes_in = Vec::new();
    let mut bytes_out = Vec::new();
    let mut busy_commands = BTreeMap::new();
    for run in 0..RUNS {
        // 10,000 custom-event series changed and 10,000 users new to the
        // cluster (distinct per run), as one bot's traffic between syncs.
        let body: Vec<String> = (0..SERIES)
            .map(|i| {
                format!(
                    r#"{{"type":"custom","name":"c{i}","value":1,"user_id":"r{run}u{i}","ts":{now}}}"#
                )
            })
            .collect();
        let body = format!("[{}]", body.join(","));
        let events = parse_batch(
            body.as_bytes(),
            BodyFormat::Json,
            SERIES + 1,
            now,
            &botmetrics::event::UserKey::legacy(),
        )
        .expect("valid batch");
        state
            .ingest
            .apply(&busy, &events, now * 1000)
            .await
            .expect("accepted");
        drop(events);
        cli(port, &["CONFIG", "RESETSTAT"]);
        let before = net_bytes(port);
        let started = Instant::now();
        syncer.sync_once().await.expect("sync");
        sync_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let after = net_bytes(port);
        bytes_in.push((after.0 - before.0) as f64);
        bytes_out.push((after.1 - before.1) as f64);
        busy_commands = commands(port);
    }
    println!(
        "| one sync, busy bot ({SERIES} series changed, {USERS} new users), median of {RUNS} | {:.1} ms |",
        median(sync_ms)
    );
    println!(
        "| bytes sent to Redis by that sync | {:.0} |",
        median(bytes_in)
    );
    println!("| bytes Redis answered | {:.0} |", median(bytes_out));
    println!("| commands in that sync | {busy_commands:?} |");

    let mut idle_ms = Vec::new();
    let mut idle_in = Vec::new();
    let mut idle_commands = BTreeMap::new();
    for _ in 0..RUNS {
        cli(port, &["CONFIG", "RESETSTAT"]);
        let before = net_bytes(port);
        let started = Instant::now();
        syncer.sync_once().await.expect("sync");
        idle_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        idle_in.push((net_bytes(port).0 - before.0) as f64);
        idle_commands = commands(port);
    }
    println!(
        "| one sync with nothing new (both bots), median | {:.2} ms |",
        median(idle_ms)
    );
    println!("| bytes sent by it | {:.0} |", median(idle_in));
    println!("| commands in it | {idle_commands:?} |");

    for (bot, what) in [
        ("busy", format!("{SERIES} series, {} users", USERS * RUNS)),
        ("idle", "no traffic".to_owned()),
    ] {
        let keys = memory_of(port, &format!("bm:{{{bot}}}:*"));
        println!(
            "| Redis memory, {bot} bot ({what}) | {} bytes: {keys:?} |",
            keys.values().sum::<u64>()
        );
    }

    for name in ["busy", "idle"] {
        let bots = [state.metrics.bot(name).expect("bot").clone()];
        let mut render_ms = Vec::new();
        for _ in 0..RUNS {
            let started = Instant::now();
            let summaries = state.totals.summaries(&bots, chrono::Utc::now(), 0).await;
            std::hint::black_box(summaries[0].to_text());
            render_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        println!(
            "| /v1/summary of the {name} bot built from Redis, median | {:.2} ms |",
            median(render_ms)
        );
    }
}
