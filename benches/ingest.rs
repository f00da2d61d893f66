//! In-process benchmarks, each beside a baseline measured in the same run:
//!
//! * `ingest`: parse + validate + apply of a realistic batch, against
//!   serde_json parsing the same bytes into untyped `Value`s (no checks, no
//!   counting) — the floor any JSON service pays.
//! * `ingest_stages`: the same batch one step at a time, so each step's
//!   cost shows: serde_json merely tokenizing it (`IgnoredAny`, the floor
//!   of any serde_json parse), botmetrics' parse with its checks (one pass:
//!   each event is checked as it is read) by its fast reader and by
//!   serde_json's derived reader alone, and the count of the parsed events
//!   alone (active-user sketches, user book, counters, histograms).
//! * `apply`: counting one parsed event, against the prometheus crate's own
//!   `IntCounterVec::with_label_values(..).inc()`.
//! * `render`: the whole registry with 10,000 series, against the prometheus
//!   crate rendering 10,000 plain counters.
//! * `sketch`: one active-user insert (hash + two sketches), dense and
//!   sparse, against two always-dense sketches of the hyperloglockless crate.
//! * `many_bots`: the uncached `/metrics` render and the all-bots
//!   `/v1/summary` render for 1,000 bots with a little traffic each, against
//!   the prometheus crate rendering as many plain counters.
//! * `store`: flush of 10,000 changed series, history write of 10,000
//!   points and start-up restore of 10,000 series, on the local PostgreSQL
//!   (`DATABASE_URL`, default postgres://postgres@127.0.0.1:5432/test);
//!   skipped with a message when it is unreachable.
//!
//! Run: `cargo bench --bench ingest` (add a filter such as `-- render`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use botmetrics::cluster::pending::{Pending, UserBudget};
use botmetrics::dedupe::Dedupe;
use botmetrics::event::{BodyFormat, UserId, parse_batch, parse_batch_serde};
use botmetrics::ingest::Ingest;
use botmetrics::journal::{FsyncPolicy, Journal};
use botmetrics::metrics::Metrics;
use botmetrics::metrics::users::{BookLimits, UserBook, UserRow};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const NOW: i64 = 1_800_000_000;

fn metrics(max_label_values: usize) -> Arc<Metrics> {
    metrics_with_book(max_label_values, Default::default())
}

fn metrics_with_book(max_label_values: usize, book: BookLimits) -> Arc<Metrics> {
    let bots: Vec<Arc<str>> = vec![Arc::from("bench")];
    Arc::new(Metrics::new(&bots, max_label_values, chrono_tz::UTC, 30.0, book).expect("registry"))
}

/// A bot's traffic as the design describes it: mostly messages and LLM
/// responses, some cache lookups, a few errors, registrations and limits.
/// Every event carries a user; a third carry an idempotency key.
fn realistic_batch(n: usize, now: i64) -> Vec<u8> {
    batch_of(n, now, false)
}

/// [`realistic_batch`] with every field of spend and answer quality set:
/// responses carry cached and reasoning tokens, a provider and a time to
/// first token (and every other one a reported cost), and the custom
/// events become ratings.
fn spend_batch(n: usize, now: i64) -> Vec<u8> {
    batch_of(n, now, true)
}

