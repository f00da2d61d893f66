//! The store's one writer, in both modes: it takes the store's lease,
//! migrates, reads what the store holds, and then, every flush, writes what
//! changed in one transaction and, every history tick, a point per series.
//!
//! What it writes comes from a [`Source`], the narrow seam between "what to
//! write" and "how the store is written":
//!
//! * one process: [`local::Local`], this process's memory cut at a journal
//!   position (the LSN goes into the same transaction, so a restart replays
//!   exactly the journal past it);
//! * cluster mode: the cluster totals read from Redis, by the replica
//!   holding the Redis lease (`cluster::lead`).
//!
//! Everything else — the standby, restore and maintenance, the series and
//! daily diffs, the history dedupe and every store self-metric — exists
//! here once, so a new kind of state is written the same way in both modes.
//! No flush or history write happens before the restore, so the store is
//! never overwritten with totals that lack it.

pub mod local;
mod rows;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chrono::{NaiveDate, Utc};
use tokio::sync::Mutex;

pub use rows::{
    Daily, RestoreReport, Written, beyond, bot_rows, changed, restore, restore_into, restore_users,
    snapshot, whole_histograms,
};

use crate::BoxFuture;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::store::{DailyRow, FlushBatch, SeriesRow, Store, StoreError, Stored};

/// Why a flush or a history write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source could not say what to write (cluster mode: Redis).
    #[error("{0}")]
    Source(Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = PersistError> = std::result::Result<T, E>;

/// What a source gives one flush: every series as rows and each "today"
/// counter's latest day (the writer sends only what differs from the
/// store), and what the source alone knows how to fill in `rest`
/// (sketches, how far the store holds each journal).
#[derive(Debug, Default)]
pub struct Cut {
    pub rows: Vec<SeriesRow>,
    pub daily: Vec<DailyRow>,
    pub rest: FlushBatch,
}

/// Where the writer takes what it writes. Implemented by this process's
/// memory ([`local::Local`]) and by the cluster totals (`cluster::lead`).
pub trait Source: Send + Sync {
    /// Whether this process writes now: always for one process; in cluster
    /// mode while it holds (or can take) the lease. An error is a lost lead.
    fn lead(&self) -> BoxFuture<'_, Result<bool>>;
    /// This process stops writing (lease lost, store lost, or shutdown).
    fn resign(&self) -> BoxFuture<'_, ()>;
    /// The store was just read on taking the lead: `beyond` is what it
    /// holds past what this process believes it wrote, `stored` all of it.
    fn restore<'a>(
        &'a self,
        beyond: &'a Stored,
        stored: &'a Stored,
    ) -> BoxFuture<'a, Result<RestoreReport>>;
    /// What to write now. `written` is what the store holds of each
    /// series: rows equal to it may be left out of the cut (they are
    /// filtered out against it anyway).
    fn cut<'a>(&'a self, written: &'a Written) -> BoxFuture<'a, Result<Cut>>;
    /// `batch` (built from the last cut) is in the store.
    fn stored<'a>(&'a self, batch: &'a FlushBatch) -> BoxFuture<'a, ()>;
    /// `batch` could not be written: hand back what the cut took.
    fn not_stored(&self, batch: &FlushBatch);
    /// The rows of a history point.
    fn history(&self) -> BoxFuture<'_, Result<Vec<SeriesRow>>>;
    /// Takes `bot` out of what this source counts, as wipe `generation`,
    /// and out of this process's memory; answers what memory held of it.
    /// The store's rows go at the next flush that writes (`Metrics::wipe`
    /// queues them).
    fn wipe<'a>(
        &'a self,
        bot: &'a str,
        generation: i64,
    ) -> BoxFuture<'a, Result<crate::metrics::Wiped>>;
}

/// What one flush did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Nothing changed since the last flush (or another process writes):
    /// no statement was sent.
    Idle,
    /// One transaction wrote this many rows.
    Wrote {
        series: usize,
        sketches: usize,
        daily: usize,
        /// User-book rows written or deleted.
        users: usize,
        /// Rows of wiped bots deleted, in every table.
        wiped: usize,
    },
}

/// The writer's view of what the store holds, so a flush sends only changes.
#[derive(Default)]
struct Held {
    /// Whether the store was read since this process last took the lead.
    leading: bool,
    series: Written,
    daily: Daily,
    /// A digest of the last history point's rows: an unchanged point is
    /// not written again. A digest, not the rows: 1,000 bots' point is
    /// 87,000 rows, some 13 MB to keep for one comparison.
    history: Option<u128>,
    maintained_on: Option<NaiveDate>,
}

