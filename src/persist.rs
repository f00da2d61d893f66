//! Moves counts between memory and the store: the snapshot a flush writes,
//! the history points, and the restore at start.
//!
//! Restoring *adds* into the cells what the store holds beyond what this
//! process last wrote there (everything, at start). That one rule makes
//! every late restore exact: the database was down at start and came back,
//! a standby takes over from a stopped writer, or a writer retakes the lease
//! after another process wrote meanwhile: memory becomes what it counted
//! plus what others stored. No flush or history write happens before the
//! restore, so the store is never overwritten with totals that lack it.
//!
//! Exactly once: a flush stores, in the same transaction as the totals, the
//! journal LSN its snapshot covers (see `ingest`); at start only the journal
//! past it is replayed, and the journal is trimmed up to it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::Mutex;

use crate::ingest::Ingest;
use crate::metrics::bot::{ACTIVE_USERS, FAMILIES, FamilyDesc, Kind, Visitor};
use crate::metrics::today::Calendar;
use crate::metrics::{HistogramSnapshot, Metrics};
use crate::store::{self, DailyRow, FlushBatch, SeriesRow, Store, StoredSketch};

/// A series' identity in the store, as one string (one allocation per
/// lookup instead of three): no part contains a NUL, so it is unambiguous.
type SeriesKey = String;

fn key(row: &SeriesRow) -> SeriesKey {
    [row.metric.as_str(), row.bot.as_str(), row.labels.as_str()].join("\0")
}

/// What the store holds of each series, as this process last wrote or read
/// it, so a flush sends only changes. Shared by the single process's flush
/// and the cluster writer's.
#[derive(Default)]
pub struct Written(HashMap<SeriesKey, f64>);

impl Written {
    pub fn of(rows: &[SeriesRow]) -> Self {
        Written(rows.iter().map(|r| (key(r), r.value)).collect())
    }

    fn get(&self, row: &SeriesRow) -> Option<f64> {
        self.0.get(&key(row)).copied()
    }

    /// Puts each row that differs from the store into `batch`: an update
    /// for a series the store has, an insert for a new one.
    pub fn changes(&self, rows: Vec<SeriesRow>, batch: &mut FlushBatch) {
        for row in rows {
            match self.get(&row) {
                Some(stored) if stored == row.value => {}
                Some(_) => batch.changed.push(row),
                None => batch.added.push(row),
            }
        }
    }

    /// After `batch` was written: the store holds its rows, or, when rows
    /// had gone missing from it, nothing is assumed and the next flush
    /// writes every series.
    pub fn wrote(&mut self, batch: &FlushBatch, report: store::FlushReport) {
        if report.missing {
            tracing::warn!(
                "rows of real_time_metrics disappeared; the next flush rewrites every series"
            );
            self.0.clear();
        } else {
            for row in batch.changed.iter().chain(&batch.added) {
                self.0.insert(key(row), row.value);
            }
        }
    }
}

/// Labels other than `bot` as a canonical JSON object (keys sorted).
fn labels_json<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let map: BTreeMap<&str, &str> = pairs.into_iter().collect();
    serde_json::to_string(&map).unwrap_or_else(|_| "{}".to_owned())
}

/// Flattens every series to the rows the store keeps, histogram lines
/// included, exactly as they are exposed.
struct Flatten(Vec<SeriesRow>);

impl Visitor for Flatten {
    fn scalar(&mut self, family: &'static FamilyDesc, labels: &[&str], value: f64) {
        let pairs = family
            .labels
            .iter()
            .copied()
            .zip(labels.iter().copied())
            .skip(1);
        self.0.push(SeriesRow {
            metric: family.name.to_owned(),
            bot: labels[0].to_owned(),
            labels: labels_json(pairs),
            value,
        });
    }

    fn histogram(&mut self, family: &'static FamilyDesc, labels: &[&str], h: &HistogramSnapshot) {
        let bot = labels[0];
        let others: Vec<(&str, &str)> = family
            .labels
            .iter()
            .copied()
            .zip(labels.iter().copied())
            .skip(1)
            .collect();
        let bounds = h
            .bounds
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_owned()]);
        for (le, count) in bounds.zip(&h.cumulative) {
            let pairs = others.iter().copied().chain([("le", le.as_str())]);
            self.0.push(SeriesRow {
                metric: format!("{}_bucket", family.name),
                bot: bot.to_owned(),
                labels: labels_json(pairs),
                value: *count as f64,
            });
        }
        for (suffix, value) in [("_sum", h.sum), ("_count", h.count() as f64)] {
            self.0.push(SeriesRow {
                metric: format!("{}{suffix}", family.name),
                bot: bot.to_owned(),
                labels: labels_json(others.iter().copied()),
                value,
            });
        }
    }
}

