//! `GET /v1/summary` (issue 4): every field of the DESIGN's summary object
//! with exact values for a known mix of events, percentiles interpolated
//! from the histogram, bot selection, the chat text, caching, and "today"
//! counted in the configured time zone across midnight and restarts.

use std::time::Duration;

use botmetrics::summary::Summary;
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};

use crate::helpers::{
    Raw, TestApp, assert_error, config, eventually, on_both_backends, spawn_app, start, start_with,
};

/// The chat text at `path`, which must answer 200 in UTF-8 plain text.
async fn summary_text(app: &TestApp, path: &str) -> String {
    let (status, content_type, text) = app.get_text(path).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(content_type, "text/plain; charset=utf-8");
    as_of_masked(&text)
}

/// `text` with each bot's "(as of HH:MM)" checked for its shape and
/// replaced by "(as of HH:MM)", so an exact comparison does not depend on
/// the minute the test ran in. [`the_text_says_when_it_was_made`] checks
/// the time itself.
fn as_of_masked(text: &str) -> String {
    text.lines()
        .map(|line| match line.find(" (as of ") {
            Some(i) if line.starts_with("📊") => {
                let time = &line[i + 8..];
                assert!(
                    time.len() == 6
                        && time.ends_with(')')
                        && time.as_bytes()[2] == b':'
                        && time[..2]
                            .bytes()
                            .chain(time[3..5].bytes())
                            .all(|b| b.is_ascii_digit()),
                    "{line:?}"
                );
                format!("{} (as of HH:MM)", &line[..i])
            }
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_text_says_when_it_was_made() {
    let (app, _db) = start_with("x=tx", |c| {
        c.timezone = "Asia/Kolkata".parse().expect("zone");
    })
    .await;
    let before = Utc::now();
    let (_, _, text) = app.get_text("/v1/summary?format=text").await;
    let after = Utc::now();
    let tz: chrono_tz::Tz = "Asia/Kolkata".parse().expect("zone");
    let minutes: Vec<String> = [before, after]
        .iter()
        .map(|t| format!("📊 x (as of {})", t.with_timezone(&tz).format("%H:%M")))
        .collect();
    let first = text.lines().next().unwrap_or_default();
    assert!(
        minutes.iter().any(|m| m == first),
        "{first:?} is one of {minutes:?} (local time, not UTC)"
    );
    app.stop().await;
}

/// Checks that `text` holds every one of `parts`.
#[track_caller]
fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} in\n{text}");
    }
}

/// Durations (ms) of ten responses; the last one failed.
///
/// Response buckets (s): 0.05 0.1 0.25 0.5 1 2 3 …; cumulative counts:
/// 1 1 … → le=0.05:1, 0.1:2, 0.25:3, 0.5:4, 1:8, 2:9, 3:10.
/// p50: rank 5 falls in (0.5, 1] holding 4 (ranks 5..8), 1 into it:
///      0.5 + 0.5 × (5 − 4) / 4 = 0.625 s → 625 ms.
/// p95: rank 9.5 falls in (2, 3] holding 1 (rank 10), 0.5 into it:
///      2 + 1 × (9.5 − 9) / 1 = 2.5 s → 2500 ms (the true value is 2.2 s:
///      interpolation, as PromQL's histogram_quantile does).
const DURATIONS_MS: [f64; 10] = [
    40.0, 80.0, 200.0, 300.0, 600.0, 700.0, 800.0, 900.0, 1500.0, 2200.0,
];

fn known_mix() -> Value {
    let mut events = vec![];
    for user in [1, 2, 3, 4, 5, 1] {
        events.push(json!({"type": "message", "role": "user", "user_id": user}));
    }
    for _ in 0..4 {
        events.push(json!({"type": "message", "role": "assistant"}));
    }
    for user in [1, 2, 3] {
        events.push(json!({"type": "user_registered", "user_id": user}));
    }
    for (i, ms) in DURATIONS_MS.iter().enumerate() {
        let status = if i == 9 { "error" } else { "success" };
        events.push(json!({"type": "response", "status": status, "duration_ms": ms}));
    }
    for result in ["hit", "hit", "miss"] {
        events.push(json!({"type": "cache", "result": result}));
    }
    events.push(json!({"type": "cache", "result": "hit", "cache": "embeddings"}));
    events.push(json!({"type": "limit_reached", "user_id": 4}));
    events.push(json!({"type": "limit_reached", "user_id": 5}));
    for kind in ["a", "a", "b"] {
        events.push(json!({"type": "error", "kind": kind}));
    }
    events.push(json!({"type": "consent", "granted": true}));
    events.push(json!({"type": "custom", "name": "x", "value": 3}));
    Value::Array(events)
}

