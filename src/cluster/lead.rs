//! Redis → the store: cluster mode's [`Source`] for the one store writer.
//!
//! The replica that holds the lease `bm:writer` (a Redis key with an
//! expiry of three flush intervals, renewed at every flush) leads: the
//! store writer (`persist`) writes what Redis holds to `real_time_metrics`
//! every `--flush-interval`, with the sketches and each replica's applied
//! marks in the same transaction, and a point per series to
//! `metrics_history` every `--history-interval`. When it stops it gives the
//! lease up; when it dies the lease expires and another replica takes it.
//! The store's own one-writer lease (an advisory lock on PostgreSQL) is
//! taken too, by the writer, and given up with the Redis lease: it fences a
//! holder that stalled past its expiry, since only one process can hold it
//! at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::view::{BotView, View};
use super::{BotKeys, Cluster, ClusterError, Result, timed};
use crate::BoxFuture;
use crate::metrics::Metrics;
use crate::metrics::bot::{ACTIVE_USERS, RETENTION};
use crate::persist::{self, Cut, PersistError, RestoreReport, Source, Written};
use crate::store::{ClusterProgress, ClusterSketch, DailyRow, FlushBatch, SeriesRow, Stored};

const LEASE_KEY: &str = "bm:writer";

/// The Redis lease's expiry: three flush intervals, so one slow flush does
/// not lose it. The store's own lease is bounded from it (`startup`).
pub fn lease_ttl(flush_interval: Duration) -> Duration {
    (flush_interval * 3).max(Duration::from_secs(1))
}

/// The lead in Redis and the cluster totals it writes.
pub struct Lead {
    cluster: Arc<Cluster>,
    view: Arc<View>,
    /// Whose bots it writes: all counted here, those created at runtime
    /// included (the registry adds them on every replica).
    metrics: Arc<Metrics>,
    lease_ttl: Duration,
    holding: AtomicBool,
    renew: redis::Script,
    wipe: redis::Script,
    release: redis::Script,
    clean: redis::Script,
    clean_book: redis::Script,
}

fn source(e: ClusterError) -> PersistError {
    match e {
        ClusterError::Store(e) => PersistError::Store(e),
        other => PersistError::Source(Box::new(other)),
    }
}

