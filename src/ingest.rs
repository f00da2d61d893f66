//! Applies a checked batch: drops retries already seen, journals the rest,
//! and counts them once the journal holds them, before the answer goes out.
//!
//! Only whole, valid batches reach this point (see `event::parse_batch`).
//!
//! # Exactly once
//!
//! The invariant the flush (and the cluster sync) relies on lives here:
//! when the flush holds the gate exclusively, memory holds exactly the
//! records up to the journal's last LSN that the journal holds, no more and
//! no less. Storing that LSN with the snapshot, in one transaction, is what
//! makes a restart exact. A request keeps that true by holding the gate
//! (shared) from the moment it decides its ids until its events are counted
//! or refused, and by counting only after its record is as durable as the
//! fsync policy promises:
//!
//! 1. Its ids are decided and its record appended (its LSN handed out)
//!    under one short lock, so a later request that finds one of its ids
//!    remembered sees an LSN at least as high as the record that has it.
//! 2. It waits for its record's commit. A request that found duplicates
//!    waits for the commit of every record up to the LSN it saw, because
//!    one of those holds the original: "duplicate" is answered only once
//!    the original is durable, never for one that is then refused.
//! 3. Committed: its events are counted, its claims kept, 202. Refused
//!    (the write failed): nothing was counted, its ids are forgotten, its
//!    claims given back, 503, and the journal has cut the failed write off
//!    the disk (`Journal::commit`), so the record exists nowhere.
//!
//! A failed write breaks the journal until restart, so every record past
//! the last durable one is refused too, and a record that was durable
//! before the failure is acknowledged: the records that exist, in memory
//! and on disk alike, are exactly the LSNs up to the last durable one.
//! Once broken, the flush cuts there (`Journal::cut_lsn`), not at the last
//! number handed out, so the store's applied mark never covers a refused
//! number that the journal reuses after a restart. A restart replays the
//! disk past the stored cut, and a bot's retry of a refused request counts
//! once, because no trace of it was kept.
//!
//! The steps run to the end once begun: the HTTP handler runs each batch on
//! a task of its own, so neither a client that hangs up nor the request
//! timeout can stop a request between its append and its count (its record
//! would then be on disk, covered by the next cut, and never counted).

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::BoxFuture;
use crate::dedupe::{Dedupe, IdHash, Seen};
use crate::event::{Event, EventBody, UserHash};
use crate::journal::{Journal, JournalError};
use crate::metrics::{BotMetrics, Metrics};
use crate::record;

/// Why a checked batch was not accepted; nothing of it counted.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// An arbiter said another replica is counting an id of the batch.
    #[error(
        "an event_id of this batch is being counted by another replica that has not confirmed it yet; retry in a second"
    )]
    Pending,
    /// The bot was wiped while the request waited to be counted.
    #[error("bot `{0}` was removed")]
    Wiped(String),
}

/// The answer to an accepted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Accepted {
    pub accepted: usize,
    pub duplicates: usize,
}

/// What an arbiter said of one `event_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Claimed now, by this request.
    Fresh,
    /// Already held by this process: its own dedupe decides.
    Mine,
    /// Held and confirmed elsewhere: a duplicate.
    Taken,
    /// Held elsewhere and not confirmed yet: retry later.
    Pending,
}

/// What a request learned of its ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The arbiter answered, per id in order.
    Decided(Vec<Claim>),
    /// The arbiter could not answer: this process's memory decides.
    /// `maybe_claimed`: the claim may have been made all the same (its
    /// answer was lost), so the ids are settled like claims.
    Local { maybe_claimed: bool },
}

