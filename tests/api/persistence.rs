//! Persistence (issue 3): clean restarts, flushes that write only changes in
//! one transaction, kill -9, SIGTERM and SIGINT, database outages,
//! partitions and retention, against real SQLite files and a real
//! PostgreSQL (a fresh database per test). Each scenario is written once,
//! generic over the database URL, and run on both backends by
//! `on_both_backends!`.

use std::collections::BTreeMap;
use std::time::Duration;

use botmetrics::config::Config;
use botmetrics::metrics::active::{Granularity, SketchRow};
use botmetrics::persist::FlushOutcome;
use botmetrics::store::{FlushBatch, StoredSketch, partition_name};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Value, json};

use crate::helpers::{
    Binary, PgDatabase, Raw, active_lines, assert_error, assert_series, bot_part, config,
    eventually, on_both_backends, spawn_app, user_messages_row, value,
};

/// One of each event type with the corners a store must keep: histograms
/// (including the `+Inf` buckets), free-form labels (with
/// `max_label_values = 2`, the third kind and name fold into `other`),
/// fractional custom values and both user id forms.
fn every_corner() -> Value {
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

/// The exposition of a fresh start on `cfg`'s store, right after restore.
async fn restarted(cfg: Config) -> String {
    let app = spawn_app(cfg).await;
    let text = app.metrics_text().await;
    app.stop().await;
    text
}

// ---------------------------------------------------------------------------
// 1. A clean restart keeps every count exactly
// ---------------------------------------------------------------------------

/// Every `bot_*` sample but the active-user gauges (estimates, which do not
/// add up), by series.
fn counts(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        // Derived from who the users are, not summed: the same users again
        // move neither the estimates nor the count of new users.
        .filter(|l| {
            l.starts_with("bot_")
                && !l.starts_with("bot_active_users")
                && !l.starts_with("bot_users_new_total")
        })
        .map(|l| {
            let (name, v) = l.rsplit_once(' ').expect("a sample line");
            (name.to_owned(), v.parse().expect("a number"))
        })
        .collect()
}

async fn clean_restart_keeps_every_count(url: &str) {
    let mut cfg = config("x=tx", url);
    cfg.max_label_values = 2;
    let app = spawn_app(cfg.clone()).await;
    app.post_ok("tx", &every_corner()).await;
    let before = app.metrics_text().await;
    // Sanity: the batch reached the corners this test is about.
    assert_series(
        &before,
        &[
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
        ],
    );
    app.stop().await;

    let app = spawn_app(cfg.clone()).await;
    assert_eq!(
        bot_part(&app.metrics_text().await),
        bot_part(&before),
        "every bot_* series restored exactly, active-user estimates too"
    );

    // Counters stay monotonic: the same batch again doubles every count...
    app.post_ok("tx", &every_corner()).await;
    let again = app.metrics_text().await;
    let (once, twice) = (counts(&before), counts(&again));
    assert_eq!(once.len(), twice.len(), "the same series exist");
    for (series, v) in &once {
        let w = twice[series];
        assert!(
            (w - 2.0 * v).abs() <= 1e-9 * v.abs().max(1.0),
            "{series}: {v} before the restart, {w} after sending the batch again"
        );
    }
    // ...and moves no estimate: the same users again.
    assert_eq!(active_lines(&again), active_lines(&before));
    app.stop().await;

    // Nothing is replayed: another restart shows exactly the last values.
    assert_eq!(bot_part(&restarted(cfg).await), bot_part(&again));
}

on_both_backends!(clean_restart_keeps_every_count);

// ---------------------------------------------------------------------------
// 2. A flush writes only changes, in one transaction; nothing when idle
// ---------------------------------------------------------------------------

/// What a flush wrote: so many series, sketches and daily counters, and
/// user-book rows.
fn wrote(series: usize, sketches: usize, daily: usize, users: usize) -> FlushOutcome {
    FlushOutcome::Wrote {
        series,
        sketches,
        daily,
        users,
        wiped: 0,
    }
}

async fn flush_writes_only_changes(url: &str) {
    let app = spawn_app(config("x=tx", url)).await;
    let p = &app.state.persistence;
    let raw = Raw::connect(url).await;
    let all = botmetrics::persist::snapshot(&app.state.metrics).len();
    let flush = || async { p.flush_once().await.expect("flush") };

    // A fresh store: every series is written once, at 0.
    assert_eq!(flush().await, wrote(all, 0, 0, 0));
    assert_eq!(raw.count("real_time_metrics").await, all as i64);
    assert_eq!(flush().await, FlushOutcome::Idle);
    assert_eq!(flush().await, FlushOutcome::Idle);

    // Three series change (one existing, two new); the daily message count too.
    app.post_ok(
        "tx",
        &json!([
            {"type": "message", "role": "user"},
            {"type": "message", "role": "user"},
            {"type": "error", "kind": "db"},
            {"type": "custom", "name": "c", "value": 0.5}
        ]),
    )
    .await;
    assert_eq!(flush().await, wrote(3, 0, 1, 0));
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
    assert_eq!(flush().await, FlushOutcome::Idle);

    // A user: its message, the three active-user gauges and two sketches;
    // new to the book: bot_users_new_total, today's new users, its row.
    let user_42 = json!({"type": "message", "role": "user", "user_id": 42});
    app.post_ok("tx", &user_42).await;
    assert_eq!(flush().await, wrote(5, 2, 2, 1));
    assert_eq!(raw.count("user_book").await, 1);
    assert_eq!(raw.count("active_user_sketches").await, 2);
    // Sparse sketches: a tag byte and one 4-byte entry each.
    assert_eq!(raw.sketch_sizes().await, vec![5, 5]);
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
    assert_eq!(flush().await, FlushOutcome::Idle);
    app.post_ok("tx", &user_42).await;
    assert_eq!(flush().await, wrote(1, 0, 1, 1));
    assert_eq!(flush().await, FlushOutcome::Idle);

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

on_both_backends!(flush_writes_only_changes);

// ---------------------------------------------------------------------------
// 3. The real binary: kill -9 after a flush keeps what was flushed; SIGTERM
//    and SIGINT flush everything and exit 0
// ---------------------------------------------------------------------------

/// Waits until the store holds `value` for one series of bot x: written by
/// the binary's own flush loop.
async fn until_stored(url: &str, metric: &str, pairs: &[(&str, &str)], value: f64) {
    let raw = Raw::connect(url).await;
    eventually(Duration::from_secs(20), || async {
        raw.stored(metric, "x", pairs).await == Some(value)
    })
    .await;
    raw.close().await;
}

async fn last_flush(bin: &Binary) -> f64 {
    bin.sample("botmetrics_last_flush_timestamp_seconds")
        .await
        .unwrap_or(0.0)
}

async fn kill_9_keeps_what_was_flushed(url: &str) {
    let flags = ["--flush-interval", "200ms", "--max-label-values", "2"];
    let mut bin = Binary::serve(url, "x=tx", &flags).await;
    bin.post_ok("tx", &every_corner()).await;
    let expected = bin.metrics_text().await;

    // Wait for a flush holding the batch's last event...
    until_stored(url, "bot_custom_events_total", &[("name", "other")], 1.0).await;
    // ...then for two more, so a flush that began before the batch was
    // applied whole cannot be the last one.
    for _ in 0..2 {
        let seen = last_flush(&bin).await;
        eventually(Duration::from_secs(15), || async {
            last_flush(&bin).await > seen
        })
        .await;
    }
    bin.kill_9().await;
    let log = bin.log();
    assert!(
        !log.contains("final flush"),
        "no final flush on kill -9:\n{log}"
    );

    assert_eq!(
        bot_part(&restarted(config("x=tx", url)).await),
        bot_part(&expected),
        "what was flushed survives kill -9"
    );
}

on_both_backends!(kill_9_keeps_what_was_flushed);

async fn sigterm_and_sigint_flush_everything_and_exit_0(url: &str) {
    // Flushing hourly: only the flush on the way out can store these.
    let flags = ["--flush-interval", "1h", "--max-label-values", "2"];
    let mut first = Binary::serve(url, "x=tx,y=ty", &flags).await;
    first.post_ok("tx", &every_corner()).await;
    first
        .post_ok(
            "ty",
            &json!({"type": "message", "role": "user", "user_id": 77}),
        )
        .await;
    let expected = first.metrics_text().await;
    let status = first.signal("TERM").await;
    let log = first.log();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(log.contains("final flush done"), "log:\n{log}");

    // Same store, new process: totals, histograms and active-user sketches
    // are exactly what was counted.
    let mut second = Binary::serve(url, "x=tx,y=ty", &flags).await;
    let restored = second.metrics_text().await;
    assert_eq!(bot_part(&restored), bot_part(&expected));
    assert_eq!(
        value(&restored, r#"bot_active_users{bot="x",window="1d"}"#),
        3.0
    );

    // Counting goes on from there; SIGINT stops as cleanly as SIGTERM.
    second
        .post_ok("tx", &json!({"type": "message", "role": "user"}))
        .await;
    let status = second.signal("INT").await;
    let log = second.log();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(log.contains("final flush done"), "log:\n{log}");

    let third = Binary::serve(url, "x=tx,y=ty", &flags).await;
    assert_series(
        &third.metrics_text().await,
        &[
            (r#"bot_messages_total{bot="x",role="user"}"#, 3.0),
            (r#"bot_messages_total{bot="y",role="user"}"#, 1.0),
        ],
    );
}

on_both_backends!(sigterm_and_sigint_flush_everything_and_exit_0);

// ---------------------------------------------------------------------------
// 4. Outages (PostgreSQL)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn outage_keeps_every_event_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let cfg = config("x=tx", &db.url);
    let app = spawn_app(cfg.clone()).await;
    let p = &app.state.persistence;
    app.post_ok(
        "tx",
        &json!([
            {"type": "message", "role": "user", "user_id": 1},
            {"type": "message", "role": "user", "user_id": 2}
        ]),
    )
    .await;
    p.flush_once().await.expect("flush while the store is up");
    assert_eq!(app.get_json("/readyz").await.0, 200);

    db.set_outage(true).await;
    // Ingestion and /metrics work from memory.
    app.post_ok(
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
    assert_error(&app.get_json("/readyz").await, 503, "unavailable", None);

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
    assert_series(
        &app.metrics_text().await,
        &[
            ("botmetrics_flush_failures_total", 2.0),
            ("botmetrics_history_write_failures_total", 1.0),
            ("botmetrics_store_up", 0.0),
        ],
    );
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
    let (status, body) = app.get_json("/readyz").await;
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
    assert_series(
        &restarted(cfg).await,
        &[
            (r#"bot_active_users{bot="x",window="1d"}"#, 5.0),
            (r#"bot_messages_total{bot="x",role="user"}"#, 5.0),
        ],
    );
}

#[tokio::test]
async fn start_during_outage_restores_on_recovery_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let cfg = config("x=tx", &db.url);
    // Totals in the store from an earlier run.
    let app = spawn_app(cfg.clone()).await;
    app.post_ok(
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
    assert!(!p.is_restored());
    assert_eq!(app.get_json("/healthz").await.0, 200);
    assert_error(&app.get_json("/readyz").await, 503, "unavailable", None);
    app.post_ok(
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
    assert!(p.is_restored());
    assert_series(
        &app.metrics_text().await,
        &[
            (r#"bot_messages_total{bot="x",role="user"}"#, 5.0),
            (r#"bot_users_registered_total{bot="x"}"#, 1.0),
            (r#"bot_response_duration_seconds_count{bot="x"}"#, 2.0),
            (r#"bot_response_duration_seconds_sum{bot="x"}"#, 2.0),
            (r#"bot_active_users{bot="x",window="1d"}"#, 5.0),
        ],
    );
    let raw = Raw::connect(&db.url).await;
    assert_eq!(
        raw.stored("bot_messages_total", "x", &[("role", "user")])
            .await,
        Some(5.0)
    );
    raw.close().await;
    assert_eq!(app.get_json("/readyz").await.0, 200);
    let before = app.metrics_text().await;
    app.stop().await;

    assert_eq!(
        bot_part(&restarted(cfg).await),
        bot_part(&before),
        "nothing double-counted"
    );
}

/// The real binary through an outage: the flush retries with backoff, and
/// the log says so once when it starts and once when it ends, not per tick.
#[tokio::test]
async fn outage_is_logged_once_per_state_change_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let mut bin = Binary::serve(&db.url, "x=tx", &["--flush-interval", "200ms"]).await;
    let failures = || async {
        bin.sample("botmetrics_flush_failures_total")
            .await
            .unwrap_or(0.0)
    };
    db.set_outage(true).await;
    bin.post_ok(
        "tx",
        &json!([
            {"type": "message", "role": "user", "user_id": 1},
            {"type": "error", "kind": "during-outage"}
        ]),
    )
    .await;
    // Several failed attempts...
    eventually(Duration::from_secs(20), || async {
        failures().await >= 4.0
    })
    .await;
    assert_eq!(bin.sample("botmetrics_store_up").await, Some(0.0));
    db.set_outage(false).await;
    // ...then the catch-up writes what was counted meanwhile.
    until_stored(
        &db.url,
        "bot_errors_total",
        &[("kind", "during-outage")],
        1.0,
    )
    .await;
    eventually(Duration::from_secs(5), || async {
        bin.sample("botmetrics_store_up").await == Some(1.0)
    })
    .await;
    let attempts = failures().await;
    let status = bin.signal("TERM").await;
    let log = bin.log();
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
    let mut cfg = config("x=tx", &db.url);
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
        .write_history(&[user_messages_row(1.0)], noon(day(-200)))
        .await
        .expect("history into the old partition");
    store
        .write_history(&[user_messages_row(2.0)], noon(day(-10)))
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
    let app = spawn_app(config("x=tx", url)).await;
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
            .write_history(&[user_messages_row(value)], ago(days))
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

on_both_backends!(maintain_prunes_history_and_sketches);

// ---------------------------------------------------------------------------
// 6. Free-form labels past the cap at restore time
// ---------------------------------------------------------------------------

/// The sum of every series of one family in an exposition.
fn family_total(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}

/// Restarts `restarts` times on `cfg`'s store; every time, the errors of
/// every kind add up to `total`.
async fn assert_errors_after_restarts(cfg: &Config, restarts: usize, total: f64) {
    for restart in 1..=restarts {
        let text = restarted(cfg.clone()).await;
        assert_eq!(
            family_total(&text, "bot_errors_total"),
            total,
            "restart {restart}:\n{text}"
        );
    }
}

async fn restore_past_the_label_cap_counts_once(url: &str) {
    // Three error kinds stored while the cap allowed them...
    let mut cfg = config("x=tx", url);
    cfg.max_label_values = 3;
    let app = spawn_app(cfg.clone()).await;
    let kinds = |pairs: &[(&str, usize)]| {
        let events: Vec<Value> = pairs
            .iter()
            .flat_map(|(kind, n)| (0..*n).map(move |_| json!({"type": "error", "kind": kind})))
            .collect();
        Value::Array(events)
    };
    app.post_ok("tx", &kinds(&[("a", 1), ("b", 2), ("c", 4)]))
        .await;
    assert_eq!(
        family_total(&app.metrics_text().await, "bot_errors_total"),
        7.0
    );
    app.stop().await;

    // ...then restarts with a lower cap: every count is still counted once,
    // restart after restart.
    cfg.max_label_values = 2;
    assert_errors_after_restarts(&cfg, 3, 7.0).await;
}

on_both_backends!(restore_past_the_label_cap_counts_once);

/// The same through an outage at start: kinds first seen while the store
/// was down take places under the cap before the stored ones are restored.
#[tokio::test]
async fn late_restore_past_the_label_cap_counts_once_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let mut cfg = config("x=tx", &db.url);
    cfg.max_label_values = 2;
    let app = spawn_app(cfg.clone()).await;
    app.post_ok(
        "tx",
        &json!([{"type": "error", "kind": "a"}, {"type": "error", "kind": "b"}]),
    )
    .await;
    app.stop().await;

    db.set_outage(true).await;
    let app = spawn_app(cfg.clone()).await;
    app.post_ok("tx", &json!({"type": "error", "kind": "c"}))
        .await;
    db.set_outage(false).await;
    app.state
        .persistence
        .flush_once()
        .await
        .expect("restore and flush");
    assert_eq!(
        family_total(&app.metrics_text().await, "bot_errors_total"),
        3.0
    );
    app.stop().await;

    assert_errors_after_restarts(&cfg, 2, 3.0).await;
}

/// "When nothing changed no statement is sent", by PostgreSQL's own count
/// of committed transactions in the database (`pg_stat_database`), not by
/// the application's report of itself. The count is read from another
/// database, so reading it does not move it.
#[tokio::test]
async fn an_idle_flush_commits_nothing_by_postgres_own_count() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    // A backend reports its counts at most every second while busy and 10 s
    // after it goes idle (PostgreSQL's PGSTAT_IDLE_INTERVAL): so much
    // settling before each reading.
    const SETTLE: Duration = Duration::from_secs(11);
    let admin = sqlx::PgPool::connect(&crate::helpers::postgres_base_url())
        .await
        .expect("admin connection");
    let commits = || async {
        sqlx::query_scalar::<_, i64>("select xact_commit from pg_stat_database where datname = $1")
            .bind(&db.name)
            .fetch_one(&admin)
            .await
            .expect("pg_stat_database")
    };
    let app = spawn_app(config("x=tx", &db.url)).await;
    let p = &app.state.persistence;
    app.post_ok("tx", &json!({"type": "message", "role": "user"}))
        .await;
    assert!(matches!(
        p.flush_once().await.expect("flush"),
        FlushOutcome::Wrote { .. }
    ));

    tokio::time::sleep(SETTLE).await;
    let before = commits().await;
    for _ in 0..3 {
        assert_eq!(p.flush_once().await.expect("flush"), FlushOutcome::Idle);
    }
    tokio::time::sleep(SETTLE).await;
    assert_eq!(commits().await, before, "transactions during idle flushes");

    // The measure sees a flush that has something to write.
    app.post_ok("tx", &json!({"type": "message", "role": "user"}))
        .await;
    assert!(matches!(
        p.flush_once().await.expect("flush"),
        FlushOutcome::Wrote { .. }
    ));
    eventually(Duration::from_secs(30), || async {
        commits().await > before
    })
    .await;
    app.stop().await;
    admin.close().await;
}

// ---------------------------------------------------------------------------
// Histograms survive whole whichever buckets were hit (issue 17, item 0)
// ---------------------------------------------------------------------------

/// `responses.p50_ms` and `responses.p95_ms` of bot x's summary.
async fn response_quantiles(app: &crate::helpers::TestApp) -> (f64, f64) {
    let (status, s) = app.get_json("/v1/summary?bot=x").await;
    assert_eq!(status, 200, "{s}");
    let ms = |q: &str| s["responses"][q].as_f64().expect("a number");
    (ms("p50_ms"), ms("p95_ms"))
}

/// Only slow responses (1,840 ms, all in (1 s, 2 s]): flushed, restarted on
/// the same store, the median and p95 are what they were, 1,500 ms and
/// 1,950 ms. Then the store loses the lines below 2 s, as a cluster writer
/// before this fix wrote them (only the lines Redis held): the restore
/// still reads the histogram whole.
async fn slow_responses_keep_their_percentiles_across_a_restart(url: &str) {
    let cfg = config("x=tx", url);
    let app = spawn_app(cfg.clone()).await;
    let slow = json!({"type": "response", "status": "success", "duration_ms": 1840});
    app.post_ok("tx", &Value::Array(vec![slow; 4])).await;
    assert_eq!(response_quantiles(&app).await, (1500.0, 1950.0));
    app.stop().await;

    let app = spawn_app(cfg.clone()).await;
    assert_eq!(
        response_quantiles(&app).await,
        (1500.0, 1950.0),
        "after a restart"
    );
    app.stop().await;

    let raw = Raw::connect(url).await;
    raw.execute(
        "delete from real_time_metrics where metric = 'bot_response_duration_seconds_bucket' \
         and value = 0",
    )
    .await;
    raw.close().await;
    let app = spawn_app(cfg).await;
    assert_eq!(
        response_quantiles(&app).await,
        (1500.0, 1950.0),
        "restored from a store holding only the lines that moved"
    );
    let text = app.metrics_text().await;
    assert_series(
        &text,
        &[
            (
                r#"bot_response_duration_seconds_bucket{bot="x",le="0.05"}"#,
                0.0,
            ),
            (
                r#"bot_response_duration_seconds_bucket{bot="x",le="2"}"#,
                4.0,
            ),
            (
                r#"bot_response_duration_seconds_bucket{bot="x",le="+Inf"}"#,
                4.0,
            ),
        ],
    );
    app.stop().await;
}

on_both_backends!(slow_responses_keep_their_percentiles_across_a_restart);