/// The link between a source and the store, shared by the flush and
/// history tasks (and by tests, which call the one-step functions directly).
pub struct Persistence {
    pub store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// For its gauges, set every tick in both modes.
    ingest: Arc<Ingest>,
    source: Arc<dyn Source>,
    retention: chrono::Duration,
    /// Why this process does not write, while it is a standby.
    standby: std::sync::Mutex<Option<String>>,
    held: Mutex<Held>,
    /// Bumped by each restore (0 before the first), and part of every
    /// render-cache key, so no answer rendered before a (late) restore is
    /// served after it. Read without the lock, so /readyz never waits on a
    /// flush.
    generation: AtomicU64,
    /// Bumped by each wipe: with `generation`, the render caches' key.
    wipes: AtomicU64,
    /// Rows each wipe's flush deleted, until its caller reads them.
    wiped_rows: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// What `DELETE /v1/admin/bots/{bot}?wipe=true` removed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WipeReport {
    /// What memory held of the bot (nothing when it was not counted here).
    pub memory: crate::metrics::Wiped,
    /// Rows deleted from the store, history included; `None` while the
    /// store could not be written: they go at the next flush that can,
    /// after a restart too (the wipe is journaled).
    pub store_rows: Option<u64>,
}

impl Persistence {
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        ingest: Arc<Ingest>,
        source: Arc<dyn Source>,
        retention: std::time::Duration,
    ) -> Self {
        Persistence {
            store,
            metrics,
            ingest,
            source,
            retention: chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX),
            standby: std::sync::Mutex::new(None),
            held: Mutex::new(Held::default()),
            generation: AtomicU64::new(0),
            wipes: AtomicU64::new(0),
            wiped_rows: Default::default(),
        }
    }

    /// Part of every render-cache key: changes with each restore and each
    /// wipe, so no answer rendered before either is served after it.
    pub fn cache_generation(&self) -> u64 {
        self.generation() + self.wipes.load(Ordering::Relaxed)
    }

    /// Wipes `bot`: out of memory and the journal's future replays at once
    /// (`Ingest::wipe`), then out of the store by a flush now. The caller
    /// revoked its tokens first, so nothing new arrives for it.
    pub async fn wipe(&self, bot: &str) -> Result<WipeReport> {
        let generation = Utc::now().timestamp_millis();
        let memory = self.source.wipe(bot, generation).await?;
        self.wipes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.flush_once().await {
            tracing::warn!(error = %e, bot, "a wiped bot's rows stay in the store until a flush can delete them");
        }
        let store_rows = if self.metrics.wipe_pending(bot) {
            None
        } else {
            // Deleted by this flush or by one that ran just before it.
            Some(lock(&self.wiped_rows).remove(bot).unwrap_or(0))
        };
        Ok(WipeReport { memory, store_rows })
    }

    /// One process's writer: its memory is the source.
    pub fn local(
        store: Store,
        metrics: Arc<Metrics>,
        ingest: Arc<Ingest>,
        retention: std::time::Duration,
        dedupe_window: std::time::Duration,
    ) -> Self {
        let source = Arc::new(local::Local::new(
            metrics.clone(),
            ingest.clone(),
            dedupe_window,
        ));
        Persistence::new(Arc::new(store), metrics, ingest, source, retention)
    }

    /// Changes whenever stored values were added into memory.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// True once stored values are loaded; until then nothing is written.
    pub fn is_restored(&self) -> bool {
        self.generation() > 0
    }

    /// Why this process is not writing, while it is a standby.
    pub fn standby_reason(&self) -> Option<String> {
        lock(&self.standby).clone()
    }

    /// Takes the lead and restores, once. Called at start and, while it
    /// has not succeeded, before every flush. `None` when nothing was to
    /// do (leading already, or another process writes).
    pub async fn prepare(&self) -> Result<Option<RestoreReport>> {
        let mut held = self.held.lock().await;
        self.prepare_locked(&mut held).await
    }

    async fn prepare_locked(&self, held: &mut Held) -> Result<Option<RestoreReport>> {
        let leads = match self.source.lead().await {
            Ok(leads) => leads,
            Err(e) => {
                self.step_down(held).await;
                return Err(e);
            }
        };
        if !leads {
            if held.leading {
                self.step_down(held).await;
            }
            return Ok(None);
        }
        // A session PostgreSQL ended while this process was stalled has
        // lost the lease: taken again (or not) before anything is written.
        if held.leading && self.store.writer_alive().await {
            return Ok(None);
        }
        let report = match self.take_over(held).await {
            Ok(report) => report,
            Err(e) => {
                // Give the lead back at once: another process may do better.
                self.source.resign().await;
                if !matches!(e, PersistError::Store(StoreError::Standby(_))) {
                    self.store.release_writer().await;
                }
                return Err(e);
            }
        };
        held.leading = true;
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.metrics.selfm.store_up.set(1);
        self.maintain_locked(held).await?;
        Ok(Some(report))
    }

    async fn take_over(&self, held: &mut Held) -> Result<RestoreReport> {
        if let Err(e) = self.store.acquire_writer().await {
            if let StoreError::Standby(holder) = &e {
                let mut standby = lock(&self.standby);
                if standby.is_none() {
                    tracing::warn!(holder = %holder, "standby: another process writes to the store; counting in memory and the journal until it stops");
                }
                *standby = Some(e.to_string());
            }
            return Err(e.into());
        }
        if lock(&self.standby).take().is_some() {
            tracing::info!("the store's writer stopped; this process takes over");
        }
        tracing::info!(
            backend = self.store.backend(),
            "this process is the store's writer"
        );
        self.store.migrate().await?;
        let stored = self.store.load().await?;
        let report = self
            .source
            .restore(&beyond(&stored, &held.series, &held.daily), &stored)
            .await?;
        held.series = Written::of(&stored.series);
        held.daily = stored
            .daily
            .iter()
            .map(|d| ((d.bot.clone(), d.name.clone()), (d.day, d.value)))
            .collect();
        Ok(report)
    }

    async fn step_down(&self, held: &mut Held) {
        held.leading = false;
        held.history = None;
        self.source.resign().await;
        self.store.release_writer().await;
    }

    async fn maintain_locked(&self, held: &mut Held) -> Result<()> {
        let now = Utc::now();
        let report = self.store.maintain(now, now - self.retention).await?;
        if !report.partitions_dropped.is_empty() || report.rows_deleted > 0 {
            tracing::info!(dropped = ?report.partitions_dropped, rows_deleted = report.rows_deleted, "history past retention removed");
        }
        held.maintained_on = Some(now.date_naive());
        Ok(())
    }

    /// Writes every series, sketch, "today" counter and journal mark that
    /// changed since the last successful flush, in one transaction; sends
    /// nothing when nothing changed or another process writes. Counts its
    /// duration and failures, and sets the gauges every mode shares.
    pub async fn flush_once(&self) -> Result<FlushOutcome> {
        let started = Instant::now();
        let result = self.flush_inner().await;
        self.observe_ingest();
        let selfm = &self.metrics.selfm;
        let leading = self.held.lock().await.leading;
        selfm
            .store_writer
            .set(i64::from(leading && self.store.is_writer().await));
        match &result {
            Ok(Some(outcome)) => {
                // An idle tick sent nothing, so it says nothing about the
                // store: only a write (or /readyz's ping) sets it up again.
                if *outcome != FlushOutcome::Idle {
                    selfm.store_up.set(1);
                    selfm
                        .flush_duration
                        .observe(started.elapsed().as_secs_f64());
                }
                selfm
                    .last_flush
                    .set(Utc::now().timestamp_millis() as f64 / 1000.0);
            }
            Ok(None) => {
                // Another process writes: still say whether the store
                // answers, so the store alert means the same everywhere.
                let up = self.store.ping().await.is_ok();
                selfm.store_up.set(i64::from(up));
            }
            Err(PersistError::Store(_)) => {
                selfm.store_up.set(0);
                selfm.flush_failures.inc();
            }
            // The source failed (cluster mode: Redis), not the store.
            Err(PersistError::Source(_)) => selfm.flush_failures.inc(),
        }
        result.map(|outcome| outcome.unwrap_or(FlushOutcome::Idle))
    }

    /// The gauges of what ingest holds, right in both modes.
    fn observe_ingest(&self) {
        let selfm = &self.metrics.selfm;
        let now = Utc::now().timestamp_millis();
        selfm.dedupe_ids.set(self.ingest.dedupe.len() as i64);
        selfm
            .dedupe_window
            .set(self.ingest.dedupe.effective_window(now).as_secs_f64());
        if let Some(journal) = self.ingest.journal() {
            let (backlog, max) = journal.backlog();
            selfm.journal_backlog.set(backlog as i64);
            selfm.journal_max.set(max as i64);
            // A counter that follows the journal's own count.
            let fsyncs = journal.fsyncs();
            let shown = selfm.journal_fsyncs.get();
            if fsyncs > shown {
                selfm.journal_fsyncs.inc_by(fsyncs - shown);
            }
        }
    }

    /// `None` while another process writes.
    async fn flush_inner(&self) -> Result<Option<FlushOutcome>> {
        let mut held = self.held.lock().await;
        self.prepare_locked(&mut held).await?;
        if !held.leading {
            return Ok(None);
        }
        let Cut {
            rows,
            daily,
            rest: mut batch,
        } = self.source.cut(&held.series).await?;
        // A wiped bot's rows are deleted before this batch is written:
        // whatever it has now (a bot counting afresh) is new to the store.
        let wiped: Vec<String> = batch.wiped.iter().map(|(bot, _)| bot.clone()).collect();
        held.series.forget_bots(&wiped);
        held.daily.retain(|(bot, _), _| !wiped.contains(bot));
        held.series.changes(rows, &mut batch);
        for d in daily {
            let key = (d.bot.clone(), d.name.clone());
            if d.value > 0 && held.daily.get(&key) != Some(&(d.day, d.value)) {
                batch.daily.push(d);
            }
        }
        // Marks alone (cluster mode: unchanged since the last write) are
        // not worth a transaction; a journal position that moved is.
        let worth = !(batch.changed.is_empty()
            && batch.added.is_empty()
            && batch.daily.is_empty()
            && batch.sketches.is_empty()
            && batch.cluster_sketches.is_empty()
            && batch.users.is_empty()
            && batch.wiped.is_empty()
            && batch.progress.is_none());
        if !worth {
            return Ok(Some(FlushOutcome::Idle));
        }
        let report = match self.store.flush(&batch, Utc::now()).await {
            Ok(report) => report,
            Err(e) => {
                // A PostgreSQL writer whose connection dropped has lost the
                // lease with it: the next tick takes it again (and restores).
                self.store.lost_connection().await;
                if !self.store.is_writer().await {
                    held.leading = false;
                }
                self.source.not_stored(&batch);
                return Err(e.into());
            }
        };
        for (bot, rows) in &report.wiped {
            tracing::info!(bot = %bot, rows, "a wiped bot's rows were deleted from the store");
            *lock(&self.wiped_rows).entry(bot.clone()).or_default() += rows;
        }
        let wiped_rows = report.wiped.iter().map(|(_, n)| *n as usize).sum();
        held.series
            .wrote(&batch.changed, &batch.added, report.missing);
        for d in &batch.daily {
            held.daily
                .insert((d.bot.clone(), d.name.clone()), (d.day, d.value));
        }
        self.source.stored(&batch).await;
        Ok(Some(FlushOutcome::Wrote {
            series: batch.changed.len() + batch.added.len(),
            sketches: batch.sketches.len() + batch.cluster_sketches.len(),
            daily: batch.daily.len(),
            users: batch
                .users
                .iter()
                .map(|u| u.changed.len() + u.gone.len())
                .sum(),
            wiped: wiped_rows,
        }))
    }

    /// Appends a point per series to the history, in one statement, unless
    /// nothing changed since the last point or another process writes.
    /// Returns the points written.
    pub async fn write_history_once(&self) -> Result<usize> {
        let started = Instant::now();
        let result = self.write_history_inner().await;
        let selfm = &self.metrics.selfm;
        match &result {
            Ok(0) => {}
            Ok(_) => selfm
                .history_duration
                .observe(started.elapsed().as_secs_f64()),
            Err(e) => {
                if matches!(e, PersistError::Store(_)) {
                    selfm.store_up.set(0);
                }
                selfm.history_failures.inc();
            }
        }
        result
    }

    async fn write_history_inner(&self) -> Result<usize> {
        let mut held = self.held.lock().await;
        self.prepare_locked(&mut held).await?;
        if !held.leading {
            return Ok(0);
        }
        if held.maintained_on != Some(Utc::now().date_naive()) {
            self.maintain_locked(&mut held).await?;
        }
        let rows = self.source.history().await?;
        let digest = rows::digest(&rows);
        if held.history == Some(digest) {
            return Ok(0);
        }
        self.store.write_history(&rows, Utc::now()).await?;
        held.history = Some(digest);
        Ok(rows.len())
    }

    /// On the way out, after the final flush: the lead goes back, so
    /// another process takes over at once.
    pub async fn finish(&self) {
        let mut held = self.held.lock().await;
        if held.leading {
            self.step_down(&mut held).await;
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
