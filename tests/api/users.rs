//! The user book against the real server: new and returning users,
//! retention cohorts and sessions over scripted days, erasure that survives
//! kill -9, and user ids that appear nowhere, not even as a hash anyone
//! without the installation secret could compute.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

const DAY: i64 = 86_400;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Noon UTC `ago` days before today, or for today a minute ago (never in
/// the future, never yesterday).
fn at(ago: i64) -> i64 {
    let now = now();
    let today = now - now.rem_euclid(DAY);
    if ago == 0 {
        today + (now - today).min(60)
    } else {
        today - ago * DAY + DAY / 2
    }
}

fn date(ago: i64) -> String {
    chrono::DateTime::from_timestamp(at(ago), 0)
        .unwrap()
        .date_naive()
        .to_string()
}

fn message(user: u64, ts: i64) -> Value {
    json!({"type": "message", "role": "user", "user_id": user, "ts": ts})
}

/// The scripted month: 10 users on day −31 (five back on −30, three on
/// −24, one on −1; one more on −20, one on −5 and today), four on day −2
/// (two back yesterday), three new today.
fn month() -> Vec<Value> {
    let mut events = Vec::new();
    for u in 1..=10 {
        events.push(message(u, at(31)));
    }
    for u in 1..=5 {
        events.push(message(u, at(30)));
    }
    for u in 1..=3 {
        events.push(message(u, at(24)));
    }
    events.push(message(4, at(20)));
    events.push(message(2, at(5)));
    for u in 101..=104 {
        events.push(message(u, at(2)));
    }
    events.push(message(1, at(1)));
    events.push(message(101, at(1)));
    events.push(message(102, at(1)));
    events.push(message(2, at(0)));
    events.push(message(101, at(0)));
    for u in 201..=203 {
        events.push(message(u, at(0)));
    }
    events.sort_by_key(|e| e["ts"].as_i64());
    events
}

fn cohort<'a>(answer: &'a Value, day: &str) -> &'a Value {
    answer["cohorts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["day"] == day)
        .unwrap_or_else(|| panic!("no cohort {day} in {answer}"))
}

async fn check_month(app: &TestApp) {
    botmetrics::tasks::scan_users_once(&app.state.metrics, &app.state.ingest, now()).await;
    let (status, r) = app
        .get_json(&format!("/v1/retention?from={}&to={}", date(31), date(0)))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["cohorts"].as_array().unwrap().len(), 32, "{r}");
    assert_eq!(
        cohort(&r, &date(31)),
        &json!({"day": date(31), "size": 10, "d1": 5, "d7": 3, "d30": 1,
                "rolling": {"d1": 5, "d7": 4, "d30": 2}}),
    );
    // Day +7 and +30 of the cohort of two days ago have not come: null.
    assert_eq!(
        cohort(&r, &date(2)),
        &json!({"day": date(2), "size": 4, "d1": 2, "d7": null, "d30": null,
                "rolling": {"d1": 2, "d7": null, "d30": null}}),
    );
    assert_eq!(
        cohort(&r, &date(0)),
        &json!({"day": date(0), "size": 3, "d1": null, "d7": null, "d30": null,
                "rolling": {"d1": null, "d7": null, "d30": null}}),
    );
    // A day without newcomers is a cohort of 0 whose days have come.
    assert_eq!(cohort(&r, &date(10))["size"], 0);
    assert_eq!(cohort(&r, &date(10))["d7"], 0);

    let (_, s) = app.get_json("/v1/summary").await;
    assert_eq!(s["users"]["new_today"], 3, "{s}");
    assert_eq!(s["users"]["returning_today"], 2, "{s}");
    assert_eq!(s["users"]["new_total"], 17, "{s}");
    assert_eq!(
        s["retention"],
        json!({"d1": 0.5, "d7": null, "d30": 0.1}),
        "{s}"
    );
    assert_eq!(
        app.sample("bot_users_new_total{bot=\"x\"}").await,
        Some(17.0)
    );
    assert_eq!(
        app.sample("bot_retention_ratio{bot=\"x\",day=\"1\"}").await,
        Some(0.5)
    );
    assert_eq!(
        app.sample("bot_retention_ratio{bot=\"x\",day=\"30\"}")
            .await,
        Some(0.1)
    );
    assert_eq!(
        app.sample("bot_retention_ratio{bot=\"x\",day=\"7\"}").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn new_returning_and_retention_over_a_scripted_month_are_exact_and_survive_a_restart() {
    let db = SqliteFile::new();
    let app = spawn_app(config("x=tx", &db.url())).await;
    app.post_ok("tx", &Value::Array(month())).await;
    check_month(&app).await;
    app.stop().await;

    // The book comes back whole from the store (the stop's final flush),
    // and the same secret hashes the same user alike: user 1 is not new.
    let app = spawn_app(config("x=tx", &db.url())).await;
    check_month(&app).await;
    app.post_ok("tx", &json!([message(1, at(0))])).await;
    let (_, s) = app.get_json("/v1/summary").await;
    assert_eq!(s["users"]["new_total"], 17, "{s}");
    assert_eq!(s["users"]["returning_today"], 3, "{s}");
    app.stop().await;
}

#[tokio::test]
async fn a_session_ends_one_second_past_the_gap_and_not_at_it() {
    let (app, _db) = start_with("x=tx", |c| c.session_gap = Duration::from_secs(60)).await;
    let t0 = now() - 1_000;
    // 0 and 60: one session (a gap of exactly --session-gap); 121: a gap of
    // 61 starts another.
    app.post_ok(
        "tx",
        &json!([message(1, t0), message(1, t0 + 60), message(1, t0 + 121)]),
    )
    .await;
    let sample = |s: &'static str| {
        let app = &app;
        async move { app.sample(s).await }
    };
    assert_eq!(sample("bot_sessions_total{bot=\"x\"}").await, Some(1.0));
    assert_eq!(
        sample("bot_session_duration_seconds_sum{bot=\"x\"}").await,
        Some(60.0)
    );
    assert_eq!(
        sample("bot_session_messages_sum{bot=\"x\"}").await,
        Some(2.0)
    );
    // 60 s after the last event the second is still open; at 61 s the
    // scan ends it.
    let ms = &app.state.metrics;
    botmetrics::tasks::scan_users_once(ms, &app.state.ingest, t0 + 121 + 60).await;
    assert_eq!(sample("bot_sessions_total{bot=\"x\"}").await, Some(1.0));
    botmetrics::tasks::scan_users_once(ms, &app.state.ingest, t0 + 121 + 61).await;
    assert_eq!(sample("bot_sessions_total{bot=\"x\"}").await, Some(2.0));
    assert_eq!(
        sample("bot_session_duration_seconds_count{bot=\"x\"}").await,
        Some(2.0)
    );
    assert_eq!(
        sample("bot_session_messages_sum{bot=\"x\"}").await,
        Some(3.0)
    );
    // Counted once: a later scan finds nothing more to end.
    botmetrics::tasks::scan_users_once(ms, &app.state.ingest, now()).await;
    assert_eq!(sample("bot_sessions_total{bot=\"x\"}").await, Some(2.0));
    let (_, s) = app.get_json("/v1/summary").await;
    if (t0 + 121) / DAY == now() / DAY {
        assert_eq!(s["sessions"]["total"], 2, "{s}");
        assert_eq!(s["sessions"]["messages_per_session_today"], 1.5, "{s}");
    }
    app.stop().await;
}

