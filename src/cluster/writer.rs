//! Redis → the store: one replica at a time writes the cluster totals.
//!
//! The replica that holds the lease `bm:writer` (a Redis key with an
//! expiry of three flush intervals, renewed at every flush) writes what
//! Redis holds to `real_time_metrics` every `--flush-interval`, with the
//! sketches and each replica's applied marks in the same transaction, and
//! a point per series to `metrics_history` every `--history-interval`. When
//! it stops it gives the lease up; when it dies the lease expires and
//! another replica takes it. The store's own one-writer lease (an advisory
//! lock on PostgreSQL) is taken too, and given up with the Redis lease: it
//! fences a holder that stalled past its expiry, since only one process can
//! hold it at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::view::{BotView, View};
use super::{BotKeys, Cluster, Result, timed};
use crate::metrics::Metrics;
use crate::metrics::bot::ACTIVE_USERS;
use crate::persist::{FlushOutcome, Written};
use crate::store::{ClusterProgress, ClusterSketch, DailyRow, FlushBatch, SeriesRow, Store};

const LEASE_KEY: &str = "bm:writer";

#[derive(Default)]
struct State {
    holding: bool,
    /// What the store holds, so a flush sends only changes.
    written: Written,
    daily: HashMap<(String, String), (NaiveDate, i64)>,
    history: Option<Vec<SeriesRow>>,
    maintained_on: Option<NaiveDate>,
}

pub struct Writer {
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    view: Arc<View>,
    store: Arc<Store>,
    bots: Vec<Arc<str>>,
    lease_ttl: Duration,
    retention: chrono::Duration,
    state: Mutex<State>,
    renew: redis::Script,
    release: redis::Script,
    clean: redis::Script,
}

