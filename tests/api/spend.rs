//! Spend and answer quality: exact money from the price table and from
//! reported costs, unpriced models never free, feedback, the summary's new
//! figures, and bad values refused with nothing counted.

use serde_json::{Value, json};

use crate::helpers::{Binary, SqliteFile, assert_error, config, spawn_app, start};

/// A mixed batch whose cost is computed by hand below, in micro-units:
///
/// * gpt-4o-mini (table: 0.15 / 0.075 cached / 0.60 per million):
///   600 plain × 150 + 400 cached × 75 + 200 out × 600 nano = 240,000
///   nano = 240 µ;
/// * gpt-4o (2.50 / 10.00): 2,000 × 2,500 + 500 × 10,000 = 10,000,000 nano
///   = 10,000 µ;
/// * claude-sonnet-4 (3.00 / 0.30 cached / 3.75 write / 15.00): 1,000 plain
///   × 3,000 + 1,000 cached × 300 + 1,000 written × 3,750 + 100 out ×
///   15,000 = 8,550,000 nano = 8,550 µ;
/// * gpt-4.1-nano (0.10 / 0.40): 7 × 100 + 3 × 400 = 1,900 nano, rounded
///   once to 2 µ;
/// * gpt-4o with `cost: 0.0125` reported: 12,500 µ, its table price unused;
/// * "my-finetune", unknown to the table: 150 tokens unpriced, no cost;
/// * a response with no tokens: nothing to price.
fn mixed_batch() -> Value {
    json!([
        {"type": "response", "user_id": 1, "status": "success", "duration_ms": 900,
         "model": "gpt-4o-mini", "tokens": {"prompt": 1000, "completion": 200, "cached": 400}},
        {"type": "response", "user_id": 2, "status": "success", "duration_ms": 2400,
         "model": "gpt-4o", "tokens": {"prompt": 2000, "completion": 500}, "ttft_ms": 300},
        {"type": "response", "user_id": 3, "status": "success", "duration_ms": 3100,
         "model": "claude-sonnet-4", "provider": "anthropic",
         "tokens": {"prompt": 3000, "completion": 100, "cached": 1000, "cache_write": 1000}},
        {"type": "response", "user_id": 1, "status": "success", "duration_ms": 120,
         "model": "gpt-4.1-nano", "tokens": {"prompt": 7, "completion": 3}, "ttft_ms": 80},
        {"type": "response", "user_id": 2, "status": "success", "duration_ms": 1500,
         "model": "gpt-4o", "tokens": {"prompt": 100, "completion": 10}, "cost": 0.0125},
        {"type": "response", "user_id": 3, "status": "error", "duration_ms": 700,
         "model": "my-finetune", "tokens": {"prompt": 100, "completion": 50}},
        {"type": "response", "user_id": 4, "status": "timeout", "duration_ms": 30000},
        {"type": "feedback", "user_id": 1, "score": 1},
        {"type": "feedback", "user_id": 2, "score": -1, "reason": "wrong_answer"},
        {"type": "feedback", "user_id": 3, "score": 5, "scale": 5},
        {"type": "feedback", "user_id": 4, "score": 2, "scale": 5}
    ])
}