fn batch_of(n: usize, now: i64, spend: bool) -> Vec<u8> {
    let mut out = String::from("[");
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        let user = 100_000 + (i * 7919) % 50_000;
        let id = if i % 3 == 0 {
            format!(r#","event_id":"evt-{i}""#)
        } else {
            String::new()
        };
        let body = match i % 20 {
            0..=7 => format!(
                r#""type":"message","role":"{}","db_queries":{}"#,
                ["user", "assistant"][i % 2],
                i % 9
            ),
            8..=13 if spend => format!(
                r#""type":"response","status":"success","duration_ms":{},"model":"gpt-4o-mini","provider":"openai","ttft_ms":{},"tokens":{{"prompt":{},"completion":{},"cached":{},"reasoning":{}}}{}"#,
                200 + (i * 37) % 9000,
                100 + i % 100,
                300 + i % 500,
                50 + i % 200,
                i % 300,
                i % 20,
                if i % 2 == 0 { r#","cost":0.00125"# } else { "" }
            ),
            19 if spend => format!(r#""type":"feedback","score":{},"scale":5"#, 1 + i % 5),
            8..=13 => format!(
                r#""type":"response","status":"{}","duration_ms":{},"model":"gpt-4o-mini","tokens":{{"prompt":{},"completion":{}}}"#,
                [
                    "success",
                    "success",
                    "success",
                    "error",
                    "timeout",
                    "rate_limited"
                ][i % 6],
                200 + (i * 37) % 9000,
                300 + i % 500,
                50 + i % 200
            ),
            14..=16 => format!(
                r#""type":"cache","result":"{}","cache":"answers""#,
                ["hit", "miss"][i % 2]
            ),
            17 => r#""type":"error","kind":"llm_timeout""#.to_owned(),
            18 => r#""type":"limit_reached""#.to_owned(),
            _ => r#""type":"custom","name":"voice_note","value":1"#.to_owned(),
        };
        out.push_str(&format!(
            r#"{{{body},"user_id":{user}{id},"ts":{}}}"#,
            now - (i as i64 % 600)
        ));
    }
    out.push(']');
    out.into_bytes()
}

fn ingest(c: &mut Criterion) {
    const N: usize = 1000;
    let body = realistic_batch(N, NOW);
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| {
            black_box(
                serde_json::from_slice::<Vec<serde_json::Value>>(black_box(&body)).expect("json"),
            )
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    group.bench_function("botmetrics_parse_validate_apply", |b| {
        let metrics = metrics(1000);
        // Dedupe window off so every iteration counts, as a stream of new ids would.
        let ingest = Ingest::new(Dedupe::new(Duration::ZERO, 16), None);
        let bot = metrics.bot("bench").expect("bot").clone();
        b.iter(|| {
            let events = parse_batch(
                black_box(&body),
                BodyFormat::Json,
                10_000,
                NOW,
                &botmetrics::event::UserKey::legacy(),
            )
            .expect("valid");
            black_box(
                rt.block_on(ingest.apply(&bot, &events, NOW * 1000))
                    .expect("applied"),
            )
        })
    });
    // The same batch with every new field of spend and quality, priced as
    // the HTTP handler prices it: what those fields cost per event.
    let spend_body = spend_batch(N, NOW);
    let prices = botmetrics::prices::Prices::builtin();
    group.bench_function("botmetrics_parse_validate_apply_with_spend_fields", |b| {
        let metrics = metrics(1000);
        let ingest = Ingest::new(Dedupe::new(Duration::ZERO, 16), None);
        let bot = metrics.bot("bench").expect("bot").clone();
        b.iter(|| {
            let mut events = parse_batch(
                black_box(&spend_body),
                BodyFormat::Json,
                10_000,
                NOW,
                &botmetrics::event::UserKey::legacy(),
            )
            .expect("valid");
            prices.price(&mut events);
            black_box(
                rt.block_on(ingest.apply(&bot, &events, NOW * 1000))
                    .expect("applied"),
            )
        })
    });
    // Cluster mode's one extra on a request without ids: each user is
    // noted for the next sync to Redis (here users recur, as they do within
    // an hour, so the note is a probe that finds them).
    group.bench_function("botmetrics_cluster_replica", |b| {
        let metrics = metrics(1000);
        let ingest = Ingest::new(Dedupe::new(Duration::ZERO, 16), None);
        let bot = metrics.bot("bench").expect("bot").clone();
        let dropped = prometheus::IntCounter::new("dropped", "dropped").expect("counter");
        let budget = Arc::new(UserBudget::new(1_000_000, dropped));
        let ingest = ingest.with_notes(Arc::new(Pending::new(budget)));
        b.iter(|| {
            let events = parse_batch(
                black_box(&body),
                BodyFormat::Json,
                10_000,
                NOW,
                &botmetrics::event::UserKey::legacy(),
            )
            .expect("valid");
            black_box(
                rt.block_on(ingest.apply(&bot, &events, NOW * 1000))
                    .expect("applied"),
            )
        })
    });
    group.bench_function("botmetrics_with_dedupe", |b| {
        let metrics = metrics(1000);
        let ingest = Ingest::new(Dedupe::new(Duration::from_secs(600), 2_000_000), None);
        let bot = metrics.bot("bench").expect("bot").clone();
        b.iter(|| {
            let events = parse_batch(
                black_box(&body),
                BodyFormat::Json,
                10_000,
                NOW,
                &botmetrics::event::UserKey::legacy(),
            )
            .expect("valid");
            black_box(
                rt.block_on(ingest.apply(&bot, &events, NOW * 1000))
                    .expect("applied"),
            )
        })
    });
    group.finish();

    // Each step alone, on the same bytes.
    let mut group = c.benchmark_group("ingest_stages");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("floor_serde_json_tokenize_only", |b| {
        b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&body)).expect("json"))
    });
    group.bench_function("parse_and_validate", |b| {
        b.iter(|| {
            parse_batch(
                black_box(&body),
                BodyFormat::Json,
                10_000,
                NOW,
                &botmetrics::event::UserKey::legacy(),
            )
            .expect("valid")
        })
    });
    // The same parse and checks by serde_json's derived reader alone: what
    // the fast reader (src/event/fast.rs) is measured against.
    group.bench_function("parse_and_validate_serde_json", |b| {
        b.iter(|| {
            parse_batch_serde(
                black_box(&body),
                BodyFormat::Json,
                10_000,
                NOW,
                &botmetrics::event::UserKey::legacy(),
            )
            .expect("valid")
        })
    });
    group.bench_function("apply", |b| {
        let metrics = metrics(1000);
        let ingest = Ingest::new(Dedupe::new(Duration::ZERO, 16), None);
        let bot = metrics.bot("bench").expect("bot").clone();
        let events = parse_batch(
            &body,
            BodyFormat::Json,
            10_000,
            NOW,
            &botmetrics::event::UserKey::legacy(),
        )
        .expect("valid");
        b.iter(|| {
            black_box(
                rt.block_on(ingest.apply(&bot, black_box(&events), NOW * 1000))
                    .expect("applied"),
            )
        })
    });
    group.finish();

    // The journal's cost, side by side in one run: the same batch and the
    // same single event with the journal off, `everysec` (the default) and
    // `always`.
    let single = br#"{"type":"message","user_id":42,"role":"user"}"#.to_vec();
    for (name, events_body, elements) in [("batch_1000", &body, N as u64), ("single", &single, 1)] {
        let mut group = c.benchmark_group(format!("journal_{name}"));
        group.throughput(Throughput::Elements(elements));
        for policy in [None, Some(FsyncPolicy::Everysec), Some(FsyncPolicy::Always)] {
            let label = policy.map_or("off".to_owned(), |p| format!("{p:?}").to_lowercase());
            let metrics = metrics(1000);
            let dir = std::env::temp_dir().join(format!(
                "botmetrics-bench-{name}-{label}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let journal = policy.map(|p| {
                Journal::open(&dir, "bench", p, u64::MAX)
                    .expect("journal")
                    .journal
            });
            let ingest = Ingest::new(Dedupe::new(Duration::ZERO, 16), journal);
            let bot = metrics.bot("bench").expect("bot").clone();
            group.bench_function(&label, |b| {
                b.iter(|| {
                    let events = parse_batch(
                        black_box(events_body),
                        BodyFormat::Json,
                        10_000,
                        NOW,
                        &botmetrics::event::UserKey::legacy(),
                    )
                    .expect("valid");
                    black_box(
                        rt.block_on(ingest.apply(&bot, &events, NOW * 1000))
                            .expect("applied"),
                    )
                })
            });
            drop(ingest);
            let _ = std::fs::remove_dir_all(&dir);
        }
        group.finish();
    }
}

