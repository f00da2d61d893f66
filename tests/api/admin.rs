//! The admin API (`--admin-token`, `/v1/admin/bots`, issue 21 item 1):
//! bots and tokens created, rotated and revoked at runtime on the real
//! binary, exact counts, bad input that changes nothing, a restart that
//! keeps the registry, and a second process on the same store that sees a
//! revocation within one `--sync-interval`; a wiped bot gone from memory,
//! the store and every answer, and still gone after kill -9, with the
//! crash between the journal and the store too.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Binary, SqliteFile, eventually, sample};

const ADMIN: &str = "adm1n-secret";

/// "Within one `--sync-interval`" (1 s in these tests) as a test can see
/// it: the interval, the poll's own 50 ms and a request's time, and a
/// second for a machine so loaded (CI runs every test at once on 2 cores)
/// that the refresh task itself starts late (1.5 s failed there once).
/// A replica that never reads the registry again fails it all the same.
const WITHIN_ONE_INTERVAL: Duration = Duration::from_millis(2500);

/// One admin call: status and JSON answer.
async fn call(
    bin: &Binary,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = bin.client.request(method, bin.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let res = req.send().await.expect("request sent");
    let status = res.status().as_u16();
    (status, res.json().await.expect("a JSON answer"))
}

async fn admin(bin: &Binary, method: Method, path: &str, body: Option<&str>) -> (u16, Value) {
    call(bin, method, path, Some(ADMIN), body).await
}

async fn list(bin: &Binary) -> Value {
    let (status, answer) = admin(bin, Method::GET, "/v1/admin/bots", None).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

fn prefix_of(token: &str) -> String {
    botmetrics::registry::prefix_of(token)
}

fn names(listing: &Value) -> Vec<String> {
    listing["bots"]
        .as_array()
        .expect("bots")
        .iter()
        .map(|b| b["bot"].as_str().expect("name").to_owned())
        .collect()
}

async fn total_messages(bin: &Binary, bot: &str) -> u64 {
    let (status, summary) = bin.get_json(&format!("/v1/summary?bot={bot}")).await;
    assert_eq!(status, 200, "{summary}");
    summary["messages"]["total"].as_u64().expect("a total")
}

fn message(i: u64) -> Value {
    json!({"type": "message", "role": "user", "user_id": i})
}

#[tokio::test]
async fn bots_are_created_rotated_and_revoked_at_runtime_and_bad_input_changes_nothing() {
    let db = SqliteFile::new();
    let url = db.url();
    let flags = ["--admin-token", ADMIN];
    let mut bin = Binary::serve(&url, "seeded=s33ded", &flags).await;

    // Who may call: the admin token only.
    for token in [None, Some("wrong"), Some("s33ded")] {
        let (status, answer) = call(&bin, Method::GET, "/v1/admin/bots", token, None).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (401, Some("unauthorized")),
            "{token:?}"
        );
    }
    let before = list(&bin).await;
    assert_eq!(names(&before), ["seeded"]);
    assert_eq!(before["bots"][0]["tokens"], json!([prefix_of("s33ded")]));

    // Create: the token is answered once, and posts at once.
    let (status, created) = admin(
        &bin,
        Method::POST,
        "/v1/admin/bots",
        Some(r#"{"bot":"fresh"}"#),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let first = created["token"].as_str().expect("token").to_owned();
    assert!(first.starts_with("bm_") && first.len() == 51, "{first}");
    assert_eq!(created["prefix"].as_str(), Some(prefix_of(&first).as_str()));
    bin.post_ok(&first, &json!([message(1), message(2)])).await;
    let listing = list(&bin).await;
    assert_eq!(names(&listing), ["fresh", "seeded"]);
    assert!(
        !listing.to_string().contains(&first),
        "the listing never shows a token"
    );

    // Bad input: the documented 4xx, and nothing changes.
    let bad: [(Method, &str, Option<&str>, u16, &str); 10] = [
        (
            Method::POST,
            "/v1/admin/bots",
            Some(r#"{"bot":"fresh"}"#),
            409,
            "conflict",
        ),
        (
            Method::POST,
            "/v1/admin/bots",
            Some(r#"{"bot":"seeded"}"#),
            409,
            "conflict",
        ),
        (
            Method::POST,
            "/v1/admin/bots",
            Some(r#"{"bot":"no spaces"}"#),
            422,
            "invalid",
        ),
        (
            Method::POST,
            "/v1/admin/bots",
            Some(r#"{"name":"x"}"#),
            422,
            "invalid",
        ),
        (
            Method::POST,
            "/v1/admin/bots",
            Some(r#"{"bot":"#),
            400,
            "malformed",
        ),
        (
            Method::POST,
            "/v1/admin/bots/ghost/tokens",
            None,
            404,
            "not_found",
        ),
        (
            Method::DELETE,
            "/v1/admin/bots/ghost",
            None,
            404,
            "not_found",
        ),
        (
            Method::DELETE,
            "/v1/admin/bots/fresh/tokens/00000000",
            None,
            404,
            "not_found",
        ),
        // A wipe of a bot nobody ever had, and a query that is not a flag.
        (
            Method::DELETE,
            "/v1/admin/bots/ghost?wipe=true",
            None,
            404,
            "not_found",
        ),
        (
            Method::DELETE,
            "/v1/admin/bots/fresh?wipe=maybe",
            None,
            400,
            "bad_request",
        ),
    ];
    let settled = list(&bin).await;
    for (method, path, body, status, code) in bad {
        let (got, answer) = admin(&bin, method.clone(), path, body).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{method} {path} {body:?}: {answer}"
        );
        assert_eq!(
            list(&bin).await,
            settled,
            "{method} {path} changed the registry"
        );
    }
    bin.post_ok(&first, &json!(message(3))).await;

    // Rotation: a second token, both valid, then the first revoked; every
    // event posted with a valid token is counted, none is lost.
    let (status, added) = admin(&bin, Method::POST, "/v1/admin/bots/fresh/tokens", None).await;
    assert_eq!(status, 201, "{added}");
    let second = added["token"].as_str().expect("token").to_owned();
    let poster = |token: String, from: u64| {
        let client = bin.client.clone();
        let url = bin.url("/v1/events");
        tokio::spawn(async move {
            let mut accepted = 0u64;
            for i in from..from + 40 {
                let res = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&message(i))
                    .send()
                    .await
                    .expect("sent");
                match res.status().as_u16() {
                    202 => accepted += 1,
                    401 => break,
                    other => panic!("{other}"),
                }
            }
            accepted
        })
    };
    let (old, new) = (poster(first.clone(), 100), poster(second.clone(), 1000));
    let path = format!("/v1/admin/bots/fresh/tokens/{}", prefix_of(&first));
    let (status, revoked) = admin(&bin, Method::DELETE, &path, None).await;
    assert_eq!(
        (status, revoked),
        (200, json!({"bot": "fresh", "revoked": prefix_of(&first)}))
    );
    let (old, new) = (old.await.expect("poster"), new.await.expect("poster"));
    assert_eq!(new, 40, "the new token never failed");
    // Refused at once on this replica.
    assert_eq!(bin.post_events(&first, &message(9)).await.0, 401);
    assert_eq!(total_messages(&bin, "fresh").await, 3 + old + new);
    assert_eq!(
        list(&bin).await["bots"][0]["tokens"],
        json!([prefix_of(&second)])
    );

    // A bot created after this one, kept across a restart.
    let (_, kept) = admin(
        &bin,
        Method::POST,
        "/v1/admin/bots",
        Some(r#"{"bot":"kept"}"#),
    )
    .await;
    let kept = kept["token"].as_str().expect("token").to_owned();
    bin.post_ok(
        &kept,
        &json!([message(1), message(2), message(3), message(4)]),
    )
    .await;

    // Revoking a bot: its last token is refused at once; its data stays.
    let (status, answer) = admin(&bin, Method::DELETE, "/v1/admin/bots/fresh", None).await;
    assert_eq!(
        (status, &answer["revoked"]),
        (200, &json!(true)),
        "{answer}"
    );
    assert_eq!(bin.post_events(&second, &message(9)).await.0, 401);
    assert_eq!(names(&list(&bin).await), ["kept", "seeded"]);

    let page = bin.metrics_text().await;
    let calls = |action: &str, outcome: &str| {
        sample(
            &page,
            &format!(r#"botmetrics_admin_requests_total{{action="{action}",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(calls("create_bot", "ok"), Some(2.0), "{page}");
    assert_eq!(calls("create_bot", "conflict"), Some(2.0));
    assert_eq!(calls("revoke_bot", "ok"), Some(1.0));
    assert_eq!(calls("list", "unauthorized"), Some(3.0));

    // After a restart: the registry and the runtime bot's totals are back.
    assert_eq!(bin.signal("TERM").await.code(), Some(0), "{}", bin.log());
    let log = bin.log();
    for secret in [ADMIN, &first, &second, &kept] {
        assert!(!log.contains(secret), "a token in the log:\n{log}");
    }
    assert!(
        log.contains("admin call done") && log.contains(&format!("admin:{}", prefix_of(ADMIN))),
        "{log}"
    );
    let bin = Binary::serve(&url, "seeded=s33ded", &flags).await;
    assert_eq!(names(&list(&bin).await), ["kept", "seeded"]);
    assert_eq!(total_messages(&bin, "kept").await, 4);
    bin.post_ok(&kept, &json!(message(5))).await;
    for gone in [&first, &second] {
        assert_eq!(bin.post_events(gone, &message(9)).await.0, 401);
    }
    bin.post_ok("s33ded", &json!(message(1))).await;
}

#[tokio::test]
async fn without_admin_token_the_admin_api_is_off_and_a_disagreeing_tokens_flag_stops_the_start() {
    let db = SqliteFile::new();
    let url = db.url();
    let mut bin = Binary::serve(&url, "a=sh4red", &[]).await;
    let (status, answer) = call(&bin, Method::GET, "/v1/admin/bots", Some("anything"), None).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("not_found")),
        "{answer}"
    );
    assert_eq!(bin.signal("TERM").await.code(), Some(0));
    // The same token now given to another bot: the store says `a`.
    let line = Binary::refused_in_one_line(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--tokens",
            "b=sh4red",
        ],
        &[],
        &[],
    )
    .await;
    assert!(
        line.contains("--tokens") && line.contains("`a`") && line.contains("`b`"),
        "{line}"
    );
    // Debug output of the configuration hides the admin token.
    let config = crate::helpers::config("a=sh4red", &url);
    let mut config = config;
    config.admin_token = Some(botmetrics::config::Secret(ADMIN.into()));
    assert!(!format!("{config:?}").contains(ADMIN));
}

#[tokio::test]
async fn a_revocation_reaches_another_process_on_the_store_within_one_sync_interval() {
    let db = SqliteFile::new();
    let url = db.url();
    let flags = ["--admin-token", ADMIN, "--sync-interval", "1s"];
    let one = Binary::serve(&url, "a=t0ken-a", &flags).await;
    let (_, created) = admin(
        &one,
        Method::POST,
        "/v1/admin/bots",
        Some(r#"{"bot":"roaming"}"#),
    )
    .await;
    let token = created["token"].as_str().expect("token").to_owned();
    // A second process on the same store (a standby for the store's
    // writes, serving all the same) reads the registry at start.
    let other_dir = std::env::temp_dir().join(format!(
        "botmetrics-admin-{}",
        crate::helpers::unique_suffix()
    ));
    let dir = other_dir.display().to_string();
    let mut other_flags = flags.to_vec();
    other_flags.extend(["--data-dir", &dir]);
    let two = Binary::serve(&url, "a=t0ken-a", &other_flags).await;
    let (status, _) = two.post_events(&token, &message(1)).await;
    assert_eq!(status, 202);
    // The standby sends changes to the writer, which alone reads nothing.
    let (status, answer) = admin(&two, Method::DELETE, "/v1/admin/bots/roaming", None).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("unavailable")),
        "{answer}"
    );
    assert_eq!(two.post_events(&token, &message(1)).await.0, 202);
    let (status, _) = admin(&one, Method::DELETE, "/v1/admin/bots/roaming", None).await;
    assert_eq!(status, 200);
    let revoked = Instant::now();
    assert_eq!(
        one.post_events(&token, &message(2)).await.0,
        401,
        "at once where it was revoked"
    );
    eventually(Duration::from_secs(10), || {
        let two = &two;
        let token = token.clone();
        async move { two.post_events(&token, &message(3)).await.0 == 401 }
    })
    .await;
    let took = revoked.elapsed();
    assert!(took < WITHIN_ONE_INTERVAL, "{took:?}");
    let _ = std::fs::remove_dir_all(other_dir);
}

/// A cluster replica on `db_url` and `redis_url` with 1 s sync and flush
/// intervals, the admin API and its own data directory (`name`): started
/// again with the same name, it finds its journal.
async fn replica(db_url: &str, redis_url: &str, name: &str, tokens: &str) -> Binary {
    let dir = crate::helpers::pg_data_dir(db_url).join(name);
    std::fs::create_dir_all(&dir).expect("data dir");
    let dir = dir.display().to_string();
    let flags = [
        "--redis-url",
        redis_url,
        "--sync-interval",
        "1s",
        "--flush-interval",
        "1s",
        "--admin-token",
        ADMIN,
        "--data-dir",
        &dir,
    ];
    Binary::serve(db_url, tokens, &flags).await
}

/// Posts one message with `token` until the replica accepts it (401 until
/// it reads the registry again).
async fn once_accepted(r: &Binary, token: &str) {
    eventually(Duration::from_secs(5), || async move {
        r.post_events(token, &message(1)).await.0 == 202
    })
    .await;
}

/// Cluster mode: three replicas on one PostgreSQL and a private Redis. A
/// token added on one replica posts on every replica within one
/// `--sync-interval`; revoked on another, it is refused there at once and
/// on every replica within one interval, and the cluster total is exactly
/// what was accepted (rotation loses nothing). A bot created at runtime on
/// one replica posts on every replica, and its cluster total is exact on
/// each.
#[tokio::test]
async fn in_cluster_mode_a_revoked_token_is_refused_on_every_replica_within_one_sync_interval() {
    let Some(db) = crate::helpers::PgDatabase::create().await else {
        return;
    };
    let Some(redis) = crate::redis::RedisServer::start().await else {
        return;
    };
    let mut replicas = Vec::new();
    for n in 0..3 {
        let name = format!("admin-replica-{n}");
        replicas.push(replica(&db.url, &redis.url(), &name, "a=t0ken-a").await);
    }
    let (status, added) = admin(&replicas[0], Method::POST, "/v1/admin/bots/a/tokens", None).await;
    assert_eq!(status, 201, "{added}");
    let token = added["token"].as_str().expect("token").to_owned();
    let mut accepted = 0u64;
    for r in &replicas {
        once_accepted(r, &token).await;
        accepted += 1;
        // The old token stays valid beside it.
        r.post_ok("t0ken-a", &json!(message(2))).await;
        accepted += 1;
    }
    let path = format!("/v1/admin/bots/a/tokens/{}", prefix_of(&token));
    let (status, answer) = admin(&replicas[1], Method::DELETE, &path, None).await;
    assert_eq!(status, 200, "{answer}");
    let revoked = Instant::now();
    assert_eq!(replicas[1].post_events(&token, &message(3)).await.0, 401);
    // Until it reaches a replica the token still posts there: those
    // events are accepted, and counted below like every other.
    for r in &replicas {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match r.post_events(&token, &message(3)).await.0 {
                401 => break,
                202 => accepted += 1,
                other => panic!("{other}"),
            }
            assert!(Instant::now() < deadline, "still accepted after 5 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let took = revoked.elapsed();
    assert!(took < WITHIN_ONE_INTERVAL, "{took:?}");
    for r in &replicas {
        r.post_ok("t0ken-a", &json!(message(4))).await;
        accepted += 1;
    }
    // Every accepted event in the cluster total, on every replica.
    for r in &replicas {
        eventually(Duration::from_secs(10), || async move {
            let (status, summary) = r.get_json("/v1/summary?bot=a").await;
            status == 200 && summary["messages"]["total"].as_u64() == Some(accepted)
        })
        .await;
    }

    // A bot created at runtime, on the third replica.
    let (status, created) = admin(
        &replicas[2],
        Method::POST,
        "/v1/admin/bots",
        Some(r#"{"bot":"fresh"}"#),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let fresh = created["token"].as_str().expect("token").to_owned();
    let mut posted = 0u64;
    for r in &replicas {
        // Refused (401) until the replica reads the registry again.
        once_accepted(r, &fresh).await;
        posted += 1;
        for _ in 0..4 {
            r.post_ok(&fresh, &json!(message(2))).await;
            posted += 1;
        }
    }
    for r in &replicas {
        eventually(Duration::from_secs(10), || async move {
            let (status, summary) = r.get_json("/v1/summary?bot=fresh").await;
            status == 200 && summary["messages"]["total"].as_u64() == Some(posted)
        })
        .await;
        // Each replica exposes its own share: five events.
        let own = r
            .sample(r#"bot_messages_total{bot="fresh",role="user"}"#)
            .await;
        assert_eq!(own, Some(5.0));
    }
    // The writer-lease holder writes its cluster totals to the store.
    let raw = crate::helpers::Raw::connect(&db.url).await;
    eventually(Duration::from_secs(15), || {
        let raw = &raw;
        async move {
            raw.stored("bot_messages_total", "fresh", &[("role", "user")])
                .await
                == Some(posted as f64)
        }
    })
    .await;
    // The other bot is untouched.
    let (_, summary) = replicas[0].get_json("/v1/summary?bot=a").await;
    assert_eq!(summary["messages"]["total"].as_u64(), Some(accepted));
}

/// Every row a bot has in the tables a wipe clears, as (table, rows).
async fn rows_of(raw: &crate::helpers::Raw, bot: &str) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for table in [
        "real_time_metrics",
        "metrics_history",
        "active_user_sketches",
        "daily_counters",
        "user_book",
        "cluster_sketches",
        "cluster_progress",
    ] {
        let n = raw
            .int(&format!("select count(*) from {table} where bot = '{bot}'"))
            .await;
        out.push((table, n));
    }
    out
}

fn none_left(rows: &[(&'static str, i64)]) -> bool {
    rows.iter().all(|(_, n)| *n == 0)
}

/// Ten users, one message each, and `extra` more from the first.
fn day_of(bot_users: u64, extra: u64) -> Value {
    let mut events: Vec<Value> = (0..bot_users).map(message).collect();
    events.extend((0..extra).map(|_| message(0)));
    Value::Array(events)
}

/// What a wiped bot leaves: nothing in the store, `/metrics`, the summary,
/// the page's data or the listing; its token refused; `keep` exact.
async fn check_gone(raw: &crate::helpers::Raw, bin: &Binary, gone: &str) {
    let rows = rows_of(raw, "gone").await;
    assert!(none_left(&rows), "{rows:?}");
    let (_, _, exposition) = bin.get_text("/metrics").await;
    assert!(!exposition.contains("bot=\"gone\""), "{exposition}");
    let (status, _) = bin.get_json("/v1/summary?bot=gone").await;
    assert_eq!(status, 404);
    let (_, all) = bin.get_json("/v1/summary").await;
    assert!(!all.to_string().contains("\"gone\""), "{all}");
    let (status, _) = bin.get_json("/v1/charts?bot=gone&range=24h").await;
    assert_eq!(status, 404);
    let (status, _) = bin.get_json("/v1/retention?bot=gone").await;
    assert_eq!(status, 404);
    assert_eq!(bin.post_events(gone, &message(1)).await.0, 401);
    assert!(!names(&list(bin).await).contains(&"gone".to_owned()));
    // The other bot is exactly as it was.
    assert_eq!(total_messages(bin, "keep").await, 7);
}

/// A bot created at runtime is counted, flushed (series, sketches, daily
/// counters, user book, history), then wiped: the answer says what went;
/// it is gone from memory, the store, `/metrics`, the summary (a cached one
/// included) and the page's data, its token is refused, and another bot is
/// untouched. After kill -9 and a restart it is still gone.
#[tokio::test]
async fn a_wiped_bot_is_gone_from_memory_the_store_and_every_answer_and_stays_gone_after_kill_9() {
    let db = SqliteFile::new();
    let url = db.url();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        &url,
        "--tokens",
        "keep=t0ken-keep",
        "--admin-token",
        ADMIN,
        "--flush-interval",
        "1s",
        "--history-interval",
        "1s",
        "--metrics-cache-ttl",
        "0s",
        // A summary cached for long: the wipe must not be served from it.
        "--summary-cache-ttl",
        "1h",
    ];
    let mut bin = Binary::start(&args, &[]).await;
    let (status, created) = admin(
        &bin,
        Method::POST,
        "/v1/admin/bots",
        Some(r#"{"bot":"gone"}"#),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let gone = created["token"].as_str().expect("token").to_owned();
    bin.post_ok(&gone, &day_of(10, 5)).await;
    bin.post_ok("t0ken-keep", &day_of(7, 0)).await;
    let raw = crate::helpers::Raw::connect(&url).await;
    // Everything of it reached the store, history included.
    eventually(Duration::from_secs(15), || {
        let raw = &raw;
        async move {
            let rows = rows_of(raw, "gone").await;
            rows.iter()
                .filter(|(t, _)| !t.starts_with("cluster_"))
                .all(|(_, n)| *n > 0)
        }
    })
    .await;
    assert_eq!(total_messages(&bin, "gone").await, 15);
    // Counted after the last flush: in memory and the journal only.
    bin.post_ok(&gone, &day_of(3, 0)).await;

    let (status, answer) = admin(&bin, Method::DELETE, "/v1/admin/bots/gone?wipe=true", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["revoked"], json!(true), "{answer}");
    assert_eq!(answer["wiped"], json!(true), "{answer}");
    assert_eq!(answer["store"], json!("removed"), "{answer}");
    assert_eq!(answer["removed"]["users"], json!(10), "{answer}");
    assert!(answer["removed"]["series"].as_u64() > Some(0), "{answer}");
    assert!(
        answer["removed"]["store_rows"].as_u64() > Some(0),
        "{answer}"
    );
    check_gone(&raw, &bin, &gone).await;
    // Nothing brings it back: the next flushes and history points.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    check_gone(&raw, &bin, &gone).await;

    bin.kill_9().await;
    let bin = Binary::start(&args, &[]).await;
    check_gone(&raw, &bin, &gone).await;
    assert_eq!(
        raw.int("select count(*) from real_time_metrics where bot = 'keep' and metric = 'bot_messages_total' and value = 7")
            .await,
        1
    );
}

/// The crash between the journal and the store: the wipe is journaled and
/// out of memory, and the flush that deletes the rows is held (the test
/// locks a table the wipe deletes from) when the process is killed, so the
/// rows are all still there. The restart replays the wipe: what the store
/// held of the bot is not counted again, and its rows go at the first
/// flush. The bot is still in `--tokens`, so it counts afresh from 0; the
/// other bot is exact.
#[tokio::test]
async fn a_wipe_journaled_but_not_yet_in_the_store_when_killed_is_finished_by_the_restart() {
    let Some(db) = crate::helpers::PgDatabase::create().await else {
        return;
    };
    let dir = crate::helpers::pg_data_dir(&db.url).display().to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        &db.url,
        "--data-dir",
        &dir,
        "--tokens",
        "keep=t0ken-keep,gone=t0ken-gone",
        "--admin-token",
        ADMIN,
        "--flush-interval",
        "1s",
        "--metrics-cache-ttl",
        "0s",
        "--summary-cache-ttl",
        "0s",
    ];
    let mut bin = Binary::start(&args, &[]).await;
    bin.post_ok("t0ken-gone", &day_of(10, 5)).await;
    bin.post_ok("t0ken-keep", &day_of(7, 0)).await;
    let raw = crate::helpers::Raw::connect(&db.url).await;
    eventually(Duration::from_secs(15), || {
        let raw = &raw;
        async move {
            raw.stored("bot_messages_total", "gone", &[("role", "user")])
                .await
                == Some(15.0)
                && raw
                    .int("select count(*) from user_book where bot = 'gone'")
                    .await
                    == 10
        }
    })
    .await;
    // A table only cluster mode writes: the wipe's delete is the one
    // statement that waits on it.
    let pool = match &raw {
        crate::helpers::Raw::Pg(pool) => pool.clone(),
        crate::helpers::Raw::Sqlite(_) => unreachable!("PostgreSQL"),
    };
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("lock table cluster_progress in access exclusive mode")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let url = bin.url("/v1/admin/bots/gone?wipe=true");
    let client = bin.client.clone();
    let wipe = tokio::spawn(async move {
        client
            .delete(url)
            .bearer_auth(ADMIN)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // Out of memory: the journal holds the wipe (it is written first).
    eventually(Duration::from_secs(10), || {
        let bin = &bin;
        async move {
            let (_, _, exposition) = bin.get_text("/metrics").await;
            !exposition.contains("bot=\"gone\"")
        }
    })
    .await;
    assert!(!wipe.is_finished(), "the wipe's flush waits on the lock");
    bin.kill_9().await;
    lock.rollback().await.expect("unlock");
    let _ = wipe.await;
    // The rows are all there: the killed transaction never committed.
    assert_eq!(
        raw.stored("bot_messages_total", "gone", &[("role", "user")])
            .await,
        Some(15.0)
    );
    assert_eq!(
        raw.int("select count(*) from user_book where bot = 'gone'")
            .await,
        10
    );

    let bin = Binary::start(&args, &[]).await;
    assert_eq!(
        total_messages(&bin, "gone").await,
        0,
        "the stored counts are not restored"
    );
    let (_, summary) = bin.get_json("/v1/summary?bot=gone").await;
    assert_eq!(
        summary["users"]["new_total"].as_u64().unwrap_or(0),
        0,
        "{summary}"
    );
    eventually(Duration::from_secs(15), || {
        let raw = &raw;
        async move {
            raw.int("select count(*) from user_book where bot = 'gone'")
                .await
                == 0
                && raw
                    .int("select count(*) from active_user_sketches where bot = 'gone'")
                    .await
                    == 0
                && raw
                    .int("select count(*) from real_time_metrics where bot = 'gone' and value <> 0")
                    .await
                    == 0
        }
    })
    .await;
    assert_eq!(total_messages(&bin, "keep").await, 7);
    // Still in --tokens: it counts again, from nothing.
    bin.post_ok("t0ken-gone", &day_of(2, 0)).await;
    assert_eq!(total_messages(&bin, "gone").await, 2);
}

/// Every replica has dropped `gone` (exposition, summary), shows `keep`'s
/// cluster total of 6, and the store holds no row of `gone`.
async fn everywhere_gone(raw: &crate::helpers::Raw, replicas: &[Binary]) -> bool {
    for r in replicas {
        let (_, _, exposition) = r.get_text("/metrics").await;
        if exposition.contains("bot=\"gone\"") {
            return false;
        }
        if r.get_json("/v1/summary?bot=gone").await.0 != 404 {
            return false;
        }
        let (status, summary) = r.get_json("/v1/summary?bot=keep").await;
        if status != 200 || summary["messages"]["total"].as_u64() != Some(6) {
            return false;
        }
    }
    none_left(&rows_of(raw, "gone").await)
}

/// Cluster mode: a bot counted on three replicas is wiped on one. Within a
/// few sync intervals every replica has dropped it (its own counts, the
/// cluster totals it shows), Redis holds nothing of it but the marker that
/// names the wipe, the store none of its rows, and the other bot's cluster
/// total is exact on every replica; a replica killed with kill -9 and
/// started again, which replays a journal holding the bot's events, brings
/// nothing of it back.
#[tokio::test]
async fn in_cluster_mode_a_wiped_bot_is_gone_from_every_replica_redis_and_the_store() {
    let Some(db) = crate::helpers::PgDatabase::create().await else {
        return;
    };
    let Some(redis) = crate::redis::RedisServer::start().await else {
        return;
    };
    let mut replicas = Vec::new();
    for n in 0..3 {
        let name = format!("wipe-replica-{n}");
        replicas.push(replica(&db.url, &redis.url(), &name, "keep=t0ken-keep").await);
    }
    let (status, created) = admin(
        &replicas[0],
        Method::POST,
        "/v1/admin/bots",
        Some(r#"{"bot":"gone"}"#),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let gone = created["token"].as_str().expect("token").to_owned();
    let mut posted = 0;
    for r in &replicas {
        once_accepted(r, &gone).await;
        r.post_ok(&gone, &day_of(3, 0)).await;
        posted += 4;
        r.post_ok("t0ken-keep", &day_of(2, 0)).await;
    }
    let raw = crate::helpers::Raw::connect(&db.url).await;
    eventually(Duration::from_secs(20), || {
        let raw = &raw;
        async move {
            raw.stored("bot_messages_total", "gone", &[("role", "user")])
                .await
                == Some(f64::from(posted))
        }
    })
    .await;

    let redis_keys = || {
        let listed = redis.cmd(&["--scan", "--pattern", "bm:{gone}:*"]);
        let mut keys: Vec<String> = listed.lines().map(str::to_owned).collect();
        keys.sort();
        keys
    };
    // Its totals, sketches and shared user book are in Redis.
    let before = redis_keys();
    for key in ["bm:{gone}:series", "bm:{gone}:book", "bm:{gone}:today"] {
        assert!(before.iter().any(|k| k == key), "{key} in {before:?}");
    }
    // The set of its users for exact counts (`lua/exact.lua`).
    for key in ["bm:{gone}:u:seen", "bm:{gone}:u:seen:since"] {
        assert!(before.iter().any(|k| k == key), "{key} in {before:?}");
    }
    let (status, answer) = admin(
        &replicas[1],
        Method::DELETE,
        "/v1/admin/bots/gone?wipe=true",
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["wiped"], json!(true), "{answer}");
    // This replica's own share, dropped before the answer.
    assert!(answer["removed"]["series"].as_u64() > Some(0), "{answer}");
    let (_, _, exposition) = replicas[1].get_text("/metrics").await;
    assert!(!exposition.contains("bot=\"gone\""), "{exposition}");

    eventually(Duration::from_secs(15), || everywhere_gone(&raw, &replicas)).await;
    assert_eq!(redis_keys(), vec!["bm:{gone}:seeded".to_owned()]);
    assert!(
        redis
            .cmd(&["get", "bm:{gone}:seeded"])
            .starts_with("wiped:")
    );

    // kill -9 a replica whose journal holds the bot's events; restarted,
    // it replays them and brings nothing back, nor do the next syncs and
    // flushes.
    let mut killed = replicas.remove(2);
    killed.kill_9().await;
    replicas.push(replica(&db.url, &redis.url(), "wipe-replica-2", "keep=t0ken-keep").await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(everywhere_gone(&raw, &replicas).await);
    assert_eq!(redis_keys(), vec!["bm:{gone}:seeded".to_owned()]);
    assert_eq!(replicas[2].post_events(&gone, &message(1)).await.0, 401);
}
