//! `GET /metrics` and the other read endpoints, black-box: every closed
//! series present at 0 from start-up, the render cache (TTL, hits and
//! misses, one render shared by concurrent scrapes), gzip, the optional
//! bearer token, `promtool check metrics`, health and routing errors.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{
    TestApp, assert_error, assert_series, bot_part, bot_series, eventually, every_event_type, have,
    sample, start, start_with, value,
};

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The buckets of the two histograms, as their `le` labels read.
const RESPONSE_LE: &[&str] = &[
    "0.05", "0.1", "0.25", "0.5", "1", "2", "3", "5", "8", "13", "20", "30", "45", "60", "+Inf",
];
const DB_QUERIES_LE: &[&str] = &["1", "2", "3", "5", "8", "13", "20", "30", "50", "+Inf"];
const SESSION_DURATION_LE: &[&str] = &[
    "10", "30", "60", "120", "300", "600", "900", "1800", "3600", "7200", "14400", "+Inf",
];
const SESSION_MESSAGES_LE: &[&str] = &[
    "1", "2", "3", "5", "8", "13", "20", "30", "50", "100", "+Inf",
];

/// One scrape, whatever it answers: status, headers and the raw body.
async fn scrape(
    app: &TestApp,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    app.get_raw("/metrics", headers).await
}

fn header<'h>(headers: &'h reqwest::header::HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).map(|v| v.to_str().expect("ASCII header"))
}

// ---------------------------------------------------------------------------
// No missing series
// ---------------------------------------------------------------------------

/// Every series of every closed label set, for one bot.
/// `bot_llm_ttft_seconds`' buckets: streamed first tokens, 50 ms to 30 s.
const TTFT_LE: &[&str] = &[
    "0.05", "0.1", "0.25", "0.5", "1", "2", "3", "5", "10", "20", "30", "+Inf",
];