/// Every series as stored rows. A non-finite value cannot arise from
/// checked input (every number has a range); should one ever appear it is
/// left out, so that one bad series never blocks every other bot's writes.
pub fn snapshot(metrics: &Metrics) -> Vec<SeriesRow> {
    let mut flat = Flatten(Vec::with_capacity(1024));
    metrics.visit(&mut flat);
    finite(flat.0)
}

/// One bot's series as stored rows, as [`snapshot`] gives them.
pub fn bot_rows(bot: &crate::metrics::BotMetrics) -> Vec<SeriesRow> {
    let mut flat = Flatten(Vec::with_capacity(64));
    bot.visit(&mut flat);
    finite(flat.0)
}

fn finite(mut rows: Vec<SeriesRow>) -> Vec<SeriesRow> {
    let before = rows.len();
    rows.retain(|r| r.value.is_finite());
    if rows.len() < before {
        tracing::error!(
            series = before - rows.len(),
            "non-finite values left out of the store"
        );
    }
    rows
}

/// What the store holds beyond what this process believes it wrote: the
/// part a restore adds into memory.
fn beyond(stored: &store::Stored, written: &Flushed) -> store::Stored {
    let series = stored
        .series
        .iter()
        .filter(|r| r.value.is_finite())
        .map(|r| {
            let mine = written.series.get(r).unwrap_or(0.0);
            SeriesRow {
                value: (r.value - mine).max(0.0),
                ..r.clone()
            }
        })
        .collect();
    let daily = stored
        .daily
        .iter()
        .map(|d| {
            let mine = match written.daily.get(&(d.bot.clone(), d.name.clone())) {
                Some((day, v)) if *day == d.day => *v,
                _ => 0,
            };
            DailyRow {
                value: (d.value - mine).max(0),
                ..d.clone()
            }
        })
        .collect();
    store::Stored {
        series,
        // Sketches merge as a union: adding them again changes nothing.
        sketches: stored.sketches.clone(),
        daily,
        progress: stored.progress.clone(),
        ..store::Stored::default()
    }
}

/// What a restore did, for the start-up log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub series: usize,
    pub sketches: usize,
    pub daily: usize,
    /// Rows for bots no longer configured, or metrics this build does not
    /// know: kept in the store, not loaded.
    pub skipped: usize,
}

/// Adds stored values into the (fresh) cells.
pub fn restore(metrics: &Metrics, stored: &store::Stored, now: i64) -> RestoreReport {
    let mut report = RestoreReport::default();
    // Histogram lines are grouped first: a histogram is restored whole.
    #[derive(Default)]
    struct Hist {
        buckets: Vec<(f64, u64)>,
        sum: f64,
        rows: usize,
    }
    let mut histograms: HashMap<(&str, &str), Hist> = HashMap::new();
    for row in &stored.series {
        let Some(bot) = metrics.bot(&row.bot) else {
            report.skipped += 1;
            continue;
        };
        // Active-user gauges are derived from sketches, not restored.
        if row.metric == ACTIVE_USERS.name {
            continue;
        }
        let labels: BTreeMap<String, String> =
            serde_json::from_str(&row.labels).unwrap_or_default();
        // A histogram line: `<family>_bucket`, `_sum` or `_count`.
        let line = FAMILIES
            .iter()
            .filter(|f| f.kind == Kind::Histogram)
            .find_map(|f| Some((f.name, row.metric.strip_prefix(f.name)?)));
        if let Some((family, suffix @ ("_bucket" | "_sum" | "_count"))) = line {
            let hist = histograms.entry((family, &row.bot)).or_default();
            hist.rows += 1;
            match suffix {
                "_bucket" => {
                    let le = labels.get("le").and_then(|le| match le.as_str() {
                        "+Inf" => Some(f64::INFINITY),
                        le => le.parse::<f64>().ok(),
                    });
                    match le {
                        Some(le) => hist.buckets.push((le, row.value as u64)),
                        None => report.skipped += 1,
                    }
                }
                "_sum" => hist.sum = row.value,
                // The count is the +Inf bucket; nothing more to restore.
                _ => {}
            }
            continue;
        }
        let pairs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if bot.restore_scalar(&row.metric, &pairs, row.value) {
            report.series += 1;
        } else {
            report.skipped += 1;
        }
    }
    for ((family, bot), mut hist) in histograms {
        hist.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        match metrics.bot(bot) {
            Some(b) if b.restore_histogram(family, &hist.buckets, hist.sum) => {
                report.series += hist.rows
            }
            _ => {
                tracing::warn!(
                    family,
                    bot,
                    "stored histogram does not match this build's buckets; not restored"
                );
                report.skipped += hist.rows;
            }
        }
    }
    for s in &stored.sketches {
        match metrics.bot(&s.bot) {
            Some(b) if b.active.restore(&s.sketch) => report.sketches += 1,
            _ => report.skipped += 1,
        }
    }
    let today = metrics.calendar().day_of(now);
    for d in &stored.daily {
        let counter = metrics.bot(&d.bot).and_then(|b| b.today.counter(&d.name));
        match counter {
            // Yesterday's count is not today's: it stays stored until replaced.
            Some(c) if Calendar::day_number(d.day) == today => {
                c.restore(today, d.value.max(0) as u64);
                report.daily += 1;
            }
            Some(_) => {}
            None => report.skipped += 1,
        }
    }
    report
}

