//! `POST /v1/events`, black-box: every event type and field counted exactly,
//! every error code with its JSON shape, and the promises around a request:
//! validated whole, deduplicated by `event_id`, confined to the token's bot.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{
    TestApp, assert_error, assert_series, bot_part, bot_series, eventually, every_event_type,
    sample, start, start_with, value,
};

/// The sample lines of one bot.
fn lines_of_bot(text: &str, bot: &str) -> Vec<String> {
    let needle = format!("bot=\"{bot}\"");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

const TOKEN: &str = "secret-a";

/// The answer to a request whose events were taken.
fn accepted(accepted: usize, duplicates: usize) -> (u16, Value) {
    (202, json!({"accepted": accepted, "duplicates": duplicates}))
}

/// Posts a raw NDJSON body with bot a's token.
async fn post_ndjson(app: &TestApp, body: impl Into<reqwest::Body>) -> (u16, Value) {
    app.post(Some(TOKEN), Some("application/x-ndjson"), body)
        .await
}

/// Bot a's `bot_limit_reached_total`: the event most tests send.
async fn limits_reached(app: &TestApp) -> Option<f64> {
    app.sample(r#"bot_limit_reached_total{bot="a"}"#).await
}

// ---------------------------------------------------------------------------
// Every event type and field, counted exactly
// ---------------------------------------------------------------------------

#[tokio::test]
async fn messages_count_by_role_and_fill_the_db_queries_histogram() {
    let (app, _db) = start("a=secret-a").await;
    app.post_ok(
        TOKEN,
        &json!([
            {"type": "message", "role": "user", "db_queries": 0},
            {"type": "message", "role": "user", "db_queries": 1},
            {"type": "message", "role": "user", "db_queries": 3},
            {"type": "message", "role": "assistant", "db_queries": 4},
            {"type": "message", "role": "assistant", "db_queries": 50},
            {"type": "message", "role": "assistant", "db_queries": 51},
            {"type": "message", "role": "assistant"},
        ]),
    )
    .await;
    let text = app.metrics_text().await;
    // `le` buckets: a value equal to a bound (1, 3, 50) falls in that bound.
    let h = "bot_db_queries_per_message";
    assert_series(
        &text,
        &[
            (r#"bot_messages_total{bot="a",role="user"}"#, 3.0),
            (r#"bot_messages_total{bot="a",role="assistant"}"#, 4.0),
            (&format!(r#"{h}_bucket{{bot="a",le="1"}}"#), 2.0),
            (&format!(r#"{h}_bucket{{bot="a",le="2"}}"#), 2.0),
            (&format!(r#"{h}_bucket{{bot="a",le="3"}}"#), 3.0),
            (&format!(r#"{h}_bucket{{bot="a",le="5"}}"#), 4.0),
            (&format!(r#"{h}_bucket{{bot="a",le="8"}}"#), 4.0),
            (&format!(r#"{h}_bucket{{bot="a",le="13"}}"#), 4.0),
            (&format!(r#"{h}_bucket{{bot="a",le="20"}}"#), 4.0),
            (&format!(r#"{h}_bucket{{bot="a",le="30"}}"#), 4.0),
            (&format!(r#"{h}_bucket{{bot="a",le="50"}}"#), 5.0),
            (&format!(r#"{h}_bucket{{bot="a",le="+Inf"}}"#), 6.0),
            (&format!(r#"{h}_sum{{bot="a"}}"#), 109.0),
            // The message without `db_queries` is not an observation.
            (&format!(r#"{h}_count{{bot="a"}}"#), 6.0),
        ],
    );
    app.stop().await;
}

#[tokio::test]
async fn responses_count_status_duration_buckets_and_tokens_by_model() {
    let (app, _db) = start("a=secret-a").await;
    app.post_ok(
        TOKEN,
        &json!([
            {"type": "response", "status": "success", "duration_ms": 0},
            // Exactly on the 0.25 s bound.
            {"type": "response", "status": "success", "duration_ms": 250},
            {"type": "response", "status": "error", "duration_ms": 1500, "model": "gpt-4o",
             "tokens": {"prompt": 100, "completion": 20}},
            // Past the last bound: only +Inf.
            {"type": "response", "status": "rate_limited", "duration_ms": 75000},
            // Exactly on the last finite bound, 60 s.
            {"type": "response", "status": "timeout", "duration_ms": 60000, "model": "gpt-4o",
             "tokens": {"prompt": 1, "completion": 2}},
            // Exactly on the first bound; tokens without a model.
            {"type": "response", "status": "timeout", "duration_ms": 50, "tokens": {"prompt": 7}},
            // A model without tokens counts no tokens.
            {"type": "response", "status": "success", "duration_ms": 100, "model": "claude-3.5:haiku"},
            {"type": "response", "status": "success", "duration_ms": 10, "model": "llama.cpp-q4",
             "tokens": {"completion": 9}},
        ]),
    )
    .await;
    let text = app.metrics_text().await;
    let expected_sum: f64 = [0.0, 0.25, 1.5, 75.0, 60.0, 0.05, 0.1, 0.01]
        .into_iter()
        .fold(0.0, |a, b| a + b);
    let h = "bot_response_duration_seconds";
    let buckets = [
        ("0.05", 3.0),
        ("0.1", 4.0),
        ("0.25", 5.0),
        ("0.5", 5.0),
        ("1", 5.0),
        ("2", 6.0),
        ("3", 6.0),
        ("5", 6.0),
        ("8", 6.0),
        ("13", 6.0),
        ("20", 6.0),
        ("30", 6.0),
        ("45", 6.0),
        ("60", 7.0),
        ("+Inf", 8.0),
    ];
    let bucket_series: Vec<(String, f64)> = buckets
        .iter()
        .map(|(le, n)| (format!(r#"{h}_bucket{{bot="a",le="{le}"}}"#), *n))
        .collect();
    let mut expected: Vec<(&str, f64)> = bucket_series
        .iter()
        .map(|(s, n)| (s.as_str(), *n))
        .collect();
    let sum = format!(r#"{h}_sum{{bot="a"}}"#);
    let count = format!(r#"{h}_count{{bot="a"}}"#);
    expected.extend([
        (r#"bot_responses_total{bot="a",status="success"}"#, 4.0),
        (r#"bot_responses_total{bot="a",status="error"}"#, 1.0),
        (r#"bot_responses_total{bot="a",status="rate_limited"}"#, 1.0),
        (r#"bot_responses_total{bot="a",status="timeout"}"#, 2.0),
        (sum.as_str(), expected_sum),
        (count.as_str(), 8.0),
        (
            r#"bot_llm_tokens_total{bot="a",model="gpt-4o",kind="prompt"}"#,
            101.0,
        ),
        (
            r#"bot_llm_tokens_total{bot="a",model="gpt-4o",kind="completion"}"#,
            22.0,
        ),
        (
            r#"bot_llm_tokens_total{bot="a",model="unknown",kind="prompt"}"#,
            7.0,
        ),
        (
            r#"bot_llm_tokens_total{bot="a",model="unknown",kind="completion"}"#,
            0.0,
        ),
        (
            r#"bot_llm_tokens_total{bot="a",model="llama.cpp-q4",kind="prompt"}"#,
            0.0,
        ),
        (
            r#"bot_llm_tokens_total{bot="a",model="llama.cpp-q4",kind="completion"}"#,
            9.0,
        ),
    ]);
    assert_series(&text, &expected);
    for kind in ["prompt", "completion"] {
        let series =
            format!(r#"bot_llm_tokens_total{{bot="a",model="claude-3.5:haiku",kind="{kind}"}}"#);
        assert!(
            matches!(sample(&text, &series), None | Some(0.0)),
            "a response without tokens spent some: {series}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn cache_lookups_count_by_cache_and_result() {
    let (app, _db) = start("a=secret-a").await;
    app.post_ok(
        TOKEN,
        &json!([
            {"type": "cache", "result": "hit"},
            {"type": "cache", "result": "hit"},
            {"type": "cache", "result": "miss"},
            {"type": "cache", "result": "hit", "cache": "redis"},
            {"type": "cache", "result": "miss", "cache": "redis"},
            {"type": "cache", "result": "miss", "cache": "redis"},
            {"type": "cache", "result": "miss", "cache": "redis"},
            {"type": "cache", "result": "hit", "cache": "default"},
        ]),
    )
    .await;
    assert_series(
        &app.metrics_text().await,
        &[
            (
                r#"bot_cache_requests_total{bot="a",cache="default",result="hit"}"#,
                3.0,
            ),
            (
                r#"bot_cache_requests_total{bot="a",cache="default",result="miss"}"#,
                1.0,
            ),
            (
                r#"bot_cache_requests_total{bot="a",cache="redis",result="hit"}"#,
                1.0,
            ),
            (
                r#"bot_cache_requests_total{bot="a",cache="redis",result="miss"}"#,
                3.0,
            ),
        ],
    );
    app.stop().await;
}

#[tokio::test]
async fn registrations_consent_limits_errors_and_custom_events_are_counted() {
    let (app, _db) = start("a=secret-a").await;
    app.post_ok(
        TOKEN,
        &json!([
            {"type": "user_registered", "user_id": 1},
            {"type": "user_registered"},
            {"type": "consent", "granted": true},
            {"type": "consent", "granted": true},
            {"type": "consent", "granted": true},
            {"type": "consent", "granted": false},
            {"type": "limit_reached", "user_id": 1},
            {"type": "error", "kind": "db_timeout"},
            {"type": "error", "kind": "db_timeout"},
            {"type": "error", "kind": "llm.5xx:openai"},
            // `value` defaults to 1 and may be fractional.
            {"type": "custom", "name": "voice_note"},
            {"type": "custom", "name": "voice_note", "value": 2.5},
            {"type": "custom", "name": "photo", "value": 0},
        ]),
    )
    .await;
    assert_series(
        &app.metrics_text().await,
        &[
            (r#"bot_users_registered_total{bot="a"}"#, 2.0),
            (r#"bot_consent_total{bot="a",decision="granted"}"#, 3.0),
            (r#"bot_consent_total{bot="a",decision="denied"}"#, 1.0),
            (r#"bot_limit_reached_total{bot="a"}"#, 1.0),
            (r#"bot_errors_total{bot="a",kind="db_timeout"}"#, 2.0),
            (r#"bot_errors_total{bot="a",kind="llm.5xx:openai"}"#, 1.0),
            (r#"bot_custom_events_total{bot="a",name="voice_note"}"#, 3.5),
            (r#"bot_custom_events_total{bot="a",name="photo"}"#, 0.0),
            (r#"botmetrics_events_accepted_total{bot="a"}"#, 13.0),
        ],
    );
    app.stop().await;
}

/// "Any event with a `user_id` counts as active", for each type alone: one
/// bot per type, one event each, and only that bot's user is counted.
#[tokio::test]
async fn any_event_type_with_a_user_id_alone_makes_its_user_active() {
    let events = [
        json!({"type": "message", "role": "user"}),
        json!({"type": "message", "role": "assistant"}),
        json!({"type": "response", "status": "success", "duration_ms": 10}),
        json!({"type": "cache", "result": "hit"}),
        json!({"type": "user_registered"}),
        json!({"type": "consent", "granted": false}),
        json!({"type": "limit_reached"}),
        json!({"type": "error", "kind": "e"}),
        json!({"type": "custom", "name": "n"}),
    ];
    let tokens: Vec<String> = (0..events.len()).map(|i| format!("b{i}=t{i}")).collect();
    // One more bot gets every type without a user_id: nobody is active there.
    let (app, _db) = start(&format!("{},anon=tanon", tokens.join(","))).await;
    for (i, event) in events.iter().enumerate() {
        let mut with_user = event.clone();
        with_user["user_id"] = json!(format!("user-{i}"));
        app.post_ok(&format!("t{i}"), &with_user).await;
    }
    app.post_ok("tanon", &Value::Array(events.to_vec())).await;
    let text = app.metrics_text().await;
    for (i, event) in events.iter().enumerate() {
        for window in ["1d", "7d", "30d"] {
            let series = format!(r#"bot_active_users{{bot="b{i}",window="{window}"}}"#);
            assert_eq!(sample(&text, &series), Some(1.0), "{event}");
        }
    }
    assert_eq!(
        sample(&text, r#"bot_active_users{bot="anon",window="1d"}"#),
        Some(0.0)
    );
}

#[tokio::test]
async fn active_users_are_distinct_ids_per_window_and_42_equals_string_42() {
    let (app, _db) = start("a=secret-a,b=secret-b").await;
    let now = chrono::Utc::now().timestamp();
    let day = 86_400;
    let rfc3339 = |ts: i64| {
        chrono::DateTime::from_timestamp(ts, 0)
            .expect("valid time")
            .to_rfc3339()
    };
    app.post_ok(
        TOKEN,
        &json!([
            {"type": "message", "role": "user", "user_id": 42},
            {"type": "message", "role": "assistant", "user_id": "42"},
            {"type": "limit_reached", "user_id": 7},
            {"type": "error", "kind": "x", "user_id": "alice"},
            {"type": "consent", "granted": true},
            // Older activity: in 7d and 30d, not in 1d.
            {"type": "message", "role": "user", "user_id": "bob", "ts": rfc3339(now - 3 * day)},
            // In 30d only.
            {"type": "message", "role": "user", "user_id": 1000, "ts": now - 10 * day},
            // Outside every window.
            {"type": "message", "role": "user", "user_id": 2000, "ts": now - 40 * day},
        ]),
    )
    .await;
    assert_series(
        &app.metrics_text().await,
        &[
            (r#"bot_active_users{bot="a",window="1d"}"#, 3.0),
            (r#"bot_active_users{bot="a",window="7d"}"#, 4.0),
            (r#"bot_active_users{bot="a",window="30d"}"#, 5.0),
            (r#"bot_active_users{bot="b",window="1d"}"#, 0.0),
            (r#"bot_active_users{bot="b",window="7d"}"#, 0.0),
            (r#"bot_active_users{bot="b",window="30d"}"#, 0.0),
            // Old events still count as messages: only the windows move.
            (r#"bot_messages_total{bot="a",role="user"}"#, 4.0),
        ],
    );
    // A user seen again adds nothing.
    app.post_ok(
        TOKEN,
        &json!({"type": "message", "role": "user", "user_id": "alice"}),
    )
    .await;
    assert_eq!(
        app.sample(r#"bot_active_users{bot="a",window="1d"}"#).await,
        Some(3.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn user_ids_up_to_256_characters_are_accepted_counting_characters_not_bytes() {
    let (app, _db) = start("a=secret-a").await;
    app.post_ok(
        TOKEN,
        &json!([
            {"type": "limit_reached", "user_id": "u".repeat(256)},
            {"type": "limit_reached", "user_id": "é".repeat(256)},
            {"type": "limit_reached", "user_id": -5},
            {"type": "limit_reached", "user_id": u64::MAX},
        ]),
    )
    .await;
    assert_eq!(
        app.sample(r#"bot_active_users{bot="a",window="1d"}"#).await,
        Some(4.0)
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// NDJSON
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ndjson_bodies_count_every_line_and_skip_blank_ones() {
    let (app, _db) = start("a=secret-a").await;
    let body = concat!(
        "\n",
        "{\"type\":\"message\",\"role\":\"user\",\"user_id\":1}\n",
        "\n",
        "   \n",
        "{\"type\":\"message\",\"role\":\"assistant\"}\r\n",
        "\t\n",
        "{\"type\":\"error\",\"kind\":\"boom\"}",
    );
    let got = app
        .post(
            Some(TOKEN),
            Some("application/x-ndjson; charset=utf-8"),
            body,
        )
        .await;
    assert_eq!(got, accepted(3, 0));
    assert_series(
        &app.metrics_text().await,
        &[
            (r#"bot_messages_total{bot="a",role="user"}"#, 1.0),
            (r#"bot_messages_total{bot="a",role="assistant"}"#, 1.0),
            (r#"bot_errors_total{bot="a",kind="boom"}"#, 1.0),
        ],
    );
    // A body of blank lines holds no event: malformed, nothing counted.
    let got = post_ndjson(&app, "\n \n\n").await;
    assert_error(&got, 400, "malformed", None);
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Error codes and their JSON shape
// ---------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_is_400_without_an_index() {
    let (app, _db) = start("a=secret-a").await;
    let bodies: Vec<Vec<u8>> = [
        "",
        "   ",
        "{",
        r#"{"type":"message""#,
        r#"[{"type":"limit_reached"}"#,
        r#"[{"type":"limit_reached"},]"#,
        "not json",
        r#"{"type":"limit_reached"} x"#,
        r#"{"type":"limit_reached"}{"type":"limit_reached"}"#,
    ]
    .iter()
    .map(|b| b.as_bytes().to_vec())
    .chain([b"{\"type\":\"error\",\"kind\":\"\xff\"}".to_vec()])
    .collect();
    for body in bodies {
        let got = app
            .post(Some(TOKEN), Some("application/json"), body.clone())
            .await;
        assert_eq!(
            got.0,
            400,
            "{:?} → {}",
            String::from_utf8_lossy(&body),
            got.1
        );
        assert_error(&got, 400, "malformed", None);
    }
    let before = app.metrics_text().await;
    assert_eq!(
        sample(&before, r#"botmetrics_events_accepted_total{bot="a"}"#),
        Some(0.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_ndjson_line_is_400_with_its_index() {
    let (app, _db) = start("a=secret-a").await;
    let body = "{\"type\":\"limit_reached\"}\n\n{\"type\":\"limit_reached\"}\n{oops\n";
    let got = post_ndjson(&app, body).await;
    // Blank lines are not events: the third event is index 2.
    assert_error(&got, 400, "malformed", Some(2));
    assert_eq!(limits_reached(&app).await, Some(0.0));
    app.stop().await;
}

#[tokio::test]
async fn a_missing_or_unknown_token_is_401() {
    let (app, _db) = start("a=secret-a").await;
    let event = r#"{"type":"limit_reached"}"#;
    let json = Some("application/json");
    // None, a wrong one, and a bot's name (which is not its token).
    for token in [None, Some("wrong"), Some("a")] {
        let got = app.post(token, json, event).await;
        assert_error(&got, 401, "unauthorized", None);
    }
    for header in ["secret-a", "Basic secret-a", "Token secret-a", "Bearer"] {
        let res = app
            .client
            .post(app.url("/v1/events"))
            .header("authorization", header)
            .header("content-type", "application/json")
            .body(event)
            .send()
            .await
            .expect("sent");
        let got = (res.status().as_u16(), res.json().await.expect("JSON"));
        assert_error(&got, 401, "unauthorized", None);
    }
    // The token is checked before anything else about the request.
    assert_error(&app.post(None, None, "{").await, 401, "unauthorized", None);
    assert_eq!(limits_reached(&app).await, Some(0.0));
    app.stop().await;
}

#[tokio::test]
async fn without_tokens_ingestion_is_disabled_with_401() {
    let (app, _db) = start("").await;
    let got = app
        .post(
            Some("anything"),
            Some("application/json"),
            r#"{"type":"limit_reached"}"#,
        )
        .await;
    let message = assert_error(&got, 401, "unauthorized", None);
    assert!(message.contains("--tokens"), "{message}");
    // No bot, no bot series; the server still serves its self-metrics.
    let text = app.metrics_text().await;
    assert_eq!(bot_series(&text), BTreeSet::new());
    assert_eq!(
        sample(
            &text,
            r#"botmetrics_events_rejected_total{reason="unauthorized"}"#
        ),
        Some(1.0)
    );
    app.stop().await;
}

/// `n` bytes exactly: the JSON, then spaces (JSON allows trailing space).
fn padded(json: &str, n: usize) -> String {
    assert!(json.len() <= n);
    format!("{json:<n$}")
}

#[tokio::test]
async fn a_body_over_max_body_bytes_is_413_json_and_ndjson() {
    let (app, _db) = start_with("a=secret-a", |c| c.max_body_bytes = 200).await;
    let event = r#"[{"type":"limit_reached"}]"#;
    for ct in ["application/json", "application/x-ndjson"] {
        let event = if ct == "application/json" {
            event
        } else {
            r#"{"type":"limit_reached"}"#
        };
        let got = app.post(Some(TOKEN), Some(ct), padded(event, 201)).await;
        let message = assert_error(&got, 413, "too_large", None);
        assert!(message.contains("200"), "{message}");
        // The limit itself is allowed.
        let got = app.post(Some(TOKEN), Some(ct), padded(event, 200)).await;
        assert_eq!(got, accepted(1, 0), "{ct}");
    }
    assert_eq!(limits_reached(&app).await, Some(2.0));
    app.stop().await;
}

#[tokio::test]
async fn a_batch_over_max_batch_is_413_json_and_ndjson() {
    let (app, _db) = start_with("a=secret-a", |c| c.max_batch = 3).await;
    let one = json!({"type": "limit_reached"});
    let over = json!([one, one, one, one]);
    let got = app.post_events(TOKEN, &over).await;
    let message = assert_error(&got, 413, "too_large", None);
    assert!(message.contains('3'), "{message}");
    let ndjson = |n: usize| format!("{one}\n\n").repeat(n);
    let got = post_ndjson(&app, ndjson(4)).await;
    assert_error(&got, 413, "too_large", None);
    assert_eq!(limits_reached(&app).await, Some(0.0));
    // Exactly the limit passes, blank lines not counted against it.
    app.post_ok(TOKEN, &json!([one, one, one])).await;
    let got = post_ndjson(&app, ndjson(3)).await;
    assert_eq!(got, accepted(3, 0));
    assert_eq!(limits_reached(&app).await, Some(6.0));
    app.stop().await;
}

#[tokio::test]
async fn a_missing_or_wrong_content_type_is_415() {
    let (app, _db) = start("a=secret-a").await;
    let event = r#"{"type":"limit_reached"}"#;
    assert_error(
        &app.post(Some(TOKEN), None, event).await,
        415,
        "unsupported_media_type",
        None,
    );
    for ct in [
        "text/plain",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ] {
        let got = app.post(Some(TOKEN), Some(ct), event).await;
        assert_error(&got, 415, "unsupported_media_type", None);
    }
    // Parameters and case do not matter.
    for ct in ["application/json; charset=utf-8", "Application/JSON"] {
        let got = app.post(Some(TOKEN), Some(ct), event).await;
        assert_eq!(got, accepted(1, 0), "{ct}");
    }
    assert_eq!(limits_reached(&app).await, Some(2.0));
    app.stop().await;
}

/// Well-formed JSON that is not a valid event, and a word the error message
/// must contain so the sender can tell what to fix.
fn invalid_events() -> Vec<(Value, &'static str)> {
    let now = chrono::Utc::now().timestamp();
    vec![
        // Unknown or missing type.
        (json!({"type": "nope"}), "nope"),
        (json!({"type": 1}), ""),
        (json!({"role": "user"}), "type"),
        // Missing fields.
        (json!({"type": "message"}), "role"),
        (
            json!({"type": "response", "status": "success"}),
            "duration_ms",
        ),
        (json!({"type": "response", "duration_ms": 5}), "status"),
        (json!({"type": "cache"}), "result"),
        (json!({"type": "consent"}), "granted"),
        (json!({"type": "error"}), "kind"),
        (json!({"type": "custom"}), "name"),
        // Mistyped fields: well-formed JSON, so 422 and never 400.
        (json!({"type": "message", "role": 1}), ""),
        (json!({"type": "message", "role": "robot"}), "robot"),
        (
            json!({"type": "message", "role": "user", "db_queries": -1}),
            "",
        ),
        (
            json!({"type": "message", "role": "user", "db_queries": 1.5}),
            "",
        ),
        (
            json!({"type": "message", "role": "user", "db_queries": "6"}),
            "",
        ),
        (
            json!({"type": "response", "status": "ok", "duration_ms": 5}),
            "ok",
        ),
        (
            json!({"type": "response", "status": "success", "duration_ms": "5"}),
            "",
        ),
        (
            json!({"type": "response", "status": "success", "duration_ms": 5, "tokens": {"prompt": -1}}),
            "",
        ),
        (
            json!({"type": "response", "status": "success", "duration_ms": 5, "tokens": 10}),
            "",
        ),
        (json!({"type": "cache", "result": "maybe"}), "maybe"),
        (json!({"type": "consent", "granted": "yes"}), ""),
        (json!({"type": "custom", "name": "x", "value": "1"}), ""),
        (json!({"type": "limit_reached", "user_id": 1.5}), ""),
        (json!({"type": "limit_reached", "user_id": true}), ""),
        (
            json!({"type": "limit_reached", "chat_type": "forum"}),
            "forum",
        ),
        (json!({"type": "limit_reached", "event_id": 7}), ""),
        // Negative numbers where only >= 0 makes sense.
        (
            json!({"type": "response", "status": "success", "duration_ms": -5}),
            "duration_ms",
        ),
        (json!({"type": "custom", "name": "x", "value": -1}), "value"),
        // Names outside 1-64 characters of [A-Za-z0-9_.:-].
        (json!({"type": "error", "kind": "has space"}), "kind"),
        (json!({"type": "error", "kind": ""}), "kind"),
        (json!({"type": "error", "kind": "k".repeat(65)}), "kind"),
        (json!({"type": "error", "kind": "üml"}), "kind"),
        (json!({"type": "custom", "name": "a\"b"}), "name"),
        (json!({"type": "custom", "name": "a{b}"}), "name"),
        (
            json!({"type": "response", "status": "success", "duration_ms": 1, "model": "gpt 4"}),
            "model",
        ),
        (
            json!({"type": "cache", "result": "hit", "cache": "a/b"}),
            "cache",
        ),
        // A field that belongs to another type, or to none.
        (
            json!({"type": "message", "role": "user", "status": "success"}),
            "status",
        ),
        (json!({"type": "limit_reached", "kind": "daily"}), "kind"),
        (
            json!({"type": "consent", "granted": true, "value": 1}),
            "value",
        ),
        (
            json!({"type": "message", "role": "user", "surprise": 1}),
            "surprise",
        ),
        (
            json!({"type": "message", "role": "user", "bot": "b"}),
            "bot",
        ),
        (
            json!({"type": "response", "status": "success", "duration_ms": 5, "tokens": {"prompt": 1, "cached": 2}}),
            "cached",
        ),
        // Time: more than five minutes ahead, or not a time.
        (json!({"type": "limit_reached", "ts": now + 600}), "future"),
        (json!({"type": "limit_reached", "ts": "yesterday"}), ""),
        (json!({"type": "limit_reached", "ts": -1}), ""),
        // Identifiers out of bounds.
        (
            json!({"type": "limit_reached", "user_id": "u".repeat(257)}),
            "user_id",
        ),
        (json!({"type": "limit_reached", "user_id": ""}), "user_id"),
        (json!({"type": "limit_reached", "event_id": ""}), "event_id"),
        (
            json!({"type": "limit_reached", "event_id": "e".repeat(129)}),
            "event_id",
        ),
        // Not an event object at all.
        (json!("limit_reached"), ""),
        (json!(null), ""),
    ]
}

#[tokio::test]
async fn invalid_events_are_422_alone_and_name_their_index_in_a_batch() {
    let (app, _db) = start("a=secret-a").await;
    let ok = json!({"type": "limit_reached"});
    let empty = bot_part(&app.metrics_text().await);
    for (event, word) in invalid_events() {
        let got = app.post_events(TOKEN, &event).await;
        let message = assert_error(&got, 422, "invalid", None);
        assert!(
            message.contains(word),
            "the message for {event} should mention {word:?}: {message}"
        );
        // In a JSON array and in NDJSON, the faulty event is named.
        let got = app.post_events(TOKEN, &json!([ok, ok, event])).await;
        assert_eq!(got.0, 422, "[ok, ok, {event}] → {}", got.1);
        assert_error(&got, 422, "invalid", Some(2));
        let ndjson = format!("{ok}\n\n{event}\n{ok}\n");
        let got = post_ndjson(&app, ndjson).await;
        assert_error(&got, 422, "invalid", Some(1));
    }
    // A valid time close enough to now is accepted (clock skew).
    let soon = chrono::Utc::now().timestamp() + 60;
    app.post_ok(TOKEN, &json!({"type": "limit_reached", "ts": soon}))
        .await;
    let text = app.metrics_text().await;
    assert_eq!(value(&text, r#"bot_limit_reached_total{bot="a"}"#), 1.0);
    // Everything but that one event was refused: nothing else moved.
    let expected = empty.replace(
        r#"bot_limit_reached_total{bot="a"} 0"#,
        r#"bot_limit_reached_total{bot="a"} 1"#,
    );
    assert_eq!(bot_part(&text), expected);
    app.stop().await;
}

#[tokio::test]
async fn bodies_that_are_no_batch_of_events_are_422() {
    let (app, _db) = start("a=secret-a").await;
    for body in [json!([]), json!(42), json!("x"), json!({})] {
        let got = app.post_events(TOKEN, &body).await;
        assert_error(&got, 422, "invalid", None);
    }
    // An array element that is not an object is named by its index.
    let got = app
        .post_events(TOKEN, &json!([{"type": "limit_reached"}, 1]))
        .await;
    assert_error(&got, 422, "invalid", Some(1));
    let got = app
        .post_events(
            TOKEN,
            &json!([{"type": "limit_reached"}, [{"type": "limit_reached"}]]),
        )
        .await;
    assert_error(&got, 422, "invalid", Some(1));
    app.stop().await;
}

#[tokio::test]
async fn an_event_must_be_an_object_not_a_positional_array() {
    // serde's derived Deserialize also accepts a struct written as an
    // array of its fields in order; the contract's event is a JSON object,
    // so `["limit_reached"]` must be refused like any other non-object.
    let (app, _db) = start("a=secret-a").await;
    let got = app.post_events(TOKEN, &json!([["limit_reached"]])).await;
    assert_error(&got, 422, "invalid", Some(0));
    let got = post_ndjson(&app, "[\"message\",42,null,null,null,\"user\"]\n").await;
    assert_error(&got, 422, "invalid", Some(0));
    // The same holds for the nested `tokens` object.
    let got = app
        .post_events(
            TOKEN,
            &json!({"type": "response", "status": "success", "duration_ms": 5,
                    "model": "m", "tokens": [10, 5]}),
        )
        .await;
    assert_error(&got, 422, "invalid", None);
    let text = app.metrics_text().await;
    assert_series(
        &text,
        &[
            (r#"bot_limit_reached_total{bot="a"}"#, 0.0),
            (r#"bot_messages_total{bot="a",role="user"}"#, 0.0),
            (r#"bot_responses_total{bot="a",status="success"}"#, 0.0),
        ],
    );
    app.stop().await;
}

#[tokio::test]
async fn every_refused_request_is_counted_by_reason() {
    let (app, _db) = start_with("a=secret-a", |c| c.max_batch = 2).await;
    let json_ct = Some("application/json");
    let before = app.metrics_text().await;
    app.post(Some(TOKEN), json_ct, "{").await;
    app.post(None, json_ct, "{}").await;
    app.post(Some("nope"), json_ct, "{}").await;
    app.post(
        Some(TOKEN),
        json_ct,
        r#"[{"type":"limit_reached"},{"type":"limit_reached"},{"type":"limit_reached"}]"#,
    )
    .await;
    app.post(Some(TOKEN), Some("text/plain"), "{}").await;
    for _ in 0..3 {
        app.post(Some(TOKEN), json_ct, r#"{"type":"nope"}"#).await;
    }
    let text = app.metrics_text().await;
    let reason = |r: &str| format!(r#"botmetrics_events_rejected_total{{reason="{r}"}}"#);
    assert_series(
        &text,
        &[
            (&reason("malformed"), 1.0),
            (&reason("unauthorized"), 2.0),
            (&reason("too_large"), 1.0),
            (&reason("unsupported_media_type"), 1.0),
            (&reason("invalid"), 3.0),
            (r#"botmetrics_events_accepted_total{bot="a"}"#, 0.0),
        ],
    );
    assert_eq!(bot_part(&text), bot_part(&before));
    app.stop().await;
}

// ---------------------------------------------------------------------------
// A request is validated whole: one bad event changes nothing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_batch_with_one_bad_event_changes_nothing() {
    let (app, _db) = start("a=secret-a").await;
    // Some history first, so "nothing changed" is not "all zero".
    app.post_ok(TOKEN, &every_event_type()).await;
    let before = app.metrics_text().await;

    // Every event type, new label values, new users and an event_id, then
    // one bad event at the end: none of it may be applied.
    let mut batch = every_event_type().as_array().unwrap().clone();
    batch.extend([
        json!({"type": "error", "kind": "brand_new_kind", "user_id": "new-user"}),
        json!({"type": "custom", "name": "brand_new_name", "user_id": 999}),
        json!({"type": "message", "role": "user", "event_id": "once"}),
        json!({"type": "message", "role": "user", "db_queries": -1}),
    ]);
    let got = app.post_events(TOKEN, &json!(batch)).await;
    assert_error(&got, 422, "invalid", Some(batch.len() as u64 - 1));

    // The same in NDJSON, the bad line in the middle.
    let mut lines: Vec<String> = batch.iter().map(Value::to_string).collect();
    lines.insert(3, r#"{"type":"message","role":"user","bot":"b"}"#.into());
    lines.pop();
    let got = post_ndjson(&app, lines.join("\n")).await;
    assert_error(&got, 422, "invalid", Some(3));

    // And a malformed tail after valid events.
    let mut raw = json!(batch[..4]).to_string();
    raw.pop();
    raw.push_str(r#",{"type":"#);
    let got = app.post(Some(TOKEN), Some("application/json"), raw).await;
    assert_error(&got, 400, "malformed", None);

    let after = app.metrics_text().await;
    assert_eq!(bot_part(&after), bot_part(&before));
    assert_eq!(
        value(&after, r#"botmetrics_events_accepted_total{bot="a"}"#),
        value(&before, r#"botmetrics_events_accepted_total{bot="a"}"#),
    );
    assert_eq!(
        value(
            &after,
            r#"botmetrics_events_rejected_total{reason="invalid"}"#
        ),
        2.0
    );
    // The refused event_id was not remembered: sent alone, it counts.
    app.post_ok(
        TOKEN,
        &json!({"type": "message", "role": "user", "event_id": "once"}),
    )
    .await;
    assert_eq!(
        app.sample(r#"bot_messages_total{bot="a",role="user"}"#)
            .await,
        Some(value(&before, r#"bot_messages_total{bot="a",role="user"}"#) + 1.0)
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Tenant isolation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_bots_token_only_ever_moves_that_bots_series() {
    let (app, _db) = start("A=token-a,B=token-b").await;
    let fresh = app.metrics_text().await;

    app.post_ok("token-a", &every_event_type()).await;
    let after_a = app.metrics_text().await;
    assert_eq!(lines_of_bot(&after_a, "B"), lines_of_bot(&fresh, "B"));
    assert_ne!(lines_of_bot(&after_a, "A"), lines_of_bot(&fresh, "A"));
    assert_eq!(
        value(&after_a, r#"bot_messages_total{bot="A",role="user"}"#),
        1.0
    );

    // No field, query parameter or header can point A's token at B.
    let sneaky = [
        json!({"type": "message", "role": "user", "bot": "B"}),
        json!([{"type": "message", "role": "user"}, {"type": "message", "role": "user", "bot": "B"}]),
        json!({"type": "message", "role": "user", "labels": {"bot": "B"}}),
        json!({"type": "error", "kind": "x", "tenant": "B"}),
    ];
    for body in &sneaky {
        let got = app.post_events("token-a", body).await;
        assert_eq!(got.0, 422, "{body} → {}", got.1);
        assert_eq!(got.1["error"], "invalid");
    }
    let res = app
        .client
        .post(app.url("/v1/events?bot=B"))
        .bearer_auth("token-a")
        .header("content-type", "application/json")
        .header("x-bot", "B")
        .body(r#"{"type":"limit_reached"}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), 202);
    let after_sneaky = app.metrics_text().await;
    assert_eq!(lines_of_bot(&after_sneaky, "B"), lines_of_bot(&fresh, "B"));
    assert_eq!(
        value(&after_sneaky, r#"bot_limit_reached_total{bot="A"}"#),
        2.0,
        "the query string is ignored: the event counts for A"
    );

    // And the other way round.
    app.post_ok("token-b", &json!({"type": "error", "kind": "only_b"}))
        .await;
    let after_b = app.metrics_text().await;
    assert_eq!(
        lines_of_bot(&after_b, "A"),
        lines_of_bot(&after_sneaky, "A")
    );
    assert_eq!(
        value(&after_b, r#"bot_errors_total{bot="B",kind="only_b"}"#),
        1.0
    );
    assert_eq!(
        sample(&after_b, r#"bot_errors_total{bot="A",kind="only_b"}"#),
        None
    );
    assert_series(
        &after_b,
        &[
            (r#"botmetrics_events_accepted_total{bot="A"}"#, 13.0),
            (r#"botmetrics_events_accepted_total{bot="B"}"#, 1.0),
        ],
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Dedupe by event_id
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_event_id_seen_again_is_a_duplicate_in_one_batch_and_across_requests() {
    let (app, _db) = start("A=token-a,B=token-b").await;
    let event = |id: &str| json!({"type": "message", "role": "user", "event_id": id});

    let got = app
        .post_events(
            "token-a",
            &json!([event("m-1"), event("m-1"), event("m-2")]),
        )
        .await;
    assert_eq!(got, accepted(2, 1));
    let got = app.post_events("token-a", &event("m-2")).await;
    assert_eq!(got, accepted(0, 1));
    let got = app
        .post_events("token-a", &json!([event("m-1"), event("m-3")]))
        .await;
    assert_eq!(got, accepted(1, 1));
    // Events without an id are never duplicates.
    let plain = json!({"type": "message", "role": "user"});
    let got = app.post_events("token-a", &json!([plain, plain])).await;
    assert_eq!(got, accepted(2, 0));
    // The same id from another bot is that bot's own event.
    let got = app.post_events("token-b", &event("m-1")).await;
    assert_eq!(got, accepted(1, 0));
    // Ids are exact strings: case and a trailing space make a new one.
    let got = app
        .post_events("token-a", &json!([event("M-1"), event("m-1 ")]))
        .await;
    assert_eq!(got, accepted(2, 0));

    assert_series(
        &app.metrics_text().await,
        &[
            (r#"bot_messages_total{bot="A",role="user"}"#, 7.0),
            (r#"bot_messages_total{bot="B",role="user"}"#, 1.0),
            (r#"botmetrics_events_accepted_total{bot="A"}"#, 7.0),
            (r#"botmetrics_events_duplicate_total{bot="A"}"#, 3.0),
            (r#"botmetrics_events_accepted_total{bot="B"}"#, 1.0),
            (r#"botmetrics_events_duplicate_total{bot="B"}"#, 0.0),
        ],
    );
    app.stop().await;
}

#[tokio::test]
async fn an_event_id_is_forgotten_after_the_dedupe_window() {
    let (app, _db) = start_with("a=secret-a", |c| {
        c.dedupe_window = Duration::from_millis(300);
    })
    .await;
    let event = json!({"type": "message", "role": "user", "event_id": "retry"});
    let got = app.post_events(TOKEN, &event).await;
    assert_eq!(got, accepted(1, 0));
    let got = app.post_events(TOKEN, &event).await;
    assert_eq!(got, accepted(0, 1));
    eventually(Duration::from_secs(5), || {
        let (app, event) = (&app, &event);
        async move { app.post_events(TOKEN, event).await.1["accepted"] == 1 }
    })
    .await;
    assert_eq!(
        app.sample(r#"bot_messages_total{bot="a",role="user"}"#)
            .await,
        Some(2.0)
    );
    app.stop().await;
}

/// `--dedupe-window 0s` turns dedupe off: the same `event_id` counts every
/// time, within a batch and across requests (the real binary, so the flag's
/// parsing is in the test too).
#[tokio::test]
async fn a_zero_dedupe_window_counts_every_event() {
    let db = crate::helpers::SqliteFile::new();
    let bin = crate::helpers::Binary::serve(&db.url(), "a=ta", &["--dedupe-window", "0s"]).await;
    let event = json!({"type": "message", "role": "user", "event_id": "retry"});
    let twice = Value::Array(vec![event.clone(), event.clone()]);
    assert_eq!(bin.post_events("ta", &twice).await, accepted(2, 0));
    assert_eq!(bin.post_events("ta", &event).await, accepted(1, 0));
    let text = bin.metrics_text().await;
    assert_series(
        &text,
        &[
            (r#"bot_messages_total{bot="a",role="user"}"#, 3.0),
            (r#"botmetrics_events_duplicate_total{bot="a"}"#, 0.0),
            ("botmetrics_dedupe_window_seconds", 0.0),
        ],
    );
}

/// A request that takes longer than `--request-timeout` (here a body that
/// stops half-way) is answered 408 and counts nothing; the server goes on.
#[tokio::test]
async fn a_request_slower_than_request_timeout_is_408_and_counts_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let db = crate::helpers::SqliteFile::new();
    let bin = crate::helpers::Binary::serve(&db.url(), "a=ta", &["--request-timeout", "1s"]).await;
    let body = r#"[{"type":"message","role":"user"},{"type":"message","role":"user"}]"#;
    let addr = bin
        .url("/")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer ta\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    stream
        .write_all(&body.as_bytes()[..body.len() / 2])
        .await
        .expect("send half the body");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 1024];
        // The head of the answer is enough.
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.expect("read the answer");
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 30 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // Nothing of the cut-off request was counted; the next request works.
    assert_eq!(
        bin.post_events("ta", &json!({"type": "message", "role": "user"}))
            .await,
        accepted(1, 0)
    );
    assert_eq!(
        bin.sample(r#"bot_messages_total{bot="a",role="user"}"#)
            .await,
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------
// Label cap
// ---------------------------------------------------------------------------

#[tokio::test]
async fn past_max_label_values_new_values_count_under_other() {
    let (app, _db) = start_with("A=token-a,B=token-b", |c| c.max_label_values = 2).await;
    app.post_ok(
        "token-a",
        &json!([
            {"type": "error", "kind": "first"},
            {"type": "error", "kind": "second"},
            {"type": "error", "kind": "third"},
            {"type": "error", "kind": "fourth"},
            {"type": "error", "kind": "first"},
            {"type": "custom", "name": "n1", "value": 2},
            {"type": "custom", "name": "n2"},
            {"type": "custom", "name": "n3", "value": 0.5},
            {"type": "response", "status": "success", "duration_ms": 1, "model": "m1", "tokens": {"prompt": 1}},
            {"type": "response", "status": "success", "duration_ms": 1, "model": "m2", "tokens": {"prompt": 1}},
            {"type": "response", "status": "success", "duration_ms": 1, "model": "m3", "tokens": {"prompt": 5}},
        ]),
    )
    .await;
    // The cap is per bot: B still has room for "third".
    app.post_ok("token-b", &json!({"type": "error", "kind": "third"}))
        .await;
    let text = app.metrics_text().await;
    assert_series(
        &text,
        &[
            (r#"bot_errors_total{bot="A",kind="first"}"#, 2.0),
            (r#"bot_errors_total{bot="A",kind="second"}"#, 1.0),
            (r#"bot_errors_total{bot="A",kind="other"}"#, 2.0),
            (
                r#"botmetrics_label_overflow_total{bot="A",label="kind"}"#,
                2.0,
            ),
            (r#"bot_custom_events_total{bot="A",name="n1"}"#, 2.0),
            (r#"bot_custom_events_total{bot="A",name="n2"}"#, 1.0),
            (r#"bot_custom_events_total{bot="A",name="other"}"#, 0.5),
            (
                r#"botmetrics_label_overflow_total{bot="A",label="name"}"#,
                1.0,
            ),
            (
                r#"bot_llm_tokens_total{bot="A",model="other",kind="prompt"}"#,
                5.0,
            ),
            (
                r#"botmetrics_label_overflow_total{bot="A",label="model"}"#,
                1.0,
            ),
            (r#"bot_errors_total{bot="B",kind="third"}"#, 1.0),
            (
                r#"botmetrics_label_overflow_total{bot="B",label="kind"}"#,
                0.0,
            ),
        ],
    );
    for absent in [
        r#"bot_errors_total{bot="A",kind="third"}"#,
        r#"bot_errors_total{bot="A",kind="fourth"}"#,
        r#"bot_custom_events_total{bot="A",name="n3"}"#,
    ] {
        assert_eq!(
            sample(&text, absent),
            None,
            "{absent} should be folded into other"
        );
    }
    app.stop().await;
}
