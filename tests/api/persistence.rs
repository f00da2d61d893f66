//! Persistence (issue 3): clean restarts, flushes that write only changes in
//! one transaction, kill -9, database outages, partitions and retention,
//! against real SQLite files and a real PostgreSQL (a fresh database per
//! test). Each scenario is written once, generic over the database URL, and
//! run by one `#[tokio::test]` per backend.
//!
//! The shared pieces other suites reuse (a quiet config, raw database
//! access, the real binary) live here too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use botmetrics::config::Config;
use botmetrics::metrics::active::{Granularity, SketchRow};
use botmetrics::persist::FlushOutcome;
use botmetrics::store::{FlushBatch, SeriesRow, StoredSketch, partition_name};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::{PgDatabase, SqliteFile, TestApp, config, eventually, sample, spawn_app};

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// A test configuration whose background loops stay out of the way: tests
/// call `flush_once` and `write_history_once` themselves.
pub(crate) fn quiet_config(tokens: &str, url: &str) -> Config {
    let mut c = config(tokens, url);
    c.flush_interval = Duration::from_secs(3600);
    c.history_interval = Duration::from_secs(3600);
    c
}

/// Labels as the store keys them: a JSON object with sorted keys.
pub(crate) fn labels(pairs: &[(&str, &str)]) -> String {
    let map: BTreeMap<&str, &str> = pairs.iter().copied().collect();
    serde_json::to_string(&map).expect("labels serialise")
}

/// Direct access to the database a test app uses, beside the app's own pool.
pub(crate) enum Raw {
    Pg(PgPool),
    Sqlite(SqlitePool),
}

impl Raw {
    pub(crate) async fn connect(url: &str) -> Raw {
        if url.starts_with("sqlite:") {
            Raw::Sqlite(SqlitePool::connect(url).await.expect("open SQLite file"))
        } else {
            Raw::Pg(PgPool::connect(url).await.expect("connect to PostgreSQL"))
        }
    }

    pub(crate) fn is_pg(&self) -> bool {
        matches!(self, Raw::Pg(_))
    }

    /// One integer from a query written by the test (never from input).
    pub(crate) async fn int(&self, sql: &str) -> i64 {
        let sql = sql.to_owned();
        match self {
            Raw::Pg(p) => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(p).await,
            Raw::Sqlite(p) => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(p).await,
        }
        .unwrap_or_else(|e| panic!("query failed: {e}"))
    }

    /// Text rows from a query written by the test.
    pub(crate) async fn texts(&self, sql: &str) -> Vec<String> {
        let sql = sql.to_owned();
        match self {
            Raw::Pg(p) => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(p).await,
            Raw::Sqlite(p) => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(p).await,
        }
        .unwrap_or_else(|e| panic!("query failed: {e}"))
    }

    pub(crate) async fn execute(&self, sql: &str) {
        let sql = sql.to_owned();
        match self {
            Raw::Pg(p) => sqlx::query(AssertSqlSafe(sql)).execute(p).await.map(drop),
            Raw::Sqlite(p) => sqlx::query(AssertSqlSafe(sql)).execute(p).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("statement failed: {e}"))
    }

    pub(crate) async fn count(&self, table: &str) -> i64 {
        self.int(&format!("select count(*) from {table}")).await
    }

    /// The stored value of one series of `real_time_metrics`.
    pub(crate) async fn stored(
        &self,
        metric: &str,
        bot: &str,
        pairs: &[(&str, &str)],
    ) -> Option<f64> {
        let labels = labels(pairs);
        match self {
            Raw::Pg(p) => sqlx::query_scalar(
                // A cast on both sides: right whether the column is jsonb or text.
                "select value from real_time_metrics where metric = $1 and bot = $2 and labels::jsonb = $3::jsonb",
            )
            .bind(metric)
            .bind(bot)
            .bind(labels)
            .fetch_optional(p)
            .await,
            Raw::Sqlite(p) => sqlx::query_scalar(
                "select value from real_time_metrics where metric = ? and bot = ? and labels = ?",
            )
            .bind(metric)
            .bind(bot)
            .bind(labels)
            .fetch_optional(p)
            .await,
        }
        .expect("read real_time_metrics")
    }

    /// Sizes in bytes of every stored sketch.
    pub(crate) async fn sketch_sizes(&self) -> Vec<i64> {
        self.texts("select cast(length(registers) as text) from active_user_sketches")
            .await
            .iter()
            .map(|s| s.parse().expect("a length"))
            .collect()
    }

    pub(crate) async fn close(self) {
        match self {
            Raw::Pg(p) => p.close().await,
            Raw::Sqlite(p) => p.close().await,
        }
    }
}