fn apply(c: &mut Criterion) {
    let body = br#"{"type":"error","kind":"db_timeout"}"#;
    let events = parse_batch(
        body,
        BodyFormat::Json,
        1,
        NOW,
        &botmetrics::event::UserKey::legacy(),
    )
    .expect("valid");
    let metrics = metrics(1000);
    let bot = metrics.bot("bench").expect("bot").clone();
    let peer = prometheus::IntCounterVec::new(
        prometheus::Opts::new("bot_errors_total", "peer"),
        &["bot", "kind"],
    )
    .expect("counter");
    let mut group = c.benchmark_group("apply_free_form_label");
    group.bench_function("baseline_prometheus_with_label_values", |b| {
        b.iter(|| {
            peer.with_label_values(&[black_box("bench"), black_box("db_timeout")])
                .inc()
        })
    });
    group.bench_function("botmetrics_apply", |b| {
        b.iter(|| bot.apply(black_box(&events[0])))
    });
    group.finish();
}

/// Returns a function that counts one error of each of enough kinds (the
/// free-form label that grows) to bring the bot to `series` series; the
/// first call creates them, later calls move each of them once more.
fn fill_to(metrics: &Metrics, series: usize) -> impl Fn() + use<> {
    let bot = metrics.bot("bench").expect("bot").clone();
    let fixed = String::from_utf8_lossy(&metrics.render())
        .lines()
        .filter(|l| l.starts_with("bot_"))
        .count();
    let bodies: Vec<String> = (0..series.saturating_sub(fixed))
        .map(|k| format!(r#"{{"type":"error","kind":"kind_{k}"}}"#))
        .collect();
    move || {
        for body in &bodies {
            let events = parse_batch(
                body.as_bytes(),
                BodyFormat::Json,
                1,
                NOW,
                &botmetrics::event::UserKey::legacy(),
            )
            .expect("valid");
            bot.apply(&events[0]);
        }
    }
}

fn render(c: &mut Criterion) {
    const SERIES: usize = 10_000;
    let metrics = metrics(SERIES);
    fill_to(&metrics, SERIES)();
    let peer_registry = prometheus::Registry::new();
    let peer = prometheus::IntCounterVec::new(
        prometheus::Opts::new("peer_total", "peer"),
        &["bot", "kind"],
    )
    .expect("counter");
    peer_registry
        .register(Box::new(peer.clone()))
        .expect("register");
    for k in 0..SERIES {
        peer.with_label_values(&["bench", &format!("kind_{k}")])
            .inc();
    }
    let mut group = c.benchmark_group("render_10k_series");
    group.sample_size(30);
    group.bench_function("baseline_prometheus_crate_counters", |b| {
        b.iter(|| black_box(prometheus_crate_text(&peer_registry)))
    });
    group.bench_function("botmetrics_render", |b| {
        b.iter(|| black_box(metrics.render()))
    });
    group.bench_function("botmetrics_store_snapshot", |b| {
        b.iter(|| black_box(botmetrics::persist::snapshot(&metrics)))
    });
    group.bench_function("botmetrics_render_and_gzip", |b| {
        b.iter(|| {
            black_box(botmetrics::render_cache::Rendered::with_gzip(
                "text/plain",
                metrics.render(),
            ))
        })
    });
    group.finish();
}

fn sketch(c: &mut Criterion) {
    let metrics = metrics(10);
    let bot = metrics.bot("bench").expect("bot").clone();
    let mut group = c.benchmark_group("active_users");
    group.throughput(Throughput::Elements(1));
    // What earlier versions did per user: two always-dense atomic sketches.
    let hourly = hyperloglockless::AtomicHyperLogLog::seeded(14, 1);
    let daily = hyperloglockless::AtomicHyperLogLog::seeded(14, 1);
    let key = botmetrics::event::UserKey::legacy();
    let mut n: i128 = 0;
    group.bench_function("baseline_dense_hll_two_sketches", |b| {
        b.iter(|| {
            n += 1;
            let hash = key.hash(&UserId::Int(black_box(n))).0;
            hourly.insert_hash(hash);
            daily.insert_hash(hash);
        })
    });
    // A bot with a little traffic: sparse sketches, 500 users a bucket.
    let small = botmetrics::metrics::active::ActiveUsers::new();
    let mut m: i128 = 0;
    group.bench_function("insert_user_sparse_sketch", |b| {
        b.iter(|| {
            m += 1;
            small.insert_hashed(key.hash(&UserId::Int(black_box(m % 500))), NOW)
        })
    });
    let mut n: i128 = 0;
    group.bench_function("insert_distinct_user", |b| {
        b.iter(|| {
            n += 1;
            bot.active
                .insert_hashed(key.hash(&UserId::Int(black_box(n))), NOW)
        })
    });
    group.bench_function("estimate_three_windows", |b| {
        b.iter(|| black_box(bot.active.estimates_at(NOW)))
    });
    group.finish();
}

fn store(c: &mut Criterion) {
    use botmetrics::persist::Persistence;
    use botmetrics::store::Store;

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let db = format!("botmetrics_bench_{}", std::process::id());
    let admin = match rt.block_on(sqlx::PgPool::connect(&url)) {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("store benchmarks skipped: PostgreSQL at {url} is unreachable ({e})");
            return;
        }
    };
    rt.block_on(sqlx::query(sqlx::AssertSqlSafe(format!("create database {db}"))).execute(&admin))
        .expect("create db");
    let (base, _) = url.rsplit_once('/').expect("url path");
    let db_url = format!("{base}/{db}");

    const SERIES: usize = 10_000;
    let metrics = metrics(SERIES);
    // Every call moves every series: what the flush bench needs between runs.
    let bump = fill_to(&metrics, SERIES);
    bump();
    let _runtime = rt.enter();
    let persistence = Persistence::local(
        Store::open(&db_url).expect("open"),
        metrics.clone(),
        Arc::new(Ingest::new(Dedupe::new(Duration::ZERO, 16), None)),
        Duration::from_secs(90 * 86400),
        Duration::ZERO,
    );
    let store = &persistence.store;
    rt.block_on(persistence.prepare()).expect("prepare");
    let changed = botmetrics::persist::snapshot(&metrics).len();
    eprintln!("store benchmarks: {changed} series per flush");

    let mut group = c.benchmark_group("store_postgres_10k");
    group.sample_size(20);
    group.bench_function("flush_10k_changed_series", |b| {
        b.iter_batched(
            &bump,
            |()| rt.block_on(persistence.flush_once()).expect("flush"),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("history_write_10k_points", |b| {
        let rows = botmetrics::persist::snapshot(&metrics);
        b.iter(|| {
            rt.block_on(store.write_history(&rows, chrono::Utc::now()))
                .expect("history")
        })
    });
    group.bench_function("restore_10k_series", |b| {
        b.iter(|| {
            let fresh = self::metrics(SERIES);
            let stored = rt.block_on(store.load()).expect("load");
            black_box(botmetrics::persist::restore(&fresh, &stored, NOW))
        })
    });
    group.finish();
    rt.block_on(store.close());
    let _ = rt.block_on(
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists {db} with (force)"
        )))
        .execute(&admin),
    );
}

/// 1,000 bots, each with a little traffic: 20 distinct users this hour and
/// a few of every event type, as `--tokens` with 1,000 pairs would serve.
fn many_bots_metrics() -> Arc<Metrics> {
    const BOTS: usize = 1000;
    let bots: Vec<Arc<str>> = (0..BOTS).map(|i| Arc::from(format!("bot{i}"))).collect();
    let metrics = Arc::new(
        Metrics::new(&bots, 1000, chrono_tz::UTC, 30.0, Default::default()).expect("registry"),
    );
    // Real time: `/metrics` estimates the windows that end now.
    let now = chrono::Utc::now().timestamp();
    let body = realistic_batch(20, now);
    for (i, bot) in metrics.bots().iter().enumerate() {
        let events = parse_batch(
            &body,
            BodyFormat::Json,
            100,
            now,
            &botmetrics::event::UserKey::legacy(),
        )
        .expect("valid");
        for event in events.iter() {
            bot.apply(event);
        }
        // Yesterday's users too, so two hourly and two daily buckets hold some.
        for u in 0..20 {
            bot.active.insert_hashed(
                botmetrics::event::UserKey::legacy().hash(&UserId::Int((i * 1000 + u) as i128)),
                now - 86_400 + 3600,
            );
        }
    }
    metrics
}

fn many_bots(c: &mut Criterion) {
    let metrics = many_bots_metrics();
    let lines = String::from_utf8_lossy(&metrics.render())
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    eprintln!("many_bots: {lines} sample lines on /metrics");
    let peer_registry = prometheus::Registry::new();
    let peer = prometheus::IntCounterVec::new(
        prometheus::Opts::new("peer_total", "peer"),
        &["bot", "kind"],
    )
    .expect("counter");
    peer_registry
        .register(Box::new(peer.clone()))
        .expect("register");
    for k in 0..lines {
        peer.with_label_values(&[&format!("bot{}", k % 1000), &format!("kind_{k}")])
            .inc();
    }
    let mut group = c.benchmark_group("many_bots_1000");
    group.sample_size(20);
    group.bench_function("baseline_prometheus_crate_same_line_count", |b| {
        b.iter(|| black_box(prometheus_crate_text(&peer_registry)))
    });
    group.bench_function("botmetrics_metrics_render", |b| {
        b.iter(|| black_box(metrics.render()))
    });
    group.bench_function("botmetrics_metrics_render_and_gzip", |b| {
        b.iter(|| {
            black_box(botmetrics::render_cache::Rendered::with_gzip(
                "text/plain",
                metrics.render(),
            ))
        })
    });
    group.bench_function("botmetrics_summary_all_bots_json", |b| {
        b.iter(|| {
            let now = chrono::Utc::now();
            let summaries: Vec<botmetrics::summary::Summary> = metrics
                .bots()
                .iter()
                .map(|bot| botmetrics::summary::Summary::build(bot, now, 60))
                .collect();
            black_box(serde_json::to_vec(
                &serde_json::json!({ "bots": summaries }),
            ))
        })
    });
    group.bench_function("botmetrics_active_estimates_all_bots", |b| {
        b.iter(|| {
            for bot in metrics.bots().iter() {
                black_box(bot.active.estimates());
            }
        })
    });
    // A flush tick with nothing changed: every series compared with what
    // the store holds, inside the cut's ingest pause, and no row built.
    let written = botmetrics::persist::Written::of(&botmetrics::persist::snapshot(&metrics));
    group.bench_function("botmetrics_quiet_flush_compare_all_series", |b| {
        b.iter(|| {
            let rows = botmetrics::persist::changed(&metrics, &written);
            assert!(rows.is_empty());
            black_box(rows)
        })
    });
    group.finish();
}

/// The peer: the prometheus crate's own gather and text encoding.
fn prometheus_crate_text(registry: &prometheus::Registry) -> Vec<u8> {
    let mut out = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &registry.gather(),
        &mut out,
    )
    .expect("encode");
    out
}

