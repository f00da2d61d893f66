//! Memory → Redis: every `--sync-interval`, what each bot counted since its
//! last confirmed sync, added to the cluster totals at most once.
//!
//! Per bot, a sync is one batch: counter and histogram-line deltas, "today"
//! deltas and the users seen, cut under the ingest gate at one journal LSN
//! (the batch's *mark*). The script that adds it records the mark for this
//! replica in the same atomic step and skips a batch whose mark it already
//! holds. A batch whose answer never came is kept and sent again as it
//! was — never merged with newer counts, or a lost reply would add them
//! twice — and only a confirmed batch moves the bot's baseline.
//!
//! What happens once, before the first sync (seeding, settling this
//! replica's old claims, replaying its journal), and the resend after Redis
//! lost data, is in [`recover`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::claims::Claims;
use super::pending::{PendingUser, PendingUsers};
use super::{BotKeys, Cluster, ClusterError, DAYS, HOURS, Result, field, sketch_ttl, timed};
use crate::ingest::Ingest;
use crate::metrics::today::Calendar;
use crate::metrics::users::BookDelta;
use crate::metrics::{BotMetrics, Metrics};
use crate::persist::bot_rows;
use crate::store::{Store, Stored};

mod recover;

/// Users one bot's batch carries at most: after a long outage the rest go
/// in the next syncs, so no one script keeps Redis busy for long.
const USERS_PER_BATCH: usize = 50_000;

/// One bot's sync, sent until Redis confirms it.
#[derive(Debug, Clone)]
struct Batch {
    mark: u64,
    /// (field, delta, value at the cut).
    series: Vec<(String, f64, f64)>,
    /// (counter, local day, delta, value at the cut).
    today: Vec<(&'static str, u32, u64, u64)>,
    users: Vec<PendingUser>,
    /// The users' runs and erasures, when the bot's book is shared: merged
    /// into Redis' book by the same script call, under the same mark.
    book: BookDelta,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.series.is_empty()
            && self.today.is_empty()
            && self.users.is_empty()
            && self.book.is_empty()
    }
}

struct BotSync {
    bot: Arc<BotMetrics>,
    keys: BotKeys,
    /// What Redis holds of this replica's counts: the values at the last
    /// confirmed cut.
    baseline: HashMap<String, f64>,
    today: HashMap<&'static str, (u32, u64)>,
    inflight: Option<Batch>,
    /// The mark Redis last confirmed for this replica and bot.
    confirmed: u64,
}

/// Makes `bots` follow the bots counted here: each one the sync does not
/// know yet is added (every bot at start, and each one the admin API
/// creates later, on this replica or, through the registry, on another);
/// its first batch carries everything it counted, from a baseline of
/// nothing, and Redis, which holds nothing of it either, seeds it from the
/// store first (where a bot created anew has nothing). A bot whose cells
/// were wiped (a replayed wipe starts a configured bot afresh) is dropped
/// with its unsent batch: what those cells counted is not the bot's.
fn track(bots: &mut Vec<BotSync>, metrics: &Metrics, cluster: &Cluster) {
    let set = metrics.bots();
    bots.retain(|b| {
        set.get(&b.bot.bot)
            .is_some_and(|now| Arc::ptr_eq(now, &b.bot))
    });
    if set.len() == bots.len() {
        return;
    }
    for bot in set.iter() {
        if bots.iter().any(|b| b.bot.bot == bot.bot) {
            continue;
        }
        // Its series exists from the start, at 0, like every bot's.
        cluster
            .metrics
            .dedupe_fallbacks
            .with_label_values(&[&*bot.bot]);
        bots.push(BotSync {
            bot: bot.clone(),
            keys: BotKeys::new(&bot.bot),
            baseline: HashMap::new(),
            today: HashMap::new(),
            inflight: None,
            confirmed: 0,
        });
    }
}

impl BotSync {
    /// The counts since the baseline. Runs under the ingest gate.
    fn cut(&self, pending: Option<&PendingUsers>, mark: u64) -> Batch {
        cut(&self.bot, pending, &self.baseline, &self.today, mark)
    }
}

