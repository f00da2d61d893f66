//! One process's [`Source`]: its own memory, cut at a journal position.
//!
//! Exactly once: a flush stores, in the same transaction as the totals, the
//! journal LSN its cut covers (see `ingest`); at start only the journal past
//! it is replayed, and the journal is trimmed up to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;

use super::{
    Cut, PersistError, RestoreReport, Result, Source, Written, changed, restore, restore_users,
    snapshot,
};
use crate::BoxFuture;
use crate::ingest::Ingest;
use crate::journal::JournalError;
use crate::metrics::Metrics;
use crate::metrics::today::Calendar;
use crate::store::{BotUsers, DailyRow, FlushBatch, SeriesRow, StoreError, Stored, StoredSketch};

/// How far the store holds the journals, as this process knows it.
#[derive(Default)]
struct Marks {
    /// The journal LSN the store holds everything up to.
    lsn: u64,
    /// Whether this process's journal from before a restart was counted:
    /// once, on the first restore.
    replayed: bool,
    /// How far the store holds each journal, as of the last restore. While
    /// this process leads nobody else changes it.
    progress: HashMap<String, u64>,
}

pub struct Local {
    metrics: Arc<Metrics>,
    ingest: Arc<Ingest>,
    /// Journal segments stay this long after the store holds them: the ids
    /// in them are what dedupe remembers across a restart.
    dedupe_window: std::time::Duration,
    marks: Mutex<Marks>,
}

fn corrupt(e: JournalError) -> PersistError {
    PersistError::Store(StoreError::Corrupt(e.to_string()))
}

impl Local {
    pub fn new(
        metrics: Arc<Metrics>,
        ingest: Arc<Ingest>,
        dedupe_window: std::time::Duration,
    ) -> Self {
        Local {
            metrics,
            ingest,
            dedupe_window,
            marks: Mutex::new(Marks::default()),
        }
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the journals of processes that stopped or died (a standby
    /// that was stopped, a writer killed before its last flush): at each
    /// restore and at every flush, so their events reach the store without
    /// waiting for a restart.
    async fn adopt_orphans(&self) -> Result<()> {
        let progress = self.marks().progress.clone();
        let applied = |id: &str| progress.get(id).copied().unwrap_or(0);
        let orphans = match self.ingest.journal() {
            Some(journal) => journal.orphans().map_err(corrupt)?,
            None => Vec::new(),
        };
        let adopted = self
            .ingest
            .adopt_orphans(
                &self.metrics,
                orphans,
                |journal, _bot| applied(journal),
                |_, _, _| false,
            )
            .await
            .map_err(corrupt)?;
        if adopted.records > 0 {
            tracing::info!(?adopted, "stopped processes' journals counted");
        }
        Ok(())
    }
}

impl Source for Local {
    fn lead(&self) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async { Ok(true) })
    }

