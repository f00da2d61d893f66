//! `GET /v1/history` and the history write (issue 3, item 6), on both
//! backends: points written by `write_history_once`, server-side
//! downsampling (last value per step), histogram line names, and a clear
//! JSON error for every bad parameter.

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

use crate::helpers::{
    Raw, TestApp, assert_error, config, on_both_backends, spawn_app, user_messages_row,
};

/// `key=value&…`, percent-encoded.
fn query_string(query: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    query
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn history(app: &TestApp, query: &[(&str, &str)]) -> (u16, Value) {
    app.get_json(&format!("/v1/history?{}", query_string(query)))
        .await
}

/// The series of an answer keyed by their `role`-style label value.
fn series_by<'a>(answer: &'a Value, label: &str) -> Vec<(&'a str, &'a Value)> {
    answer["series"]
        .as_array()
        .expect("series is an array")
        .iter()
        .map(|s| (s["labels"][label].as_str().unwrap_or_default(), s))
        .collect()
}

fn points(series: &Value) -> Vec<(i64, f64)> {
    series["points"]
        .as_array()
        .expect("points is an array")
        .iter()
        .map(|p| {
            (
                p[0].as_i64().expect("unix seconds"),
                p[1].as_f64().expect("a value"),
            )
        })
        .collect()
}

