//! Applies a checked batch: drops retries already seen, counts the rest, and
//! journals what it counted before the answer goes out.
//!
//! Only whole, valid batches reach this point (see `event::parse_batch`).
//! The invariant the flush relies on lives here: a record's LSN is handed
//! out under the same (shared) gate as its events are counted, so when the
//! flush holds the gate exclusively, memory holds exactly the records up to
//! the journal's last LSN, no more and no less. Storing that LSN with the
//! snapshot, in one transaction, is what makes a restart exact.

use std::cell::RefCell;
use std::sync::RwLock;

use serde::Serialize;

use crate::dedupe::{Dedupe, IdHash, Seen};
use crate::event::Event;
use crate::journal::{Journal, JournalError};
use crate::metrics::{BotMetrics, Metrics};
use crate::record;

/// The answer to an accepted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Accepted {
    pub accepted: usize,
    pub duplicates: usize,
}

pub struct Ingest {
    pub dedupe: Dedupe,
    journal: Option<Journal>,
    /// Shared by requests while they count and append; held exclusively by
    /// the flush while it takes its snapshot.
    gate: RwLock<()>,
}

thread_local! {
    /// The encoding buffer, reused so that a request allocates nothing for
    /// its journal record.
    static ENCODED: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(4096));
}

/// What a replay at start found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub records: u64,
    pub events: u64,
    /// Events of bots no longer configured, or records that do not decode.
    pub skipped: u64,
}

impl Ingest {
    pub fn new(dedupe: Dedupe, journal: Option<Journal>) -> Self {
        Ingest {
            dedupe,
            journal,
            gate: RwLock::new(()),
        }
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Counts every event not seen before and returns once the journal holds
    /// them as durably as its fsync policy promises. Hot path: memory and one
    /// shared append, never the store.
    /// `now_ms` is the arrival time in unix milliseconds.
    pub async fn apply(
        &self,
        bot: &BotMetrics,
        events: &[Event<'_>],
        now_ms: i64,
    ) -> Result<Accepted, JournalError> {
        if let Some(journal) = &self.journal {
            // Before dedupe remembers anything: a refused batch must be
            // countable when it is retried.
            journal.check_room()?;
        }
        // Per event: `None` for a duplicate, else its id hash if it has an id.
        let mut fresh: Vec<Option<Option<IdHash>>> = Vec::with_capacity(events.len());
        let mut duplicates = 0;
        let lsn = {
            let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
            for event in events {
                let id = event.event_id.as_deref().map(|id| IdHash::of(&bot.bot, id));
                let first = id.is_none_or(|id| self.dedupe.check(id, now_ms) == Seen::First);
                if first {
                    bot.apply(event);
                    fresh.push(Some(id));
                } else {
                    duplicates += 1;
                    fresh.push(None);
                }
            }
            match &self.journal {
                Some(journal) if duplicates < events.len() => {
                    Some(ENCODED.with_borrow_mut(|buf| {
                        buf.clear();
                        let kept = events
                            .iter()
                            .zip(&fresh)
                            .filter_map(|(e, id)| Some((e, (*id)?)));
                        record::encode(buf, &bot.bot, ExactSize(kept, events.len() - duplicates));
                        journal.append(now_ms.div_euclid(1000), buf)
                    }))
                }
                _ => None,
            }
        };
        if let (Some(journal), Some(lsn)) = (&self.journal, lsn) {
            journal.commit(lsn).await?;
        }
        let accepted = events.len() - duplicates;
        bot.counters.accepted.inc_by(accepted as u64);
        bot.counters.duplicates.inc_by(duplicates as u64);
        Ok(Accepted {
            accepted,
            duplicates,
        })
    }

    /// Runs `f` while no request is counting, with the journal's last LSN:
    /// what `f` reads of memory is exactly the records up to that LSN.
    pub fn consistent<R>(&self, f: impl FnOnce(u64) -> R) -> R {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        f(self.journal.as_ref().map_or(0, Journal::last_lsn))
    }

    /// Reads every `event_id` the journals on disk remember (this process's
    /// and the orphans'), so a retry that straddles a restart is recognised
    /// from the first request on. Called once, before serving.
    pub fn remember_journal_ids(&self, now_ms: i64) -> Result<u64, JournalError> {
        let mut ids = 0;
        let mut remember = |r: crate::journal::Record<'_>| {
            if let Ok(decoded) = record::decode(r.body) {
                for (_, id) in decoded.events {
                    if let Some(id) = id {
                        self.dedupe.remember(id, r.at.saturating_mul(1000), now_ms);
                        ids += 1;
                    }
                }
            }
        };
        if let Some(journal) = &self.journal {
            journal.replay(0, u64::MAX, &mut remember)?;
            for orphan in journal.orphans()? {
                orphan.replay(0, &mut remember)?;
            }
        }
        Ok(ids)
    }

    /// Counts this process's journal records past `applied` (what the store
    /// holds) and up to what was on disk at open: events counted before a
    /// crash but never flushed. Records appended since open are in memory.
    pub fn replay_own(&self, metrics: &Metrics, applied: u64) -> Result<Replayed, JournalError> {
        let mut report = Replayed::default();
        let Some(journal) = &self.journal else {
            return Ok(report);
        };
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        journal.replay(applied, journal.recovered_lsn(), |r| {
            count_record(metrics, r.body, &mut report);
        })?;
        Ok(report)
    }

    /// Counts the records of stopped processes' journals past what the store
    /// applied of each, moving them into this process's journal (so they are
    /// flushed, and trimmed, like its own), then deletes the orphans.
    pub async fn adopt_orphans(
        &self,
        metrics: &Metrics,
        applied: impl Fn(&str) -> u64,
    ) -> Result<Replayed, JournalError> {
        let mut report = Replayed::default();
        let Some(journal) = &self.journal else {
            return Ok(report);
        };
        for orphan in journal.orphans()? {
            let mut last = None;
            {
                let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
                let now_ms = chrono::Utc::now().timestamp_millis();
                orphan.replay(applied(&orphan.id), |r| {
                    count_record(metrics, r.body, &mut report);
                    // Its retries are duplicates here too.
                    if let Ok(decoded) = record::decode(r.body) {
                        for id in decoded.events.into_iter().filter_map(|(_, id)| id) {
                            self.dedupe.remember(id, r.at.saturating_mul(1000), now_ms);
                        }
                    }
                    last = Some(journal.append(r.at, r.body));
                })?;
            }
            if let Some(lsn) = last {
                journal.commit(lsn).await?;
                journal.sync().await?;
            }
            tracing::info!(journal = %orphan.id, "adopted the journal of a stopped process");
            orphan.remove()?;
        }
        Ok(report)
    }
}

/// An iterator whose length is known without counting.
struct ExactSize<I>(I, usize);

impl<I: Iterator> Iterator for ExactSize<I> {
    type Item = I::Item;
    fn next(&mut self) -> Option<I::Item> {
        self.0.next()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.1, Some(self.1))
    }
}

impl<I: Iterator> ExactSizeIterator for ExactSize<I> {}

fn count_record(metrics: &Metrics, body: &[u8], report: &mut Replayed) {
    report.records += 1;
    match record::decode(body) {
        Ok(decoded) => match metrics.bot(decoded.bot) {
            Some(bot) => {
                for (event, _) in &decoded.events {
                    bot.apply(event);
                }
                report.events += decoded.events.len() as u64;
            }
            None => report.skipped += decoded.events.len() as u64,
        },
        Err(e) => {
            tracing::warn!(error = %e, "journal record skipped");
            report.skipped += 1;
        }
    }
}