/// The `bot_*` lines of an exposition, without the active-user gauges
/// (compared on their own: they are estimates from sketches).
pub(crate) fn bot_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("bot_") && !l.starts_with("bot_active_users"))
        .map(str::to_owned)
        .collect()
}

pub(crate) fn active_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("bot_active_users{"))
        .map(str::to_owned)
        .collect()
}

fn values(lines: &[String]) -> BTreeMap<String, f64> {
    lines
        .iter()
        .map(|l| {
            let (name, v) = l.rsplit_once(' ').expect("a sample line");
            (name.to_owned(), v.parse().expect("a number"))
        })
        .collect()
}

/// One of each event type, with histograms (including the `+Inf` buckets),
/// free-form labels (with `max_label_values = 2`, the third kind and name
/// fold into `other`), fractional custom values and both user id forms.
pub(crate) fn every_event_type() -> Value {
    json!([
        {"type": "message", "role": "user", "user_id": 1, "db_queries": 3},
        {"type": "message", "role": "user", "user_id": "alice", "db_queries": 70},
        {"type": "message", "role": "assistant"},
        {"type": "response", "status": "success", "duration_ms": 120.5, "model": "gpt-4o",
         "tokens": {"prompt": 100, "completion": 50}, "user_id": 1},
        {"type": "response", "status": "error", "duration_ms": 0},
        {"type": "response", "status": "rate_limited", "duration_ms": 61000},
        {"type": "response", "status": "timeout", "duration_ms": 30000.25, "tokens": {"prompt": 7}},
        {"type": "cache", "result": "hit"},
        {"type": "cache", "result": "miss", "cache": "redis_main"},
        {"type": "user_registered", "user_id": 2},
        {"type": "consent", "granted": true, "user_id": 2},
        {"type": "consent", "granted": false},
        {"type": "limit_reached", "user_id": 1},
        {"type": "error", "kind": "timeout.llm"},
        {"type": "error", "kind": "db:conn-lost"},
        {"type": "error", "kind": "k3"},
        {"type": "custom", "name": "feature_x", "value": 0.1},
        {"type": "custom", "name": "feature_x", "value": 0.2},
        {"type": "custom", "name": "payment", "value": 2.125},
        {"type": "custom", "name": "launch"}
    ])
}

async fn post_ok(app: &TestApp, token: &str, events: &Value) {
    let (status, body) = app.post_events(token, events).await;
    assert_eq!(status, 202, "events refused: {body}");
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    app.get_json("/readyz").await
}