async fn history_points_from_write_history_once(url: &str) {
    let app = spawn_app(config("x=tx,y=ty", url)).await;
    let p = &app.state.persistence;
    let raw = Raw::connect(url).await;
    app.post_ok(
        "tx",
        &json!([
            {"type": "message", "role": "user"},
            {"type": "message", "role": "user"},
            {"type": "message", "role": "assistant"},
            {"type": "response", "status": "success", "duration_ms": 700}
        ]),
    )
    .await;

    let all = botmetrics::persist::snapshot(&app.state.metrics).len();
    assert_eq!(
        p.write_history_once().await.expect("history"),
        all,
        "a point per series"
    );
    assert_eq!(
        p.write_history_once().await.expect("history"),
        0,
        "nothing changed since the last point: no statement"
    );
    assert_eq!(raw.count("metrics_history").await, all as i64);
    app.post_ok("tx", &json!({"type": "message", "role": "user"}))
        .await;
    assert_eq!(p.write_history_once().await.expect("history"), all);
    assert_eq!(p.write_history_once().await.expect("history"), 0);
    assert_eq!(raw.count("metrics_history").await, 2 * all as i64);

    let (status, answer) = history(&app, &[("metric", "bot_messages_total"), ("bot", "x")]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["metric"], "bot_messages_total");
    assert_eq!(
        answer["step_seconds"], 3600,
        "the history interval by default"
    );
    let series = series_by(&answer, "role");
    assert_eq!(
        series.iter().map(|(role, _)| *role).collect::<Vec<_>>(),
        ["assistant", "user"],
        "{answer}"
    );
    for (role, s) in &series {
        assert_eq!(s["bot"], "x");
        assert_eq!(s["labels"], json!({ "role": role }));
        let pts = points(s);
        // Both writes fall in one step unless an hour boundary lies between.
        assert!((1..=2).contains(&pts.len()), "{answer}");
        let last = pts.last().unwrap().1;
        assert_eq!(last, if *role == "user" { 3.0 } else { 1.0 }, "{answer}");
    }
    // Every bot when none is named.
    let (status, answer) = history(&app, &[("metric", "bot_messages_total")]).await;
    assert_eq!(status, 200);
    let bots: Vec<&str> = answer["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bot"].as_str().unwrap())
        .collect();
    assert_eq!(bots, ["x", "x", "y", "y"], "{answer}");

    // Histogram lines are history metrics of their own.
    let (status, answer) = history(
        &app,
        &[
            ("metric", "bot_response_duration_seconds_bucket"),
            ("bot", "x"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let le: Vec<&str> = series_by(&answer, "le").iter().map(|(le, _)| *le).collect();
    assert_eq!(le.len(), 15, "14 bounds and +Inf: {le:?}");
    assert!(
        le.contains(&"+Inf") && le.contains(&"1") && le.contains(&"0.05"),
        "{le:?}"
    );
    for (suffix, value) in [("_sum", 0.7), ("_count", 1.0)] {
        let metric = format!("bot_response_duration_seconds{suffix}");
        let (status, answer) = history(&app, &[("metric", &metric), ("bot", "x")]).await;
        assert_eq!(status, 200, "{answer}");
        let s = &answer["series"][0];
        assert_eq!(s["labels"], json!({}));
        assert_eq!(points(s).last().unwrap().1, value);
    }
    raw.close().await;
    app.stop().await;
}

on_both_backends!(history_points_from_write_history_once);

/// Tomorrow 00:00 UTC: a PostgreSQL partition exists for it from start-up,
/// and every step length that divides a day starts there.
fn tomorrow() -> DateTime<Utc> {
    (Utc::now().date_naive() + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
}

async fn downsampling_keeps_the_last_value_per_step(url: &str) {
    let app = spawn_app(config("x=tx", url)).await;
    let store = &app.state.persistence.store;
    let t0 = tomorrow();
    for (offset, value) in [
        (0, 1.0),
        (10, 2.0),
        (20, 3.0),
        (70, 4.0),
        (130, 5.0),
        (500, 6.0),
    ] {
        store
            .write_history(&[user_messages_row(value)], t0 + Duration::seconds(offset))
            .await
            .expect("write a point");
    }
    let t = t0.timestamp();
    let from = t0.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = (t + 200).to_string();

    let (status, answer) = history(
        &app,
        &[
            ("metric", "bot_messages_total"),
            ("bot", "x"),
            ("from", &from),
            ("to", &to),
            ("step", "60s"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["step_seconds"], 60);
    assert_eq!(answer["from"], from);
    let series = series_by(&answer, "role");
    assert_eq!(series.len(), 1, "only the written series: {answer}");
    assert_eq!(
        points(series[0].1),
        [(t + 20, 3.0), (t + 70, 4.0), (t + 130, 5.0)],
        "the last value of each minute, the point after `to` left out"
    );

    // Bare seconds for step; every point when the step is finer than they are.
    let (status, answer) = history(
        &app,
        &[
            ("metric", "bot_messages_total"),
            ("from", &t.to_string()),
            ("to", &to),
            ("step", "10"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        points(&answer["series"][0]),
        [
            (t, 1.0),
            (t + 10, 2.0),
            (t + 20, 3.0),
            (t + 70, 4.0),
            (t + 130, 5.0)
        ]
    );

    // One step over the whole range: the last value in it.
    let (status, answer) = history(
        &app,
        &[
            ("metric", "bot_messages_total"),
            ("from", &t.to_string()),
            ("to", &(t + 600).to_string()),
            ("step", "1h"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(points(&answer["series"][0]), [(t + 500, 6.0)]);

    // A range with no points: no series, not an error.
    let (status, answer) = history(
        &app,
        &[
            ("metric", "bot_errors_total"),
            ("from", &t.to_string()),
            ("to", &to),
        ],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["series"], json!([]));
    app.stop().await;
}

on_both_backends!(downsampling_keeps_the_last_value_per_step);

/// Query parameters, in order.
type Query<'a> = Vec<(&'a str, &'a str)>;

async fn bad_parameters_get_clear_errors(url: &str) {
    let app = spawn_app(config("x=tx", url)).await;
    let m = ("metric", "bot_messages_total");
    let year_ago = (Utc::now() - Duration::days(365)).timestamp().to_string();
    let cases: Vec<(Query, u16, &str)> = vec![
        (vec![], 400, "metric"),
        (vec![("bot", "x")], 400, "metric"),
        (vec![("metric", "pg_catalog")], 400, "pg_catalog"),
        (
            vec![(
                "metric",
                "bot_messages_total'; drop table metrics_history; --",
            )],
            400,
            "not a botmetrics metric",
        ),
        (
            vec![("metric", "bot_response_duration_seconds")],
            400,
            "not a botmetrics metric",
        ),
        (
            vec![("metric", "bot_messages_total_bucket")],
            400,
            "not a botmetrics metric",
        ),
        (
            vec![("metric", "botmetrics_flush_failures_total")],
            400,
            "not a botmetrics metric",
        ),
        (vec![m, ("from", "yesterday")], 400, "from"),
        (vec![m, ("to", "2026-13-01T00:00:00Z")], 400, "to"),
        (vec![m, ("from", "-5")], 400, "from"),
        (vec![m, ("from", "1000"), ("to", "1000")], 400, "before"),
        (vec![m, ("from", "2000"), ("to", "1000")], 400, "before"),
        (vec![m, ("step", "0")], 400, "step"),
        (vec![m, ("step", "500ms")], 400, "step"),
        (vec![m, ("step", "soon")], 400, "step"),
        (vec![m, ("from", &year_ago), ("step", "1s")], 400, "limit"),
        (vec![m, ("from", &year_ago), ("step", "1m")], 400, "limit"),
        (vec![m, ("limit", "10")], 400, "limit"),
        (vec![m, ("bot", "nobody")], 404, "nobody"),
    ];
    for (query, status, mentions) in cases {
        let code = if status == 404 {
            "not_found"
        } else {
            "bad_request"
        };
        let got = history(&app, &query).await;
        assert_eq!(got.0, status, "{query:?}: {}", got.1);
        let message = assert_error(&got, status, code, None);
        assert!(
            message.contains(mentions),
            "{query:?}: {message:?} should mention {mentions:?}"
        );
    }
    // The edges that are fine: a year at a coarse step, RFC 3339 with an offset.
    for query in [
        vec![m, ("from", year_ago.as_str()), ("step", "1h")],
        vec![
            m,
            ("from", "2026-01-01T09:00:00+09:00"),
            ("to", "2026-01-02T00:00:00Z"),
        ],
    ] {
        let (got, body) = history(&app, &query).await;
        assert_eq!(got, 200, "{query:?}: {body}");
    }
    app.stop().await;
}

on_both_backends!(bad_parameters_get_clear_errors);

/// During a PostgreSQL outage `/v1/history` answers 503 `unavailable` (it
/// reads the store; memory cannot answer it), and 200 again after.
#[tokio::test]
async fn history_is_503_during_an_outage_and_200_after() {
    let Some(db) = crate::helpers::PgDatabase::create().await else {
        return;
    };
    let app = spawn_app(config("x=tx", &db.url)).await;
    app.post_ok("tx", &json!({"type": "message", "role": "user"}))
        .await;
    let p = &app.state.persistence;
    assert!(p.write_history_once().await.expect("history write") > 0);
    let query = [("metric", "bot_messages_total"), ("bot", "x")];
    let (status, answer) = history(&app, &query).await;
    assert_eq!(status, 200, "{answer}");
    let user = series_by(&answer, "role")
        .into_iter()
        .find(|(role, _)| *role == "user")
        .expect("the user series")
        .1;
    assert_eq!(points(user).last().map(|p| p.1), Some(1.0));

    db.set_outage(true).await;
    let got = history(&app, &query).await;
    assert_error(&got, 503, "unavailable", None);
    // Still answered from memory meanwhile.
    assert_eq!(
        app.sample(r#"bot_messages_total{bot="x",role="user"}"#)
            .await,
        Some(1.0)
    );

    db.set_outage(false).await;
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        history(&app, &query).await.0 == 200
    })
    .await;
    app.stop().await;
}