/// The optional families' series, which appear whole with their first
/// event: the time-to-first-token histogram and the seven scores.
fn optional_series(bot: &str) -> Vec<String> {
    let mut s: Vec<String> = TTFT_LE
        .iter()
        .map(|le| format!(r#"bot_llm_ttft_seconds_bucket{{bot="{bot}",le="{le}"}}"#))
        .collect();
    s.push(format!(r#"bot_llm_ttft_seconds_sum{{bot="{bot}"}}"#));
    s.push(format!(r#"bot_llm_ttft_seconds_count{{bot="{bot}"}}"#));
    for score in ["-1", "+1", "1", "2", "3", "4", "5"] {
        s.push(format!(
            r#"bot_feedback_total{{bot="{bot}",score="{score}"}}"#
        ));
    }
    s
}

#[tokio::test]
async fn optional_families_appear_whole_with_their_first_event() {
    let (app, _db) = start("alpha=t1,beta=t2").await;
    let text = app.metrics_text().await;
    for series in optional_series("alpha") {
        assert_eq!(sample(&text, &series), None, "{series} before any event");
    }
    app.post_ok(
        "t1",
        &serde_json::json!([
            {"type": "response", "status": "success", "duration_ms": 900, "ttft_ms": 120},
            {"type": "feedback", "score": 1}
        ]),
    )
    .await;
    let text = app.metrics_text().await;
    for series in optional_series("alpha") {
        let want = match series.as_str() {
            s if s.contains("score=\"+1\"") || s.ends_with("_count{bot=\"alpha\"}") => 1.0,
            s if s.contains("_bucket")
                && !s.contains("le=\"0.05\"")
                && !s.contains("le=\"0.1\"") =>
            {
                1.0
            }
            s if s.contains("_sum") => 0.12,
            _ => 0.0,
        };
        assert_eq!(sample(&text, &series), Some(want), "{series}");
    }
    for series in optional_series("beta") {
        assert_eq!(sample(&text, &series), None, "{series}: beta has none");
    }
    app.stop().await;
}

fn closed_series(bot: &str) -> Vec<String> {
    let mut s = Vec::new();
    for role in ["user", "assistant"] {
        s.push(format!(
            r#"bot_messages_total{{bot="{bot}",role="{role}"}}"#
        ));
    }
    for status in ["success", "error", "rate_limited", "timeout"] {
        s.push(format!(
            r#"bot_responses_total{{bot="{bot}",status="{status}"}}"#
        ));
    }
    for (name, les) in [
        ("bot_response_duration_seconds", RESPONSE_LE),
        ("bot_db_queries_per_message", DB_QUERIES_LE),
        ("bot_session_duration_seconds", SESSION_DURATION_LE),
        ("bot_session_messages", SESSION_MESSAGES_LE),
    ] {
        for le in les {
            s.push(format!(r#"{name}_bucket{{bot="{bot}",le="{le}"}}"#));
        }
        s.push(format!(r#"{name}_sum{{bot="{bot}"}}"#));
        s.push(format!(r#"{name}_count{{bot="{bot}"}}"#));
    }
    for result in ["hit", "miss"] {
        s.push(format!(
            r#"bot_cache_requests_total{{bot="{bot}",cache="default",result="{result}"}}"#
        ));
    }
    s.push(format!(r#"bot_users_registered_total{{bot="{bot}"}}"#));
    for decision in ["granted", "denied"] {
        s.push(format!(
            r#"bot_consent_total{{bot="{bot}",decision="{decision}"}}"#
        ));
    }
    s.push(format!(r#"bot_limit_reached_total{{bot="{bot}"}}"#));
    // The user book's (on by default).
    s.push(format!(r#"bot_users_new_total{{bot="{bot}"}}"#));
    s.push(format!(r#"bot_sessions_total{{bot="{bot}"}}"#));
    for day in ["1", "7", "30"] {
        s.push(format!(r#"bot_retention_ratio{{bot="{bot}",day="{day}"}}"#));
    }
    for window in ["1d", "7d", "30d"] {
        s.push(format!(
            r#"bot_active_users{{bot="{bot}",window="{window}"}}"#
        ));
    }
    s
}

#[tokio::test]
async fn every_closed_series_exists_at_zero_from_start_for_each_bot() {
    // Two tokens for one bot make one bot, not two.
    let (app, _db) = start("alpha=t1,beta=t2,alpha=t3").await;
    let text = app.metrics_text().await;
    let mut expected = BTreeSet::new();
    for bot in ["alpha", "beta"] {
        for series in closed_series(bot) {
            assert_eq!(sample(&text, &series), Some(0.0), "{series} at start");
            expected.insert(series);
        }
    }
    // Nothing else: free-form families have no series until an event names one.
    assert_eq!(bot_series(&text), expected);
    assert_eq!(value(&text, "botmetrics_series"), expected.len() as f64);

    let mut own = Vec::new();
    for bot in ["alpha", "beta"] {
        own.push(format!(
            r#"botmetrics_events_accepted_total{{bot="{bot}"}}"#
        ));
        own.push(format!(
            r#"botmetrics_events_duplicate_total{{bot="{bot}"}}"#
        ));
        for label in ["kind", "name", "model", "cache"] {
            own.push(format!(
                r#"botmetrics_label_overflow_total{{bot="{bot}",label="{label}"}}"#
            ));
        }
    }
    for reason in [
        "malformed",
        "unauthorized",
        "too_large",
        "unsupported_media_type",
        "invalid",
        "retry_later",
        "journal_full",
        "journal_failed",
    ] {
        own.push(format!(
            r#"botmetrics_events_rejected_total{{reason="{reason}"}}"#
        ));
    }
    for endpoint in ["metrics", "summary"] {
        own.push(format!(
            r#"botmetrics_exposition_cache_hits_total{{endpoint="{endpoint}"}}"#
        ));
    }
    own.push(r#"botmetrics_exposition_cache_misses_total{endpoint="summary"}"#.into());
    for series in &own {
        assert_eq!(sample(&text, series), Some(0.0), "{series} at start");
    }
    let build_info = format!(
        r#"botmetrics_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_series(
        &text,
        &[
            (build_info.as_str(), 1.0),
            ("botmetrics_metrics_cache_ttl_seconds", 0.0),
        ],
    );
    app.stop().await;
}

#[tokio::test]
async fn the_store_is_reported_up_once_it_answered_at_start() {
    // The SQLite store answered the start-up restore (so /readyz is 200);
    // `botmetrics_store_up` must not claim it is down until the first
    // flush, which in tests is an hour away.
    let (app, _db) = start("a=t").await;
    assert_eq!(app.sample("botmetrics_store_up").await, Some(1.0));
    app.stop().await;
}

// ---------------------------------------------------------------------------
// The render cache
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_exposition_has_the_exact_prometheus_content_type() {
    let (app, _db) = start("a=t").await;
    let (status, headers, body) = scrape(&app, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some(CONTENT_TYPE));
    assert_eq!(header(&headers, "content-encoding"), None);
    assert!(String::from_utf8(body).expect("UTF-8").ends_with('\n'));
    app.stop().await;
}

#[tokio::test]
async fn within_the_ttl_scrapes_are_served_from_the_cache_and_after_it_fresh() {
    // A TTL no test run outlasts: every scrape after the first is cached.
    let (app, _db) = start_with("a=t", |c| c.metrics_cache_ttl = Duration::from_secs(60)).await;
    let message = json!({"type": "message", "role": "user"});
    let (_, _, first) = scrape(&app, &[]).await;
    assert_eq!(
        (app.cache_misses("metrics"), app.cache_hits("metrics")),
        (1, 0)
    );
    app.post_ok("t", &message).await;
    let (_, _, second) = scrape(&app, &[]).await;
    assert_eq!(first, second, "a scrape within the TTL is the cached bytes");
    assert_eq!(
        (app.cache_misses("metrics"), app.cache_hits("metrics")),
        (1, 1)
    );
    assert_series(
        &String::from_utf8(second).unwrap(),
        &[
            (r#"bot_messages_total{bot="a",role="user"}"#, 0.0),
            ("botmetrics_metrics_cache_ttl_seconds", 60.0),
        ],
    );
    app.stop().await;

    // A short TTL: once it has passed, the next scrape renders again and
    // shows the event, however long the machine took to get there.
    let (app, _db) = start_with("a=t", |c| c.metrics_cache_ttl = Duration::from_secs(1)).await;
    scrape(&app, &[]).await;
    app.post_ok("t", &message).await;
    eventually(Duration::from_secs(10), || async {
        app.sample(r#"bot_messages_total{bot="a",role="user"}"#)
            .await
            == Some(1.0)
    })
    .await;
    assert_eq!(
        app.cache_misses("metrics"),
        2,
        "exactly one more render after expiry"
    );
    app.stop().await;
}

#[tokio::test]
async fn with_a_zero_ttl_every_scrape_renders_afresh() {
    let (app, _db) = start_with("a=t", |c| c.metrics_cache_ttl = Duration::ZERO).await;
    for scrape_no in 0..3u32 {
        app.post_ok("t", &json!({"type": "limit_reached"})).await;
        let text = app.metrics_text().await;
        // The page reports the misses counted before its own render.
        assert_series(
            &text,
            &[
                (
                    r#"bot_limit_reached_total{bot="a"}"#,
                    f64::from(scrape_no + 1),
                ),
                (
                    r#"botmetrics_exposition_cache_misses_total{endpoint="metrics"}"#,
                    f64::from(scrape_no),
                ),
                (
                    r#"botmetrics_exposition_cache_hits_total{endpoint="metrics"}"#,
                    0.0,
                ),
            ],
        );
    }
    assert_eq!(
        (app.cache_misses("metrics"), app.cache_hits("metrics")),
        (3, 0)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_scrapes_during_a_miss_share_one_render() {
    let (app, _db) = start_with("a=t", |c| {
        c.metrics_cache_ttl = Duration::from_secs(60);
        c.max_label_values = 5000;
    })
    .await;
    // Thousands of series make the render slow enough that the scrapes
    // below really arrive while it runs.
    let many: Vec<Value> = (0..4000)
        .map(|i| json!({"type": "custom", "name": format!("event_{i}")}))
        .collect();
    app.post_ok("t", &json!(many)).await;

    let bodies = app.concurrent_gets("/metrics", 20).await;
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "every scrape got the same render"
    );
    assert_eq!(app.cache_misses("metrics"), 1, "twenty scrapes, one render");
    assert_eq!(app.cache_hits("metrics"), 19);
    assert_eq!(
        value(
            &bodies[0],
            r#"bot_custom_events_total{bot="a",name="event_3999"}"#
        ),
        1.0
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// gzip
// ---------------------------------------------------------------------------

fn gunzip(bytes: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .expect("a gzip stream of UTF-8 text");
    text
}

#[tokio::test]
async fn gzip_is_served_when_asked_and_decompresses_to_the_plain_answer() {
    // A TTL, so the plain and the gzip answer come from one render.
    let (app, _db) = start_with("a=t", |c| c.metrics_cache_ttl = Duration::from_secs(60)).await;
    app.post_ok("t", &every_event_type()).await;

    let (status, headers, plain) = scrape(&app, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-encoding"), None);
    let plain = String::from_utf8(plain).expect("plain text");
    assert!(plain.contains(r#"bot_messages_total{bot="a",role="user"} 1"#));

    for accept in ["gzip", "deflate, gzip;q=0.5", "br, gzip"] {
        let (status, headers, body) = scrape(&app, &[("accept-encoding", accept)]).await;
        assert_eq!(status, 200);
        assert_eq!(
            header(&headers, "content-encoding"),
            Some("gzip"),
            "{accept}"
        );
        assert_eq!(header(&headers, "content-type"), Some(CONTENT_TYPE));
        assert!(
            header(&headers, "vary")
                .is_some_and(|v| v.to_ascii_lowercase().contains("accept-encoding")),
            "caches must key on Accept-Encoding"
        );
        assert!(body.len() < plain.len(), "compressed is smaller");
        assert_eq!(gunzip(&body), plain, "{accept}");
    }
    // Refused or not offered: plain text.
    for accept in ["gzip;q=0", "identity"] {
        let (_, headers, body) = scrape(&app, &[("accept-encoding", accept)]).await;
        assert_eq!(header(&headers, "content-encoding"), None, "{accept}");
        assert_eq!(String::from_utf8(body).unwrap(), plain);
    }
    assert_eq!(
        app.cache_misses("metrics"),
        1,
        "one render, one compression, many answers"
    );
    app.stop().await;
}

#[tokio::test]
async fn gzip_works_without_a_cache_too() {
    let (app, _db) = start("a=t").await;
    app.post_ok("t", &every_event_type()).await;
    let (_, headers, body) = scrape(&app, &[("accept-encoding", "gzip")]).await;
    assert_eq!(header(&headers, "content-encoding"), Some("gzip"));
    let unzipped = gunzip(&body);
    let plain = app.metrics_text().await;
    // Two renders: self-metrics differ, the bots' series do not.
    assert_eq!(bot_part(&unzipped), bot_part(&plain));
    app.stop().await;
}

// ---------------------------------------------------------------------------
// --metrics-token
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_metrics_token_guards_the_exposition() {
    let (app, _db) = start_with("a=ingest-token", |c| {
        c.metrics_token = Some("prom-secret".into());
    })
    .await;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("prom-secret"),
        Some("Bearer prom-secre"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let (status, _, body) = scrape(&app, &headers).await;
        let got = (status, serde_json::from_slice(&body).expect("JSON error"));
        assert_error(&got, 401, "unauthorized", None);
    }
    // A bot's token is known but reads only its own bot: the page shows all.
    let (status, _, body) = scrape(&app, &[("authorization", "Bearer ingest-token")]).await;
    let got = (status, serde_json::from_slice(&body).expect("JSON error"));
    assert_error(&got, 403, "forbidden", None);
    let (status, headers, body) = scrape(&app, &[("authorization", "Bearer prom-secret")]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some(CONTENT_TYPE));
    let text = String::from_utf8(body).expect("UTF-8");
    assert_eq!(
        sample(&text, r#"bot_messages_total{bot="a",role="user"}"#),
        Some(0.0)
    );
    // The probes stay open for the orchestrator.
    assert_eq!(app.get_json("/healthz").await.0, 200);
    app.stop().await;
}

// ---------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------

#[tokio::test]
async fn promtool_accepts_the_real_exposition() {
    let (app, _db) = start_with("a=ta,b.bot:2=tb", |c| c.max_label_values = 3).await;
    app.post_ok("ta", &every_event_type()).await;
    app.post_ok("tb", &every_event_type()).await;
    // Overflow into `other`, odd but allowed label characters, big values.
    app.post_ok(
        "ta",
        &json!([
            {"type": "error", "kind": "k1"}, {"type": "error", "kind": "k2"},
            {"type": "error", "kind": "k3"}, {"type": "error", "kind": "k4"},
            {"type": "custom", "name": "a.b:c-d_e", "value": 0.125},
            {"type": "response", "status": "error", "duration_ms": 1e7, "model": "m:1.2-x",
             "tokens": {"prompt": 1_000_000_000u64, "completion": 1}},
        ]),
    )
    .await;
    let text = app.metrics_text().await;
    assert_eq!(
        value(&text, r#"bot_errors_total{bot="a",kind="other"}"#),
        2.0
    );

    if !have("promtool", "prometheus") {
        app.stop().await;
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("exposition written to promtool");
    let out = child.wait_with_output().expect("promtool ends");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{report}"
    );
    assert_eq!(report.trim(), "", "promtool has lint remarks");
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Health and routing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn health_readiness_and_routing_errors_answer_json() {
    let (app, _db) = start("a=t").await;
    use reqwest::Method;
    assert_eq!(
        app.request_json(Method::GET, "/healthz").await,
        (200, json!({"status": "ok"}))
    );
    assert_eq!(
        app.request_json(Method::GET, "/readyz").await,
        (200, json!({"status": "ready", "store": "sqlite"}))
    );
    for path in ["/nope", "/v1/event", "/metrics/extra", "/v2/events"] {
        assert_error(
            &app.request_json(Method::GET, path).await,
            404,
            "not_found",
            None,
        );
    }
    for (method, path) in [
        (Method::POST, "/metrics"),
        (Method::GET, "/v1/events"),
        (Method::PUT, "/v1/events"),
        (Method::DELETE, "/healthz"),
        (Method::POST, "/readyz"),
    ] {
        assert_error(
            &app.request_json(method.clone(), path).await,
            405,
            "method_not_allowed",
            None,
        );
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Fresh scrapes at the defaults (issue 9)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_defaults_every_scrape_on_a_fixed_schedule_sees_every_event_sent_before_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let defaults = botmetrics::config::Config::for_tests("", "sqlite://unused.db");
    let (app, _db) = start_with("a=t", |c| {
        c.metrics_cache_ttl = defaults.metrics_cache_ttl;
        c.summary_cache_ttl = defaults.summary_cache_ttl;
    })
    .await;
    let app = Arc::new(app);
    // Traffic flows the whole time; `acked` counts what got its 202.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn({
        let (app, acked, stop) = (app.clone(), acked.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                app.post_ok("t", &json!({"type": "limit_reached"})).await;
                acked.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let (_, first_summary) = app.get_json("/v1/summary").await;
    // Prometheus' fixed schedule, scaled down: a tick every 100 ms, and an
    // HA pair scraping at each tick.
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    for tick in 0..15 {
        ticks.tick().await;
        let before = acked.load(Ordering::SeqCst);
        let (one, two) = tokio::join!(app.metrics_text(), app.metrics_text());
        for text in [one, two] {
            let seen = value(&text, r#"bot_limit_reached_total{bot="a"}"#);
            assert!(
                seen >= before as f64,
                "tick {tick}: the scrape shows {seen} of the {before} events acknowledged before it"
            );
        }
    }
    stop.cancel();
    traffic.await.expect("traffic task");
    assert!(acked.load(Ordering::SeqCst) > 0);
    // The bot's summary keeps its 30 s cache meanwhile.
    let (_, summary) = app.get_json("/v1/summary").await;
    assert_eq!(summary, first_summary, "the summary is the cached one");
    assert!(app.cache_hits("summary") >= 1);
}
