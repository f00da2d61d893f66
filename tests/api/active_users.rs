//! Active users (issue 4): HyperLogLog estimates within 2 % up to a million
//! users and exact for a handful, repeat visitors that change nothing,
//! rolling windows, estimates that survive a restart on both backends,
//! bounded memory (sparse sketches for few users, dense past 1,024), and no
//! user id anywhere in the database.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use botmetrics::event::UserId;
use botmetrics::metrics::active::REGISTERS;
use botmetrics::persist::FlushOutcome;
use chrono::Utc;
use serde_json::{Value, json};

use crate::helpers::{
    Binary, PgDatabase, Raw, SqliteFile, TestApp, active_lines, config, eventually,
    on_both_backends, sample, spawn_app, start,
};

const DAY: i64 = 86_400;

fn message(user: impl Into<Value>, ts: i64) -> Value {
    json!({"type": "message", "role": "user", "user_id": user.into(), "ts": ts})
}

async fn windows(app: &TestApp, bot: &str) -> [Option<f64>; 3] {
    let text = app.metrics_text().await;
    ["1d", "7d", "30d"].map(|w| {
        sample(
            &text,
            &format!(r#"bot_active_users{{bot="{bot}",window="{w}"}}"#),
        )
    })
}

async fn summary_users(app: &TestApp, bot: &str) -> Value {
    let (status, body) = app.get_json(&format!("/v1/summary?bot={bot}")).await;
    assert_eq!(status, 200, "{body}");
    body["users"].clone()
}

fn within_2_percent(estimate: u64, truth: u64) {
    let error = (estimate as f64 - truth as f64).abs() / truth as f64;
    assert!(
        error <= 0.02,
        "estimate {estimate} for {truth} users: {:.2} % off",
        error * 100.0
    );
}

#[tokio::test]
async fn ten_users_read_exactly_ten() {
    let (app, _db) = start("x=tx").await;
    let now = Utc::now().timestamp();
    app.post_ndjson("tx", (1..=10).map(|n| message(n, now)))
        .await;
    assert_eq!(windows(&app, "x").await, [Some(10.0); 3]);
    let users = summary_users(&app, "x").await;
    assert_eq!(
        (
            users["active_1d"].as_u64(),
            users["active_7d"].as_u64(),
            users["active_30d"].as_u64()
        ),
        (Some(10), Some(10), Some(10))
    );

    // The same users again, as integers and as their decimal strings, and in
    // every event type that carries a user: nothing moves.
    let again = (1..=10).flat_map(|n| {
        [
            message(n, now),
            message(n.to_string(), now),
            json!({"type": "user_registered", "user_id": n}),
            json!({"type": "limit_reached", "user_id": n.to_string()}),
        ]
    });
    app.post_ndjson("tx", again).await;
    assert_eq!(windows(&app, "x").await, [Some(10.0); 3]);
    // An 11th user does move it.
    app.post_ndjson("tx", std::iter::once(message("eleven", now)))
        .await;
    assert_eq!(windows(&app, "x").await, [Some(11.0); 3]);
    app.stop().await;
}

#[tokio::test]
async fn a_thousand_users_within_2_percent() {
    let (app, _db) = start("x=tx").await;
    let now = Utc::now().timestamp();
    let users = || (0..1000).map(|n| message(format!("user-{n}"), now));
    app.post_ndjson("tx", users()).await;
    let first = windows(&app, "x").await;
    for w in first {
        within_2_percent(w.expect("exposed") as u64, 1000);
    }
    app.post_ndjson("tx", users()).await;
    assert_eq!(
        windows(&app, "x").await,
        first,
        "the same users twice do not move it"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_million_users_within_2_percent_in_bounded_memory() {
    let db = SqliteFile::new();
    let cfg = config("big=tb,small=ts", &db.url());
    let app = spawn_app(cfg.clone()).await;
    let now = Utc::now().timestamp();
    let metrics = app.state.metrics.clone();
    let big = metrics.bot("big").expect("bot big");
    let started = Instant::now();
    for n in 0..1_000_000i128 {
        big.active.insert_hashed(
            botmetrics::event::UserKey::legacy().hash(&UserId::Int(n)),
            now,
        );
    }
    let inserted = started.elapsed();
    for (window, estimate) in big.active.estimates_at(now) {
        assert!(matches!(window, "1d" | "7d" | "30d"));
        within_2_percent(estimate, 1_000_000);
    }
    let before = big.active.estimates_at(now);
    for n in (0..1_000_000i128).step_by(7) {
        big.active.insert_hashed(
            botmetrics::event::UserKey::legacy().hash(&UserId::Int(n)),
            now,
        );
    }
    assert_eq!(big.active.estimates_at(now), before, "repeat visitors");

    // Memory is bounded: a million users fill two dense sketches (hour and
    // day), no more.
    assert_eq!(big.active.heap_bytes(), 2 * REGISTERS);

    // A thousand users of another bot: sparse sketches, exact, 4 bytes a user.
    let small = metrics.bot("small").expect("bot small");
    for n in 0..1000i128 {
        small.active.insert_hashed(
            botmetrics::event::UserKey::legacy().hash(&UserId::Int(n)),
            now,
        );
    }
    assert_eq!(
        small.active.estimates_at(now),
        [("1d", 1000), ("7d", 1000), ("30d", 1000)]
    );
    assert!(small.active.heap_bytes() <= 2 * 4 * 1024);
    assert_eq!(
        app.state.persistence.flush_once().await.expect("flush"),
        FlushOutcome::Wrote {
            series: botmetrics::persist::snapshot(&metrics).len(),
            sketches: 4,
            daily: 0,
            users: 0,
            wiped: 0,
        }
    );
    let raw = Raw::connect(&db.url()).await;
    assert_eq!(
        raw.texts("select bot || ':' || granularity from active_user_sketches order by 1")
            .await,
        ["big:day", "big:hour", "small:day", "small:hour"],
        "one sketch per bucket, whatever the number of users"
    );
    let mut sizes = raw.sketch_sizes().await;
    sizes.sort_unstable();
    // Sparse rows: a tag byte and 4 bytes per user; dense rows: 2^14 registers.
    assert_eq!(sizes, vec![4001, 4001, 16384, 16384]);
    raw.close().await;
    let exposed = windows(&app, "big").await;
    app.stop().await;

    let app = spawn_app(cfg).await;
    assert_eq!(windows(&app, "big").await, exposed, "restored exactly");
    assert_eq!(
        app.state
            .metrics
            .bot("big")
            .unwrap()
            .active
            .estimates_at(now),
        before
    );
    app.stop().await;
    eprintln!("1,000,000 sketch inserts took {inserted:?}");
}

/// 100,000 users through the HTTP API, in NDJSON batches of 10,000.
#[tokio::test]
async fn a_hundred_thousand_users_over_http_within_2_percent() {
    let (app, _db) = start("x=tx").await;
    let now = Utc::now().timestamp();
    for batch in 0..10 {
        let users = (batch * 10_000..(batch + 1) * 10_000).map(|n| message(n, now));
        app.post_ndjson("tx", users).await;
    }
    for w in windows(&app, "x").await {
        within_2_percent(w.expect("exposed") as u64, 100_000);
    }
    app.stop().await;
}

/// Users seen now, 2, 10 and 40 days ago: 3, 5, 7 and 11 distinct users.
fn spread_users(now: i64) -> impl Iterator<Item = Value> {
    let group = move |first: i64, count: i64, days_ago: i64| {
        (first..first + count).map(move |n| message(format!("u{n}"), now - days_ago * DAY))
    };
    group(0, 3, 0)
        .chain(group(100, 5, 2))
        .chain(group(200, 7, 10))
        .chain(group(300, 11, 40))
}

#[tokio::test]
async fn windows_roll() {
    let (app, _db) = start("x=tx").await;
    let now = Utc::now().timestamp();
    app.post_ndjson("tx", spread_users(now)).await;
    assert_eq!(
        windows(&app, "x").await,
        [Some(3.0), Some(8.0), Some(15.0)],
        "2 days ago counts in 7d and 30d, 10 days ago in 30d, 40 days ago in none"
    );
    let active = &app.state.metrics.bot("x").unwrap().active;
    assert_eq!(
        active.estimates_at(now),
        [("1d", 3), ("7d", 8), ("30d", 15)]
    );
    // Time passes: today's users leave the 1d window after 24 hours...
    assert_eq!(
        active.estimates_at(now + DAY / 2),
        [("1d", 3), ("7d", 8), ("30d", 15)]
    );
    assert_eq!(
        active.estimates_at(now + DAY + 3600),
        [("1d", 0), ("7d", 8), ("30d", 15)]
    );
    // ...the 2-day-old ones leave 7d on day 7, the 10-day-old ones 30d on day 30.
    assert_eq!(
        active.estimates_at(now + 6 * DAY),
        [("1d", 0), ("7d", 3), ("30d", 15)]
    );
    assert_eq!(
        active.estimates_at(now + 21 * DAY),
        [("1d", 0), ("7d", 0), ("30d", 8)]
    );
    assert_eq!(
        active.estimates_at(now + 31 * DAY),
        [("1d", 0), ("7d", 0), ("30d", 0)]
    );
    app.stop().await;
}

/// 3,000 users of bot x over the last five days, 250 of bot y today.
async fn post_many_users(app: &TestApp, now: i64) {
    app.post_ndjson("tx", (0..3000).map(|n| message(n, now - (n % 5) * DAY)))
        .await;
    app.post_ndjson("ty", (0..250).map(|n| message(n, now)))
        .await;
}

async fn restart_keeps_estimates(url: &str) {
    let cfg = config("x=tx,y=ty", url);
    let app = spawn_app(cfg.clone()).await;
    let now = Utc::now().timestamp();
    app.post_ndjson("tx", spread_users(now)).await;
    post_many_users(&app, now).await;
    let before = active_lines(&app.metrics_text().await);
    assert_eq!(before.len(), 6, "three windows for each of two bots");
    let users_x = summary_users(&app, "x").await;
    let users_y = summary_users(&app, "y").await;
    app.stop().await;

    let app = spawn_app(cfg.clone()).await;
    assert_eq!(active_lines(&app.metrics_text().await), before);
    assert_eq!(summary_users(&app, "x").await, users_x);
    assert_eq!(summary_users(&app, "y").await, users_y);
    // The restored sketches merge with new inserts of the same users (the
    // hash is fixed across runs): nothing moves.
    post_many_users(&app, now).await;
    assert_eq!(active_lines(&app.metrics_text().await), before);
    // New users this time, so the stop stores y's sketches a second time,
    // over the first: the next start must read the second version.
    app.post_ndjson("ty", (0..50).map(|n| message(format!("late-{n}"), now)))
        .await;
    let after = active_lines(&app.metrics_text().await);
    assert_ne!(after, before, "the new users moved y's estimates");
    assert_eq!(
        after
            .iter()
            .filter(|l| l.contains("bot=\"x\""))
            .collect::<Vec<_>>(),
        before
            .iter()
            .filter(|l| l.contains("bot=\"x\""))
            .collect::<Vec<_>>(),
        "x's did not move"
    );
    let users_y_after = summary_users(&app, "y").await;
    assert_ne!(users_y_after, users_y);
    app.stop().await;

    // A restart that finds sketches stored twice over reads the second.
    let app = spawn_app(cfg).await;
    assert_eq!(active_lines(&app.metrics_text().await), after);
    assert_eq!(summary_users(&app, "y").await, users_y_after);
    app.stop().await;
}

on_both_backends!(restart_keeps_estimates);

// ---------------------------------------------------------------------------
// Privacy: no user id is stored
// ---------------------------------------------------------------------------

const STRING_ID: &str = "user-7f3a9c";
const INT_ID: i64 = 987_654_321_987;
const EVENT_ID: &str = "evt-5e1d2b0a";

fn needles() -> Vec<Vec<u8>> {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    vec![
        STRING_ID.as_bytes().to_vec(),
        INT_ID.to_string().into_bytes(),
        EVENT_ID.as_bytes().to_vec(),
        // As PostgreSQL prints a bytea.
        hex(STRING_ID.as_bytes()).into_bytes(),
        hex(INT_ID.to_string().as_bytes()).into_bytes(),
        // As SQLite stores an integer: big-endian, 6 bytes for this one.
        INT_ID.to_be_bytes()[2..].to_vec(),
    ]
}

fn assert_absent(haystack: &[u8], place: &str) {
    for needle in needles() {
        assert!(
            !haystack
                .windows(needle.len())
                .any(|w| w == needle.as_slice()),
            "{:?} found in {place}",
            String::from_utf8_lossy(&needle)
        );
    }
}

async fn store_with_distinctive_ids(url: &str) {
    let app = spawn_app(config("x=tx", url)).await;
    let now = Utc::now().timestamp();
    for user in [json!(STRING_ID), json!(INT_ID)] {
        let (status, body) = app
            .post_events(
                "tx",
                &json!([
                    {"type": "message", "role": "user", "user_id": user, "event_id": EVENT_ID, "ts": now - 3 * DAY},
                    {"type": "message", "role": "user", "user_id": user},
                    {"type": "response", "status": "success", "duration_ms": 800, "user_id": user},
                    {"type": "user_registered", "user_id": user},
                    {"type": "consent", "granted": true, "user_id": user},
                    {"type": "limit_reached", "user_id": user},
                    {"type": "cache", "result": "hit", "user_id": user},
                    {"type": "error", "kind": "e", "user_id": user},
                    {"type": "custom", "name": "n", "user_id": user}
                ]),
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }
    assert_eq!(
        app.sample(r#"bot_active_users{bot="x",window="1d"}"#).await,
        Some(2.0)
    );
    let p = &app.state.persistence;
    assert!(matches!(
        p.flush_once().await.expect("flush"),
        FlushOutcome::Wrote { .. }
    ));
    assert!(p.write_history_once().await.expect("history") > 0);
    app.stop().await;
}

#[tokio::test]
async fn no_user_id_in_the_database_sqlite() {
    let db = SqliteFile::new();
    store_with_distinctive_ids(&db.url()).await;
    let dir = db.path().parent().unwrap().to_owned();
    let mut files = 0;
    let mut journal_files = 0;
    let mut all = Vec::new();
    // Every file the server wrote, the journal's segments included.
    let mut pending = vec![dir];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the database directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).expect("read a database file");
            assert_absent(&bytes, &path.display().to_string());
            if path.extension().is_some_and(|e| e == "wal") && bytes.len() > 12 {
                journal_files += 1;
            }
            all.extend(bytes);
            files += 1;
        }
    }
    assert!(files >= 1);
    assert!(journal_files >= 1, "the journal was searched too");
    // Sanity: the dump holds what was stored.
    for present in [
        "bot_messages_total",
        "bot_active_users",
        "real_time_metrics",
    ] {
        assert!(
            all.windows(present.len()).any(|w| w == present.as_bytes()),
            "{present} is in the file"
        );
    }
}

#[tokio::test]
async fn no_user_id_in_the_database_postgres() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    store_with_distinctive_ids(&db.url).await;
    let raw = Raw::connect(&db.url).await;
    let tables = raw
        .texts(
            "select table_name::text from information_schema.tables
             where table_schema = 'public' order by 1",
        )
        .await;
    for expected in [
        "real_time_metrics",
        "metrics_history",
        "active_user_sketches",
        "daily_counters",
    ] {
        assert!(
            tables.iter().any(|t| t == expected),
            "{expected} in {tables:?}"
        );
    }
    // Every text-like column of every table, selected on its own...
    let columns = raw
        .texts(
            "select table_name::text || '.' || column_name::text from information_schema.columns
             where table_schema = 'public'
               and data_type in ('text', 'jsonb', 'json', 'character varying', 'bytea')
             order by 1",
        )
        .await;
    assert!(
        columns.contains(&"real_time_metrics.labels".to_owned()),
        "{columns:?}"
    );
    let mut dump = String::new();
    for column in &columns {
        let (table, column) = column.split_once('.').unwrap();
        let values = raw
            .texts(&format!(
                "select coalesce(string_agg(\"{column}\"::text, E'\\n'), '') from \"{table}\""
            ))
            .await;
        assert_absent(values.concat().as_bytes(), &format!("{table}.{column}"));
        dump.push_str(&values.concat());
    }
    // ...and every whole row, whatever its column types.
    for table in &tables {
        let rows = raw
            .texts(&format!(
                "select coalesce(string_agg(t::text, E'\\n'), '') from \"{table}\" t"
            ))
            .await;
        assert_absent(rows.concat().as_bytes(), table);
    }
    assert!(dump.contains("bot_messages_total") && dump.contains("role"));
    raw.close().await;
}

// ---------------------------------------------------------------------------
// Privacy beyond the tables: logs at debug level and every answer
// ---------------------------------------------------------------------------

/// A user id only ever sent in events that are refused.
const REFUSED_ID: &str = "user-refused-c41d08";

/// The real binary at debug level in `format`, fed distinctive ids in
/// accepted and refused events (a 257-character one among them): neither
/// its log nor any answer (the POST answers, `/metrics`, the summary as
/// JSON and text, `/v1/history`) holds an id, and no series has a label
/// that could carry one, after the traffic and not only at start.
async fn no_user_id_in_logs_or_answers(format: &str) {
    let db = SqliteFile::new();
    let url = db.url();
    let bin = Binary::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--tokens",
            "x=tx",
            "--log-format",
            format,
            "--metrics-cache-ttl",
            "0s",
            "--flush-interval",
            "1s",
            "--history-interval",
            "1s",
        ],
        &[("RUST_LOG", "debug")],
    )
    .await;
    let long_id = format!("{REFUSED_ID}-{}", "z".repeat(257 - REFUSED_ID.len() - 1));
    assert_eq!(long_id.chars().count(), 257);
    let mut answers = String::new();
    for user in [json!(STRING_ID), json!(INT_ID)] {
        let (status, body) = bin
            .post_events(
                "tx",
                &json!([
                    {"type": "message", "role": "user", "user_id": user, "event_id": EVENT_ID},
                    {"type": "response", "status": "success", "duration_ms": 800, "user_id": user},
                    {"type": "limit_reached", "user_id": user}
                ]),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        answers.push_str(&body.to_string());
    }
    let refused = [
        json!({"type": "message", "role": "user", "user_id": long_id}),
        json!({"type": "message", "role": "robot", "user_id": REFUSED_ID}),
        json!([{"type": "limit_reached", "user_id": REFUSED_ID},
               {"type": "message", "role": "user", "user_id": REFUSED_ID, "surprise": 1}]),
        json!({"type": "limit_reached", "user_id": REFUSED_ID, "ts": "yesterday"}),
    ];
    for events in &refused {
        let (status, body) = bin.post_events("tx", events).await;
        assert_eq!(status, 422, "{events}: {body}");
        answers.push_str(&body.to_string());
    }
    // A retry: the event_id again, a duplicate.
    let (status, body) = bin
        .post_events(
            "tx",
            &json!({"type": "message", "role": "user", "user_id": STRING_ID, "event_id": EVENT_ID}),
        )
        .await;
    assert_eq!((status, body["duplicates"].as_u64()), (202, Some(1)));

    // The history loop has written the traffic (every second): the one
    // message (the second carried the first one's event_id).
    let history = "/v1/history?metric=bot_messages_total&bot=x&step=60";
    eventually(Duration::from_secs(30), || async {
        let (_, answer) = bin.get_json(history).await;
        answer["series"].as_array().is_some_and(|series| {
            series.iter().any(|s| {
                s["labels"]["role"] == "user"
                    && s["points"].as_array().and_then(|p| p.last()).map(|p| &p[1])
                        == Some(&json!(1.0))
            })
        })
    })
    .await;
    let metrics = bin.metrics_text().await;
    assert_eq!(
        sample(&metrics, r#"bot_active_users{bot="x",window="1d"}"#),
        Some(2.0),
        "the accepted ids were counted, the refused ones not"
    );
    // The second message carried the first one's event_id: a duplicate.
    assert_eq!(
        sample(&metrics, r#"bot_messages_total{bot="x",role="user"}"#),
        Some(1.0)
    );
    for path in [
        "/metrics",
        "/v1/summary?bot=x",
        "/v1/summary?bot=x&format=text",
        history,
        "/v1/history?metric=bot_limit_reached_total&bot=x&step=60",
    ] {
        let (status, body, _) = bin.get_text(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        answers.push_str(&body);
    }
    // No series has a label a user id could be in: every label name is one
    // of the closed set, and no label value is an id.
    let mut names = BTreeSet::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, labels)) = line.split_once('{') else {
            continue;
        };
        let labels = labels.rsplit_once('}').expect("closed label set").0;
        for pair in labels.split("\",") {
            let (name, _) = pair.split_once("=\"").expect("name=\"value\"");
            names.insert(name.to_owned());
        }
    }
    let allowed = [
        "bot", "cache", "day", "decision", "endpoint", "kind", "label", "le", "model", "name",
        "quantile", "reason", "result", "role", "score", "source", "status", "version", "window",
    ];
    let unexpected: Vec<_> = names
        .iter()
        .filter(|n| !allowed.contains(&n.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "label names {unexpected:?} in\n{metrics}"
    );

    let mut bin = bin;
    assert!(bin.signal("TERM").await.success());
    let log = bin.log();
    // The log is at debug level and in the asked format.
    assert!(
        log.contains("DEBUG") || log.contains("\"level\":\"DEBUG\""),
        "{log}"
    );
    if format == "json" {
        for line in log.lines() {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        }
    }
    for (place, text) in [("log", &log), ("answers", &answers)] {
        assert_absent(text.as_bytes(), &format!("the {format} {place}"));
        for refused in [REFUSED_ID, &long_id] {
            assert!(!text.contains(refused), "{refused} in the {format} {place}");
        }
    }
}

#[tokio::test]
async fn no_user_id_in_the_text_log_or_any_answer() {
    no_user_id_in_logs_or_answers("text").await;
}

#[tokio::test]
async fn no_user_id_in_the_json_log_or_any_answer() {
    no_user_id_in_logs_or_answers("json").await;
}