/// What `bot` counted beyond `baseline` and `today_base`, as a batch.
fn cut(
    bot: &BotMetrics,
    pending: Option<&PendingUsers>,
    baseline: &HashMap<String, f64>,
    today_base: &HashMap<&'static str, (u32, u64)>,
    mark: u64,
) -> Batch {
    {
        let shared = bot.shared_book_gap().is_some();
        let mut series = Vec::new();
        for row in bot_rows(bot) {
            if crate::metrics::bot::derived(&row.metric) {
                continue; // a gauge, from Redis' own sketches
            }
            if shared && crate::metrics::bot::of_book(&row.metric) {
                continue; // Redis' merge counts these (see `cluster::book`)
            }
            let field = field(&row.metric, &row.labels);
            let delta = row.value - baseline.get(&field).copied().unwrap_or(0.0);
            if delta != 0.0 && delta.is_finite() {
                series.push((field, delta, row.value));
            }
        }
        let mut today = Vec::new();
        for (name, counter) in bot.today.counters() {
            let (day, value) = counter.load();
            let delta = match today_base.get(name) {
                Some(&(base_day, base)) if base_day == day => value.saturating_sub(base),
                _ => value,
            };
            if delta > 0 {
                today.push((name, day, delta, value));
            }
        }
        Batch {
            mark,
            series,
            today,
            users: pending.map_or_else(Vec::new, |p| p.take(USERS_PER_BATCH)),
            book: bot.take_book_delta(),
        }
    }
}

impl BotSync {
    fn confirm(&mut self, batch: Batch, cluster: &Cluster) {
        self.confirmed = self.confirmed.max(batch.mark);
        for (field, _, value) in batch.series {
            self.baseline.insert(field, value);
        }
        for (name, day, _, value) in batch.today {
            self.today.insert(name, (day, value));
        }
        cluster.pending.budget.release(batch.users.len());
    }
}

/// What one sync did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// Bots whose batch Redis added now.
    pub applied: usize,
    /// Bots whose batch Redis already held (an earlier reply was lost).
    pub repeated: usize,
    /// Bots seeded from the store first.
    pub seeded: usize,
    /// Bots with a batch still to send (this sync sent an older one).
    pub waiting: usize,
}

struct State {
    bots: Vec<BotSync>,
    /// The mark of the next batch without a journal: a sequence.
    seq: u64,
    /// The steps of `prepare`, each done once even when a later one fails
    /// and `prepare` runs again: counting the journal twice would double it.
    claims_settled: bool,
    replayed: bool,
    adopted: bool,
}

pub struct Syncer {
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    ingest: Arc<Ingest>,
    claims: Arc<Claims>,
    store: Arc<Store>,
    state: Mutex<State>,
    prepared: AtomicBool,
    /// `--max-label-values`, so a recovery folds labels as counting did.
    max_label_values: usize,
    sync_script: redis::Script,
    seed_script: redis::Script,
    book_fields: super::book::BookFields,
}

impl Syncer {
    pub fn new(
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
        ingest: Arc<Ingest>,
        claims: Arc<Claims>,
        store: Arc<Store>,
        max_label_values: usize,
    ) -> Result<Self> {
        let mut bots = Vec::new();
        track(&mut bots, &metrics, &cluster);
        Ok(Syncer {
            cluster,
            metrics,
            ingest,
            claims,
            store,
            state: Mutex::new(State {
                bots,
                seq: 0,
                claims_settled: false,
                replayed: false,
                adopted: false,
            }),
            prepared: AtomicBool::new(false),
            max_label_values,
            // The book's rule is prepended: the sync merges runs with it.
            sync_script: redis::Script::new(concat!(
                include_str!("../lua/book.lua"),
                include_str!("../lua/exact.lua"),
                include_str!("../lua/sync.lua")
            )),
            seed_script: redis::Script::new(concat!(
                include_str!("../lua/exact.lua"),
                include_str!("../lua/seed.lua")
            )),
            book_fields: super::book::BookFields::new()?,
        })
    }

    /// True once this replica's journal was replayed past what Redis
    /// holds: from then on its counts reach the cluster.
    pub fn is_prepared(&self) -> bool {
        self.prepared.load(Ordering::Relaxed)
    }