/// The seam through which other processes take part in deciding whether an
/// `event_id` is new: one process needs none (its dedupe decides alone);
/// cluster mode claims ids across replicas (`cluster::claims`). A claim is
/// settled once the request ends: kept when its events were counted, given
/// back when they were not, so a retry counts wherever it lands.
pub trait Arbiter: Send + Sync {
    fn claim<'a>(&'a self, bot: &'a str, ids: &'a [IdHash], now_ms: i64) -> BoxFuture<'a, Claimed>;
    fn keep(&self, bot: &str, ids: Vec<IdHash>);
    fn give_back(&self, bot: &str, ids: Vec<IdHash>);
    /// How long after its claim a request may still count: past it,
    /// another replica may have taken its claims over, so it gives them
    /// back and is answered `retry_later` instead.
    fn hold(&self) -> std::time::Duration;
}

/// The seam that hears of every counted user, as `(user, unix seconds)`,
/// a request (or a replayed record) at a time: cluster mode sends them to
/// Redis' sketches at the next sync (`cluster::pending`). One process has
/// none: its own sketches are all there is.
pub trait UserNotes: Send + Sync {
    fn note(&self, bot: &str, users: &[(UserHash, i64)]);
}

pub struct Ingest {
    pub dedupe: Dedupe,
    journal: Option<Journal>,
    arbiter: Option<Arc<dyn Arbiter>>,
    notes: Option<Arc<dyn UserNotes>>,
    /// Shared by requests from their decision to their count (across the
    /// journal commit, hence an async lock); held exclusively by the flush
    /// while it takes its snapshot.
    gate: tokio::sync::RwLock<()>,
    /// Held while a request with ids decides them and appends its record,
    /// so that the LSN a duplicate waits for covers its original.
    deciding: Mutex<()>,
}

thread_local! {
    /// The encoding buffer, reused so that a request allocates nothing for
    /// its journal record.
    static ENCODED: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(4096));
    /// A request's ids asked of the dedupe memory, and its answers, reused.
    static CHECKED: RefCell<(Vec<IdHash>, Vec<Seen>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// A request's users to note for the next sync (cluster mode), reused.
    static USERS: RefCell<Vec<(UserHash, i64)>> = const { RefCell::new(Vec::new()) };
}

/// What a replay at start found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub records: u64,
    pub events: u64,
    /// Events of bots no longer configured, or records that do not decode.
    pub skipped: u64,
    /// Records left out because another replica took their claims over
    /// and counted them (cluster mode: see `cluster::claims`).
    pub released: u64,
}

impl Ingest {
    pub fn new(dedupe: Dedupe, journal: Option<Journal>) -> Self {
        Ingest {
            dedupe,
            journal,
            arbiter: None,
            notes: None,
            gate: tokio::sync::RwLock::new(()),
            deciding: Mutex::new(()),
        }
    }

    /// Ids are decided with `arbiter` before anything is counted.
    pub fn with_arbiter(mut self, arbiter: Arc<dyn Arbiter>) -> Self {
        self.arbiter = Some(arbiter);
        self
    }

