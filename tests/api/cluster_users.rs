//! The user book in cluster mode: one book per bot in Redis, shared by
//! three replicas. A user whose events land on different replicas is one
//! user with one first day and one session; retention is exact over a
//! scripted month; an erasure on any replica reaches Redis and the store;
//! Redis holds no user id, nor any hash computable without the secret; a
//! Redis that lost its data gets the book back from the store.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::{all_synced, connected, summary, until};
use crate::helpers::{Binary, PgDatabase, Raw, pg_data_dir};
use crate::redis::RedisServer;

const TOKENS: &str = "x=tx";
const DAY: i64 = 86_400;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Noon UTC `ago` days before today, or for today a minute ago at most.
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

fn message(user: impl Into<Value>, ts: i64) -> Value {
    json!({"type": "message", "role": "user", "user_id": user.into(), "ts": ts})
}

/// Replica `n`, its own data directory, syncing every 200 ms, flushing
/// every 500 ms and scanning the book every second.
async fn replica(db: &PgDatabase, redis_url: &str, n: usize, extra: &[&str]) -> Binary {
    let dir = pg_data_dir(&db.url).join(format!("replica-{n}"));
    std::fs::create_dir_all(&dir).expect("replica data dir");
    let dir = dir.display().to_string();
    let mut flags = vec![
        "--redis-url",
        redis_url,
        "--sync-interval",
        "200ms",
        "--flush-interval",
        "500ms",
        "--user-scan-interval",
        "1s",
        "--data-dir",
        &dir,
    ];
    flags.extend_from_slice(extra);
    Binary::serve(&db.url, TOKENS, &flags).await
}

async fn three(extra: &[&str]) -> Option<(PgDatabase, RedisServer, Replicas)> {
    let db = PgDatabase::create().await?;
    let redis = RedisServer::start().await?;
    let mut reps = Vec::new();
    for n in 0..3 {
        reps.push(replica(&db, &redis.url(), n, extra).await);
    }
    for r in &reps {
        connected(r).await;
    }
    Some((db, redis, Replicas(reps)))
}

/// The replicas, their logs' tails shown when a test fails.
struct Replicas(Vec<Binary>);

impl std::ops::Deref for Replicas {
    type Target = [Binary];
    fn deref(&self) -> &[Binary] {
        &self.0
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (n, r) in self.0.iter().enumerate() {
                let log = r.log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                eprintln!("--- replica {n} (last 30 lines of its log) ---\n{tail}");
            }
        }
    }
}

fn refs(reps: &[Binary]) -> Vec<&Binary> {
    reps.iter().collect()
}

/// The scripted month of `users.rs`: 10 users on day −31 (five back on
/// −30, three on −24, one on −1; one more on −20, one on −5 and today),
/// four on day −2 (two back yesterday), three new today. By day.
fn month_by_day() -> Vec<Vec<Value>> {
    let mut days: Vec<(i64, Vec<u64>)> = vec![
        (31, (1..=10).collect()),
        (30, (1..=5).collect()),
        (24, (1..=3).collect()),
        (20, vec![4]),
        (5, vec![2]),
        (2, (101..=104).collect()),
        (1, vec![1, 101, 102]),
        (0, vec![2, 101, 201, 202, 203]),
    ];
    days.iter_mut()
        .map(|(ago, users)| users.iter().map(|u| message(*u, at(*ago))).collect())
        .collect()
}

fn cohort<'a>(answer: &'a Value, day: &str) -> &'a Value {
    answer["cohorts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["day"] == day)
        .unwrap_or_else(|| panic!("no cohort {day} in {answer}"))
}

async fn sum_over(reps: &[Binary], series: &str) -> f64 {
    let mut total = 0.0;
    for r in reps {
        total += r.sample(series).await.unwrap_or(0.0);
    }
    total
}