/// The user book: today's mixed batch with the book on and off side by
/// side (the batch's 50,000 users are in the book after the first pass, as
/// a bot's returning users are), the periodic scan over a million users,
/// and the restore of a million stored users.
fn user_book(c: &mut Criterion) {
    const N: usize = 1000;
    let body = realistic_batch(N, NOW);
    let key = botmetrics::event::UserKey::legacy();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("user_book");
    group.throughput(Throughput::Elements(N as u64));
    for (name, limits) in [
        ("ingest_book_off", BookLimits::OFF),
        ("ingest_book_on", BookLimits::DEFAULT),
    ] {
        let metrics = metrics_with_book(1000, limits);
        let ingest = Ingest::new(Dedupe::new(Duration::ZERO, 16), None);
        let bot = metrics.bot("bench").expect("bot").clone();
        group.bench_function(name, |b| {
            b.iter(|| {
                let events = parse_batch(black_box(&body), BodyFormat::Json, 10_000, NOW, &key)
                    .expect("valid");
                black_box(
                    rt.block_on(ingest.apply(&bot, &events, NOW * 1000))
                        .expect("applied"),
                )
            })
        });
    }
    group.finish();

    const USERS: u64 = 1_000_000;
    let day = (NOW / 86_400) as u32;
    let million = || {
        let book = UserBook::new(BookLimits::DEFAULT);
        for u in 1..=USERS {
            let ts = NOW - (u % 30) as i64 * 86_400;
            book.touch(
                u.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ts,
                (ts / 86_400) as u32,
                true,
            );
        }
        book
    };
    let mut group = c.benchmark_group("user_book_1m");
    group.sample_size(10);
    group.throughput(Throughput::Elements(USERS));
    let book = million();
    group.bench_function("scan_1m_users", |b| {
        b.iter(|| black_box(book.scan(NOW, day).cohorts.len()))
    });
    let rows: Vec<UserRow> = book.cut().changed;
    group.bench_function("restore_1m_users", |b| {
        b.iter_batched(
            || UserBook::new(BookLimits::DEFAULT),
            |fresh| {
                fresh.restore(&rows);
                black_box(fresh.len())
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(
    benches, ingest, apply, render, sketch, many_bots, store, user_book
);
criterion_main!(benches);