/// The real binary, started as an operator would.
pub(crate) struct Binary {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    log: Arc<Mutex<String>>,
    drain: tokio::task::JoinHandle<()>,
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Binary {
    /// Starts `botmetrics` on port 0 with bot `x` (token `tx`) and reads the
    /// bound address from its `botmetrics serving listen=…` log line.
    pub(crate) async fn spawn(url: &str, args: &[&str]) -> Binary {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_botmetrics"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                url,
                "--tokens",
                "x=tx",
            ])
            .args(["--history-interval", "1h", "--metrics-cache-ttl", "0s"])
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the botmetrics binary");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let line = strip_ansi(&line);
                log.lock().unwrap().push_str(&format!("{line}\n"));
                if line.contains("botmetrics serving") {
                    return line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("listen="))
                        .and_then(|a| a.parse::<SocketAddr>().ok());
                }
            }
            None
        })
        .await;
        let addr = match found {
            Ok(Some(addr)) => addr,
            _ => panic!(
                "botmetrics did not log `botmetrics serving listen=…`:\n{}",
                log.lock().unwrap()
            ),
        };
        let sink = log.clone();
        let drain = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock()
                    .unwrap()
                    .push_str(&format!("{}\n", strip_ansi(&line)));
            }
        });
        Binary {
            child,
            addr,
            client: reqwest::Client::new(),
            log,
            drain,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub(crate) async fn post_events(&self, events: &Value) {
        let res = self
            .client
            .post(self.url("/v1/events"))
            .bearer_auth("tx")
            .json(events)
            .send()
            .await
            .expect("request sent");
        assert_eq!(res.status(), 202);
    }

    pub(crate) async fn metrics_text(&self) -> String {
        let res = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("scrape");
        assert_eq!(res.status(), 200);
        res.text().await.expect("text")
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn pid(&self) -> String {
        self.child.id().expect("the child runs").to_string()
    }

    /// Sends a signal with the `kill` command, e.g. `-KILL` or `-TERM`, and
    /// waits for the process to end.
    pub(crate) async fn signal(mut self, signal: &str) -> (std::process::ExitStatus, String) {
        let sent = std::process::Command::new("kill")
            .args([signal, &self.pid()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill {signal} failed");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("botmetrics exits within 30 s after the signal")
            .expect("wait for botmetrics");
        // The last lines are read once stderr closes.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.drain).await;
        (status, self.log())
    }
}

// ---------------------------------------------------------------------------
// 1. A clean restart keeps every count exactly
// ---------------------------------------------------------------------------

async fn clean_restart_keeps_every_count(url: &str) {
    let mut cfg = quiet_config("x=tx", url);
    cfg.max_label_values = 2;
    let app = spawn_app(cfg.clone()).await;
    post_ok(&app, "tx", &every_event_type()).await;
    let before = app.metrics_text().await;
    // Sanity: the batch reached the corners this test is about.
    for (series, value) in [
        (r#"bot_errors_total{bot="x",kind="other"}"#, 1.0),
        (r#"bot_custom_events_total{bot="x",name="other"}"#, 1.0),
        (
            r#"bot_custom_events_total{bot="x",name="feature_x"}"#,
            0.1 + 0.2,
        ),
        (r#"bot_custom_events_total{bot="x",name="payment"}"#, 2.125),
        (
            r#"bot_response_duration_seconds_bucket{bot="x",le="+Inf"}"#,
            4.0,
        ),
        (
            r#"bot_response_duration_seconds_bucket{bot="x",le="60"}"#,
            3.0,
        ),
        (r#"bot_db_queries_per_message_bucket{bot="x",le="50"}"#, 1.0),
        (
            r#"bot_llm_tokens_total{bot="x",model="unknown",kind="prompt"}"#,
            7.0,
        ),
        (r#"bot_active_users{bot="x",window="1d"}"#, 3.0),
    ] {
        assert_eq!(
            sample(&before, series),
            Some(value),
            "{series} in\n{before}"
        );
    }
    app.stop().await;

    let app = spawn_app(cfg.clone()).await;
    let after = app.metrics_text().await;
    assert_eq!(
        bot_lines(&after),
        bot_lines(&before),
        "every bot_* series restored exactly"
    );
    assert_eq!(
        active_lines(&after),
        active_lines(&before),
        "active-user estimates unchanged"
    );

    // Counters stay monotonic: the same batch again doubles every series.
    post_ok(&app, "tx", &every_event_type()).await;
    let again = app.metrics_text().await;
    let (once, twice) = (values(&bot_lines(&before)), values(&bot_lines(&again)));
    assert_eq!(once.len(), twice.len(), "the same series exist");
    for (series, v) in &once {
        let w = twice[series];
        assert!(
            (w - 2.0 * v).abs() <= 1e-9 * v.abs().max(1.0),
            "{series}: {v} before the restart, {w} after sending the batch again"
        );
    }
    assert_eq!(
        active_lines(&again),
        active_lines(&before),
        "the same users again"
    );
    app.stop().await;

    // Nothing is replayed: another restart shows exactly the last values.
    let app = spawn_app(cfg).await;
    let third = app.metrics_text().await;
    assert_eq!(bot_lines(&third), bot_lines(&again));
    assert_eq!(active_lines(&third), active_lines(&again));
    app.stop().await;
}

#[tokio::test]
async fn clean_restart_keeps_every_count_sqlite() {
    let db = SqliteFile::new();
    clean_restart_keeps_every_count(&db.url()).await;
}

#[tokio::test]
async fn clean_restart_keeps_every_count_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    clean_restart_keeps_every_count(&db.url).await;
}

// ---------------------------------------------------------------------------
// 2. A flush writes only changes, in one transaction; nothing when idle
// ---------------------------------------------------------------------------

async fn flush_writes_only_changes(url: &str) {
    let app = spawn_app(quiet_config("x=tx", url)).await;
    let p = &app.state.persistence;
    let raw = Raw::connect(url).await;
    let all = botmetrics::persist::snapshot(&app.state.metrics).len();

    // A fresh store: every series is written once, at 0.
    assert_eq!(
        p.flush_once().await.expect("flush"),
        FlushOutcome::Wrote {
            series: all,
            sketches: 0,
            daily: 0
        }
    );
    assert_eq!(raw.count("real_time_metrics").await, all as i64);
    assert_eq!(p.flush_once().await.expect("flush"), FlushOutcome::Idle);
    assert_eq!(p.flush_once().await.expect("flush"), FlushOutcome::Idle);

    // Three series change (one existing, two new); the daily message count too.
    post_ok(
        &app,
        "tx",
        &json!([
            {"type": "message", "role": "user"},
            {"type": "message", "role": "user"},
            {"type": "error", "kind": "db"},
            {"type": "custom", "name": "c", "value": 0.5}
        ]),
    )
    .await;
    assert_eq!(
        p.flush_once().await.expect("flush"),
        FlushOutcome::Wrote {
            series: 3,
            sketches: 0,
            daily: 1
        }
    );
    assert_eq!(raw.count("real_time_metrics").await, all as i64 + 2);
    assert_eq!(raw.count("daily_counters").await, 1);
    assert_eq!(
        raw.stored("bot_messages_total", "x", &[("role", "user")])
            .await,
        Some(2.0)
    );
    assert_eq!(
        raw.stored("bot_errors_total", "x", &[("kind", "db")]).await,
        Some(1.0)
    );
    assert_eq!(
        raw.stored("bot_custom_events_total", "x", &[("name", "c")])
            .await,
        Some(0.5)
    );
    if raw.is_pg() {
        // Rows written by one statement carry one transaction id.
        assert_eq!(
            raw.int("select count(distinct xmin::text) from real_time_metrics")
                .await,
            2,
            "the first flush and this one, one transaction each"
        );
        assert_eq!(
            raw.int(
                "select count(*) from real_time_metrics where xmin::text =
                 (select xmin::text from real_time_metrics where metric = 'bot_errors_total')"
            )
            .await,
            3
        );
    }
    assert_eq!(p.flush_once().await.expect("flush"), FlushOutcome::Idle);

    // A user: its message, the three active-user gauges and two sketches.
    post_ok(
        &app,
        "tx",
        &json!({"type": "message", "role": "user", "user_id": 42}),
    )
    .await;
    assert_eq!(
        p.flush_once().await.expect("flush"),
        FlushOutcome::Wrote {
            series: 4,
            sketches: 2,
            daily: 1
        }
    );
    assert_eq!(raw.count("active_user_sketches").await, 2);
    assert_eq!(raw.sketch_sizes().await, vec![16384, 16384]);
    if raw.is_pg() {
        assert_eq!(
            raw.int(
                "select count(distinct x) from (
                   select xmin::text as x from real_time_metrics
                    where metric in ('bot_messages_total', 'bot_active_users') and value > 0
                   union all select xmin::text from active_user_sketches
                   union all select xmin::text from daily_counters) t"
            )
            .await,
            1,
            "series, sketches and daily counters are written in one transaction"
        );
    }
    // The same user again changes no register and no count but the message.
    assert_eq!(p.flush_once().await.expect("flush"), FlushOutcome::Idle);
    post_ok(
        &app,
        "tx",
        &json!({"type": "message", "role": "user", "user_id": 42}),
    )
    .await;
    assert_eq!(
        p.flush_once().await.expect("flush"),
        FlushOutcome::Wrote {
            series: 1,
            sketches: 0,
            daily: 1
        }
    );
    assert_eq!(p.flush_once().await.expect("flush"), FlushOutcome::Idle);

    // The primary key is real_time_metrics' only index.
    if raw.is_pg() {
        assert_eq!(
            raw.texts(
                "select indexname::text from pg_indexes where tablename = 'real_time_metrics' order by 1"
            )
            .await,
            vec!["real_time_metrics_pkey".to_owned()]
        );
    } else {
        let indexes = raw
            .texts("select name from sqlite_master where type = 'index' and tbl_name = 'real_time_metrics'")
            .await;
        assert!(
            indexes.iter().all(|i| i.starts_with("sqlite_autoindex_")),
            "only the primary key: {indexes:?}"
        );
    }
    raw.close().await;
    app.stop().await;
}

#[tokio::test]
async fn flush_writes_only_changes_sqlite() {
    let db = SqliteFile::new();
    flush_writes_only_changes(&db.url()).await;
}

#[tokio::test]
async fn flush_writes_only_changes_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    flush_writes_only_changes(&db.url).await;
}

// ---------------------------------------------------------------------------
// 3. The real binary: kill -9 after a flush keeps what was flushed;
//    SIGTERM flushes everything and exits 0
// ---------------------------------------------------------------------------

async fn last_flush(bin: &Binary) -> f64 {
    sample(
        &bin.metrics_text().await,
        "botmetrics_last_flush_timestamp_seconds",
    )
    .unwrap_or(0.0)
}

async fn kill_9_keeps_what_was_flushed(url: &str) {
    let bin = Binary::spawn(
        url,
        &["--flush-interval", "200ms", "--max-label-values", "2"],
    )
    .await;
    bin.post_events(&every_event_type()).await;
    let expected = bin.metrics_text().await;

    // Wait for a flush holding the batch's last event...
    let raw = Raw::connect(url).await;
    eventually(Duration::from_secs(15), || async {
        raw.stored("bot_custom_events_total", "x", &[("name", "other")])
            .await
            == Some(1.0)
    })
    .await;
    // ...then for two more, so a flush that began before the batch was
    // applied whole cannot be the last one.
    for _ in 0..2 {
        let seen = last_flush(&bin).await;
        eventually(Duration::from_secs(15), || async {
            last_flush(&bin).await > seen
        })
        .await;
    }
    let (status, log) = bin.signal("-KILL").await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    assert!(
        !log.contains("final flush"),
        "no final flush on kill -9:\n{log}"
    );

    let app = spawn_app(quiet_config("x=tx", url)).await;
    let restored = app.metrics_text().await;
    assert_eq!(
        bot_lines(&restored),
        bot_lines(&expected),
        "what was flushed survives kill -9"
    );
    assert_eq!(active_lines(&restored), active_lines(&expected));
    raw.close().await;
    app.stop().await;
}

#[tokio::test]
async fn kill_9_keeps_what_was_flushed_sqlite() {
    let db = SqliteFile::new();
    kill_9_keeps_what_was_flushed(&db.url()).await;
}

#[tokio::test]
async fn kill_9_keeps_what_was_flushed_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    kill_9_keeps_what_was_flushed(&db.url).await;
}

async fn sigterm_flushes_and_exits_0(url: &str) {
    // The default 10 s flush interval: only the final flush can store this.
    let bin = Binary::spawn(url, &["--max-label-values", "2"]).await;
    bin.post_events(&every_event_type()).await;
    let expected = bin.metrics_text().await;
    let (status, log) = bin.signal("-TERM").await;
    assert!(status.success(), "exit status {status:?}, log:\n{log}");
    assert!(log.contains("final flush done"), "log:\n{log}");

    let app = spawn_app(quiet_config("x=tx", url)).await;
    let restored = app.metrics_text().await;
    assert_eq!(bot_lines(&restored), bot_lines(&expected));
    assert_eq!(active_lines(&restored), active_lines(&expected));
    app.stop().await;
}

#[tokio::test]
async fn sigterm_flushes_and_exits_0_sqlite() {
    let db = SqliteFile::new();
    sigterm_flushes_and_exits_0(&db.url()).await;
}

#[tokio::test]
async fn sigterm_flushes_and_exits_0_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    sigterm_flushes_and_exits_0(&db.url).await;
}

// ---------------------------------------------------------------------------
// 4. Outages (PostgreSQL)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn outage_keeps_every_event_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let cfg = quiet_config("x=tx", &db.url);
    let app = spawn_app(cfg.clone()).await;
    let p = &app.state.persistence;
    post_ok(
        &app,
        "tx",
        &json!([
            {"type": "message", "role": "user", "user_id": 1},
            {"type": "message", "role": "user", "user_id": 2}
        ]),
    )
    .await;
    p.flush_once().await.expect("flush while the store is up");
    assert_eq!(readyz(&app).await.0, 200);

    db.set_outage(true).await;
    // Ingestion and /metrics work from memory.
    post_ok(
        &app,
        "tx",
        &json!([
            {"type": "message", "role": "user", "user_id": 3},
            {"type": "message", "role": "user", "user_id": 4},
            {"type": "message", "role": "user", "user_id": 5},
            {"type": "error", "kind": "outage"},
            {"type": "user_registered", "user_id": 5}
        ]),
    )
    .await;
    assert_eq!(
        app.sample(r#"bot_messages_total{bot="x",role="user"}"#)
            .await,
        Some(5.0)
    );
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "unavailable", "{body}");
    assert!(body["message"].is_string(), "{body}");

    assert!(
        p.flush_once().await.is_err(),
        "a flush fails while the store is down"
    );
    assert!(
        p.flush_once().await.is_err(),
        "and again: nothing was marked flushed"
    );
    assert!(
        p.write_history_once().await.is_err(),
        "so does a history write"
    );
    let text = app.metrics_text().await;
    assert_eq!(sample(&text, "botmetrics_flush_failures_total"), Some(2.0));
    assert_eq!(
        sample(&text, "botmetrics_history_write_failures_total"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "botmetrics_store_up"), Some(0.0));
    let (status, body) = app.get_json("/healthz").await;
    assert_eq!((status, &body["status"]), (200, &json!("ok")));

    db.set_outage(false).await;
    assert!(
        matches!(
            p.flush_once().await.expect("flush after recovery"),
            FlushOutcome::Wrote { .. }
        ),
        "the flush catches up"
    );
    assert_eq!(app.sample("botmetrics_store_up").await, Some(1.0));
    let raw = Raw::connect(&db.url).await;
    assert_eq!(
        raw.stored("bot_messages_total", "x", &[("role", "user")])
            .await,
        Some(5.0)
    );
    assert_eq!(
        raw.stored("bot_errors_total", "x", &[("kind", "outage")])
            .await,
        Some(1.0)
    );
    assert_eq!(
        raw.stored("bot_users_registered_total", "x", &[]).await,
        Some(1.0)
    );
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert!(
        p.write_history_once()
            .await
            .expect("history after recovery")
            > 0
    );
    assert_eq!(
        app.sample("botmetrics_history_write_duration_seconds_count")
            .await,
        Some(1.0)
    );
    raw.close().await;
    app.stop().await;

    // The sketches that failed to flush were written on recovery.
    let app = spawn_app(cfg).await;
    assert_eq!(
        app.sample(r#"bot_active_users{bot="x",window="1d"}"#).await,
        Some(5.0)
    );
    assert_eq!(
        app.sample(r#"bot_messages_total{bot="x",role="user"}"#)
            .await,
        Some(5.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn start_during_outage_restores_on_recovery_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let cfg = quiet_config("x=tx", &db.url);
    // Totals in the store from an earlier run.
    let app = spawn_app(cfg.clone()).await;
    post_ok(
        &app,
        "tx",
        &json!([
            {"type": "message", "role": "user", "user_id": 1},
            {"type": "message", "role": "user", "user_id": 2},
            {"type": "message", "role": "user", "user_id": 3},
            {"type": "user_registered", "user_id": 3},
            {"type": "response", "status": "success", "duration_ms": 500}
        ]),
    )
    .await;
    app.stop().await;

    db.set_outage(true).await;
    let app = spawn_app(cfg.clone()).await;
    let p = &app.state.persistence;
    assert!(!p.is_restored().await);
    assert_eq!(app.get_json("/healthz").await.0, 200);
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "unavailable");
    post_ok(
        &app,
        "tx",
        &json!([
            {"type": "message", "role": "user", "user_id": 4},
            {"type": "message", "role": "user", "user_id": 5},
            {"type": "response", "status": "success", "duration_ms": 1500}
        ]),
    )
    .await;
    assert_eq!(
        app.sample(r#"bot_messages_total{bot="x",role="user"}"#)
            .await,
        Some(2.0),
        "counting from memory until the store answers"
    );
    assert!(p.flush_once().await.is_err());

    db.set_outage(false).await;
    assert!(matches!(
        p.flush_once().await.expect("restore and flush on recovery"),
        FlushOutcome::Wrote { .. }
    ));
    assert!(p.is_restored().await);
    let text = app.metrics_text().await;
    assert_eq!(
        sample(&text, r#"bot_messages_total{bot="x",role="user"}"#),
        Some(5.0)
    );
    assert_eq!(
        sample(&text, r#"bot_users_registered_total{bot="x"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"bot_response_duration_seconds_count{bot="x"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"bot_response_duration_seconds_sum{bot="x"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"bot_active_users{bot="x",window="1d"}"#),
        Some(5.0)
    );
    let raw = Raw::connect(&db.url).await;
    assert_eq!(
        raw.stored("bot_messages_total", "x", &[("role", "user")])
            .await,
        Some(5.0)
    );
    raw.close().await;
    assert_eq!(readyz(&app).await.0, 200);
    let before = app.metrics_text().await;
    app.stop().await;

    let app = spawn_app(cfg).await;
    let after = app.metrics_text().await;
    assert_eq!(
        bot_lines(&after),
        bot_lines(&before),
        "nothing double-counted"
    );
    assert_eq!(active_lines(&after), active_lines(&before));
    app.stop().await;
}

/// The real binary through an outage: the flush retries with backoff, and
/// the log says so once when it starts and once when it ends, not per tick.
#[tokio::test]
async fn outage_is_logged_once_per_state_change_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let bin = Binary::spawn(&db.url, &["--flush-interval", "200ms"]).await;
    let failures = || async {
        sample(&bin.metrics_text().await, "botmetrics_flush_failures_total").unwrap_or(0.0)
    };
    db.set_outage(true).await;
    bin.post_events(&json!([
        {"type": "message", "role": "user", "user_id": 1},
        {"type": "error", "kind": "during-outage"}
    ]))
    .await;
    // Several failed attempts...
    eventually(Duration::from_secs(20), || async {
        failures().await >= 4.0
    })
    .await;
    assert_eq!(
        sample(&bin.metrics_text().await, "botmetrics_store_up"),
        Some(0.0)
    );
    db.set_outage(false).await;
    // ...then the catch-up writes what was counted meanwhile.
    let raw = Raw::connect(&db.url).await;
    eventually(Duration::from_secs(20), || async {
        raw.stored("bot_errors_total", "x", &[("kind", "during-outage")])
            .await
            == Some(1.0)
    })
    .await;
    raw.close().await;
    eventually(Duration::from_secs(5), || async {
        sample(&bin.metrics_text().await, "botmetrics_store_up") == Some(1.0)
    })
    .await;
    let attempts = failures().await;
    let (status, log) = bin.signal("-TERM").await;
    assert!(status.success(), "{log}");
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        count("flush failed"),
        1,
        "one line for {attempts} failures:\n{log}"
    );
    assert_eq!(count("store reachable again"), 1, "{log}");
}

// ---------------------------------------------------------------------------
// 5. Partitions and retention
// ---------------------------------------------------------------------------

fn one_row(bot: &str, value: f64) -> Vec<SeriesRow> {
    vec![SeriesRow {
        metric: "bot_messages_total".into(),
        bot: bot.into(),
        labels: labels(&[("role", "user")]),
        value,
    }]
}

fn noon(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(12, 0, 0).unwrap().and_utc()
}

async fn partitions(raw: &Raw) -> Vec<String> {
    raw.texts(
        "select c.relname::text from pg_inherits i
         join pg_class c on c.oid = i.inhrelid
         join pg_class p on p.oid = i.inhparent
         where p.relname = 'metrics_history' order by 1",
    )
    .await
}

async fn create_partition(raw: &Raw, day: NaiveDate) {
    let next = day.succ_opt().unwrap();
    raw.execute(&format!(
        "create table {} partition of metrics_history for values from ('{day}') to ('{next}')",
        partition_name(day)
    ))
    .await;
}

#[tokio::test]
async fn partitions_are_created_ahead_and_dropped_past_retention_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let mut cfg = quiet_config("x=tx", &db.url);
    cfg.retention = Duration::from_secs(90 * 86_400);
    let app = spawn_app(cfg.clone()).await;
    let raw = Raw::connect(&db.url).await;
    let now = Utc::now();
    let today = now.date_naive();
    let day = |offset: i64| today + chrono::Duration::days(offset);
    let ahead: Vec<String> = (0..3).map(|d| partition_name(day(d))).collect();
    assert_eq!(partitions(&raw).await, ahead, "today and the next two days");
    assert!(ahead[0].starts_with("metrics_history_") && ahead[0].len() == 24);

    for offset in [-200, -91, -90, -10] {
        create_partition(&raw, day(offset)).await;
    }
    let store = &app.state.persistence.store;
    store
        .write_history(&one_row("x", 1.0), noon(day(-200)))
        .await
        .expect("history into the old partition");
    store
        .write_history(&one_row("x", 2.0), noon(day(-10)))
        .await
        .expect("history into a recent partition");
    assert_eq!(raw.count("metrics_history").await, 2);

    let report = store
        .maintain(now, now - chrono::Duration::days(90))
        .await
        .expect("maintain");
    let mut dropped = report.partitions_dropped.clone();
    dropped.sort();
    assert_eq!(
        dropped,
        vec![partition_name(day(-200)), partition_name(day(-91))]
    );
    let mut kept = vec![partition_name(day(-90)), partition_name(day(-10))];
    kept.extend(ahead.iter().cloned());
    kept.sort();
    assert_eq!(
        partitions(&raw).await,
        kept,
        "a partition goes once all of it is past retention"
    );
    assert_eq!(
        raw.count("metrics_history").await,
        1,
        "the recent point stays"
    );
    app.stop().await;

    // A fresh start maintains too: with 30 days, the 90-day-old one goes.
    create_partition(&raw, day(-150)).await;
    cfg.retention = Duration::from_secs(30 * 86_400);
    let app = spawn_app(cfg).await;
    let mut kept = vec![partition_name(day(-10))];
    kept.extend(ahead.iter().cloned());
    kept.sort();
    assert_eq!(partitions(&raw).await, kept);
    raw.close().await;
    app.stop().await;
}

async fn maintain_prunes_history_and_sketches(url: &str) {
    let app = spawn_app(quiet_config("x=tx", url)).await;
    let raw = Raw::connect(url).await;
    let store = &app.state.persistence.store;
    let now = Utc::now();
    let ago = |days: i64| now - chrono::Duration::days(days);
    if raw.is_pg() {
        for days in [200, 91, 89] {
            create_partition(&raw, ago(days).date_naive()).await;
        }
    }
    for (days, value) in [(200, 1.0), (91, 2.0), (89, 3.0), (0, 4.0)] {
        store
            .write_history(&one_row("x", value), ago(days))
            .await
            .expect("write history");
    }
    let hour = now.timestamp().div_euclid(3600);
    let day = now.timestamp().div_euclid(86_400);
    let sketch = |granularity, bucket| StoredSketch {
        bot: "x".into(),
        sketch: SketchRow {
            granularity,
            bucket,
            registers: vec![0; 16384],
        },
    };
    let batch = FlushBatch {
        sketches: vec![
            sketch(Granularity::Hour, hour),
            sketch(Granularity::Hour, hour - 100),
            sketch(Granularity::Day, day - 5),
            sketch(Granularity::Day, day - 40),
        ],
        ..FlushBatch::default()
    };
    store.flush(&batch, now).await.expect("store sketches");
    assert_eq!(raw.count("active_user_sketches").await, 4);

    let report = store
        .maintain(now, now - chrono::Duration::days(90))
        .await
        .expect("maintain");
    if raw.is_pg() {
        assert_eq!(report.partitions_dropped.len(), 2);
    } else {
        assert_eq!(report.rows_deleted, 2, "the points older than 90 days");
    }
    let left = raw
        .texts("select cast(value as text) from metrics_history order by recorded_at")
        .await;
    let left: Vec<f64> = left.iter().map(|v| v.parse().unwrap()).collect();
    assert_eq!(left, vec![3.0, 4.0]);
    assert_eq!(
        raw.texts(
            "select granularity || ':' || cast(bucket as text) from active_user_sketches order by 1"
        )
        .await,
        vec![format!("day:{}", day - 5), format!("hour:{hour}")],
        "sketches no window reaches are pruned"
    );
    raw.close().await;
    app.stop().await;
}

#[tokio::test]
async fn maintain_prunes_history_and_sketches_sqlite() {
    let db = SqliteFile::new();
    maintain_prunes_history_and_sketches(&db.url()).await;
}

#[tokio::test]
async fn maintain_prunes_history_and_sketches_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    maintain_prunes_history_and_sketches(&db.url).await;
}

// ---------------------------------------------------------------------------
// Free-form labels past the cap at restore time
// ---------------------------------------------------------------------------

/// The sum of every series of one family, as exposed.
async fn family_total(app: &TestApp, family: &str) -> f64 {
    app.metrics_text()
        .await
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}

async fn restore_past_the_label_cap_counts_once(url: &str) {
    // Three error kinds stored while the cap allowed them...
    let mut cfg = quiet_config("x=tx", url);
    cfg.max_label_values = 3;
    let app = spawn_app(cfg.clone()).await;
    let kinds = |pairs: &[(&str, usize)]| {
        let events: Vec<Value> = pairs
            .iter()
            .flat_map(|(kind, n)| (0..*n).map(move |_| json!({"type": "error", "kind": kind})))
            .collect();
        Value::Array(events)
    };
    post_ok(&app, "tx", &kinds(&[("a", 1), ("b", 2), ("c", 4)])).await;
    assert_eq!(family_total(&app, "bot_errors_total").await, 7.0);
    app.stop().await;

    // ...then restarts with a lower cap: every count is still counted once,
    // restart after restart.
    cfg.max_label_values = 2;
    for restart in 1..=3 {
        let app = spawn_app(cfg.clone()).await;
        assert_eq!(
            family_total(&app, "bot_errors_total").await,
            7.0,
            "restart {restart}:\n{}",
            app.metrics_text().await
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn restore_past_the_label_cap_counts_once_sqlite() {
    let db = SqliteFile::new();
    restore_past_the_label_cap_counts_once(&db.url()).await;
}

#[tokio::test]
async fn restore_past_the_label_cap_counts_once_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    restore_past_the_label_cap_counts_once(&db.url).await;
}

/// The same through an outage at start: kinds first seen while the store
/// was down take places under the cap before the stored ones are restored.
#[tokio::test]
async fn late_restore_past_the_label_cap_counts_once_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let mut cfg = quiet_config("x=tx", &db.url);
    cfg.max_label_values = 2;
    let app = spawn_app(cfg.clone()).await;
    post_ok(
        &app,
        "tx",
        &json!([{"type": "error", "kind": "a"}, {"type": "error", "kind": "b"}]),
    )
    .await;
    app.stop().await;

    db.set_outage(true).await;
    let app = spawn_app(cfg.clone()).await;
    post_ok(&app, "tx", &json!({"type": "error", "kind": "c"})).await;
    db.set_outage(false).await;
    app.state
        .persistence
        .flush_once()
        .await
        .expect("restore and flush");
    assert_eq!(family_total(&app, "bot_errors_total").await, 3.0);
    app.stop().await;

    for restart in 1..=2 {
        let app = spawn_app(cfg.clone()).await;
        assert_eq!(
            family_total(&app, "bot_errors_total").await,
            3.0,
            "restart {restart}:\n{}",
            app.metrics_text().await
        );
        app.stop().await;
    }
}