#[tokio::test]
async fn three_replicas_share_one_user_book_new_returning_and_retention_are_exact() {
    let Some((db, redis, reps)) = three(&[]).await else {
        return;
    };
    // Day by day, as time goes, each day's events spread over the three
    // replicas in turn (a user's events of two days land on two), each day
    // synced before the next comes.
    let mut turn = 0;
    for day in month_by_day() {
        for event in day {
            // Twice, on two replicas: one user, counted once.
            reps[turn % 3].post_ok("tx", &json!([event])).await;
            reps[(turn + 1) % 3].post_ok("tx", &json!([event])).await;
            turn += 1;
        }
        all_synced(&refs(&reps)).await;
    }
    // Every replica answers the cohorts of the lead's scan of Redis' book.
    for r in reps.iter() {
        let answer = until(
            "the lead's scan counted the cohorts",
            || async {
                r.get_json(&format!("/v1/retention?from={}&to={}", date(31), date(0)))
                    .await
                    .1
            },
            |a| {
                a["cohorts"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["day"] == date(0) && c["size"] == 3))
            },
        )
        .await;
        assert_eq!(
            cohort(&answer, &date(31)),
            &json!({"day": date(31), "size": 10, "d1": 5, "d7": 3, "d30": 1,
                    "rolling": {"d1": 5, "d7": 4, "d30": 2}}),
        );
        assert_eq!(
            cohort(&answer, &date(2)),
            &json!({"day": date(2), "size": 4, "d1": 2, "d7": null, "d30": null,
                    "rolling": {"d1": 2, "d7": null, "d30": null}}),
        );
        assert_eq!(cohort(&answer, &date(10))["size"], 0);
        let s = summary(r, "x").await.expect("a summary");
        assert_eq!(s["users"]["new_today"], 3, "{s}");
        assert_eq!(s["users"]["returning_today"], 2, "{s}");
        assert_eq!(s["users"]["new_total"], 17, "{s}");
        assert_eq!(
            s["retention"],
            json!({"d1": 0.5, "d7": null, "d30": 0.1}),
            "{s}"
        );
        assert_eq!(
            r.sample("bot_retention_ratio{bot=\"x\",day=\"1\"}").await,
            Some(0.5)
        );
    }
    // Each replica's /metrics holds what the merges of its own batches
    // found: summed, the cluster's.
    assert_eq!(
        sum_over(&reps, "bot_users_new_total{bot=\"x\"}").await,
        17.0
    );
    assert_eq!(
        redis.cmd(&["HLEN", "bm:{x}:book"]).trim(),
        "17",
        "one entry per user in Redis"
    );
    // The lead writes the book to the store.
    let raw = Raw::connect(&db.url).await;
    until(
        "the store holds every user",
        || async { raw.int("select count(*) from user_book").await },
        |n| *n == 17,
    )
    .await;
    // ... and the retention ratios, with the totals, as one process does.
    until(
        "the store holds bot_retention_ratio{day=\"1\"}",
        || async {
            raw.stored("bot_retention_ratio", "x", &[("day", "1")])
                .await
        },
        |v| *v == Some(0.5),
    )
    .await;
    drop(reps);
}