/// What one flush did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Nothing changed since the last flush: no statement was sent.
    Idle,
    /// One transaction wrote this many rows.
    Wrote {
        series: usize,
        sketches: usize,
        daily: usize,
    },
}

/// Memory's view of what the store holds, so a flush sends only changes.
#[derive(Default)]
struct Flushed {
    series: Written,
    daily: HashMap<(String, String), (NaiveDate, i64)>,
    history: Option<Vec<SeriesRow>>,
    maintained_on: Option<NaiveDate>,
    /// The journal LSN the store holds everything up to.
    lsn: u64,
    /// Whether this process's journal from before a restart was counted:
    /// once, on the first restore.
    replayed: bool,
    /// How far the store holds each journal, as of the last restore. While
    /// this process holds the lease nobody else changes it.
    progress: HashMap<String, u64>,
}

/// The link between memory and the store, shared by the flush and history
/// tasks (and by tests, which call the one-step functions directly).
pub struct Persistence {
    pub store: Arc<Store>,
    metrics: Arc<Metrics>,
    ingest: Arc<Ingest>,
    retention: chrono::Duration,
    /// Journal segments stay this long after the store holds them: the ids
    /// in them are what dedupe remembers across a restart.
    dedupe_window: std::time::Duration,
    /// Why this process does not write, while it is a standby.
    standby: std::sync::Mutex<Option<String>>,
    state: Mutex<Flushed>,
    /// Bumped by the restore (0 before it), and part of every render-cache
    /// key, so no answer rendered before a (late) restore is served after
    /// it. Read without the state lock, so /readyz never waits on a flush.
    generation: AtomicU64,
}