    fn resign(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn restore<'a>(
        &'a self,
        beyond: &'a Stored,
        stored: &'a Stored,
    ) -> BoxFuture<'a, Result<RestoreReport>> {
        Box::pin(async move {
            let report = restore(&self.metrics, beyond, Utc::now().timestamp());
            // The book is state, not a sum: the store's rows merge into
            // what memory holds (see `UserBook::restore`).
            restore_users(&self.metrics, stored);
            if let Some(journal) = self.ingest.journal() {
                let applied = stored.progress.get(journal.id()).copied().unwrap_or(0);
                // The store may hold numbers this journal's disk lost (a
                // torn tail after power loss): they are never reused, or the
                // records written under them would be taken as applied.
                if journal.skip_past(applied) {
                    tracing::warn!(
                        applied,
                        on_disk = journal.recovered_lsn(),
                        "the store holds records of this journal that its disk lost: numbering continues past them"
                    );
                }
                let replay = {
                    let mut marks = self.marks();
                    marks.lsn = marks.lsn.max(applied);
                    !std::mem::replace(&mut marks.replayed, true)
                };
                if replay {
                    let replayed = self
                        .ingest
                        .replay_own(&self.metrics, |_bot| applied, |_, _| false)
                        .await
                        .map_err(corrupt)?;
                    if replayed.records > 0 {
                        tracing::info!(?replayed, "journal replayed past what the store held");
                    }
                }
            }
            self.marks().progress = stored.progress.clone();
            self.adopt_orphans().await?;
            Ok(report)
        })
    }

    fn cut<'a>(&'a self, written: &'a Written) -> BoxFuture<'a, Result<Cut>> {
        Box::pin(async move {
            self.adopt_orphans().await?;
            // One consistent cut: no request counts while it is taken, so
            // the rows hold exactly the journal up to `lsn`.
            let (rows, sketches, daily, users, wiped, lsn) = self
                .ingest
                .consistent(|lsn| {
                    // A wipe journaled at or below `lsn` is in this cut:
                    // the same transaction deletes its rows.
                    let wiped = self.metrics.take_wipes();
                    let rows = changed(&self.metrics, written);
                    let mut sketches = Vec::new();
                    let mut daily = Vec::new();
                    let mut users = Vec::new();
                    for bot in self.metrics.bots().iter() {
                        let cut = bot.book.cut();
                        if !cut.changed.is_empty() || !cut.gone.is_empty() {
                            users.push(BotUsers {
                                bot: bot.bot.to_string(),
                                changed: cut.changed,
                                gone: cut.gone,
                            });
                        }
                        for sketch in bot.active.take_dirty() {
                            sketches.push(StoredSketch {
                                bot: bot.bot.to_string(),
                                sketch,
                            });
                        }
                        for (name, counter) in bot.today.counters() {
                            let (day, value) = counter.load();
                            daily.push(DailyRow {
                                bot: bot.bot.to_string(),
                                name: name.to_owned(),
                                day: Calendar::date(day),
                                value: value as i64,
                            });
                        }
                    }
                    (rows, sketches, daily, users, wiped, lsn)
                })
                .await;
            let mut rest = FlushBatch {
                sketches,
                users,
                wiped,
                ..FlushBatch::default()
            };
            if let Some(journal) = self.ingest.journal()
                && lsn > self.marks().lsn
            {
                rest.progress = Some((journal.id().to_owned(), lsn as i64));
            }
            Ok(Cut { rows, daily, rest })
        })
    }

    fn stored<'a>(&'a self, batch: &'a FlushBatch) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(journal) = self.ingest.journal() else {
                return;
            };
            let lsn = {
                let mut marks = self.marks();
                if let Some((_, lsn)) = &batch.progress {
                    marks.lsn = marks.lsn.max(*lsn as u64);
                }
                marks.lsn
            };
            // Trimming is housekeeping: a failure leaves files to delete
            // next time, never a wrong count.
            if let Err(e) = journal.trim(lsn, self.dedupe_window).await {
                tracing::warn!(error = %e, "journal trim failed; retried after the next flush");
            }
        })
    }

    fn not_stored(&self, batch: &FlushBatch) {
        self.metrics.wipes_not_stored(&batch.wiped);
        // The cut took every bot's change mark: the retry compares every
        // series again.
        for bot in self.metrics.bots().iter() {
            bot.touch();
        }
        // The sketches' change marks were taken: hand them back so the
        // retry writes them. Series and counters are diffed afresh.
        for s in &batch.sketches {
            if let Some(bot) = self.metrics.bot(&s.bot) {
                bot.active.mark_dirty(std::slice::from_ref(&s.sketch));
            }
        }
        for u in &batch.users {
            if let Some(bot) = self.metrics.bot(&u.bot) {
                bot.book.not_stored(&crate::metrics::users::BookCut {
                    changed: u.changed.clone(),
                    gone: u.gone.clone(),
                });
            }
        }
    }

    fn history(&self) -> BoxFuture<'_, Result<Vec<SeriesRow>>> {
        Box::pin(async move { Ok(snapshot(&self.metrics)) })
    }

    /// Journaled, then out of memory (`Ingest::wipe`).
    fn wipe<'a>(
        &'a self,
        bot: &'a str,
        generation: i64,
    ) -> BoxFuture<'a, Result<crate::metrics::Wiped>> {
        Box::pin(async move {
            match self.ingest.wipe(&self.metrics, bot, generation).await {
                Ok(wiped) => Ok(wiped.unwrap_or_default()),
                Err(e) => Err(PersistError::Source(Box::new(e))),
            }
        })
    }
}