/// Every row the store keeps for the cluster: the totals, and the
/// cluster-wide distinct users and retention ratios as the gauge rows a
/// single process writes (the ratios from the cohorts the lead's own book
/// scan counted, which `metrics` holds).
fn rows(views: &[BotView], metrics: &Metrics) -> Vec<SeriesRow> {
    let mut rows = Vec::new();
    for view in views {
        let ratios = metrics.bot(&view.bot).and_then(|b| b.retention_ratios());
        for (day, ratio) in ratios.into_iter().flatten() {
            rows.push(SeriesRow {
                metric: RETENTION.name.to_owned(),
                bot: view.bot.clone(),
                labels: format!(r#"{{"day":"{day}"}}"#),
                value: ratio,
            });
        }
        rows.extend(view.series.iter().filter(|r| r.value.is_finite()).cloned());
        for (window, users) in ["1d", "7d", "30d"].into_iter().zip(view.users) {
            rows.push(SeriesRow {
                metric: ACTIVE_USERS.name.to_owned(),
                bot: view.bot.clone(),
                labels: format!(r#"{{"window":"{window}"}}"#),
                value: users as f64,
            });
        }
    }
    rows
}

impl Lead {
    pub fn new(
        cluster: Arc<Cluster>,
        view: Arc<View>,
        metrics: Arc<Metrics>,
        flush_interval: Duration,
    ) -> Self {
        Lead {
            cluster,
            view,
            metrics,
            lease_ttl: lease_ttl(flush_interval),
            holding: AtomicBool::new(false),
            renew: redis::Script::new(include_str!("lua/renew.lua")),
            wipe: redis::Script::new(include_str!("lua/wipe.lua")),
            release: redis::Script::new(include_str!("lua/release.lua")),
            clean: redis::Script::new(concat!(
                include_str!("lua/exact.lua"),
                include_str!("lua/clean.lua")
            )),
            clean_book: redis::Script::new(include_str!("lua/book_clean.lua")),
        }
    }

    /// Takes or renews the lease. False while another replica writes. A
    /// Redis error steps down: a lease that cannot be renewed is not held.
    async fn hold(&self) -> Result<bool> {
        let held = self.renew_or_take().await;
        let was = self.holding.load(Ordering::Relaxed);
        match &held {
            Ok(true) if !was => tracing::info!(
                replica = %self.cluster.replica,
                "this replica writes the cluster totals to the store"
            ),
            Ok(false) if was => {
                tracing::warn!("the store-writer lease expired and another replica took it")
            }
            Err(e) if was => {
                tracing::warn!(error = %e, "redis unreachable: this replica stops writing the cluster totals until it can renew its lease")
            }
            _ => {}
        }
        let holding = matches!(held, Ok(true));
        self.holding.store(holding, Ordering::Relaxed);
        self.cluster.metrics.writer.set(i64::from(holding));
        held
    }

    /// Renews the lease if this replica holds it, else takes it if free.
    async fn renew_or_take(&self) -> Result<bool> {
        let mut conn = timed(self.cluster.redis.conn()).await?;
        let ttl_ms = self.lease_ttl.as_millis() as u64;
        let renewed: i64 = timed(
            self.renew
                .key(LEASE_KEY)
                .arg(&self.cluster.replica)
                .arg(ttl_ms)
                .invoke_async(&mut conn),
        )
        .await?;
        if renewed == 1 {
            return Ok(true);
        }
        let taken: Option<String> = timed(
            redis::cmd("SET")
                .arg(LEASE_KEY)
                .arg(&self.cluster.replica)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut conn),
        )
        .await?;
        Ok(taken.is_some())
    }

    async fn give_back(&self) {
        if let Ok(mut conn) = self.cluster.redis.conn().await {
            let _: Result<i64> = timed(
                self.release
                    .key(LEASE_KEY)
                    .arg(&self.cluster.replica)
                    .invoke_async(&mut conn),
            )
            .await;
        }
    }

    async fn read(&self, for_store: bool) -> Result<Vec<BotView>> {
        let bots = self.metrics.bots();
        let names: Vec<&str> = bots.iter().map(|b| &*b.bot).collect();
        Ok(self
            .view
            .read(&names, for_store)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    /// The store has these sketches now: unmark those no sync changed
    /// since they were read. Housekeeping: a mark left behind only writes
    /// a sketch again.
    async fn clean(&self, sketches: &[ClusterSketch]) {
        let mut by_bot: HashMap<&str, Vec<&ClusterSketch>> = HashMap::new();
        for s in sketches {
            by_bot.entry(&s.bot).or_default().push(s);
        }
        let Ok(mut conn) = timed(self.cluster.redis.conn()).await else {
            return;
        };
        for (bot, sketches) in by_bot {
            let keys = BotKeys::new(bot);
            let mut invocation = self.clean.prepare_invoke();
            invocation.key(keys.dirty());
            for s in sketches {
                invocation.key(format!("bm:{{{bot}}}:{}", s.sketch));
                invocation.arg(s.hll.as_slice());
            }
            if let Err(e) = timed(invocation.invoke_async::<i64>(&mut conn)).await {
                tracing::debug!(error = %e, bot, "sketch marks not cleared; the next flush writes them again");
            }
        }
    }
}

impl Lead {
    /// The store has these users now: unmark those no sync or scan
    /// changed since they were read (as [`Lead::clean`] does sketches).
    async fn clean_users(&self, users: &[crate::store::BotUsers]) {
        let Ok(mut conn) = timed(self.cluster.redis.conn()).await else {
            return;
        };
        for u in users {
            let keys = BotKeys::new(&u.bot);
            let mut invocation = self.clean_book.prepare_invoke();
            invocation.key(keys.book()).key(keys.book_changed());
            for row in &u.changed {
                let entry = crate::metrics::users::Entry::from_stored(&row.entry);
                invocation.arg(row.key.to_le_bytes().as_slice());
                invocation.arg(entry.pack().as_slice());
            }
            for key in &u.gone {
                invocation.arg(key.to_le_bytes().as_slice()).arg("");
            }
            if let Err(e) = timed(invocation.invoke_async::<i64>(&mut conn)).await {
                tracing::debug!(error = %e, bot = %u.bot, "user marks not cleared; the next flush writes them again");
            }
        }
    }
}

impl super::book::Leading for Lead {
    /// Whether this replica holds the writer lease (as of its last flush).
    fn holds(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
    }
}

impl Source for Lead {
    fn lead(&self) -> BoxFuture<'_, persist::Result<bool>> {
        Box::pin(async { self.hold().await.map_err(source) })
    }

    fn resign(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            if self.holding.swap(false, Ordering::Relaxed) {
                self.give_back().await;
            }
            self.cluster.metrics.writer.set(0);
        })
    }

    /// Nothing in memory to restore: the replicas' counts reach Redis by
    /// the sync, and a bot Redis lacks is seeded from the store there.
    fn restore<'a>(
        &'a self,
        _beyond: &'a Stored,
        _stored: &'a Stored,
    ) -> BoxFuture<'a, persist::Result<RestoreReport>> {
        Box::pin(async { Ok(RestoreReport::default()) })
    }

    fn cut<'a>(&'a self, _written: &'a Written) -> BoxFuture<'a, persist::Result<Cut>> {
        Box::pin(async move {
            // Taken before the read: a wipe applied after it (this
            // replica's sync learning of it) goes in the next flush, which
            // deletes whatever this one writes of the bot.
            let wiped = self.metrics.take_wipes();
            let views = match self.read(true).await {
                Ok(views) => views,
                Err(e) => {
                    self.metrics.wipes_not_stored(&wiped);
                    return Err(source(e));
                }
            };
            let mut cut = Cut {
                rows: rows(&views, &self.metrics),
                ..Cut::default()
            };
            cut.rest.wiped = wiped;
            for view in &views {
                // The latest day of each counter is the one the store keeps.
                let mut latest: HashMap<&str, &DailyRow> = HashMap::new();
                for d in &view.daily {
                    let e = latest.entry(d.name.as_str()).or_insert(d);
                    if d.day > e.day {
                        *e = d;
                    }
                }
                cut.daily.extend(latest.into_values().cloned());
                for (sketch, hll) in &view.sketches {
                    cut.rest.cluster_sketches.push(ClusterSketch {
                        bot: view.bot.clone(),
                        sketch: sketch.clone(),
                        hll: hll.clone(),
                    });
                }
                if !view.book_users.is_empty() {
                    let mut users = crate::store::BotUsers {
                        bot: view.bot.clone(),
                        changed: Vec::new(),
                        gone: Vec::new(),
                    };
                    for (key, entry) in &view.book_users {
                        match crate::metrics::users::Entry::unpack(entry) {
                            Some(e) => users.changed.push(crate::store::UserRow {
                                key: *key,
                                entry: e.to_stored(),
                            }),
                            None => users.gone.push(*key),
                        }
                    }
                    cut.rest.users.push(users);
                }
                for (replica, applied) in &view.applied {
                    cut.rest.cluster_progress.push(ClusterProgress {
                        bot: view.bot.clone(),
                        replica: replica.clone(),
                        applied: *applied,
                    });
                }
            }
            Ok(cut)
        })
    }

    fn stored<'a>(&'a self, batch: &'a FlushBatch) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.clean(&batch.cluster_sketches).await;
            self.clean_users(&batch.users).await;
        })
    }

    fn not_stored(&self, batch: &FlushBatch) {
        self.metrics.wipes_not_stored(&batch.wiped);
    }

    /// Deletes the bot's keys in Redis, leaving the marker every replica's
    /// next sync reads (`lua/wipe.lua`), then waits for this replica's own
    /// sync to drop what it counted: the answer then holds here.
    fn wipe<'a>(
        &'a self,
        bot: &'a str,
        generation: i64,
    ) -> BoxFuture<'a, persist::Result<crate::metrics::Wiped>> {
        Box::pin(async move {
            let held =
                self.metrics
                    .bot(bot)
                    .map_or_else(Default::default, |b| crate::metrics::Wiped {
                        series: persist::bot_rows(&b).len(),
                        users: b.book.len(),
                    });
            let keys = BotKeys::new(bot);
            let mut conn = timed(self.cluster.redis.conn()).await.map_err(source)?;
            let replicas: Vec<String> = timed(
                redis::cmd("HKEYS")
                    .arg(keys.applied())
                    .query_async(&mut conn),
            )
            .await
            .map_err(source)?;
            let now = chrono::Utc::now().timestamp();
            let mut invocation = self.wipe.prepare_invoke();
            invocation.key(keys.seeded());
            for key in keys
                .script_keys(now)
                .into_iter()
                .filter(|k| *k != keys.seeded())
            {
                invocation.key(key);
            }
            // Sketches a little outside the windows the scripts read (an
            // event up to 5 minutes ahead, an hour just past): older ones
            // expired.
            let (hour, day) = (now.div_euclid(3600), now.div_euclid(86_400));
            for h in [hour - super::HOURS, hour + 1] {
                invocation.key(keys.hour_sketch(h));
            }
            for d in [day - super::DAYS, day + 1] {
                invocation.key(keys.day_sketch(d));
            }
            // The exact set of a small audience (`lua/exact.lua`), the
            // shared user book, its marks and the cohorts read from it.
            for key in [
                keys.seen(),
                keys.seen_since(),
                keys.book(),
                keys.book_changed(),
                keys.book_load(),
                keys.cohorts(),
            ] {
                invocation.key(key);
            }
            for replica in &replicas {
                invocation.key(keys.pending(replica));
                invocation.key(keys.alive(replica));
                invocation.key(keys.released(replica));
            }
            invocation.arg(generation);
            let deleted: i64 = timed(invocation.invoke_async(&mut conn))
                .await
                .map_err(source)?;
            tracing::info!(
                bot,
                deleted,
                generation,
                "bot wiped in Redis; every replica drops its counts at its next sync"
            );
            // This replica's next sync applies it (at most one interval,
            // and a second for a sync in progress).
            let deadline = std::time::Instant::now() + self.cluster.sync_interval * 3;
            while self.metrics.wipe_generation(bot) < generation
                && self.metrics.bot(bot).is_some()
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(held)
        })
    }

    fn history(&self) -> BoxFuture<'_, persist::Result<Vec<SeriesRow>>> {
        Box::pin(async move {
            let views = self.read(false).await.map_err(source)?;
            Ok(rows(&views, &self.metrics))
        })
    }
}