impl Persistence {
    pub fn new(
        store: Store,
        metrics: Arc<Metrics>,
        ingest: Arc<Ingest>,
        retention: std::time::Duration,
        dedupe_window: std::time::Duration,
    ) -> Self {
        Persistence {
            store: Arc::new(store),
            metrics,
            ingest,
            retention: chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX),
            dedupe_window,
            standby: std::sync::Mutex::new(None),
            state: Mutex::new(Flushed::default()),
            generation: AtomicU64::new(0),
        }
    }

    /// Changes whenever stored values were added into memory.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// True once stored values are loaded; until then nothing is written.
    pub fn is_restored(&self) -> bool {
        self.generation() > 0
    }

    /// Migrates, restores and maintains, once. Called at start and, while
    /// it has not succeeded, before every flush.
    pub async fn prepare(&self) -> store::Result<Option<RestoreReport>> {
        let mut state = self.state.lock().await;
        self.prepare_locked(&mut state).await
    }

    /// Why this process is not writing, while it is a standby.
    pub fn standby_reason(&self) -> Option<String> {
        self.standby
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn prepare_locked(&self, state: &mut Flushed) -> store::Result<Option<RestoreReport>> {
        let writer = self.store.is_writer().await;
        if self.is_restored() && writer {
            return Ok(None);
        }
        if let Err(e) = self.store.acquire_writer().await {
            if let store::StoreError::Standby(holder) = &e {
                let mut standby = self.standby.lock().unwrap_or_else(|e| e.into_inner());
                if standby.is_none() {
                    tracing::warn!(holder = %holder, "standby: another process writes to the store; counting in memory and the journal until it stops");
                }
                *standby = Some(e.to_string());
            }
            return Err(e);
        }
        if self
            .standby
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some()
        {
            tracing::info!("the store's writer stopped; this process takes over");
        }
        tracing::info!(
            backend = self.store.backend(),
            "this process is the store's writer"
        );
        self.store.migrate().await?;
        let stored = self.store.load().await?;
        let report = restore(
            &self.metrics,
            &beyond(&stored, state),
            Utc::now().timestamp(),
        );
        state.series = Written::of(&stored.series);
        state.daily = stored
            .daily
            .iter()
            .map(|d| ((d.bot.clone(), d.name.clone()), (d.day, d.value)))
            .collect();
        if let Some(journal) = self.ingest.journal() {
            let applied = |id: &str| stored.progress.get(id).copied().unwrap_or(0);
            state.lsn = state.lsn.max(applied(journal.id()));
            if !state.replayed {
                let replayed = self
                    .ingest
                    .replay_own(&self.metrics, |_bot| applied(journal.id()))
                    .map_err(|e| store::StoreError::Corrupt(e.to_string()))?;
                if replayed.records > 0 {
                    tracing::info!(?replayed, "journal replayed past what the store held");
                }
                state.replayed = true;
            }
        }
        state.progress = stored.progress.clone();
        self.adopt_orphans_locked(state).await?;
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.metrics.selfm.store_up.set(1);
        self.maintain_locked(state, Utc::now()).await?;
        Ok(Some(report))
    }

    /// Counts the journals of processes that stopped or died (a standby
    /// that was stopped, a writer killed before its last flush): at each
    /// restore and at every flush, so their events reach the store without
    /// waiting for a restart.
    async fn adopt_orphans_locked(&self, state: &Flushed) -> store::Result<()> {
        let applied = |id: &str| state.progress.get(id).copied().unwrap_or(0);
        let corrupt = |e: crate::journal::JournalError| store::StoreError::Corrupt(e.to_string());
        let orphans = match self.ingest.journal() {
            Some(journal) => journal.orphans().map_err(corrupt)?,
            None => Vec::new(),
        };
        let adopted = self
            .ingest
            .adopt_orphans(&self.metrics, orphans, |journal, _bot| applied(journal))
            .await
            .map_err(corrupt)?;
        if adopted.records > 0 {
            tracing::info!(?adopted, "stopped processes' journals counted");
        }
        Ok(())
    }

    async fn maintain_locked(&self, state: &mut Flushed, now: DateTime<Utc>) -> store::Result<()> {
        let report = self.store.maintain(now, now - self.retention).await?;
        if !report.partitions_dropped.is_empty() || report.rows_deleted > 0 {
            tracing::info!(dropped = ?report.partitions_dropped, rows_deleted = report.rows_deleted, "history past retention removed");
        }
        state.maintained_on = Some(now.date_naive());
        Ok(())
    }

    /// Writes every series, sketch and "today" counter that changed since
    /// the last successful flush, in one transaction; sends nothing when
    /// nothing changed. Counts its duration and failures.
    pub async fn flush_once(&self) -> store::Result<FlushOutcome> {
        let started = Instant::now();
        let result = self.flush_inner().await;
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
        }
        selfm.store_writer.set(i64::from(
            self.store.is_writer().await && self.is_restored(),
        ));
        match &result {
            Ok(outcome) => {
                // An idle tick sent nothing, so it says nothing about the
                // store: only a write (or /readyz's ping) sets it up again.
                if *outcome != FlushOutcome::Idle {
                    selfm.store_up.set(1);
                }
                selfm
                    .last_flush
                    .set(Utc::now().timestamp_millis() as f64 / 1000.0);
                if *outcome != FlushOutcome::Idle {
                    selfm
                        .flush_duration
                        .observe(started.elapsed().as_secs_f64());
                }
            }
            Err(_) => {
                selfm.store_up.set(0);
                selfm.flush_failures.inc();
            }
        }
        result
    }

    async fn flush_inner(&self) -> store::Result<FlushOutcome> {
        let mut state = self.state.lock().await;
        self.prepare_locked(&mut state).await?;
        self.adopt_orphans_locked(&state).await?;
        let now = Utc::now();
        let mut batch = FlushBatch::default();
        // One consistent cut: no request counts while it is taken, so the
        // snapshot holds exactly the journal up to `lsn`.
        let (rows, sketches, daily, lsn) = self.ingest.consistent(|lsn| {
            let rows = snapshot(&self.metrics);
            let mut sketches = Vec::new();
            let mut daily = Vec::new();
            for bot in self.metrics.bots() {
                for sketch in bot.active.take_dirty() {
                    sketches.push(StoredSketch {
                        bot: bot.bot.to_string(),
                        sketch,
                    });
                }
                for (name, counter) in bot.today.counters() {
                    let (day, value) = counter.load();
                    daily.push((bot.bot.clone(), name, Calendar::date(day), value as i64));
                }
            }
            (rows, sketches, daily, lsn)
        });
        state.series.changes(rows, &mut batch);
        batch.sketches = sketches;
        for (bot, name, day, value) in daily {
            if value > 0
                && state.daily.get(&(bot.to_string(), name.to_owned())) != Some(&(day, value))
            {
                batch.daily.push(DailyRow {
                    bot: bot.to_string(),
                    name: name.to_owned(),
                    day,
                    value,
                });
            }
        }
        if let Some(journal) = self.ingest.journal()
            && lsn > state.lsn
        {
            batch.progress = Some((journal.id().to_owned(), lsn as i64));
        }
        if batch.is_empty() {
            return Ok(FlushOutcome::Idle);
        }
        let report = match self.store.flush(&batch, now).await {
            Ok(report) => report,
            Err(e) => {
                // A PostgreSQL writer whose connection dropped has lost the
                // lease with it: let the next tick take it again (and restore).
                self.store.lost_connection().await;
                // The sketches' change marks were taken: hand them back so
                // the retry writes them. Series and counters are diffed afresh.
                for s in &batch.sketches {
                    if let Some(bot) = self.metrics.bot(&s.bot) {
                        bot.active.mark_dirty(std::slice::from_ref(&s.sketch));
                    }
                }
                return Err(e);
            }
        };
        state.series.wrote(&batch, report);
        for d in &batch.daily {
            state
                .daily
                .insert((d.bot.clone(), d.name.clone()), (d.day, d.value));
        }
        if let Some(journal) = self.ingest.journal() {
            state.lsn = state.lsn.max(lsn);
            // Trimming is housekeeping: a failure leaves files to delete
            // next time, never a wrong count.
            if let Err(e) = journal.trim(state.lsn, self.dedupe_window).await {
                tracing::warn!(error = %e, "journal trim failed; retried after the next flush");
            }
        }
        Ok(FlushOutcome::Wrote {
            series: batch.changed.len() + batch.added.len(),
            sketches: batch.sketches.len(),
            daily: batch.daily.len(),
        })
    }

    /// Appends a point per series to the history, in one statement, unless
    /// nothing changed since the last point. Returns the points written.
    pub async fn write_history_once(&self) -> store::Result<usize> {
        let started = Instant::now();
        let result = self.write_history_inner().await;
        let selfm = &self.metrics.selfm;
        match &result {
            Ok(0) => {}
            Ok(_) => selfm
                .history_duration
                .observe(started.elapsed().as_secs_f64()),
            Err(_) => {
                selfm.store_up.set(0);
                selfm.history_failures.inc();
            }
        }
        result
    }

    async fn write_history_inner(&self) -> store::Result<usize> {
        let mut state = self.state.lock().await;
        self.prepare_locked(&mut state).await?;
        let now = Utc::now();
        if state.maintained_on != Some(now.date_naive()) {
            self.maintain_locked(&mut state, now).await?;
        }
        let rows = snapshot(&self.metrics);
        if state.history.as_ref() == Some(&rows) {
            return Ok(0);
        }
        self.store.write_history(&rows, now).await?;
        let written = rows.len();
        state.history = Some(rows);
        Ok(written)
    }
}