    /// One sync: prepares first if it never did, sends each bot's batch,
    /// and records the outcome in the self-metrics.
    pub async fn sync_once(&self) -> Result<SyncReport> {
        let started = Instant::now();
        let result = self.sync_inner().await;
        self.cluster.observe(&result);
        let m = &self.cluster.metrics;
        m.pending_users
            .set(self.cluster.pending.budget.used() as i64);
        match &result {
            Ok(report) => {
                m.sync_duration.observe(started.elapsed().as_secs_f64());
                if report.waiting == 0 {
                    m.last_sync
                        .set(Utc::now().timestamp_millis() as f64 / 1000.0);
                }
            }
            Err(_) => m.sync_failures.inc(),
        }
        result
    }

    async fn sync_inner(&self) -> Result<SyncReport> {
        let mut state = self.state.lock().await;
        if !self.is_prepared() {
            self.prepare(&mut state).await?;
            self.prepared.store(true, Ordering::Relaxed);
        }
        track(&mut state.bots, &self.metrics, &self.cluster);
        let State { bots, seq, .. } = &mut *state;
        // Bots whose older batch goes first: what they counted since waits
        // for the next sync.
        let behind: Vec<bool> = bots.iter().map(|b| b.inflight.is_some()).collect();
        // One cut for every bot without a batch in flight: exactly the
        // journal up to `mark`.
        let mark = self
            .ingest
            .consistent(|lsn| {
                let mark = if self.ingest.journal().is_some() {
                    lsn
                } else {
                    *seq += 1;
                    *seq
                };
                for b in bots.iter_mut().filter(|b| b.inflight.is_none()) {
                    self.cluster
                        .metrics
                        .users_dropped
                        .inc_by(b.bot.take_book_dropped());
                    let batch = b.cut(self.cluster.pending.of(&b.bot.bot).as_deref(), mark);
                    if !batch.is_empty() {
                        b.inflight = Some(batch);
                    }
                }
                mark
            })
            .await;
        let now = Utc::now().timestamp();
        let conn = timed(self.cluster.redis.conn()).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, b) in bots.iter().enumerate() {
            let invocation = self.invocation(b, b.inflight.as_ref(), b.confirmed, now);
            let mut conn = conn.clone();
            tasks.spawn(async move {
                let answer: Result<Vec<i64>> = timed(invocation.run(&mut conn)).await;
                (i, answer)
            });
        }
        let mut answers: Vec<Option<Result<Vec<i64>>>> = (0..bots.len()).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, answer)) => answers[i] = Some(answer),
                Err(e) => tracing::error!(error = %e, "a sync task failed"),
            }
        }
        let mut report = SyncReport::default();
        let mut first_error = None;
        // (bot, generation) of the wipes Redis told of.
        let mut wiped: Vec<(Arc<str>, i64)> = Vec::new();
        let mut stored: Option<Stored> = None;
        for (i, answer) in answers.into_iter().enumerate() {
            let mut answer =
                answer.unwrap_or_else(|| Err(ClusterError::Protocol("no answer".into())));
            if matches!(&answer, Ok(a) if a.first() == Some(&0)) {
                // Redis does not hold this bot's totals (it lost its data,
                // or this is the cluster's first start): seed them from the
                // store before anything is added.
                let result = self.seed(&bots[i], &mut stored).await;
                match result {
                    Ok(seeded) => {
                        report.seeded += usize::from(seeded);
                        let b = &bots[i];
                        let mut conn = conn.clone();
                        answer = timed(
                            self.invocation(b, b.inflight.as_ref(), b.confirmed, now)
                                .run(&mut conn),
                        )
                        .await;
                    }
                    Err(e) => answer = Err(e),
                }
            }
            let b = &mut bots[i];
            if let Ok(a) = &answer
                && a.len() >= 5
                && (a[0] == 3 || (a[0] != 0 && (a[4].max(0) as u64) < b.confirmed))
            {
                // Redis holds less of this replica than it confirmed: it
                // lost data and was reseeded from the store, which had not
                // yet received the rest. The journal still has it.
                let before = a[4].max(0) as u64;
                let resent = match self.recover(b, before, now, &conn).await {
                    Ok(()) if a[0] == 3 => {
                        let mut conn = conn.clone();
                        timed(
                            self.invocation(b, b.inflight.as_ref(), b.confirmed, now)
                                .run(&mut conn),
                        )
                        .await
                    }
                    Ok(()) => answer,
                    Err(e) => Err(e),
                };
                answer = resent;
            }
            match answer {
                Ok(a) if a.len() >= 5 && a[0] == 4 => wiped.push((b.bot.bot.clone(), a[4])),
                Ok(a) if a.len() >= 5 && (a[0] == 1 || a[0] == 2) => {
                    if let Some(batch) = b.inflight.take() {
                        if a[0] == 1 {
                            report.applied += 1;
                            // Only the call that merged knows what the
                            // merge found (a lost reply loses it for this
                            // replica's /metrics; Redis counted it).
                            let (new, sessions) = super::book::found(&a[5..]);
                            b.bot.credit_book(new, &sessions);
                        } else {
                            report.repeated += 1;
                        }
                        b.confirm(batch, &self.cluster);
                    }
                    let [day, week, month] = [a[1], a[2], a[3]].map(|n| n.max(0) as u64);
                    b.bot.active.set_cluster([day, week, month]);
                }
                Ok(a) => {
                    first_error.get_or_insert(ClusterError::Protocol(format!(
                        "sync script answered {a:?}"
                    )));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        report.waiting = behind.iter().filter(|b| **b).count();
        for (bot, generation) in wiped {
            // What this replica counted of the bot goes, its unsent batch
            // too: journaled first, so a replay drops it as well.
            match self.ingest.wipe(&self.metrics, &bot, generation).await {
                Ok(_) => {
                    tracing::info!(bot = %bot, generation, "bot wiped (on another replica or this one): its counts here are dropped");
                    bots.retain(|b| b.bot.bot != bot);
                    self.cluster.pending.forget(&bot);
                    let _ = self
                        .cluster
                        .metrics
                        .dedupe_fallbacks
                        .remove_label_values(&[&bot]);
                }
                Err(e) => {
                    first_error.get_or_insert(ClusterError::Protocol(format!(
                        "cannot apply the wipe of `{bot}`: {e}"
                    )));
                }
            }
        }
        self.trim(bots, mark).await;
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Trims the journal to what Redis holds of every bot: `mark` for a bot
    /// with nothing in flight, else what Redis last confirmed of it. One bot
    /// that cannot sync holds back only its own part, not every bot's.
    async fn trim(&self, bots: &[BotSync], mark: u64) {
        let Some(journal) = self.ingest.journal() else {
            return;
        };
        let held = bots
            .iter()
            .map(|b| match &b.inflight {
                Some(_) => b.confirmed,
                None => mark,
            })
            .min()
            .unwrap_or(mark);
        // Redis holds everything up to `held`: the journal keeps it only for
        // the ids dedupe remembers across a restart.
        if let Err(e) = journal.trim(held, self.cluster.dedupe_window).await {
            tracing::warn!(error = %e, "journal trim failed; retried after the next sync");
        }
    }

    /// The script call that sends `batch` for `b` (or nothing, to read the
    /// cluster's estimates), for keys around `now`; `expected` is the mark
    /// this replica believes Redis holds for it.
    fn invocation(
        &self,
        b: &BotSync,
        batch: Option<&Batch>,
        expected: u64,
        now: i64,
    ) -> Invocation {
        let mut keys = b.keys.script_keys(now);
        let mut args: Vec<Vec<u8>> = vec![
            self.cluster.replica.clone().into_bytes(),
            batch.map_or(0, |b| b.mark).to_string().into_bytes(),
        ];
        let wiped = self.metrics.wipe_generation(&b.bot.bot).to_string();
        let Some(batch) = batch else {
            args.extend(["0", "0", "0", ""].map(|a| a.as_bytes().to_vec()));
            args.push(expected.to_string().into_bytes());
            args.push(wiped.into_bytes());
            return Invocation::new(&self.sync_script, keys, args);
        };
        // The users, grouped by the sketches they join: the hour's (only
        // while the 1d window can read it) and the day's.
        let hour_now = now.div_euclid(3600);
        let day_now = now.div_euclid(86_400);
        let mut groups: Vec<(String, bool, Vec<[u8; 8]>)> = Vec::new();
        let mut index: HashMap<(bool, i64), usize> = HashMap::new();
        for &(hour, user) in &batch.users {
            let hour = i64::from(hour);
            let day = (hour * 3600).div_euclid(86_400);
            let wanted = [
                (true, hour, hour > hour_now - HOURS),
                (false, day, day > day_now - DAYS),
            ];
            for (hourly, bucket, in_reach) in wanted {
                if !in_reach {
                    continue;
                }
                let g = *index.entry((hourly, bucket)).or_insert_with(|| {
                    let key = if hourly {
                        b.keys.hour_sketch(bucket)
                    } else {
                        b.keys.day_sketch(bucket)
                    };
                    groups.push((key, hourly, Vec::new()));
                    groups.len() - 1
                });
                groups[g].2.push(user.to_le_bytes());
            }
        }
        let calendar = b.bot.today.calendar();
        // Yesterday's counts (a sync just past midnight), this month's
        // spend and the week's ratings: whichever reaches back furthest.
        let oldest_kept = Calendar::date(crate::metrics::today::oldest_current(
            calendar.day_of(now - 86_400),
        ))
        .to_string();
        for count in [batch.series.len(), batch.today.len(), groups.len()] {
            args.push(count.to_string().into_bytes());
        }
        args.push(oldest_kept.into_bytes());
        args.push(expected.to_string().into_bytes());
        args.push(wiped.into_bytes());
        for (field, delta, _) in &batch.series {
            args.push(field.clone().into_bytes());
            args.push(delta.to_string().into_bytes());
        }
        for (name, day, delta, _) in &batch.today {
            args.push(format!("{}:{name}", Calendar::date(*day)).into_bytes());
            args.push(delta.to_string().into_bytes());
        }
        for (key, hourly, users) in groups {
            let position = match keys.iter().position(|k| *k == key) {
                Some(p) => p,
                None => {
                    keys.push(key);
                    keys.len() - 1
                }
            };
            args.push((position + 1).to_string().into_bytes());
            args.push(sketch_ttl(hourly).to_string().into_bytes());
            args.push(users.len().to_string().into_bytes());
            args.extend(users.into_iter().map(|u| u.to_vec()));
        }
        if let Some(gap) = b.bot.shared_book_gap()
            && !batch.book.is_empty()
        {
            let section = super::book::section(
                &batch.book,
                &mut keys,
                &b.keys,
                &self.book_fields,
                calendar,
                now,
                gap,
            );
            args.extend(section);
        }
        Invocation::new(&self.sync_script, keys, args)
    }

    /// The last syncs on the way out, until nothing is left to send (a
    /// batch in flight goes first, then what was counted after it).
    pub async fn final_sync(&self) {
        for _ in 0..3 {
            match self.sync_once().await {
                Ok(report) if report.waiting == 0 => {
                    tracing::info!(?report, "final sync done");
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "final sync failed; the journal keeps what Redis lacks and the next start sends it"
                    );
                    return;
                }
            }
        }
    }
}

/// A script call that owns its keys and arguments, so it can run in a task.
struct Invocation {
    script: redis::Script,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Invocation {
    fn new(script: &redis::Script, keys: Vec<String>, args: Vec<Vec<u8>>) -> Self {
        Invocation {
            script: script.clone(),
            keys,
            args,
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut super::connection::Conn,
    ) -> redis::RedisResult<T> {
        let mut invocation = self.script.prepare_invoke();
        for key in &self.keys {
            invocation.key(key);
        }
        for arg in &self.args {
            invocation.arg(arg.as_slice());
        }
        invocation.invoke_async(conn).await
    }
}

/// The local date of `ts` in the calendar's zone, as `YYYY-MM-DD`.
/// Syncs every `interval`, retrying a failure sooner (as the flush does),
/// and until nothing is left on the way out.
pub async fn sync_loop(syncer: Arc<Syncer>, interval: Duration, shutdown: CancellationToken) {
    let task = crate::tasks::Every {
        interval,
        retry_sooner: true,
        log: Some(crate::tasks::Log {
            failed: "sync to redis failed; counts are kept and the sync retries",
            recovered: "sync to redis caught up",
        }),
    };
    crate::tasks::every(task, || syncer.sync_once(), shutdown).await;
    syncer.final_sync().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::parse_field;

    #[test]
    fn fields_split_back_into_metric_and_labels() {
        let f = field("bot_messages_total", r#"{"role":"user"}"#);
        assert_eq!(f, r#"bot_messages_total{"role":"user"}"#);
        assert_eq!(
            parse_field(&f),
            ("bot_messages_total", r#"{"role":"user"}"#)
        );
        assert_eq!(parse_field("bot_users_registered_total{}").1, "{}");
    }
}
