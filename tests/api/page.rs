//! The built-in page (issue 20, items 1-3): `GET /` and its assets served
//! from the binary with their types and caching, `GET /v1/charts` turning
//! history into steps on both backends, its errors and Read access, and
//! the page itself in a real Chromium (tests/browser/ci.sh).

use std::path::Path;
use std::process::Command;

use chrono::{DateTime, Duration, Utc};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    MACHINE, TestApp, assert_error, config, have, on_both_backends, spawn_app, start_with,
};

async fn read(app: &TestApp, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = app.client.request(Method::GET, app.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let res = req.send().await.expect("request sent");
    let status = res.status().as_u16();
    let body = res.text().await.expect("body");
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn series(answer: &Value, name: &str) -> Vec<Option<f64>> {
    answer["series"][name]
        .as_array()
        .unwrap_or_else(|| panic!("no series {name} in {answer}"))
        .iter()
        .map(Value::as_f64)
        .collect()
}

fn total(values: &[Option<f64>]) -> f64 {
    values.iter().flatten().sum()
}

/// The index in `answer["times"]` of the step holding `at`.
fn step_of(answer: &Value, at: DateTime<Utc>) -> usize {
    let step = answer["step_seconds"].as_i64().expect("step");
    let first = answer["times"][0].as_i64().expect("times");
    usize::try_from((at.timestamp() - first).div_euclid(step)).expect("inside the range")
}

/// Points written at chosen past times (what the history task writes, at
/// the instants a test needs): every series of the bot, as a tick does.
async fn charts_turn_history_into_steps(url: &str) {
    let app = spawn_app(config("x=tx", url)).await;
    let store = &app.state.persistence.store;
    let write = |at: DateTime<Utc>| {
        let rows = botmetrics::persist::snapshot(&app.state.metrics);
        async move { store.write_history(&rows, at).await.expect("a point") }
    };
    let now = Utc::now();
    if url.starts_with("postgres") {
        // The server makes partitions from today on; these points are older.
        let raw = crate::helpers::Raw::connect(url).await;
        for back in 1..=2 {
            let day = (now - Duration::days(back)).date_naive();
            let next = day + Duration::days(1);
            raw.execute(&format!(
                "create table if not exists {} partition of metrics_history for values from ('{day}') to ('{next}')",
                botmetrics::store::partition_name(day)
            ))
            .await;
        }
        raw.close().await;
    }
    let message = |user: u64| json!({"type": "message", "role": "user", "user_id": user});

    // Before the 24 h range: its base, not counted in it.
    app.post_ok("tx", &json!([message(1), message(2)])).await;
    write(now - Duration::hours(30)).await;
    // Five hours ago: three messages and one answer of 700 ms.
    app.post_ok(
        "tx",
        &json!([message(1), message(3), message(3),
            {"type": "response", "status": "success", "duration_ms": 700, "model": "gpt-4o-mini",
             "tokens": {"prompt": 1000, "completion": 100}}]),
    )
    .await;
    let (_, summary) = read(&app, "/v1/summary", None).await;
    let p50_then = summary["responses"]["p50_ms"].as_f64().expect("p50");
    let spend_then = summary["spend"]["total"].as_f64().expect("spend");
    assert!(spend_then > 0.0, "{summary}");
    let five = now - Duration::hours(5);
    write(five).await;
    // An hour ago: four more, an error event and a timed-out answer.
    app.post_ok(
        "tx",
        &json!([message(4), message(4), message(5), message(6),
            {"type": "error", "kind": "db"},
            {"type": "response", "status": "timeout", "duration_ms": 30000}]),
    )
    .await;
    let one = now - Duration::hours(1);
    write(one).await;

    let (status, day) = read(&app, "/v1/charts?bot=x&range=24h", None).await;
    assert_eq!(status, 200, "{day}");
    assert_eq!(day["bot"], "x");
    assert_eq!(day["range"], "24h");
    assert_eq!(day["step_seconds"], 3600);
    assert_eq!(day["currency"], "USD");
    let times = day["times"].as_array().expect("times");
    assert_eq!(times.len(), 24);
    assert_eq!(
        times.last().and_then(Value::as_i64),
        Some(now.timestamp() / 3600 * 3600),
        "the last step is the current hour"
    );
    for name in [
        "messages",
        "active_users",
        "latency_p50_ms",
        "latency_p95_ms",
        "errors",
        "failed_responses",
        "registered",
        "spend",
    ] {
        assert_eq!(series(&day, name).len(), 24, "{name}");
    }
    let messages = series(&day, "messages");
    let (i5, i1) = (step_of(&day, five), step_of(&day, one));
    assert_eq!(messages[i5], Some(3.0), "{messages:?}");
    assert_eq!(messages[i1], Some(4.0), "{messages:?}");
    assert_eq!(
        total(&messages),
        7.0,
        "the two before the range are its base: {messages:?}"
    );
    // The base makes every step known: quiet hours are 0, not a gap.
    assert!(messages.iter().all(Option::is_some), "{messages:?}");
    assert_eq!(series(&day, "errors")[i1], Some(1.0));
    assert_eq!(total(&series(&day, "errors")), 1.0);
    assert_eq!(series(&day, "failed_responses")[i1], Some(1.0));
    assert_eq!(series(&day, "failed_responses")[i5], Some(0.0));
    // Latency of the step's own answers, interpolated as the summary does.
    let p50 = series(&day, "latency_p50_ms");
    assert_eq!(p50[i5], Some(p50_then), "{p50:?}");
    assert!(
        p50[i1].is_some_and(|v| v > 10_000.0),
        "the timeout's hour: {p50:?}"
    );
    assert_eq!(p50[i5 + 1], None, "no answers, no latency: {p50:?}");
    let spend = series(&day, "spend");
    assert!(
        (spend[i5].expect("spend") - spend_then).abs() < 1e-9,
        "{spend:?}"
    );
    // The gauge as it stood, carried forward over quiet steps.
    let active = series(&day, "active_users");
    assert_eq!(
        active[0],
        Some(2.0),
        "the base point's 1d estimate: {active:?}"
    );
    assert_eq!(active[i5], Some(3.0));
    assert_eq!(active[i1], Some(6.0));
    assert_eq!(active[23], Some(6.0));

    // A month in days: no point before it, so it counts from 0, and days
    // before the first point are unknown (null), not 0.
    let (status, month) = read(&app, "/v1/charts?bot=x&range=30d", None).await;
    assert_eq!(status, 200, "{month}");
    assert_eq!(month["step_seconds"], 86_400);
    let messages = series(&month, "messages");
    assert_eq!(messages.len(), 30);
    assert_eq!(total(&messages), 9.0, "{messages:?}");
    assert_eq!(messages[0], None, "{messages:?}");
    let (status, week) = read(&app, "/v1/charts?range=7d", None).await;
    assert_eq!(status, 200, "the only bot is the default: {week}");
    assert_eq!(series(&week, "messages").len(), 168);
    assert_eq!(total(&series(&week, "messages")), 9.0);
    app.stop().await;
}

on_both_backends!(charts_turn_history_into_steps);

#[tokio::test]
async fn charts_refuse_bad_queries_and_follow_read_access() {
    let (app, _db) = start_with("alpha=ta,beta=tb", |c| {
        c.metrics_token = Some("reader".into());
    })
    .await;
    for (path, status, code) in [
        ("/v1/charts?bot=alpha&range=1y", 400, "bad_request"),
        ("/v1/charts?bot=alpha&range=", 400, "bad_request"),
        ("/v1/charts?bot=alpha&step=60", 400, "bad_request"),
        ("/v1/charts?range=24h", 400, "bad_request"),
        ("/v1/charts?bot=gamma", 404, "not_found"),
    ] {
        let got = read(&app, path, Some("reader")).await;
        assert_error(&got, status, code, None);
    }
    let got = read(&app, "/v1/charts?bot=alpha&range=1y", Some("reader")).await;
    assert!(assert_error(&got, 400, "bad_request", None).contains("24h, 7d or 30d"));
    for token in [None, Some("wrong")] {
        let got = read(&app, "/v1/charts?bot=alpha", token).await;
        assert_error(&got, 401, "unauthorized", None);
    }
    // A bot's token: its own bot, named or not; never another.
    for path in ["/v1/charts", "/v1/charts?bot=alpha&range=7d"] {
        let (status, own) = read(&app, path, Some("ta")).await;
        assert_eq!(status, 200, "{path}: {own}");
        assert_eq!(own["bot"], "alpha");
    }
    let got = read(&app, "/v1/charts?bot=beta", Some("ta")).await;
    assert_error(&got, 403, "forbidden", None);
    app.stop().await;
}

#[tokio::test]
async fn the_page_and_its_assets_come_from_the_binary() {
    let (app, _db) = start_with("alpha=ta", |c| {
        c.metrics_token = Some("reader".into());
    })
    .await;
    // The document shows no count itself, so it is open under a token.
    let res = app.client.get(app.url("/")).send().await.expect("GET /");
    assert_eq!(res.status(), 200);
    let header = |res: &reqwest::Response, name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().expect("ASCII").to_owned())
            .unwrap_or_default()
    };
    assert_eq!(header(&res, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&res, "cache-control"), "no-cache");
    assert!(header(&res, "content-security-policy").contains("script-src 'self'"));
    let etag = header(&res, "etag");
    assert!(etag.starts_with('"'), "{etag}");
    let html = res.text().await.expect("html");
    assert!(
        !html.contains("https://") && !html.contains("http://"),
        "nothing from elsewhere"
    );
    let again = app
        .client
        .get(app.url("/"))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("GET / again");
    assert_eq!(again.status(), 304);

    // Every asset the document names: its type, a year of caching and an
    // ETag; a 304 for a browser that has it, gzip for one that takes it.
    let urls: Vec<&str> = html
        .split(['"', '\''])
        .filter(|s| s.starts_with("/assets/"))
        .collect();
    assert_eq!(urls.len(), 5, "{urls:?}");
    for url in urls {
        let res = app.client.get(app.url(url)).send().await.expect("asset");
        assert_eq!(res.status(), 200, "{url}");
        let ty = header(&res, "content-type");
        let want = if url.contains(".js?") {
            "text/javascript; charset=utf-8"
        } else if url.contains(".css?") {
            "text/css; charset=utf-8"
        } else {
            "text/plain; charset=utf-8"
        };
        assert_eq!(ty, want, "{url}");
        assert_eq!(
            header(&res, "cache-control"),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(header(&res, "x-content-type-options"), "nosniff");
        let etag = header(&res, "etag");
        let body = res.bytes().await.expect("body");
        assert!(!body.is_empty());
        let cached = app
            .client
            .get(app.url(url))
            .header("if-none-match", &etag)
            .send()
            .await
            .expect("asset again");
        assert_eq!(cached.status(), 304, "{url}");
    }
    let gz = app
        .client
        .get(app.url("/assets/uPlot.iife.min.js"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("gzip");
    assert_eq!(header(&gz, "content-encoding"), "gzip");
    let zipped = gz.bytes().await.expect("gzip body").len();
    assert!(zipped < 30_000, "uPlot gzipped is {zipped} bytes");
    let got = read(&app, "/assets/nope.js", None).await;
    assert_error(&got, 404, "not_found", None);
    app.stop().await;
}

/// tests/browser/ci.sh: the pinned playwright-core (`npm ci`, into the
/// target directory) drives Debian's Chromium against this build's binary:
/// figures equal the summary's, every chart has points and updates without
/// a reload, the token prompt and a bot token's single bot, phone width
/// and dark mode; screenshots kept in the target directory.
#[test]
fn the_page_in_a_real_browser() {
    if !have("chromium", "chromium") || !have("node", "nodejs") || !have("npm", "npm") {
        return;
    }
    let _heavy = MACHINE.blocking_lock();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-test");
    let output = Command::new("bash")
        .arg("tests/browser/ci.sh")
        .env("BOTMETRICS_BIN", env!("CARGO_BIN_EXE_botmetrics"))
        .env("BOTMETRICS_BROWSER_DIR", &dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run tests/browser/ci.sh");
    assert!(
        output.status.success(),
        "tests/browser/ci.sh failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for shot in ["page-desktop.png", "page-phone.png"] {
        let png = std::fs::read(dir.join("screenshots").join(shot)).expect("a screenshot");
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{shot}");
    }
}