/// Every row the store keeps for the cluster: the totals, and the
/// cluster-wide distinct users as the gauge rows a single process writes.
fn rows(views: &[BotView]) -> Vec<SeriesRow> {
    let mut rows = Vec::new();
    for view in views {
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

impl Writer {
    pub fn new(
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
        view: Arc<View>,
        store: Arc<Store>,
        bots: Vec<Arc<str>>,
        flush_interval: Duration,
        retention: Duration,
    ) -> Self {
        Writer {
            cluster,
            metrics,
            view,
            store,
            bots,
            lease_ttl: (flush_interval * 3).max(Duration::from_secs(1)),
            retention: chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX),
            state: Mutex::new(State::default()),
            renew: redis::Script::new(include_str!("lua/renew.lua")),
            release: redis::Script::new(include_str!("lua/release.lua")),
            clean: redis::Script::new(include_str!("lua/clean.lua")),
        }
    }

    /// Takes or renews the lease; on taking it, the store's lease too, and
    /// what the store holds. False while another replica writes. A Redis
    /// error steps down: a lease that cannot be renewed is not held.
    async fn hold_lease(&self, state: &mut State) -> Result<bool> {
        let held = self.renew_or_take().await;
        let taken = match held {
            Ok(true) if state.holding => return Ok(true),
            Ok(true) => true,
            Ok(false) => false,
            Err(e) => {
                if state.holding {
                    tracing::warn!(error = %e, "redis unreachable: this replica stops writing the cluster totals until it can renew its lease");
                    self.step_down(state).await;
                }
                return Err(e);
            }
        };
        if !taken {
            if state.holding {
                tracing::warn!("the store-writer lease expired and another replica took it");
                self.step_down(state).await;
            }
            return Ok(false);
        }
        let prepared = async {
            self.store.acquire_writer().await?;
            self.store.migrate().await?;
            let stored = self.store.load().await?;
            state.written = Written::of(&stored.series);
            state.daily = stored
                .daily
                .iter()
                .map(|d| ((d.bot.clone(), d.name.clone()), (d.day, d.value)))
                .collect();
            self.maintain(state).await
        };
        if let Err(e) = prepared.await {
            // Give the lease back at once: another replica may do better.
            self.give_back().await;
            self.store.release_writer().await;
            return Err(e);
        }
        state.holding = true;
        self.cluster.metrics.writer.set(1);
        tracing::info!(
            replica = %self.cluster.replica,
            "this replica writes the cluster totals to the {} store",
            self.store.backend()
        );
        Ok(true)
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

    async fn step_down(&self, state: &mut State) {
        state.holding = false;
        state.history = None;
        self.store.release_writer().await;
        self.cluster.metrics.writer.set(0);
    }

    async fn maintain(&self, state: &mut State) -> Result<()> {
        let now = Utc::now();
        let report = self.store.maintain(now, now - self.retention).await?;
        if !report.partitions_dropped.is_empty() || report.rows_deleted > 0 {
            tracing::info!(dropped = ?report.partitions_dropped, rows_deleted = report.rows_deleted, "history past retention removed");
        }
        state.maintained_on = Some(now.date_naive());
        Ok(())
    }

    /// One flush, if this replica holds (or can take) the lease: every
    /// series, sketch, "today" counter and applied mark that changed.
    pub async fn flush_once(&self) -> Result<FlushOutcome> {
        let started = Instant::now();
        let mut state = self.state.lock().await;
        if !self.hold_lease(&mut state).await? {
            // Not the writer: still say whether the store answers, so the
            // store alert means the same on every replica.
            let up = self.store.ping().await.is_ok();
            self.metrics.selfm.store_up.set(i64::from(up));
            return Ok(FlushOutcome::Idle);
        }
        let names: Vec<&str> = self.bots.iter().map(|b| &**b).collect();
        let views: Vec<BotView> = self
            .view
            .read(&names, true)
            .await?
            .into_iter()
            .flatten()
            .collect();
        let mut batch = FlushBatch::default();
        state.written.changes(rows(&views), &mut batch);
        for view in &views {
            // The latest day of each counter is the one the store keeps.
            let mut latest: HashMap<&str, &DailyRow> = HashMap::new();
            for d in &view.daily {
                let e = latest.entry(d.name.as_str()).or_insert(d);
                if d.day > e.day {
                    *e = d;
                }
            }
            for d in latest.into_values() {
                let k = (d.bot.clone(), d.name.clone());
                if state.daily.get(&k) != Some(&(d.day, d.value)) {
                    batch.daily.push(d.clone());
                }
            }
            for (sketch, hll) in &view.sketches {
                batch.cluster_sketches.push(ClusterSketch {
                    bot: view.bot.clone(),
                    sketch: sketch.clone(),
                    hll: hll.clone(),
                });
            }
            for (replica, applied) in &view.applied {
                batch.cluster_progress.push(ClusterProgress {
                    bot: view.bot.clone(),
                    replica: replica.clone(),
                    applied: *applied,
                });
            }
        }
        // Marks alone, unchanged since the last write, are not worth one.
        if batch.changed.is_empty()
            && batch.added.is_empty()
            && batch.daily.is_empty()
            && batch.cluster_sketches.is_empty()
        {
            return Ok(FlushOutcome::Idle);
        }
        let written = self.store.flush(&batch, Utc::now()).await;
        let report = match written {
            Ok(report) => report,
            Err(e) => {
                self.store.lost_connection().await;
                if !self.store.is_writer().await {
                    self.step_down(&mut state).await;
                }
                self.metrics.selfm.store_up.set(0);
                self.metrics.selfm.flush_failures.inc();
                return Err(e.into());
            }
        };
        state.written.wrote(&batch, report);
        for d in &batch.daily {
            state
                .daily
                .insert((d.bot.clone(), d.name.clone()), (d.day, d.value));
        }
        // The store has these sketches now: unmark those no sync changed
        // since they were read. Housekeeping: a mark left behind only
        // writes a sketch again.
        let mut conn = timed(self.cluster.redis.conn()).await?;
        for view in views.iter().filter(|v| !v.sketches.is_empty()) {
            let keys = BotKeys::new(&view.bot);
            let mut invocation = self.clean.prepare_invoke();
            invocation.key(keys.dirty());
            for (name, hll) in &view.sketches {
                invocation.key(format!("bm:{{{}}}:{name}", view.bot));
                invocation.arg(hll.as_slice());
            }
            if let Err(e) = timed(invocation.invoke_async::<i64>(&mut conn)).await {
                tracing::debug!(error = %e, bot = %view.bot, "sketch marks not cleared; the next flush writes them again");
            }
        }
        let selfm = &self.metrics.selfm;
        selfm.store_up.set(1);
        selfm
            .flush_duration
            .observe(started.elapsed().as_secs_f64());
        selfm
            .last_flush
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
        Ok(FlushOutcome::Wrote {
            series: batch.changed.len() + batch.added.len(),
            sketches: batch.cluster_sketches.len(),
            daily: batch.daily.len(),
        })
    }

    /// A point per series to the history, if this replica writes and
    /// anything changed since the last point.
    pub async fn write_history_once(&self) -> Result<usize> {
        let mut state = self.state.lock().await;
        if !state.holding {
            return Ok(0);
        }
        if state.maintained_on != Some(Utc::now().date_naive()) {
            self.maintain(&mut state).await?;
        }
        let names: Vec<&str> = self.bots.iter().map(|b| &**b).collect();
        let views: Vec<BotView> = self
            .view
            .read(&names, false)
            .await?
            .into_iter()
            .flatten()
            .collect();
        let rows = rows(&views);
        if state.history.as_ref() == Some(&rows) {
            return Ok(0);
        }
        let started = Instant::now();
        if let Err(e) = self.store.write_history(&rows, Utc::now()).await {
            self.metrics.selfm.history_failures.inc();
            return Err(e.into());
        }
        self.metrics
            .selfm
            .history_duration
            .observe(started.elapsed().as_secs_f64());
        let n = rows.len();
        state.history = Some(rows);
        Ok(n)
    }

    /// On the way out: a last flush (after the last sync), then the lease
    /// goes back so another replica takes over at once.
    pub async fn finish(&self) {
        if !self.state.lock().await.holding {
            return;
        }
        match self.flush_once().await {
            Ok(outcome) => tracing::info!(?outcome, "final cluster flush done"),
            Err(e) => {
                tracing::warn!(error = %e, "final cluster flush failed; Redis keeps the totals and the next writer stores them")
            }
        }
        let mut state = self.state.lock().await;
        self.give_back().await;
        self.step_down(&mut state).await;
    }
}

/// Flushes every `interval` (retrying a failure sooner) and writes history
/// every `history_interval`, while this replica holds the lease.
pub async fn writer_loop(
    writer: Arc<Writer>,
    interval: Duration,
    history_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut next_history = tokio::time::Instant::now() + history_interval;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(crate::tasks::flush_wait(failures, interval)) => {}
        }
        match writer.flush_once().await {
            Ok(_) => {
                if failures > 0 {
                    tracing::info!(failures, "cluster totals reach the store again");
                }
                failures = 0;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::error!(error = %e, "writing the cluster totals to the store failed; Redis keeps them and the write retries");
                }
                failures = failures.saturating_add(1);
            }
        }
        if tokio::time::Instant::now() >= next_history {
            next_history += history_interval;
            match writer.write_history_once().await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cluster history write failed; the next tick writes a point")
                }
            }
        }
    }
}
