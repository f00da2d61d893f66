//! One remote-write push of 10,000 series: how long the snapshot, the
//! encoding and the send take, and how many bytes go on the wire.
//!
//!   cargo run --release --example remote_write_push -- http://127.0.0.1:9090/api/v1/write [pushes]
//!
//! The receiver is any remote-write 1.0 endpoint (BENCHMARKS.md used a
//! loopback Prometheus 2.42 with `--web.enable-remote-write-receiver`). The
//! bot gets 10,000 `bot_*` series as the render benchmark does (one error
//! of each of enough kinds); the self-metrics are pushed too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use botmetrics::event::{BodyFormat, parse_batch};
use botmetrics::metrics::Metrics;
use botmetrics::remote_write::{RemoteWrite, RemoteWriteArgs};
use clap::Parser;

const SERIES: usize = 10_000;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    rw: RemoteWriteArgs,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let mut argv = std::env::args().skip(1);
    let url = argv.next().expect("usage: remote_write_push URL [pushes]");
    let pushes: usize = argv.next().and_then(|n| n.parse().ok()).unwrap_or(20);
    let args = Args::parse_from([
        "remote_write_push",
        "--remote-write-url",
        &url,
        "--remote-write-label",
        "instance=bench:1",
    ]);
    let bots: Vec<Arc<str>> = vec![Arc::from("bench")];
    let metrics = Arc::new(
        Metrics::new(&bots, SERIES, chrono_tz::UTC, 0.0, Default::default()).expect("registry"),
    );
    let bot = metrics.bot("bench").expect("bot").clone();
    let fixed = String::from_utf8_lossy(&metrics.render())
        .lines()
        .filter(|l| l.starts_with("bot_"))
        .count();
    for k in 0..SERIES.saturating_sub(fixed) {
        let body = format!(r#"{{"type":"error","kind":"kind_{k}"}}"#);
        let events = parse_batch(
            body.as_bytes(),
            BodyFormat::Json,
            1,
            1_800_000_000,
            &botmetrics::event::UserKey::legacy(),
        )
        .expect("valid");
        bot.apply(&events[0]);
    }
    let rw = RemoteWrite::new(
        &args.rw,
        metrics.clone(),
        "127.0.0.1:1".parse().expect("addr"),
    )
    .expect("remote write")
    .expect("a URL");

    let (mut snapshot, mut pushed) = (Vec::new(), Vec::new());
    let (body, samples) = rw.snapshot_body();
    for _ in 0..pushes {
        let started = Instant::now();
        std::hint::black_box(rw.snapshot_body());
        snapshot.push(started.elapsed());
        let started = Instant::now();
        rw.push_once().await;
        pushed.push(started.elapsed());
    }
    let text = metrics.render();
    let grab = |name: &str| {
        String::from_utf8_lossy(&text)
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let raw = botmetrics::remote_write::proto::WriteRequest::from_body(&body)
        .map(|r| prost::Message::encoded_len(&r))
        .unwrap_or(0);
    println!(
        "series (samples) per push: {samples} ({fixed} fixed bot_ series + errors + self-metrics)"
    );
    println!(
        "bytes on the wire (snappy): {}  protobuf before snappy: {raw}",
        body.len()
    );
    println!(
        "snapshot + encode + snappy, median of {pushes}: {:?}",
        median(snapshot)
    );
    println!(
        "whole push (snapshot, encode, POST, answer), median of {pushes}: {:?}",
        median(pushed)
    );
    println!(
        "receiver accepted {} samples, failed {}, retries {}",
        grab("botmetrics_remote_write_samples_sent_total"),
        grab("botmetrics_remote_write_samples_failed_total"),
        grab("botmetrics_remote_write_retries_total")
    );
}
