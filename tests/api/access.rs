//! Read access (DESIGN.md "Read access", issue 9): `--metrics-token` guards
//! every endpoint that shows counts, a bot's own ingest token reads that
//! bot's summary and history and nothing of another bot, health stays open.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Binary, SqliteFile, TestApp, assert_error, start_with};

async fn read(app: &TestApp, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = app.client.request(Method::GET, app.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let res = req.send().await.expect("request sent");
    let status = res.status().as_u16();
    let body = res.text().await.expect("body");
    // /metrics answers in text; everything else, errors included, in JSON.
    let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, json)
}

const HISTORY: &str = "/v1/history?metric=bot_messages_total";

#[tokio::test]
async fn the_metrics_token_guards_every_count_and_a_bot_token_reads_its_own_bot_only() {
    let (app, _db) = start_with("alpha=ta,beta=tb", |c| {
        c.metrics_token = Some("reader".into());
    })
    .await;
    app.post_ok("ta", &json!({"type": "message", "role": "user"}))
        .await;

    // No token, or a wrong one: 401 on every endpoint that shows counts.
    for path in ["/metrics", "/v1/summary", "/v1/summary?bot=alpha", HISTORY] {
        for token in [None, Some("wrong")] {
            let got = read(&app, path, token).await;
            assert_error(&got, 401, "unauthorized", None);
        }
    }
    // Health stays open.
    assert_eq!(read(&app, "/healthz", None).await.0, 200);
    assert_eq!(read(&app, "/readyz", None).await.0, 200);

    // --metrics-token reads everything.
    let (status, metrics) = read(&app, "/metrics", Some("reader")).await;
    assert_eq!(status, 200);
    let metrics = metrics.as_str().expect("exposition text");
    assert!(metrics.contains(r#"bot_messages_total{bot="alpha",role="user"} 1"#));
    let (status, all) = read(&app, "/v1/summary", Some("reader")).await;
    assert_eq!(status, 200);
    let bots: Vec<&str> = all["bots"]
        .as_array()
        .expect("every bot")
        .iter()
        .map(|b| b["bot"].as_str().unwrap())
        .collect();
    assert_eq!(bots, ["alpha", "beta"]);
    assert_eq!(read(&app, HISTORY, Some("reader")).await.0, 200);

    // A bot's token: its own summary (with or without ?bot=) and history.
    for path in ["/v1/summary", "/v1/summary?bot=alpha"] {
        let (status, own) = read(&app, path, Some("ta")).await;
        assert_eq!(status, 200, "{path}: {own}");
        assert_eq!(own["bot"], "alpha", "{path}");
        assert_eq!(own["messages"]["total"], 1, "{path}");
    }
    let (status, text) = read(&app, "/v1/summary?format=text", Some("tb")).await;
    assert_eq!(status, 200);
    let text = text.as_str().expect("chat text");
    assert!(text.contains("beta") && !text.contains("alpha"), "{text}");
    // History rows of both bots exist: a bot's token reads only its own.
    app.post_ok("tb", &json!({"type": "message", "role": "assistant"}))
        .await;
    assert!(
        app.state
            .persistence
            .write_history_once()
            .await
            .expect("history")
            > 0
    );
    let bots_in = |answer: &Value| -> std::collections::BTreeSet<String> {
        answer["series"]
            .as_array()
            .expect("series")
            .iter()
            .map(|s| s["bot"].as_str().expect("bot").to_owned())
            .collect()
    };
    let (status, all) = read(&app, HISTORY, Some("reader")).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        bots_in(&all),
        ["alpha", "beta"].map(String::from).into(),
        "the reader sees both bots' rows: {all}"
    );
    for (token, bot) in [("ta", "alpha"), ("tb", "beta")] {
        let (status, own) = read(&app, HISTORY, Some(token)).await;
        assert_eq!(status, 200, "{own}");
        assert_eq!(
            bots_in(&own),
            [bot.to_owned()].into(),
            "{token} reads {bot}'s series only: {own}"
        );
    }

    // Nothing of another bot, and not /metrics (which shows every bot).
    let got = read(&app, "/v1/summary?bot=beta", Some("ta")).await;
    assert!(assert_error(&got, 403, "forbidden", None).contains("`alpha`"));
    let got = read(&app, &format!("{HISTORY}&bot=alpha"), Some("tb")).await;
    assert_error(&got, 403, "forbidden", None);
    let got = read(&app, "/metrics", Some("ta")).await;
    assert_error(&got, 403, "forbidden", None);
    app.stop().await;
}

#[tokio::test]
async fn without_a_metrics_token_reads_are_open_and_a_bot_token_still_scopes() {
    let (app, _db) = start_with("alpha=ta,beta=tb", |_| {}).await;
    // Open, as before: Prometheus needs no token, and a stray header
    // does not break a scrape.
    assert_eq!(read(&app, "/metrics", None).await.0, 200);
    assert_eq!(read(&app, "/metrics", Some("anything")).await.0, 200);
    let (status, all) = read(&app, "/v1/summary", None).await;
    assert_eq!(status, 200);
    assert_eq!(all["bots"].as_array().map(Vec::len), Some(2));
    assert_eq!(read(&app, HISTORY, None).await.0, 200);
    // A bot's token still means "my bot"; an unknown token is refused
    // rather than silently read as no token.
    let (status, own) = read(&app, "/v1/summary", Some("tb")).await;
    assert_eq!((status, own["bot"].as_str()), (200, Some("beta")));
    assert_error(
        &read(&app, "/v1/summary?bot=alpha", Some("tb")).await,
        403,
        "forbidden",
        None,
    );
    assert_error(
        &read(&app, "/v1/summary", Some("nope")).await,
        401,
        "unauthorized",
        None,
    );
    app.stop().await;
}

#[tokio::test]
async fn start_warns_about_open_reads_beyond_loopback_and_about_missing_tokens() {
    let db = SqliteFile::new();
    let url = db.url();
    // Every interface, no --metrics-token, no --tokens: two warnings.
    let bin = Binary::start(&["--listen", "0.0.0.0:0", "--database-url", &url], &[]).await;
    let log = bin.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("no --metrics-token") && l.contains("/v1/summary")),
        "{log}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("no --tokens") && l.contains("401")),
        "{log}"
    );
    drop(bin);

    // Loopback with tokens: neither.
    let db = SqliteFile::new();
    let bin = Binary::serve(&db.url(), "a=t", &[]).await;
    let log = bin.log();
    assert!(!log.contains("WARN"), "{log}");
}