/// Every figure of [`mixed_batch`], as exposed and as summarised.
async fn assert_mixed_batch(api: &crate::helpers::Api, context: &str) {
    let text = api.metrics_text().await;
    let series = |s: &str| crate::helpers::sample(&text, s);
    let cost = |model: &str, source: &str| {
        series(&format!(
            r#"bot_llm_cost_total{{bot="x",model="{model}",source="{source}"}}"#
        ))
    };
    assert_eq!(cost("gpt-4o-mini", "table"), Some(0.00024), "{context}");
    assert_eq!(cost("gpt-4o", "table"), Some(0.01), "{context}");
    assert_eq!(cost("gpt-4o", "reported"), Some(0.0125), "{context}");
    assert_eq!(cost("claude-sonnet-4", "table"), Some(0.00855), "{context}");
    assert_eq!(cost("gpt-4.1-nano", "table"), Some(0.000002), "{context}");
    assert_eq!(
        cost("my-finetune", "table"),
        None,
        "{context}: an unknown model is never priced at 0"
    );
    assert_eq!(
        series(r#"bot_llm_unpriced_tokens_total{bot="x",model="my-finetune"}"#),
        Some(150.0),
        "{context}"
    );
    for (kind, want) in [
        ("prompt", Some(3000.0)),
        ("completion", Some(100.0)),
        ("cached", Some(1000.0)),
        ("cache_write", Some(1000.0)),
        // A kind a model never had appears with its first count.
        ("reasoning", None),
    ] {
        assert_eq!(
            series(&format!(
                r#"bot_llm_tokens_total{{bot="x",model="claude-sonnet-4",kind="{kind}"}}"#
            )),
            want,
            "{context}: {kind}"
        );
    }
    assert_eq!(
        series(r#"bot_llm_ttft_seconds_count{bot="x"}"#),
        Some(2.0),
        "{context}"
    );
    assert_eq!(
        series(r#"bot_llm_ttft_seconds_bucket{bot="x",le="0.1"}"#),
        Some(1.0),
        "{context}: 80 ms"
    );
    for (score, want) in [("+1", 1.0), ("-1", 1.0), ("5", 1.0), ("2", 1.0), ("1", 0.0)] {
        assert_eq!(
            series(&format!(r#"bot_feedback_total{{bot="x",score="{score}"}}"#)),
            Some(want),
            "{context}: score {score}"
        );
    }

    let (status, s) = api.get_json("/v1/summary?bot=x").await;
    assert_eq!(status, 200, "{s}");
    // 240 + 10,000 + 8,550 + 2 + 12,500 = 31,292 µ.
    assert_eq!(s["spend"]["currency"], "USD", "{context}: {s}");
    assert_eq!(s["spend"]["today"], 0.031292, "{context}: {s}");
    assert_eq!(s["spend"]["month"], 0.031292, "{context}: {s}");
    assert_eq!(s["spend"]["total"], 0.031292, "{context}: {s}");
    assert_eq!(s["spend"]["complete"], false, "{context}: {s}");
    assert_eq!(s["spend"]["unpriced_tokens"], 150, "{context}: {s}");
    assert_eq!(
        s["spend"]["by_model"],
        json!([
            {"model": "gpt-4o", "total": 0.0225},
            {"model": "claude-sonnet-4", "total": 0.00855},
            {"model": "gpt-4o-mini", "total": 0.00024},
            {"model": "other", "total": 0.000002}
        ]),
        "{context}: the three largest, then the rest"
    );
    // 4 active users today.
    assert_eq!(
        s["spend"]["per_active_user_today"], 0.007823,
        "{context}: {s}"
    );
    assert_eq!(
        s["feedback"],
        json!({"rated_today": 4, "satisfaction_today": 0.5,
               "rated_7d": 4, "satisfaction_7d": 0.5,
               "rated_total": 4, "satisfaction_total": 0.5}),
        "{context}: +1 and 5 liked, -1 and 2 not"
    );
}

#[tokio::test]
async fn spend_is_exact_over_a_mixed_batch_and_survives_a_restart() {
    let db = SqliteFile::new();
    let app = spawn_app(config("x=tx", &db.url())).await;
    assert_eq!(
        app.post_events("tx", &mixed_batch()).await,
        (202, json!({"accepted": 11, "duplicates": 0}))
    );
    assert_mixed_batch(&app, "as counted").await;
    // SIGTERM's path: the final flush stores it, the next start restores it.
    app.stop().await;
    let app = spawn_app(config("x=tx", &db.url())).await;
    assert_mixed_batch(&app, "restored from the store").await;
    app.stop().await;
}

/// Unix seconds of noon (UTC, the default time zone) `days` before today,
/// or now for 0.
fn days_ago(days: i64) -> i64 {
    let now = chrono::Utc::now();
    if days == 0 {
        return now.timestamp();
    }
    let noon = now.date_naive().and_hms_opt(12, 0, 0).expect("noon exists");
    (noon - chrono::Duration::days(days)).and_utc().timestamp()
}

#[tokio::test]
async fn this_months_spend_and_seven_days_of_ratings_count_their_own_days_across_a_restart() {
    use chrono::Datelike;
    let db = SqliteFile::new();
    let spent = |days: i64, cost: f64| {
        json!({"type": "response", "status": "success", "duration_ms": 900, "model": "gpt-4o",
               "tokens": {"prompt": 10, "completion": 5}, "cost": cost, "ts": days_ago(days)})
    };
    let rated =
        |days: i64, score: i64| json!({"type": "feedback", "score": score, "ts": days_ago(days)});
    // Costs in whole micro-units, so the sums below are exact.
    let batch = json!([
        spent(0, 0.25),
        spent(2, 0.125),
        spent(40, 1.5),
        rated(0, 1),
        rated(6, -1),
        rated(6, 1),
        rated(7, 1),
        rated(30, -1),
    ]);
    // This month: today's cost, and two days ago's if it fell in this
    // month (not on the 1st or 2nd); 40 days ago never does.
    let today = chrono::Utc::now().date_naive();
    let two_days_ago = today - chrono::Duration::days(2);
    let month = if two_days_ago.month() == today.month() {
        0.375
    } else {
        0.25
    };
    let check = |s: &Value, context: &str| {
        assert_eq!(s["spend"]["today"], 0.25, "{context}: {s}");
        assert_eq!(s["spend"]["month"], month, "{context}: {s}");
        assert_eq!(s["spend"]["total"], 1.875, "{context}: {s}");
        assert_eq!(s["feedback"]["rated_today"], 1, "{context}: {s}");
        assert_eq!(s["feedback"]["satisfaction_today"], 1.0, "{context}: {s}");
        // Today and six days ago: three ratings, two liked; 7 and 30 days
        // ago are out of the window.
        assert_eq!(s["feedback"]["rated_7d"], 3, "{context}: {s}");
        assert_eq!(
            s["feedback"]["satisfaction_7d"],
            2.0 / 3.0,
            "{context}: {s}"
        );
        assert_eq!(s["feedback"]["rated_total"], 5, "{context}: {s}");
    };
    let app = spawn_app(config("x=tx", &db.url())).await;
    app.post_ok("tx", &batch).await;
    let (status, s) = app.get_json("/v1/summary?bot=x").await;
    assert_eq!(status, 200);
    check(&s, "as counted");
    app.stop().await;
    // Restored from the store: each count comes back only while current.
    let app = spawn_app(config("x=tx", &db.url())).await;
    let (_, s) = app.get_json("/v1/summary?bot=x").await;
    check(&s, "restored from the store");
    app.stop().await;
}

#[tokio::test]
async fn bad_spend_and_feedback_values_are_422_and_change_nothing() {
    let (app, _db) = start("x=tx").await;
    let before = app.metrics_text().await;
    let response = |extra: Value| {
        let mut e = json!({"type": "response", "status": "success", "duration_ms": 1000,
                           "model": "gpt-4o", "tokens": {"prompt": 10, "completion": 5}});
        for (k, v) in extra.as_object().expect("object") {
            e[k] = v.clone();
        }
        e
    };
    let bad = [
        response(json!({"cost": -0.01})),
        response(json!({"cost": 1000.5})),
        response(json!({"cost": "0.01"})),
        response(json!({"ttft_ms": -1})),
        response(json!({"ttft_ms": 1500})),
        response(json!({"provider": "has space"})),
        response(json!({"tokens": {"prompt": 10, "cached": 11}})),
        response(json!({"tokens": {"prompt": 10, "cached": 6, "cache_write": 5}})),
        response(json!({"tokens": {"reasoning": 1_000_000_001u64}})),
        response(json!({"tokens": {"thoughts": 3}})),
        json!({"type": "feedback", "score": 0}),
        json!({"type": "feedback", "score": 2}),
        json!({"type": "feedback", "score": 6, "scale": 5}),
        json!({"type": "feedback", "score": 3, "scale": 10}),
        json!({"type": "feedback", "score": 1.5}),
        json!({"type": "feedback"}),
        json!({"type": "feedback", "score": 1, "reason": "x".repeat(65)}),
        json!({"type": "feedback", "score": 1, "model": "gpt-4o"}),
    ];
    for (i, event) in bad.iter().enumerate() {
        // The good event first: a whole batch is refused for one bad event.
        let batch = json!([response(json!({})), event]);
        let answer = app.post_events("tx", &batch).await;
        let message = assert_error(&answer, 422, "invalid", Some(1));
        assert!(!message.is_empty(), "case {i}: {event} says why");
    }
    let after = app.metrics_text().await;
    let bot_lines = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("bot_"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        bot_lines(&before),
        bot_lines(&after),
        "nothing of a refused batch is counted"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_summary_text_shows_spend_and_ratings() {
    let (app, _db) = start("x=tx").await;
    app.post_ok("tx", &mixed_batch()).await;
    let (status, _, text) = app.get_text("/v1/summary?bot=x&format=text").await;
    assert_eq!(status, 200);
    let lines: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(
        lines,
        [
            "Today (since midnight, UTC): 0 messages (users' and the bot's), 0 registrations, 0 daily-limit hits",
            "Active users: 4 (24\u{A0}h), 4 (7\u{A0}d), 4 (30\u{A0}d)",
            "Users today: 4 new, 0 returning; retention D1 –, D7 –, D30 –",
            "All time: 0 messages, 0 registered users, 0 errors reported",
            "Responses, all time: 7, 71.4\u{202F}% ok (2 failed, limited or timed out), median 1.5\u{A0}s, p95 26.5\u{A0}s",
            "Spend today: 0.0313\u{A0}USD (0.0078 per active user); this month 0.0313; all time 0.0313 (gpt-4o 0.0225, claude-sonnet-4 0.0086, gpt-4o-mini 0.0002, other <0.0001); incomplete: 150 tokens of unpriced models",
            "Answers today: 4 rated, 50.0\u{202F}% liked; 7 days 4 rated, 50.0\u{202F}% liked; all time 4 rated, 50.0\u{202F}% liked",
        ],
        "{text}"
    );
    assert!(
        text.len() < 4096,
        "one Telegram message holds 4,096 characters"
    );
    app.stop().await;
}

/// A price table with one model at `input` and `output` per million.
fn table(input: &str, output: &str) -> String {
    format!(
        "currency = \"USD\"\ntaken = \"2026-12-01\"\n[models.m]\ninput = {input}\noutput = {output}\n"
    )
}

#[tokio::test]
async fn sighup_with_a_changed_table_changes_future_costs_only_even_across_kill_9() {
    let db = SqliteFile::new();
    let url = db.url();
    let dir = tempfile_dir(&url);
    let prices = dir.join("prices.toml");
    std::fs::write(&prices, table("1", "1")).expect("write prices");
    let prices_arg = prices.display().to_string();
    // Hourly flushes: after kill -9 only the journal has the events.
    let flags = ["--prices", &prices_arg, "--flush-interval", "1h"];
    let mut bin = Binary::serve(&url, "x=tx", &flags).await;
    // 1,000 prompt tokens at 1.00 per million: 1,000 µ.
    let call = json!({"type": "response", "status": "success", "duration_ms": 500,
                      "model": "m", "tokens": {"prompt": 1000}});
    bin.post_ok("tx", &call).await;

    std::fs::write(&prices, table("2", "1")).expect("rewrite prices");
    bin.send_signal("HUP").await;
    crate::helpers::eventually(std::time::Duration::from_secs(30), || {
        let log = bin.log();
        async move { log.contains("reload requested (SIGHUP): 1 models from") }
    })
    .await;
    // The same call now costs 2,000 µ; the first keeps its 1,000.
    bin.post_ok("tx", &call).await;
    let cost = r#"bot_llm_cost_total{bot="x",model="m",source="table"}"#;
    assert_eq!(bin.sample(cost).await, Some(0.003));

    // A broken table is refused and the one in force stays.
    std::fs::write(&prices, "models = 3").expect("break prices");
    bin.send_signal("HUP").await;
    crate::helpers::eventually(std::time::Duration::from_secs(30), || {
        let log = bin.log();
        async move { log.contains("failed, keeping what was loaded") }
    })
    .await;
    bin.post_ok("tx", &call).await;
    assert_eq!(bin.sample(cost).await, Some(0.005));

    // kill -9, then a start with yet another table: the journal replays
    // each call at the price it was counted with.
    bin.kill_9().await;
    std::fs::write(&prices, table("7", "7")).expect("rewrite prices");
    let bin = Binary::serve(&url, "x=tx", &flags).await;
    assert_eq!(
        bin.sample(cost).await,
        Some(0.005),
        "replayed at their own prices:\n{}",
        bin.log()
    );
    let (_, s) = bin.get_json("/v1/summary?bot=x").await;
    assert_eq!(s["spend"]["today"], 0.005, "{s}");
}

/// A directory beside the SQLite file of `url`, removed with it.
fn tempfile_dir(url: &str) -> std::path::PathBuf {
    let file = url.trim_start_matches("sqlite://");
    let dir = std::path::PathBuf::from(format!("{file}-prices"));
    std::fs::create_dir_all(&dir).expect("prices dir");
    dir
}