async fn forget(api: &Api, token: &str, user: &str) -> (u16, Value) {
    let res = api
        .client
        .delete(api.url(&format!("/v1/users/{user}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("request sent");
    let status = res.status().as_u16();
    (status, res.json().await.expect("a JSON answer"))
}

#[tokio::test]
async fn an_erasure_is_journaled_survives_kill_9_and_leaves_no_row() {
    let db = SqliteFile::new();
    let url = db.url();
    // Flushes every second: alice reaches the store first, then is erased.
    let mut bin = Binary::serve(&url, "x=tx", &["--flush-interval", "1s"]).await;
    bin.post_ok(
        "tx",
        &json!([
            {"type": "message", "role": "user", "user_id": "alice", "ts": now()},
            {"type": "message", "role": "user", "user_id": "bob", "ts": now()}
        ]),
    )
    .await;
    let raw = Raw::connect(&url).await;
    eventually(Duration::from_secs(20), || async {
        raw.int("select count(*) from user_book").await == 2
    })
    .await;
    // Bad requests change nothing.
    assert_eq!(forget(&bin, "nope", "alice").await.0, 401);
    let long = "a".repeat(257);
    assert_eq!(forget(&bin, "tx", &long).await.0, 422);
    let (status, body) = bin
        .request_json(reqwest::Method::DELETE, "/v1/users/alice")
        .await;
    assert_eq!(status, 401, "no token: {body}");
    assert_eq!(
        forget(&bin, "tx", "alice").await,
        (200, json!({"forgotten": true}))
    );
    assert_eq!(
        forget(&bin, "tx", "alice").await,
        (200, json!({"forgotten": false}))
    );
    // Killed before any flush could delete the row: the journal has it.
    bin.kill_9().await;
    assert_eq!(raw.int("select count(*) from user_book").await, 2);

    let bin = Binary::serve(&url, "x=tx", &["--flush-interval", "1s"]).await;
    eventually(Duration::from_secs(20), || async {
        raw.int("select count(*) from user_book").await == 1
    })
    .await;
    assert_eq!(
        forget(&bin, "tx", "alice").await,
        (200, json!({"forgotten": false}))
    );
    assert_eq!(
        forget(&bin, "tx", "bob").await,
        (200, json!({"forgotten": true}))
    );
    // Back after being forgotten, alice is new again, as documented.
    bin.post_ok(
        "tx",
        &json!([{"type": "message", "role": "user", "user_id": "alice", "ts": now()}]),
    )
    .await;
    assert_eq!(
        bin.sample("bot_users_new_total{bot=\"x\"}").await,
        Some(3.0)
    );
    raw.close().await;
}

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn no_user_id_and_no_hash_under_the_old_fixed_key_is_stored_logged_or_answered() {
    let db = SqliteFile::new();
    let url = db.url();
    let ids = [
        botmetrics::event::UserId::Str("user-7f3a9c-private".into()),
        botmetrics::event::UserId::Int(987_654_321_012),
    ];
    let mut bin = Binary::serve(&url, "x=tx", &["--flush-interval", "1s"]).await;
    bin.post_ok(
        "tx",
        &json!([
            {"type": "message", "role": "user", "user_id": "user-7f3a9c-private", "ts": now()},
            {"type": "message", "role": "user", "user_id": 987_654_321_012u64, "ts": now()}
        ]),
    )
    .await;
    let raw = Raw::connect(&url).await;
    eventually(Duration::from_secs(20), || async {
        raw.int("select count(*) from user_book").await == 2
    })
    .await;
    let answers = [
        bin.get_text("/v1/summary").await.2,
        bin.get_text("/v1/summary?format=text").await.2,
        bin.metrics_text().await,
        bin.get_text("/v1/retention").await.2,
    ];
    bin.signal("TERM").await;
    let legacy = botmetrics::event::UserKey::legacy();
    let dir = db.path().parent().unwrap().to_path_buf();
    let files = files_under(&dir);
    assert!(
        files
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("journal")),
        "the journal is under {dir:?}"
    );
    let log = bin.log();
    for id in &ids {
        let hash = legacy.hash(id).0;
        let text = match id {
            botmetrics::event::UserId::Str(s) => s.to_string(),
            botmetrics::event::UserId::Int(n) => n.to_string(),
        };
        let needles: [Vec<u8>; 4] = [
            text.clone().into_bytes(),
            hash.to_le_bytes().to_vec(),
            hash.to_be_bytes().to_vec(),
            (hash as i64).to_string().into_bytes(),
        ];
        for (path, bytes) in &files {
            for needle in &needles {
                assert!(
                    !contains(bytes, needle),
                    "{path:?} holds {needle:?} of {text}"
                );
            }
        }
        for answer in answers.iter().chain([&log]) {
            for needle in &needles {
                assert!(
                    !contains(answer.as_bytes(), needle),
                    "an answer or the log holds {text}"
                );
            }
        }
        let stored = raw
            .int(&format!(
                "select count(*) from user_book where user_key = {}",
                hash as i64
            ))
            .await;
        assert_eq!(stored, 0, "the store holds {text}'s hash under the old key");
    }
    // What is stored is the secret's hash: the secret itself is in the
    // store (and the data directory), never in an answer or the log.
    let secret = raw.texts("select hex(value) from installation").await;
    assert_eq!(secret.len(), 1);
    for answer in answers.iter().chain([&log]) {
        assert!(!answer.to_uppercase().contains(&secret[0]));
    }
    raw.close().await;
}

#[tokio::test]
async fn sketches_stored_before_the_secret_stay_readable_on_upgrade() {
    let db = SqliteFile::new();
    let url = db.url();
    let mut bin = Binary::serve(&url, "x=tx", &[]).await;
    let batch: Vec<Value> = (1..=50).map(|u| message(u, now())).collect();
    bin.post_ok("tx", &Value::Array(batch.clone())).await;
    let before = bin
        .sample("bot_active_users{bot=\"x\",window=\"1d\"}")
        .await;
    assert_eq!(before, Some(50.0));
    bin.signal("TERM").await;
    // A store from before the secret: its sketches are there, its secret
    // is not (nor the data directory's copy).
    let raw = Raw::connect(&url).await;
    raw.execute("drop table installation").await;
    raw.close().await;
    let dir = db.path().parent().unwrap().to_path_buf();
    for (path, _) in files_under(&dir) {
        if path.ends_with("installation.secret") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let bin = Binary::serve(&url, "x=tx", &[]).await;
    assert_eq!(
        bin.sample("bot_active_users{bot=\"x\",window=\"1d\"}")
            .await,
        before,
        "old sketches are read as they were"
    );
    // The transition, as documented: the same users under the new secret
    // count again in the windows that still hold the old sketches.
    bin.post_ok("tx", &Value::Array(batch)).await;
    let after = bin
        .sample("bot_active_users{bot=\"x\",window=\"1d\"}")
        .await
        .unwrap();
    assert!((99.0..=101.0).contains(&after), "{after}");
}