fn num(v: &Value, path: &str) -> f64 {
    let mut at = v;
    for key in path.split('.') {
        at = &at[key];
    }
    assert!(at.is_number(), "{path} is a number in {v}");
    at.as_f64().unwrap()
}

#[tokio::test]
async fn summary_json_has_every_field_with_exact_values() {
    let before_start = std::time::Instant::now();
    let (app, _db) = start("demo=td").await;
    let (status, empty) = app.get_json("/v1/summary").await;
    assert_eq!(status, 200, "{empty}");
    assert_eq!(
        num(&empty, "responses.success_rate"),
        1.0,
        "1.0 before any response"
    );
    assert_eq!(num(&empty, "responses.p50_ms"), 0.0);
    assert_eq!(num(&empty, "cache.hit_rate"), 0.0);

    app.post_ok("td", &known_mix()).await;
    let started = Utc::now();
    let (status, s) = app.get_json("/v1/summary").await;
    assert_eq!(status, 200, "{s}");
    // One bot: the object itself.
    assert_eq!(s["bot"], "demo");
    let expected = [
        ("messages.total", 10.0),
        ("messages.today", 10.0),
        ("users.active_1d", 5.0),
        ("users.active_7d", 5.0),
        ("users.active_30d", 5.0),
        ("users.registered_total", 3.0),
        ("users.registered_today", 3.0),
        ("responses.total", 10.0),
        ("responses.success_rate", 0.9),
        ("responses.p50_ms", 625.0),
        ("responses.p95_ms", 2500.0),
        ("cache.hit_rate", 0.75),
        ("limit_reached.today", 2.0),
        ("errors.total", 3.0),
    ];
    for (path, value) in expected {
        // Within an ulp: serde_json's default float parsing may be one off.
        let got = num(&s, path);
        assert!(
            (got - value).abs() <= 1e-12 * value.abs(),
            "{path}: {got} in {s}"
        );
    }
    // Whole seconds since the application started: no more than the time
    // since the test began to start it, and growing.
    assert!(s["uptime_seconds"].is_u64(), "whole seconds: {s}");
    let uptime = num(&s, "uptime_seconds");
    assert!(
        uptime <= before_start.elapsed().as_secs_f64().ceil(),
        "{uptime} s, started {:?} ago",
        before_start.elapsed()
    );
    eventually(Duration::from_secs(10), || async {
        num(&app.get_json("/v1/summary").await.1, "uptime_seconds") >= uptime + 1.0
    })
    .await;
    assert!(
        num(&app.get_json("/v1/summary").await.1, "uptime_seconds")
            <= before_start.elapsed().as_secs_f64().ceil()
    );
    let generated: DateTime<Utc> = s["generated_at"]
        .as_str()
        .expect("generated_at is a string")
        .parse()
        .expect("RFC 3339");
    assert!(
        (generated - started).num_seconds().abs() <= 5,
        "{generated} vs {started}"
    );
    // Whole integers stay integers in JSON.
    for path in [
        "messages.total",
        "users.active_1d",
        "users.registered_total",
        "responses.total",
        "limit_reached.today",
        "errors.total",
    ] {
        let (outer, inner) = path.split_once('.').unwrap();
        assert!(s[outer][inner].is_u64(), "{path} is an integer in {s}");
    }

    // Per cache as well, by name; cache.hit_rate stays the blend.
    assert_eq!(
        s["cache"]["caches"],
        json!([
            {"cache": "default", "hit_rate": 2.0 / 3.0, "requests": 3},
            {"cache": "embeddings", "hit_rate": 1.0, "requests": 1}
        ]),
        "{s}"
    );

    // The same numbers in the chat text, exactly: today's figures on a line
    // that says so, all-time totals on lines that say so, one hit rate per
    // cache, and no breakable space inside a figure (U+202F before "%",
    // U+00A0 before a unit).
    let text = summary_text(&app, "/v1/summary?format=text").await;
    assert_eq!(
        text,
        "📊 demo (as of HH:MM)\n\
         Today (since midnight, UTC): 10 messages (users' and the bot's), 3 registrations, 2 daily-limit hits\n\
         Active users: 5 (24\u{A0}h), 5 (7\u{A0}d), 5 (30\u{A0}d)\n\
         Users today: 5 new, 0 returning; retention D1 –, D7 –, D30 –\n\
         All time: 10 messages, 3 registered users, 3 errors reported\n\
         Responses, all time: 10, 90.0\u{202F}% ok (1 failed, limited or timed out), median 625\u{A0}ms, p95 2.5\u{A0}s\n\
         Cache hits, all time: default 66.7\u{202F}%, embeddings 100.0\u{202F}%"
    );
    // Explicit JSON is the default.
    let (status, content_type, _) = app.get_text("/v1/summary?format=json").await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    app.stop().await;
}