    /// Every counted user is told to `notes`.
    pub fn with_notes(mut self, notes: Arc<dyn UserNotes>) -> Self {
        self.notes = Some(notes);
        self
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Journals every event not seen before and counts them once the journal
    /// holds them as durably as its fsync policy promises; refused, it
    /// changes nothing. Hot path: memory and one shared append, never the
    /// store. Run it to completion (on a task of its own when the caller
    /// may be cancelled): dropped between its append and its count, its
    /// record would reach the disk uncounted.
    /// `now_ms` is the arrival time in unix milliseconds.
    pub async fn apply(
        &self,
        bot: &BotMetrics,
        events: &[Event<'_>],
        now_ms: i64,
    ) -> Result<Accepted, IngestError> {
        if let Some(journal) = &self.journal {
            // Before dedupe remembers anything: a refused batch must be
            // countable when it is retried.
            journal.check_room()?;
        }
        let id_of = |e: &Event<'_>| e.event_id.as_deref().map(|id| IdHash::of(&bot.bot, id));
        // With an arbiter, every id of the request is claimed at once
        // before anything is counted; what this request claimed is settled
        // by the guard however the request ends.
        let mut settle = None;
        let mut claimed_at = None;
        let claims = match &self.arbiter {
            Some(registry)
                if self.dedupe.enabled() && events.iter().any(|e| e.event_id.is_some()) =>
            {
                let ids: Vec<IdHash> = events.iter().filter_map(id_of).collect();
                let claimed = registry.claim(&bot.bot, &ids, now_ms).await;
                claimed_at = Some((std::time::Instant::now(), registry.hold()));
                let mine: Vec<IdHash> = match &claimed {
                    Claimed::Decided(claims) => ids
                        .iter()
                        .zip(claims)
                        .filter(|(_, c)| **c == Claim::Fresh)
                        .map(|(id, _)| *id)
                        .collect(),
                    Claimed::Local {
                        maybe_claimed: true,
                    } => ids,
                    Claimed::Local {
                        maybe_claimed: false,
                    } => Vec::new(),
                };
                settle = Some(SettleClaims {
                    arbiter: &**registry,
                    bot: &bot.bot,
                    ids: mine,
                    counted: false,
                });
                match claimed {
                    Claimed::Decided(claims) if claims.contains(&Claim::Pending) => {
                        return Err(IngestError::Pending);
                    }
                    Claimed::Decided(claims) => Some(claims),
                    Claimed::Local { .. } => None,
                }
            }
            _ => None,
        };
        let mut claimed = claims.iter().flatten();
        // Per event: `None` for a duplicate, else its id hash if it has an id.
        let mut fresh: Vec<Option<Option<IdHash>>> = Vec::with_capacity(events.len());
        let duplicates;
        // Held until the events are counted or refused: see the module doc.
        let _shared = self.gate.read().await;
        // Wiped after this request found the bot: nothing of it counts, or
        // cells no longer anyone's would take it (and a replay would count
        // it into the bot's next life).
        if bot.is_retired() {
            return Err(IngestError::Wiped(bot.bot.to_string()));
        }
        // Waited so long (a flush holding the gate, a paused process) that
        // another replica may have taken the claims over: given back
        // (the guard does it), the retry is decided wherever it lands.
        if claimed_at.is_some_and(|(at, hold)| at.elapsed() > hold) {
            return Err(IngestError::Pending);
        }
        let (lsn, seen_upto) = {
            let with_ids = self.dedupe.enabled() && events.iter().any(|e| e.event_id.is_some());
            let _deciding = (with_ids && self.journal.is_some())
                .then(|| self.deciding.lock().unwrap_or_else(|e| e.into_inner()));
            // Every id that Redis did not call another replica's is asked
            // of this replica's memory (which remembers it), the request's
            // all at once and in order: see `Dedupe::check_many`.
            CHECKED.with_borrow_mut(|(asked, seen)| {
                asked.clear();
                for event in events {
                    let id = id_of(event);
                    let claim = id.and_then(|_| claimed.next().copied());
                    match (id, claim) {
                        (Some(_), Some(Claim::Taken)) => fresh.push(None),
                        (Some(id), _) => {
                            asked.push(id);
                            fresh.push(Some(Some(id)));
                        }
                        (None, _) => fresh.push(Some(None)),
                    }
                }
                self.dedupe.check_many(asked, now_ms, seen);
                let mut seen = seen.iter();
                for slot in &mut fresh {
                    if matches!(slot, Some(Some(_))) && seen.next() == Some(&Seen::Duplicate) {
                        *slot = None;
                    }
                }
            });
            duplicates = fresh.iter().filter(|f| f.is_none()).count();
            match &self.journal {
                Some(journal) => {
                    // A duplicate's original is in a record at or below the
                    // last LSN handed out (it was appended under the lock).
                    let seen_upto = (duplicates > 0).then(|| journal.last_lsn());
                    let lsn = (duplicates < events.len()).then(|| {
                        ENCODED.with_borrow_mut(|buf| {
                            buf.clear();
                            let kept = events
                                .iter()
                                .zip(&fresh)
                                .filter_map(|(e, id)| Some((e, (*id)?)));
                            record::encode(
                                buf,
                                &bot.bot,
                                ExactSize(kept, events.len() - duplicates),
                            );
                            journal.append(now_ms.div_euclid(1000), buf)
                        })
                    });
                    (lsn, seen_upto)
                }
                None => (None, None),
            }
        };
        if let Some(journal) = &self.journal
            && let Some(upto) = lsn.max(seen_upto)
            && let Err(e) = journal.commit(upto).await
        {
            // Refused: nothing was counted, and the ids it remembered are
            // forgotten, so the bot's retry counts (after a restart: a
            // failed write breaks the journal until then).
            for id in fresh.iter().flatten().flatten() {
                self.dedupe.forget(*id, now_ms);
            }
            return Err(e.into());
        }
        let counted = || {
            events
                .iter()
                .zip(&fresh)
                .filter_map(|(e, id)| id.is_some().then_some(e))
        };
        bot.apply_all(counted());
        if let Some(notes) = self.notes.as_deref() {
            USERS.with_borrow_mut(|users| {
                users.clear();
                users.extend(
                    counted()
                        .filter(|e| e.body != EventBody::Forget)
                        .filter_map(|e| Some((e.user?, e.ts))),
                );
                notes.note(&bot.bot, users);
            });
        }
        // Counted: the next sync carries these events to Redis whatever
        // becomes of this request, so its claims are kept.
        if let Some(settle) = &mut settle {
            settle.counted = true;
        }
        let accepted = events.len() - duplicates;
        bot.counters.accepted.inc_by(accepted as u64);
        bot.counters.duplicates.inc_by(duplicates as u64);
        Ok(Accepted {
            accepted,
            duplicates,
        })
    }

    /// Wipes `bot` (`Metrics::wipe`): journaled first, alone in its record,
    /// so that a replay drops what came before it, and applied while no
    /// request is between its decision and its count, so that every event
    /// is either before the wipe (in memory and in the journal) or refused.
    /// `generation` names the wipe (unix ms): the record keeps it as its
    /// event's `ts`, so a replay applies that same wipe.
    pub async fn wipe(
        &self,
        metrics: &Metrics,
        bot: &str,
        generation: i64,
    ) -> Result<Option<crate::metrics::Wiped>, IngestError> {
        let _exclusive = self.gate.write().await;
        if let Some(journal) = &self.journal {
            journal.check_room()?;
            let event = Event {
                user: None,
                event_id: None,
                ts: generation,
                chat_type: None,
                body: EventBody::Wipe,
            };
            let mut buf = Vec::new();
            record::encode(&mut buf, bot, std::iter::once((&event, None)));
            let lsn = journal.append(chrono::Utc::now().timestamp(), &buf);
            journal.commit(lsn).await?;
        }
        Ok(metrics.wipe(bot, generation, false))
    }

    /// Runs `f` while no request is between its decision and its count,
    /// with the journal's cut (`Journal::cut_lsn`): what `f` reads of
    /// memory is exactly the records up to that LSN (see the module doc).
    pub async fn consistent<R>(&self, f: impl FnOnce(u64) -> R) -> R {
        let _exclusive = self.gate.write().await;
        f(self.journal.as_ref().map_or(0, Journal::cut_lsn))
    }

    /// Runs `f` as a request's count runs: never while a flush takes its
    /// cut, so a cut sees all of what `f` changes or none of it.
    pub async fn alongside<R>(&self, f: impl FnOnce() -> R) -> R {
        let _shared = self.gate.read().await;
        f()
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

    /// Counts this process's journal records past what the store (or, in
    /// cluster mode, Redis) holds of each bot (`applied(bot)`), up to what
    /// was on disk at open: events counted before a crash but never
    /// flushed. Records appended since open are in memory already.
    /// A record with an id in `released(bot, id)` is left out: another
    /// replica took its claim over and counted it.
    pub async fn replay_own(
        &self,
        metrics: &Metrics,
        applied: impl Fn(&str) -> u64,
        released: impl Fn(&str, IdHash) -> bool,
    ) -> Result<Replayed, JournalError> {
        let mut report = Replayed::default();
        let Some(journal) = &self.journal else {
            return Ok(report);
        };
        let floor = floor(metrics, |bot| applied(bot));
        let _shared = self.gate.read().await;
        let held = Held {
            applied: &applied,
            released: &released,
        };
        journal.replay(floor, journal.recovered_lsn(), |r| {
            count_record(metrics, self.notes.as_deref(), &r, &held, &mut report);
        })?;
        Ok(report)
    }

    /// Counts the records of stopped processes' journals past what the store
    /// applied of each (`applied(journal, bot)`), moving them into this
    /// process's journal (so they are flushed, and trimmed, like its own),
    /// then deletes the orphans.
    /// `orphans` is the listing the caller read `applied` for, so a journal
    /// that stops in between is never adopted without its marks.
    pub async fn adopt_orphans(
        &self,
        metrics: &Metrics,
        orphans: Vec<crate::journal::Orphan>,
        applied: impl Fn(&str, &str) -> u64,
        released: impl Fn(&str, &str, IdHash) -> bool,
    ) -> Result<Replayed, JournalError> {
        let mut report = Replayed::default();
        let Some(journal) = &self.journal else {
            return Ok(report);
        };
        for orphan in orphans {
            let mut last = None;
            // A failed commit broke the journal: what an earlier attempt
            // counted of this orphan is in memory, so it must not be counted
            // again (the orphan stays, for the next start to adopt).
            if journal.is_broken() {
                return Err(JournalError::Broken);
            }
            // Held across the commit too, as a request holds it.
            let _shared = self.gate.read().await;
            {
                let now_ms = chrono::Utc::now().timestamp_millis();
                let applied = |bot: &str| applied(&orphan.id, bot);
                let released = |bot: &str, id| released(&orphan.id, bot, id);
                let held = Held {
                    applied: &applied,
                    released: &released,
                };
                orphan.replay(floor(metrics, applied), |r| {
                    if !count_record(metrics, self.notes.as_deref(), &r, &held, &mut report) {
                        return;
                    }
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

/// The lowest of every bot's applied mark: no record at or below it is
/// wanted, so a replay starts past it.
fn floor(metrics: &Metrics, applied: impl Fn(&str) -> u64) -> u64 {
    metrics
        .bots()
        .iter()
        .map(|b| applied(&b.bot))
        .min()
        .unwrap_or(0)
}

/// Settles a request's claims when it ends, however it ends (answered,
/// refused, or dropped by a timeout): kept once its events are counted,
/// given back before that.
struct SettleClaims<'a> {
    arbiter: &'a dyn Arbiter,
    bot: &'a str,
    ids: Vec<IdHash>,
    counted: bool,
}

impl Drop for SettleClaims<'_> {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.ids);
        if self.counted {
            self.arbiter.keep(self.bot, ids);
        } else {
            self.arbiter.give_back(self.bot, ids);
        }
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

/// What the store (or Redis) holds of one journal: each bot's applied
/// mark, and the ids whose claims another replica took over.
struct Held<'a> {
    applied: &'a dyn Fn(&str) -> u64,
    released: &'a dyn Fn(&str, IdHash) -> bool,
}

/// Counts one replayed record unless its bot's applied mark covers it or
/// another replica counted it (one of its ids was taken over: the client
/// retried the whole request there).
/// Returns whether it is wanted (counted, or undecodable and so kept).
fn count_record(
    metrics: &Metrics,
    notes: Option<&dyn UserNotes>,
    r: &crate::journal::Record<'_>,
    held: &Held<'_>,
    report: &mut Replayed,
) -> bool {
    match record::decode(r.body) {
        Ok(decoded) if r.lsn <= (held.applied)(decoded.bot) => false,
        Ok(decoded)
            if decoded
                .events
                .iter()
                .any(|(_, id)| id.is_some_and(|id| (held.released)(decoded.bot, id))) =>
        {
            report.released += 1;
            false
        }
        Ok(decoded)
            if decoded
                .events
                .iter()
                .any(|(e, _)| e.body == EventBody::Wipe) =>
        {
            // Whatever the bot counted before is dropped, and its rows go
            // at the next flush; a bot still configured counts on afresh.
            report.records += 1;
            let configured = metrics.bot(decoded.bot).is_some();
            for (event, _) in decoded
                .events
                .iter()
                .filter(|(e, _)| e.body == EventBody::Wipe)
            {
                metrics.wipe(decoded.bot, event.ts, configured);
            }
            true
        }
        Ok(decoded) => {
            report.records += 1;
            match metrics.bot(decoded.bot) {
                Some(bot) => {
                    let mut users = Vec::new();
                    for (event, _) in &decoded.events {
                        bot.apply(event);
                        if event.body != EventBody::Forget {
                            users.extend(event.user.map(|u| (u, event.ts)));
                        }
                    }
                    if let Some(notes) = notes {
                        notes.note(&bot.bot, &users);
                    }
                    report.events += decoded.events.len() as u64;
                }
                None => report.skipped += decoded.events.len() as u64,
            }
            true
        }
        Err(e) => {
            report.records += 1;
            tracing::warn!(error = %e, "journal record skipped");
            report.skipped += 1;
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::event::{BodyFormat, parse_batch};
    use crate::journal::FsyncPolicy;

    /// Ingest over a real journal whose writes are held (the hold seam), and
    /// one bot: what the tests below post to. The directory goes with it.
    struct HeldJournal {
        dir: std::path::PathBuf,
        ingest: Arc<Ingest>,
        bot: Arc<BotMetrics>,
    }

    impl HeldJournal {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "botmetrics-ingest-test-{}-{}",
                std::process::id(),
                chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
            ));
            let journal = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30)
                .unwrap()
                .journal;
            let ingest = Arc::new(Ingest::new(
                Dedupe::new(Duration::from_secs(600), 1000),
                Some(journal),
            ));
            let metrics = Metrics::new(
                &[Arc::from("b")],
                100,
                chrono_tz::UTC,
                0.0,
                Default::default(),
            )
            .unwrap();
            let bot = metrics.bot("b").unwrap().clone();
            ingest.journal().unwrap().hold_writes(true);
            HeldJournal { dir, ingest, bot }
        }

        /// Posts `body` on a task of its own: (accepted, duplicates).
        fn post(
            &self,
            body: &'static [u8],
        ) -> tokio::task::JoinHandle<Result<(usize, usize), String>> {
            let (ingest, bot) = (self.ingest.clone(), self.bot.clone());
            tokio::spawn(async move {
                let events = parse_batch(
                    body,
                    BodyFormat::Json,
                    10,
                    1_800_000_000,
                    &crate::event::UserKey::legacy(),
                )
                .unwrap();
                ingest
                    .apply(&bot, &events, 1_800_000_000_000)
                    .await
                    .map(|a| (a.accepted, a.duplicates))
                    .map_err(|e| e.to_string())
            })
        }

        fn release(&self) {
            self.ingest.journal().unwrap().hold_writes(false);
        }
    }

    impl Drop for HeldJournal {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A kill -9 test cannot tell a 202 sent before the journal write from
    /// one sent after it; this one holds the write and looks: no answer and
    /// no count until the journal has the record, then both.
    #[tokio::test]
    async fn nothing_is_answered_or_counted_before_the_journal_holds_it() {
        let held = HeldJournal::new();
        let task = held.post(
            br#"[{"type":"message","role":"user","event_id":"e1"},{"type":"limit_reached"}]"#,
        );
        // Nothing to wait on that says "not yet": the absence of an answer
        // is looked at after a while.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !task.is_finished(),
            "answered before the journal wrote its record"
        );
        assert_eq!(held.bot.messages_total(), 0.0, "counted before the write");
        assert_eq!(held.bot.counters.accepted.get(), 0);
        held.release();
        assert_eq!(task.await.unwrap(), Ok((2, 0)));
        assert_eq!(held.bot.messages_total(), 1.0);
        assert_eq!(held.bot.counters.accepted.get(), 2);
    }

    /// Found by `cargo mutants`: a retry that arrives while its original's
    /// record is still being written is a duplicate, but its 202 must wait
    /// until the original is durable; answered earlier, a crash could lose
    /// the event although both requests were acknowledged.
    #[tokio::test]
    async fn a_duplicate_is_answered_only_once_its_original_is_written() {
        let held = HeldJournal::new();
        let body: &[u8] = br#"{"type":"message","role":"user","event_id":"e1"}"#;
        let original = held.post(body);
        // The retry comes once the original has its record appended (and
        // its id remembered): the write is what is held.
        while held.ingest.journal().unwrap().last_lsn() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let retry = held.post(body);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!original.is_finished(), "the original waits for its write");
        assert!(
            !retry.is_finished(),
            "the duplicate was answered before its original was written"
        );
        held.release();
        assert_eq!(original.await.unwrap(), Ok((1, 0)));
        assert_eq!(retry.await.unwrap(), Ok((0, 1)));
        assert_eq!(held.bot.messages_total(), 1.0);
    }

    /// An arbiter that grants every claim, records how each was settled,
    /// and holds claims for `hold`.
    struct Granting {
        hold: Duration,
        kept: Mutex<Vec<IdHash>>,
        given_back: Mutex<Vec<IdHash>>,
    }

    impl Arbiter for Granting {
        fn claim<'a>(&'a self, _: &'a str, ids: &'a [IdHash], _: i64) -> BoxFuture<'a, Claimed> {
            Box::pin(async move { Claimed::Decided(vec![Claim::Fresh; ids.len()]) })
        }
        fn keep(&self, _: &str, ids: Vec<IdHash>) {
            self.kept.lock().unwrap().extend(ids);
        }
        fn give_back(&self, _: &str, ids: Vec<IdHash>) {
            self.given_back.lock().unwrap().extend(ids);
        }
        fn hold(&self) -> Duration {
            self.hold
        }
    }

    /// A request that waited past the hold since its claim (the flush held
    /// the gate; the process was paused) may have had its claims taken
    /// over: it gives them back and counts nothing, instead of counting
    /// what another replica counts too.
    #[tokio::test]
    async fn a_request_past_its_claims_hold_gives_them_back_and_counts_nothing() {
        let metrics = Metrics::new(
            &[Arc::from("b")],
            100,
            chrono_tz::UTC,
            0.0,
            Default::default(),
        )
        .unwrap();
        let bot = metrics.bot("b").unwrap().clone();
        let body: &[u8] = br#"[{"type":"message","role":"user","event_id":"e1"}]"#;
        let events = parse_batch(
            body,
            BodyFormat::Json,
            10,
            1_800_000_000,
            &crate::event::UserKey::legacy(),
        )
        .unwrap();
        let id = IdHash::of("b", "e1");
        for (hold, counted) in [(Duration::from_secs(60), true), (Duration::ZERO, false)] {
            let arbiter = Arc::new(Granting {
                hold,
                kept: Mutex::new(Vec::new()),
                given_back: Mutex::new(Vec::new()),
            });
            let ingest = Ingest::new(Dedupe::new(Duration::from_secs(600), 1000), None)
                .with_arbiter(arbiter.clone());
            let before = bot.messages_total();
            let answer = ingest.apply(&bot, &events, 1_800_000_000_000).await;
            assert_eq!(answer.is_ok(), counted, "hold {hold:?}");
            if !counted {
                assert!(matches!(answer, Err(IngestError::Pending)));
            }
            assert_eq!(bot.messages_total() - before, f64::from(u8::from(counted)));
            let settled = |m: &Mutex<Vec<IdHash>>| m.lock().unwrap().clone();
            let (kept, back) = if counted {
                (vec![id], vec![])
            } else {
                (vec![], vec![id])
            };
            assert_eq!(settled(&arbiter.kept), kept, "hold {hold:?}");
            assert_eq!(settled(&arbiter.given_back), back, "hold {hold:?}");
        }
    }
}
