//! remote_write against real receivers on loopback: a Prometheus with its
//! remote-write receiver on and a VictoriaMetrics, both queried with PromQL
//! over their HTTP APIs after known traffic; an outage of the receiver that
//! the queue rides out; and a receiver that answers 401.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use botmetrics::remote_write::proto::WriteRequest;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::helpers::{Binary, SqliteFile, TestApp, have, start_with, unique_suffix};

const PATIENCE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Prometheus,
    Victoria,
}

/// A receiver process on a loopback port, with its data in a temporary
/// directory (kept across a restart, removed on drop).
struct Receiver {
    kind: Kind,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    http: reqwest::Client,
}

impl Receiver {
    /// Starts `kind`, or says why it cannot (a failure in CI).
    async fn start(kind: Kind) -> Option<Receiver> {
        let (tool, package) = match kind {
            Kind::Prometheus => ("prometheus", "prometheus"),
            Kind::Victoria => ("victoria-metrics", "victoria-metrics"),
        };
        if !have(tool, package) {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("botmetrics-rw-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut receiver = Receiver {
            kind,
            port: free_port(),
            dir,
            child: None,
            http: reqwest::Client::new(),
        };
        receiver.run().await;
        Some(receiver)
    }

    async fn run(&mut self) {
        let data = self.dir.join("data");
        let listen = format!("127.0.0.1:{}", self.port);
        let mut cmd = match self.kind {
            Kind::Prometheus => {
                let config = self.dir.join("prometheus.yml");
                std::fs::write(&config, "scrape_configs: []\n").expect("write config");
                let mut cmd = Command::new("prometheus");
                cmd.arg(format!("--config.file={}", config.display()))
                    .arg(format!("--storage.tsdb.path={}", data.display()))
                    .arg(format!("--web.listen-address={listen}"))
                    .arg("--web.enable-remote-write-receiver");
                cmd
            }
            Kind::Victoria => {
                let mut cmd = Command::new("victoria-metrics");
                cmd.arg(format!("-storageDataPath={}", data.display()))
                    .arg(format!("-httpListenAddr={listen}"))
                    // Samples visible to queries as soon as they are in.
                    .arg("-search.latencyOffset=0s")
                    .arg("-search.disableCache");
                cmd
            }
        };
        let log = std::fs::File::create(self.dir.join("receiver.log")).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start the receiver");
        self.child = Some(child);
        let ready = match self.kind {
            Kind::Prometheus => "/-/ready",
            Kind::Victoria => "/health",
        };
        let started = Instant::now();
        loop {
            let answer = self.http.get(self.url(ready)).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "receiver not ready: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("receiver.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn write_url(&self) -> String {
        self.url("/api/v1/write")
    }

    /// Stops it as an operator would (SIGTERM), keeping its data.
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().expect("running").to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
            let _ = tokio::time::timeout(PATIENCE, child.wait()).await;
        }
    }

    /// The instant vector of `expr` (at `time`, or now).
    async fn query(&self, expr: &str, time: Option<f64>) -> Vec<(BTreeMap<String, String>, f64)> {
        if self.kind == Kind::Victoria {
            // Its in-memory parts become searchable on a timer; this does it now.
            let _ = self
                .http
                .get(self.url("/internal/force_flush"))
                .send()
                .await;
        }
        let mut form = vec![("query", expr.to_owned())];
        if let Some(time) = time {
            form.push(("time", format!("{time:.3}")));
        }
        let url = format!(
            "{}?{}",
            self.url("/api/v1/query"),
            form.iter()
                .map(|(k, v)| format!("{k}={}", urlencode(v)))
                .collect::<Vec<_>>()
                .join("&")
        );
        let body: Value = self
            .http
            .get(url)
            .send()
            .await
            .expect("query answers")
            .json()
            .await
            .expect("query JSON");
        assert_eq!(body["status"], "success", "{expr}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect()
    }

    /// The one value of `expr`, if it has exactly one.
    async fn scalar(&self, expr: &str, time: Option<f64>) -> Option<f64> {
        match self.query(expr, time).await.as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }

    /// Waits until `expr` is `expected`; fails with what it was.
    async fn wait_for(&self, expr: &str, expected: f64) {
        let started = Instant::now();
        loop {
            let got = self.scalar(expr, None).await;
            if got == Some(expected) {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{expr}: {got:?}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn messages(n: usize, role: &str) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"type": "message", "user_id": i % 7, "role": role}))
            .collect(),
    )
}

/// The app pushing to `url` every second as `instance`.
async fn pushing_app(url: &str, instance: &str) -> (TestApp, SqliteFile) {
    let url: http::Uri = url.parse().expect("receiver URL");
    let instance = instance.to_owned();
    start_with("b=tok", move |c| {
        c.remote_write.urls = vec![url];
        c.remote_write.interval = Duration::from_secs(1);
        c.remote_write.labels = vec![("instance".into(), instance)];
    })
    .await
}

/// A self-metric of the pusher for `url`.
async fn selfm(app: &TestApp, name: &str, url: &str) -> f64 {
    app.sample(&format!("botmetrics_remote_write_{name}{{url=\"{url}\"}}"))
        .await
        .unwrap_or_else(|| panic!("no botmetrics_remote_write_{name}"))
}

/// Posts a known day's worth of events and checks the receiver holds
/// exactly those counts, with `increase()` and `rate()` over the whole run
/// exact as well (evaluated at the last sample: the first sample is the 0
/// pushed at start, so neither end is extrapolated).
async fn exact_counts(receiver: &Receiver, app: &TestApp) {
    // The push at start (the pusher's own task) must be in before the
    // events, or the first sample is already 60 and `increase()` has no
    // zero to count from.
    receiver
        .wait_for(
            r#"bot_messages_total{bot="b",instance="rw-a",role="user"}"#,
            0.0,
        )
        .await;
    app.post_ok("tok", &messages(60, "user")).await;
    app.post_ok("tok", &messages(40, "assistant")).await;
    let responses: Vec<Value> = (0..10)
        .map(
            |i| json!({"type": "response", "user_id": i, "status": "success", "duration_ms": 1200}),
        )
        .collect();
    app.post_ok("tok", &Value::Array(responses)).await;
    let b = r#"bot="b",instance="rw-a",job="botmetrics""#;
    receiver
        .wait_for(&format!("sum(bot_messages_total{{{b}}})"), 100.0)
        .await;
    receiver
        .wait_for(&format!("bot_response_duration_seconds_count{{{b}}}"), 10.0)
        .await;
    let user = format!(r#"bot_messages_total{{{b},role="user"}}"#);
    assert_eq!(receiver.scalar(&user, None).await, Some(60.0));
    for (series, expected) in [
        (
            format!(r#"bot_response_duration_seconds_bucket{{{b},le="+Inf"}}"#),
            10.0,
        ),
        (
            format!(r#"bot_response_duration_seconds_bucket{{{b},le="1"}}"#),
            0.0,
        ),
        (
            format!(r#"bot_responses_total{{{b},status="success"}}"#),
            10.0,
        ),
    ] {
        assert_eq!(
            receiver.scalar(&series, None).await,
            Some(expected),
            "{series}"
        );
    }
    // A float as the exposition shows it (ten times 1.2 is 11.999999999999998);
    // VictoriaMetrics stores it to 12 significant digits.
    let sum = app
        .sample(r#"bot_response_duration_seconds_sum{bot="b"}"#)
        .await
        .expect("a sum");
    let pushed = receiver
        .scalar(&format!("bot_response_duration_seconds_sum{{{b}}}"), None)
        .await
        .expect("a pushed sum");
    assert!(
        (pushed - sum).abs() < 1e-9,
        "pushed {pushed}, exposed {sum}"
    );
    increase_is_exact(receiver, &user, 60.0).await;
}

async fn increase_is_exact(receiver: &Receiver, series: &str, expected: f64) {
    let last = receiver
        .scalar(&format!("timestamp({series})"), None)
        .await
        .expect("a last sample");
    let increase = receiver
        .scalar(&format!("increase({series}[10m])"), Some(last))
        .await;
    assert_eq!(increase, Some(expected), "increase of {series}");
    let rate = receiver
        .scalar(&format!("rate({series}[10m])"), Some(last))
        .await
        .expect("a rate");
    match receiver.kind {
        // Prometheus divides the increase by the range.
        Kind::Prometheus => assert!((rate * 600.0 - expected).abs() < 1e-6, "rate {rate}"),
        // MetricsQL divides by the time between the samples that changed
        // (here the first push after the events): a rate of one increase
        // over about one interval, never less than the range's average.
        Kind::Victoria => assert!(
            rate * 600.0 >= expected - 1e-6 && rate <= expected,
            "rate {rate}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_receives_exact_counts_and_an_outage_loses_nothing_that_fits_the_queue() {
    let Some(mut receiver) = Receiver::start(Kind::Prometheus).await else {
        return;
    };
    let (app, _db) = pushing_app(&receiver.write_url(), "rw-a").await;
    exact_counts(&receiver, &app).await;
    let url = receiver.write_url();

    // 30 s without a receiver while events keep coming.
    receiver.stop().await;
    let down = Instant::now();
    app.post_ok("tok", &messages(50, "user")).await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down.elapsed())).await;
    let queued = selfm(&app, "queue_length", &url).await;
    assert!(queued >= 25.0, "{queued} pushes queued after 30 s down");
    assert!(selfm(&app, "retries_total", &url).await > 0.0);
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    receiver.run().await;

    let b = r#"bot="b",instance="rw-a",job="botmetrics""#;
    let user = format!(r#"bot_messages_total{{{b},role="user"}}"#);
    receiver.wait_for(&user, 110.0).await;
    // Every push made while it was down arrived, not only the latest: one
    // sample a second of the build-info series through the outage.
    let during = receiver
        .scalar(
            r#"count_over_time(botmetrics_build_info{instance="rw-a",job="botmetrics"}[30s])"#,
            Some(restarted),
        )
        .await
        .unwrap_or(0.0);
    assert!(during >= 27.0, "{during} samples of the 30 s outage");
    increase_is_exact(&receiver, &user, 110.0).await;
    let started = Instant::now();
    while selfm(&app, "queue_length", &url).await > 0.0 {
        assert!(started.elapsed() < PATIENCE, "queue never drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(selfm(&app, "samples_dropped_total", &url).await, 0.0);
    assert_eq!(selfm(&app, "samples_failed_total", &url).await, 0.0);
    assert!(selfm(&app, "samples_sent_total", &url).await > 0.0);
    // The alert's input: the last success is recent again.
    let last = selfm(&app, "last_success_timestamp_seconds", &url).await;
    assert!(
        restarted - 1.0 <= last,
        "last success {last}, restart {restarted}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn victoria_metrics_receives_exact_counts() {
    let Some(receiver) = Receiver::start(Kind::Victoria).await else {
        return;
    };
    let (app, _db) = pushing_app(&receiver.write_url(), "rw-a").await;
    exact_counts(&receiver, &app).await;
    // The self-metrics are pushed too.
    receiver
        .wait_for(r#"botmetrics_build_info{instance="rw-a"}"#, 1.0)
        .await;
    app.stop().await;
}

/// What a tiny receiver that refuses everything with 401 was sent.
#[derive(Default)]
struct Seen {
    heads: Vec<String>,
    bodies: Vec<Vec<u8>>,
}

/// A receiver answering every request 401 with a reason, as Grafana Cloud
/// does for a bad key.
async fn refusing_receiver() -> (String, Arc<Mutex<Seen>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/prom/push", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (head, length) = loop {
                    let Ok(n) = socket.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        buf.drain(..end + 4);
                        break (head, length);
                    }
                };
                while buf.len() < length {
                    let Ok(n) = socket.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                {
                    let mut seen = record.lock().unwrap();
                    seen.heads.push(head);
                    seen.bodies.push(buf);
                }
                let reason = "authentication error: invalid token";
                let answer = format!(
                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reason}",
                    reason.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_answering_401_is_reported_once_and_not_retried() {
    let (url, seen) = refusing_receiver().await;
    let db = SqliteFile::new();
    let db_url = db.url();
    let mut bin = Binary::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &db_url,
            "--tokens",
            "b=tok",
            "--remote-write-url",
            &url,
            "--remote-write-interval",
            "300ms",
            "--remote-write-username",
            "123456",
        ],
        // The password from the environment, as a service file would set it.
        &[("BOTMETRICS_REMOTE_WRITE_PASSWORD", "glc_s3cret")],
    )
    .await;
    bin.post_ok("tok", &messages(5, "user")).await;
    let started = Instant::now();
    while seen.lock().unwrap().heads.len() < 5 {
        assert!(started.elapsed() < PATIENCE, "pushes did not arrive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sample = |text: &str, name: &str| {
        crate::helpers::sample(
            text,
            &format!("botmetrics_remote_write_{name}{{url=\"{url}\"}}"),
        )
        .unwrap_or_else(|| panic!("no {name}"))
    };
    let text = bin.metrics_text().await;
    let received = seen.lock().unwrap().heads.len();
    assert!(sample(&text, "samples_failed_total") > 0.0);
    assert_eq!(sample(&text, "samples_sent_total"), 0.0);
    assert_eq!(sample(&text, "retries_total"), 0.0);
    assert!(sample(&text, "queue_length") <= 1.0);
    assert_eq!(sample(&text, "last_success_timestamp_seconds"), 0.0);
    let log = bin.log();
    bin.signal("TERM").await;

    let seen = seen.lock().unwrap();
    // Not retried: every request was a different push (its own timestamp).
    let mut stamps: Vec<i64> = seen
        .bodies
        .iter()
        .map(|body| {
            let request = WriteRequest::from_body(body).expect("snappy protobuf");
            assert!(request.samples() > 50, "{} samples", request.samples());
            request.timeseries[0].samples[0].timestamp
        })
        .collect();
    let pushes = stamps.len();
    stamps.dedup();
    assert_eq!(stamps.len(), pushes, "a refused push was sent again");
    assert!(received >= 5);
    let expected_auth = format!(
        "authorization: basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "123456:glc_s3cret"
        )
        .to_lowercase()
    );
    for head in &seen.heads {
        assert!(head.starts_with("post /api/prom/push http/1.1"), "{head}");
        for header in [
            "content-encoding: snappy",
            "content-type: application/x-protobuf",
            "x-prometheus-remote-write-version: 0.1.0",
            "user-agent: botmetrics/",
            expected_auth.as_str(),
        ] {
            assert!(head.contains(header), "{header} missing from\n{head}");
        }
    }
    // Logged once, with the status and the receiver's reason; the
    // password never (nor at shutdown).
    assert!(!bin.log().contains("glc_s3cret"));
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused the push"))
        .collect();
    assert_eq!(refusals.len(), 1, "{log}");
    assert!(refusals[0].contains("status=401"), "{}", refusals[0]);
    assert!(
        refusals[0].contains("authentication error: invalid token"),
        "{}",
        refusals[0]
    );
    assert!(!log.contains("glc_s3cret"), "{log}");
}

/// Cluster mode: each replica pushes its own series, as Prometheus would
/// scrape each one, told apart by `instance` (here the default,
/// `<hostname>:<port>`). The dashboards' `sum by (bot)` over replicas gives
/// the cluster's counts, and `max by (bot)` the cluster-wide active users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_each_replica_pushes_its_own_series_under_its_instance() {
    let Some(receiver) = Receiver::start(Kind::Prometheus).await else {
        return;
    };
    let Some(db) = crate::helpers::PgDatabase::create().await else {
        return;
    };
    let Some(redis) = crate::redis::RedisServer::start().await else {
        return;
    };
    let url = receiver.write_url();
    let mut replicas = Vec::new();
    for n in 0..2 {
        let dir = crate::helpers::pg_data_dir(&db.url).join(format!("replica-{n}"));
        std::fs::create_dir_all(&dir).expect("replica data dir");
        let dir = dir.display().to_string();
        let flags = [
            "--redis-url",
            &redis.url(),
            "--sync-interval",
            "200ms",
            "--flush-interval",
            "500ms",
            "--data-dir",
            &dir,
            "--remote-write-url",
            &url,
            "--remote-write-interval",
            "1s",
        ];
        replicas.push(Binary::serve(&db.url, "b=tok", &flags).await);
    }
    replicas[0].post_ok("tok", &messages(30, "user")).await;
    replicas[1].post_ok("tok", &messages(20, "user")).await;
    let series = r#"bot_messages_total{bot="b",role="user"}"#;
    receiver
        .wait_for(&format!("sum by (bot) ({series})"), 50.0)
        .await;
    let mut per_instance: Vec<(String, f64)> = receiver
        .query(series, None)
        .await
        .into_iter()
        .map(|(labels, v)| (labels["instance"].clone(), v))
        .collect();
    per_instance.sort_by(|a, b| a.1.total_cmp(&b.1));
    assert_eq!(per_instance.len(), 2, "{per_instance:?}");
    assert_eq!(
        per_instance.iter().map(|p| p.1).collect::<Vec<_>>(),
        [20.0, 30.0]
    );
    for (r, n) in replicas.iter().zip([30.0, 20.0]) {
        let port = r
            .url("/")
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_owned();
        assert!(
            per_instance
                .iter()
                .any(|(i, v)| i.ends_with(&format!(":{port}")) && *v == n),
            "{per_instance:?} has no {n} from port {port}"
        );
    }
    // The same seven users on both replicas: one cluster-wide count.
    receiver
        .wait_for(
            r#"max by (bot) (bot_active_users{bot="b",window="1d"})"#,
            7.0,
        )
        .await;
    drop(replicas);
    drop(redis);
    drop(db);
}