#[tokio::test]
async fn percentiles_interpolate_like_histogram_quantile() {
    let (app, _db) = start("x=tx").await;
    let responses = |n: usize, status: &str, ms: f64| {
        Value::Array(
            (0..n)
                .map(|_| json!({"type": "response", "status": status, "duration_ms": ms}))
                .collect(),
        )
    };
    // 20 responses of 1.2 s, all in the (1, 2] bucket.
    app.post_ok("tx", &responses(20, "success", 1200.0)).await;
    let (_, s) = app.get_json("/v1/summary").await;
    // p50: rank 10 of the bucket's 20: 1 + 1 × 10 / 20 = 1.5 s.
    assert_eq!(num(&s, "responses.p50_ms"), 1500.0, "{s}");
    // p95: rank 19: 1 + 19 / 20 = 1.95 s, not the 1.2 s every call took.
    assert_eq!(num(&s, "responses.p95_ms"), 1950.0, "{s}");
    assert_eq!(num(&s, "responses.success_rate"), 1.0);

    // One of 90 s lands in +Inf: p50 is rank 10.5, 1 + 10.5 / 20 = 1.525 s.
    app.post_ok("tx", &responses(1, "timeout", 90_000.0)).await;
    let (_, s) = app.get_json("/v1/summary").await;
    assert_eq!(num(&s, "responses.p50_ms"), 1525.0, "{s}");
    // serde_json's default float parsing may be one ulp off.
    assert!(
        (num(&s, "responses.success_rate") - 20.0 / 21.0).abs() < 1e-12,
        "{s}"
    );

    // Past every finite bucket, the highest bound (60 s) is the answer.
    app.post_ok("tx", &responses(100, "timeout", 90_000.0))
        .await;
    let (_, s) = app.get_json("/v1/summary").await;
    assert_eq!(num(&s, "responses.p95_ms"), 60_000.0, "{s}");
    app.stop().await;
}