#[tokio::test]
async fn a_session_across_three_replicas_is_one_session_ended_once() {
    let Some((_db, _redis, reps)) = three(&["--session-gap", "10s"]).await else {
        return;
    };
    // The scan runs on real time, so the events are of now: 0, 1 and 2 s
    // on three replicas, one session of 2 s and 3 messages.
    let t0 = now() - 2;
    for (i, dt) in [0, 1, 2].into_iter().enumerate() {
        reps[i].post_ok("tx", &json!([message(7, t0 + dt)])).await;
        all_synced(&refs(&reps)).await;
    }
    let total = |reps: &'static Replicas| async move {
        sum_over(reps, "bot_sessions_total{bot=\"x\"}").await
    };
    let reps: &'static Replicas = Box::leak(Box::new(reps));
    assert_eq!(total(reps).await, 0.0, "open until the gap passes");
    // 11 s after the last (a gap over 10), on another replica: the next
    // session; the first ends, by the lead's scan or by this event, once.
    let next = t0 + 2 + 11;
    while now() < next {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reps[1].post_ok("tx", &json!([message(7, next)])).await;
    all_synced(&refs(reps)).await;
    until("the first session ended", || total(reps), |n| *n == 1.0).await;
    assert_eq!(
        sum_over(reps, "bot_session_duration_seconds_sum{bot=\"x\"}").await,
        2.0
    );
    assert_eq!(
        sum_over(reps, "bot_session_messages_sum{bot=\"x\"}").await,
        3.0
    );
    // The second is idle past the gap: the lead's scan ends it, once.
    until(
        "the scan ended the idle session",
        || total(reps),
        |n| *n == 2.0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(total(reps).await, 2.0, "ended once, whatever scans follow");
    assert_eq!(
        sum_over(reps, "bot_session_messages_sum{bot=\"x\"}").await,
        4.0
    );
    let s = summary(&reps[2], "x").await.expect("a summary");
    if next / DAY == now() / DAY {
        assert_eq!(s["sessions"]["total"], 2, "{s}");
    }
    assert_eq!(s["users"]["new_total"], 1, "{s}");
}

async fn forget(r: &Binary, user: &str) -> (u16, Value) {
    let res = r
        .client
        .delete(r.url(&format!("/v1/users/{user}")))
        .bearer_auth("tx")
        .send()
        .await
        .expect("request sent");
    let status = res.status().as_u16();
    (status, res.json().await.expect("a JSON answer"))
}

#[tokio::test]
async fn an_erasure_on_any_replica_reaches_redis_and_the_store_and_no_id_is_in_redis() {
    let Some((db, redis, reps)) = three(&[]).await else {
        return;
    };
    let private = "user-7f3a9c-private";
    reps[0]
        .post_ok(
            "tx",
            &json!([message(private, now()), message("bob", now())]),
        )
        .await;
    all_synced(&refs(&reps)).await;
    let raw = Raw::connect(&db.url).await;
    until(
        "the store holds both users",
        || async { raw.int("select count(*) from user_book").await },
        |n| *n == 2,
    )
    .await;
    // Nothing in Redis names the user or hashes them without the secret.
    let legacy = botmetrics::event::UserKey::legacy();
    let old_hash = legacy
        .hash(&botmetrics::event::UserId::Str(private.into()))
        .0
        .to_le_bytes();
    let keys = redis.cmd(&["--scan"]);
    assert!(!keys.contains(private), "{keys}");
    let dump = redis.cmd(&["HGETALL", "bm:{x}:book"]);
    assert!(!dump.contains(private));
    assert!(
        !dump.as_bytes().windows(8).any(|w| w == old_hash),
        "a hash under the old fixed key is in Redis"
    );
    // Erased on another replica than the one that saw the user.
    assert_eq!(
        forget(&reps[1], private).await,
        (200, json!({"forgotten": true}))
    );
    all_synced(&refs(&reps)).await;
    assert_eq!(redis.cmd(&["HLEN", "bm:{x}:book"]).trim(), "1");
    assert_eq!(
        forget(&reps[2], private).await,
        (200, json!({"forgotten": false}))
    );
    until(
        "the store's row is gone",
        || async { raw.int("select count(*) from user_book").await },
        |n| *n == 1,
    )
    .await;
    // Back after the erasure: a new user.
    reps[2]
        .post_ok("tx", &json!([message(private, now())]))
        .await;
    all_synced(&refs(&reps)).await;
    let s = summary(&reps[0], "x").await.expect("a summary");
    assert_eq!(s["users"]["new_total"], 3, "{s}");
    drop(reps);
}

#[tokio::test]
async fn a_redis_that_lost_its_data_gets_the_book_back_from_the_store() {
    let Some((db, mut redis, reps)) = three(&[]).await else {
        return;
    };
    reps[0]
        .post_ok("tx", &json!([message(1, at(3)), message(2, at(3))]))
        .await;
    all_synced(&refs(&reps)).await;
    let raw = Raw::connect(&db.url).await;
    until(
        "the store holds both users",
        || async { raw.int("select count(*) from user_book").await },
        |n| *n == 2,
    )
    .await;
    redis.restart_empty().await;
    // User 1 again, today: returning, not new, after the reseed.
    reps[1].post_ok("tx", &json!([message(1, at(0))])).await;
    until(
        "the book is back in Redis",
        || async { redis.cmd(&["HLEN", "bm:{x}:book"]).trim().to_owned() },
        |n| n == "2",
    )
    .await;
    all_synced(&refs(&reps)).await;
    let s = until(
        "the summary reads the reseeded totals",
        || async { summary(&reps[2], "x").await },
        |s| {
            s.as_ref()
                .is_some_and(|s| s["users"]["returning_today"] == 1)
        },
    )
    .await
    .expect("a summary");
    assert_eq!(s["users"]["new_today"], 0, "{s}");
    assert_eq!(s["users"]["new_total"], 2, "{s}");
    drop(reps);
}

#[tokio::test]
async fn at_the_bound_the_leads_scan_forgets_the_least_recently_seen_users_of_redis_book() {
    let Some((_db, redis, reps)) = three(&["--max-users-per-bot", "100"]).await else {
        return;
    };
    // Users 1–10 last seen three days ago, 11–110 yesterday.
    let old: Vec<Value> = (1..=10u64).map(|u| message(u, at(3))).collect();
    let recent: Vec<Value> = (11..=110u64).map(|u| message(u, at(1))).collect();
    reps[0].post_ok("tx", &Value::Array(old)).await;
    reps[1].post_ok("tx", &Value::Array(recent)).await;
    all_synced(&refs(&reps)).await;
    until(
        "the scan brought the book to its bound",
        || async { redis.cmd(&["HLEN", "bm:{x}:book"]).trim().to_owned() },
        |n| n == "100",
    )
    .await;
    for r in reps.iter() {
        until(
            "every replica reads the cohorts without the forgotten",
            || async {
                r.get_json(&format!("/v1/retention?from={}&to={}", date(3), date(0)))
                    .await
                    .1
            },
            |a| {
                a["cohorts"].as_array().is_some_and(|c| {
                    c.iter().any(|c| c["day"] == date(3) && c["size"] == 0)
                        && c.iter().any(|c| c["day"] == date(1) && c["size"] == 100)
                })
            },
        )
        .await;
    }
    // Back, a forgotten user is new again.
    reps[2].post_ok("tx", &json!([message(1u64, at(0))])).await;
    all_synced(&refs(&reps)).await;
    let s = summary(&reps[0], "x").await.expect("a summary");
    assert_eq!(s["users"]["new_total"], 111, "{s}");
    assert_eq!(s["users"]["new_today"], 1, "{s}");
}

#[tokio::test]
async fn an_erasure_answered_then_kill_9_still_reaches_redis_and_every_replica() {
    let Some((db, redis, mut reps)) = three(&[]).await else {
        return;
    };
    reps[0]
        .post_ok("tx", &json!([message("carol", now())]))
        .await;
    all_synced(&refs(&reps)).await;
    assert_eq!(redis.cmd(&["HLEN", "bm:{x}:book"]).trim(), "1");
    // Answered, then killed at once: whether its sync came first or not,
    // the journal has the erasure and the restart's replay sends it.
    assert_eq!(
        forget(&reps[1], "carol").await,
        (200, json!({"forgotten": true}))
    );
    reps.0[1].kill_9().await;
    reps.0[1] = replica(&db, &redis.url(), 1, &[]).await;
    connected(&reps[1]).await;
    until(
        "the erasure reached Redis",
        || async { redis.cmd(&["HLEN", "bm:{x}:book"]).trim().to_owned() },
        |n| n == "0",
    )
    .await;
    all_synced(&refs(&reps)).await;
    for r in reps.iter() {
        assert_eq!(forget(r, "carol").await, (200, json!({"forgotten": false})));
    }
    let raw = Raw::connect(&db.url).await;
    until(
        "no row in the store",
        || async { raw.int("select count(*) from user_book").await },
        |n| *n == 0,
    )
    .await;
}