#[tokio::test]
async fn several_bots_are_listed_and_selected() {
    let (app, _db) = start("alpha=ta,beta=tb").await;
    app.post_ok(
        "ta",
        &json!({"type": "message", "role": "user", "user_id": 1}),
    )
    .await;
    app.post_ok(
        "tb",
        &json!([
            {"type": "message", "role": "user", "user_id": 1},
            {"type": "message", "role": "user", "user_id": 2},
            {"type": "error", "kind": "x"}
        ]),
    )
    .await;
    let (status, all) = app.get_json("/v1/summary").await;
    assert_eq!(status, 200);
    let bots = all["bots"].as_array().expect("{\"bots\": [...]}");
    assert_eq!(all.as_object().unwrap().len(), 1, "{all}");
    let names: Vec<&str> = bots.iter().map(|b| b["bot"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta"], "configured order");
    assert_eq!(num(&bots[0], "messages.total"), 1.0);
    assert_eq!(num(&bots[1], "messages.total"), 2.0);

    let (status, beta) = app.get_json("/v1/summary?bot=beta").await;
    assert_eq!(status, 200);
    assert_eq!(beta["bot"], "beta", "one bot asked for: the object");
    assert_eq!(num(&beta, "messages.total"), 2.0);
    assert_eq!(num(&beta, "users.active_1d"), 2.0);
    assert_eq!(num(&beta, "errors.total"), 1.0);

    let text = summary_text(&app, "/v1/summary?format=text").await;
    assert!(text.contains("alpha") && text.contains("beta"), "{text}");
    let text = summary_text(&app, "/v1/summary?format=text&bot=alpha").await;
    assert!(text.contains("alpha") && !text.contains("beta"), "{text}");

    for (path, status, code) in [
        ("/v1/summary?bot=gamma", 404, "not_found"),
        ("/v1/summary?format=xml", 400, "bad_request"),
        ("/v1/summary?format=text&bot=gamma", 404, "not_found"),
        ("/v1/summary?window=7d", 400, "bad_request"),
    ] {
        let got = app.get_json(path).await;
        assert_eq!(got.0, status, "{path}: {}", got.1);
        assert_error(&got, status, code, None);
    }
    app.stop().await;
}

#[tokio::test]
async fn text_answer_formats_numbers_for_people() {
    let (app, _db) = start("x=tx").await;
    let messages =
        (0..12_345).map(|n| json!({"type": "message", "role": "user", "user_id": n % 7}));
    let messages: Vec<Value> = messages.collect();
    for batch in messages.chunks(10_000) {
        app.post_ndjson("tx", batch.iter().cloned()).await;
    }
    let responses = (0..1000).map(|i| {
        let status = if i < 987 { "success" } else { "error" };
        json!({"type": "response", "status": status, "duration_ms": 1234})
    });
    app.post_ndjson("tx", responses).await;
    app.post_ok(
        "tx",
        &json!({"type": "cache", "result": "hit", "cache": "llm"}),
    )
    .await;
    // Thousands grouped with U+202F NARROW NO-BREAK SPACE, which a chat
    // client never wraps; one cache: its rate, with its name.
    assert_eq!(
        summary_text(&app, "/v1/summary?format=text").await,
        "📊 x (as of HH:MM)\n\
         Today (since midnight, UTC): 12\u{202F}345 messages (users' and the bot's), 0 registrations, 0 daily-limit hits\n\
         Active users: 7 (24\u{A0}h), 7 (7\u{A0}d), 7 (30\u{A0}d)\n\
         Users today: 7 new, 0 returning; retention D1 –, D7 –, D30 –\n\
         All time: 12\u{202F}345 messages, 0 registered users, 0 errors reported\n\
         Responses, all time: 1\u{202F}000, 98.7\u{202F}% ok (13 failed, limited or timed out), median 1.5\u{A0}s, p95 2.0\u{A0}s\n\
         Cache hits, all time: 100.0\u{202F}% (llm)"
    );
    let (_, s) = app.get_json("/v1/summary").await;
    assert_eq!(
        num(&s, "messages.total"),
        12_345.0,
        "JSON keeps plain numbers"
    );
    assert!(
        (num(&s, "responses.success_rate") - 0.987).abs() < 1e-12,
        "{s}"
    );
    app.stop().await;
}

#[tokio::test]
async fn summary_is_cached_like_metrics() {
    // A TTL no test run outlasts: every answer after the first is cached.
    let (app, _db) = start_with("x=tx", |c| {
        c.metrics_cache_ttl = Duration::from_secs(60);
        c.summary_cache_ttl = Duration::from_secs(60);
    })
    .await;
    let misses = || app.cache_misses("summary");
    let hits = || app.cache_hits("summary");

    // Concurrent requests on a miss share one build.
    let answers = app.concurrent_gets("/v1/summary?format=text", 8).await;
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(misses(), 1, "eight requests, one build");

    let (_, _, first) = app.get_text("/v1/summary").await;
    let metrics_first = app.metrics_text().await;
    app.post_ok("tx", &json!({"type": "message", "role": "user"}))
        .await;
    let hits_before = hits();
    let (_, _, second) = app.get_text("/v1/summary").await;
    assert_eq!(second, first, "the cached answer until the TTL passes");
    assert_eq!(app.metrics_text().await, metrics_first, "as /metrics does");
    assert_eq!(hits() - hits_before, 1);
    app.stop().await;

    // A short TTL: once it has passed, the new message shows, in both.
    let (app, _db) = start_with("x=tx", |c| {
        c.metrics_cache_ttl = Duration::from_secs(1);
        c.summary_cache_ttl = Duration::from_secs(1);
    })
    .await;
    app.get_text("/v1/summary").await;
    app.metrics_text().await;
    app.post_ok("tx", &json!({"type": "message", "role": "user"}))
        .await;
    eventually(Duration::from_secs(10), || async {
        let (_, s) = app.get_json("/v1/summary").await;
        s["messages"]["total"] == 1
    })
    .await;
    eventually(Duration::from_secs(10), || async {
        app.sample(r#"bot_messages_total{bot="x",role="user"}"#)
            .await
            == Some(1.0)
    })
    .await;
    app.stop().await;
}

// ---------------------------------------------------------------------------
// "Today" in the configured time zone
// ---------------------------------------------------------------------------

async fn today_counts_the_local_day(url: &str) {
    let tz = chrono_tz::Asia::Tokyo;
    let mut cfg = config("x=tx", url);
    cfg.timezone = tz;
    let app = spawn_app(cfg.clone()).await;
    let now = Utc::now();
    let local_today = now.with_timezone(&tz).date_naive();
    let midnight = tz
        .from_local_datetime(&local_today.and_hms_opt(0, 0, 0).unwrap())
        .single()
        .expect("Tokyo has no DST")
        .with_timezone(&Utc);
    let next_midnight = midnight + chrono::Duration::days(1);
    let (today, yesterday) = (midnight.timestamp(), midnight.timestamp() - 1);
    let at = |ty: &str, ts: i64| match ty {
        "message" => json!({"type": "message", "role": "user", "ts": ts}),
        other => json!({"type": other, "ts": ts}),
    };
    // Today's, then yesterday's (a late retry), then today's again.
    let mut events = vec![];
    for (ty, n_today, n_yesterday) in [
        ("message", 3, 4),
        ("user_registered", 1, 2),
        ("limit_reached", 3, 1),
    ] {
        events.extend((0..n_today).map(|i| at(ty, if i == 0 { today } else { now.timestamp() })));
        events.extend((0..n_yesterday).map(|_| at(ty, yesterday)));
        events.push(at(ty, now.timestamp()));
    }
    app.post_ok("tx", &Value::Array(events)).await;

    let check = |s: &Value, today: [f64; 3]| {
        assert_eq!(s["timezone"], "Asia/Tokyo", "{s}");
        assert_eq!(num(s, "messages.total"), 8.0, "{s}");
        assert_eq!(num(s, "users.registered_total"), 4.0, "{s}");
        assert_eq!(num(s, "messages.today"), today[0], "{s}");
        assert_eq!(num(s, "users.registered_today"), today[1], "{s}");
        assert_eq!(num(s, "limit_reached.today"), today[2], "{s}");
    };
    let (_, s) = app.get_json("/v1/summary").await;
    check(&s, [4.0, 2.0, 4.0]);
    assert_contains(
        &summary_text(&app, "/v1/summary?format=text").await,
        &[
            "Today (since midnight, Asia/Tokyo): 4 messages (users' and the bot's), 2 registrations, 4 daily-limit hits",
            "All time: 8 messages, 4 registered users, 0 errors reported",
        ],
    );

    // At the next local midnight the day starts over; until then it holds.
    let bot = app.state.metrics.bot("x").unwrap();
    let summary_at = |t: DateTime<Utc>| serde_json::to_value(Summary::build(&bot, t, 0)).unwrap();
    check(
        &summary_at(next_midnight - chrono::Duration::seconds(1)),
        [4.0, 2.0, 4.0],
    );
    check(&summary_at(next_midnight), [0.0, 0.0, 0.0]);
    app.stop().await;

    // A restart keeps today's figures.
    let app = spawn_app(cfg.clone()).await;
    let (_, s) = app.get_json("/v1/summary").await;
    check(&s, [4.0, 2.0, 4.0]);
    app.stop().await;

    // Stored counts of another day are not today's.
    let raw = Raw::connect(url).await;
    assert_eq!(raw.count("daily_counters").await, 3);
    let back = if raw.is_pg() {
        "update daily_counters set day = day - 1"
    } else {
        "update daily_counters set day = date(day, '-1 day')"
    };
    raw.execute(back).await;
    raw.close().await;
    let app = spawn_app(cfg).await;
    let (_, s) = app.get_json("/v1/summary").await;
    check(&s, [0.0, 0.0, 0.0]);
    app.stop().await;
}

on_both_backends!(today_counts_the_local_day);
