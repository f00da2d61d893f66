//! Dedupe across replicas: an `event_id` seen by any replica within
//! `--dedupe-window` is a duplicate everywhere, decided before the answer.
//!
//! A request's ids are claimed in one round trip (a script: every key of a
//! bot is on one slot, so a Redis Cluster answers it from one node). The
//! claims live as fields of one hash per dedupe-window-long time bucket
//! (`lua/claim.lua`), so the script's work for a thousand ids is a handful
//! of multi-field commands, not a thousand: Redis' CPU per id is what caps
//! how many ids per second a cluster dedupes (see BENCHMARKS.md). A
//! claim stays *pending* in the replica's pending set until the event is in
//! memory (and so, at the next sync, in Redis' totals); then it is
//! *confirmed* (taken out of the set, in batches, off the request path), or,
//! if the request ended before counting it, given back. Both are queued by
//! a guard the request holds (see `ingest`), so a request that times out or
//! is dropped settles its claims too.
//! What a request learns of each id:
//!
//! * claimed now: this request counts it;
//! * this replica's already (a retry after its own restart): its own
//!   dedupe decides, which the journal refilled at start;
//! * another replica's, confirmed: a duplicate, counted there;
//! * another replica's, pending: that replica may or may not count it (it
//!   may have been killed before its journal write), so the request is
//!   answered 503 `retry_later` and nothing of it counts. When that replica
//!   restarts it confirms what its journal holds and gives back the rest,
//!   so the retry is then decided for good. If it does not renew its
//!   liveness ([`Cluster::liveness`], at most 30 s) the claim is taken over
//!   instead and counted here; the replica, should it come back with its
//!   journal, leaves those records out of its replay ([`Claims::released`]).
//!
//! A replica renews its liveness with each claim and, while any claim of
//! a bot is unsettled, from a heartbeat; a request that waited past half
//! the liveness period since its claim gives its claims back rather than
//! count them (`Arbiter::hold`), since another replica may have taken them.
//!
//! Redis unreachable or slow: the ids are checked against this replica's
//! memory only, counted in `botmetrics_dedupe_fallbacks_total`, and the
//! request is answered as before. Whether to ask Redis at all is decided
//! by the replica's one opinion of it (`health`): while it does not answer,
//! no request waits more than `health::SLOW` for it and one per outage
//! (the sentinel) waits the claim timeout; a second after each failure a
//! background probe, not a request, asks again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::health::{Admit, SLOW};
use super::{BotKeys, Cluster, Result, timed};
use crate::BoxFuture;
use crate::dedupe::{Dedupe, IdHash};
use crate::ingest::{Arbiter, Claim, Claimed};

/// The longest the sentinel (see `health`) waits for its claims before
/// deciding locally; every other request waits at most [`SLOW`].
pub const CLAIM_TIMEOUT: Duration = Duration::from_millis(500);
/// How often confirmations are sent, batched.
const CONFIRM_EVERY: Duration = Duration::from_millis(20);

/// Settled off the request path, per bot: (confirm, give back).
type Queue = HashMap<String, (Vec<IdHash>, Vec<IdHash>)>;

pub struct Claims {
    cluster: Arc<Cluster>,
    script: redis::Script,
    settle_script: redis::Script,
    queue: Mutex<Queue>,
    /// Claims of this replica being given back, from the moment a request
    /// queues them until Redis has deleted them. A retry that meets one
    /// (Redis says "this replica's") must not count it: the give-back
    /// would then delete a counted claim and another replica would count
    /// the event again. It is told to retry instead, and by then the claim
    /// is gone and free.
    returning: Mutex<HashSet<(String, IdHash)>>,
    /// This replica's claims per bot that Redis may hold pending: made and
    /// not yet settled. The heartbeat keeps those bots' liveness.
    live: Mutex<HashMap<String, usize>>,
    /// Set once this replica's claims from before its start are settled
    /// ([`Claims::resolve_own`]); until then no claim is made (memory
    /// decides), so settling them can never race a live request's.
    armed: AtomicBool,
}

impl Claims {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Claims {
            cluster,
            script: redis::Script::new(include_str!("lua/claim.lua")),
            settle_script: redis::Script::new(include_str!("lua/settle.lua")),
            queue: Mutex::new(HashMap::new()),
            returning: Mutex::new(HashSet::new()),
            live: Mutex::new(HashMap::new()),
            armed: AtomicBool::new(false),
        }
    }

    /// Claims `ids` for `bot`, in order; when Redis does not answer, the
    /// caller decides with its own memory (counted here).
    pub async fn claim(&self, bot: &str, ids: &[IdHash]) -> Claimed {
        if ids.is_empty() {
            return Claimed::Decided(Vec::new());
        }
        let fallback = |maybe_claimed| {
            self.cluster
                .metrics
                .dedupe_fallbacks
                .with_label_values(&[bot])
                .inc_by(ids.len() as u64);
            if maybe_claimed {
                self.made(bot, ids.len());
            }
            Claimed::Local { maybe_claimed }
        };
        if !self.armed.load(Ordering::Acquire) {
            return fallback(false);
        }
        match self.cluster.health.admit() {
            Admit::Ask => {}
            Admit::Local => return fallback(false),
            Admit::Probe(watch) => {
                self.cluster.probe(watch);
                return fallback(false);
            }
        }
        let keys = BotKeys::new(bot);
        let replica = &self.cluster.replica;
        let mut cmd = evalsha(&self.script, 2);
        cmd.arg(keys.pending(replica))
            .arg(keys.alive(replica))
            .arg(replica)
            .arg(self.window_ms())
            .arg(keys.prefix())
            .arg(self.cluster.liveness.as_millis().max(1) as u64)
            .arg(super::RELEASED_KEPT.as_millis() as u64);
        for id in ids {
            cmd.arg(&BotKeys::id_field(*id)[..]);
        }
        let round_trip = async {
            let mut conn = self.cluster.redis.conn().await?;
            invoke::<Vec<u8>>(&self.script, &cmd, &mut conn).await
        };
        tokio::pin!(round_trip);
        // Only the sentinel waits past SLOW (see `health`); it holds its
        // watch until its verdict is recorded.
        let (answered, _watch) = match tokio::time::timeout(SLOW, &mut round_trip).await {
            Ok(answer) => (Some(answer), None),
            Err(_) => match self.cluster.health.slow() {
                // The script may still run when Redis wakes: settled like
                // a claim.
                None => return fallback(true),
                Some(watch) => {
                    let rest = CLAIM_TIMEOUT.saturating_sub(SLOW);
                    (
                        tokio::time::timeout(rest, round_trip).await.ok(),
                        Some(watch),
                    )
                }
            },
        };
        let mut timed_out = false;
        let answer = match answered {
            Some(Ok(answer)) if answer.len() == ids.len() => Ok(answer),
            Some(Ok(answer)) => Err(format!("{} answers for {} ids", answer.len(), ids.len())),
            Some(Err(e)) => Err(e.to_string()),
            None => {
                timed_out = true;
                Err(format!("no answer within {CLAIM_TIMEOUT:?}"))
            }
        };
        self.cluster
            .redis
            .observe(answer.is_ok(), &self.cluster.metrics.redis_up, || {
                answer.as_ref().err().cloned().unwrap_or_default()
            });
        match answer {
            Ok(codes) => {
                self.cluster.health.answered();
                self.made(bot, codes.iter().filter(|c| **c == b'0').count());
                let returning = self.returning.lock().unwrap_or_else(|e| e.into_inner());
                let returning_here = |id: &IdHash| {
                    !returning.is_empty() && returning.contains(&(bot.to_owned(), *id))
                };
                Claimed::Decided(
                    codes
                        .into_iter()
                        .zip(ids)
                        .map(|(code, id)| match code {
                            b'0' => Claim::Fresh,
                            // Being given back: not ours to count any more.
                            b'1' if returning_here(id) => Claim::Pending,
                            b'1' => Claim::Mine,
                            b'3' => Claim::Pending,
                            _ => Claim::Taken,
                        })
                        .collect(),
                )
            }
            Err(_) => {
                // The back-off counts from now, when the failure is seen.
                self.cluster.health.failed();
                fallback(timed_out)
            }
        }
    }

    fn made(&self, bot: &str, n: usize) {
        if n == 0 {
            return;
        }
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // The bot's name is copied only when it has no claim unsettled.
        match live.get_mut(bot) {
            Some(count) => *count += n,
            None => {
                live.insert(bot.to_owned(), n);
            }
        }
    }

    /// `n` claims of `bot` are settled in Redis.
    fn settled(&self, bot: &str, n: usize) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = live.get_mut(bot) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                live.remove(bot);
            }
        }
    }

    /// Renews this replica's liveness for every bot with claims unsettled,
    /// so that a request still in progress keeps them (a slow journal
    /// write, a flush holding the ingest gate).
    pub async fn heartbeat_once(&self) -> Result<()> {
        let bots: Vec<String> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        if bots.is_empty() {
            return Ok(());
        }
        let mut conn = timed(self.cluster.redis.conn()).await?;
        let ttl = self.cluster.liveness.as_millis().max(1) as u64;
        for bot in bots {
            let key = BotKeys::new(&bot).alive(&self.cluster.replica);
            timed(
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("PX")
                    .arg(ttl)
                    .query_async::<()>(&mut conn),
            )
            .await?;
        }
        Ok(())
    }

    /// The claims of `replica` (this one, or a stopped one whose journal
    /// is adopted) that others took over while it was gone: what its
    /// journal replay must leave out. Kept for [`super::RELEASED_KEPT`],
    /// not deleted after a replay: a crash before the next sync replays
    /// the same records again.
    pub async fn released(&self, bot: &str, replica: &str) -> Result<HashSet<IdHash>> {
        let keys = BotKeys::new(bot);
        let mut conn = timed(self.cluster.redis.conn()).await?;
        let members: Vec<Vec<u8>> = timed(
            redis::cmd("SMEMBERS")
                .arg(keys.released(replica))
                .query_async(&mut conn),
        )
        .await?;
        Ok(members.iter().filter_map(|m| keys.parse_id(m)).collect())
    }

    /// The events of these claims are counted: they are confirmed within
    /// [`CONFIRM_EVERY`], off the request path.
    pub fn keep(&self, bot: &str, ids: impl IntoIterator<Item = IdHash>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.entry(bot.to_owned()).or_default().0.extend(ids);
    }

    /// These claims' request ended before counting them (refused, or
    /// dropped): they are given back within [`CONFIRM_EVERY`], so the
    /// client's retry counts wherever it lands.
    pub fn give_back(&self, bot: &str, ids: impl IntoIterator<Item = IdHash>) {
        let ids: Vec<IdHash> = ids.into_iter().collect();
        self.returning
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids.iter().map(|id| (bot.to_owned(), *id)));
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.entry(bot.to_owned()).or_default().1.extend(ids);
    }

    /// Takes `keep` out of the pending set (confirmed) and gives `drop`
    /// back, in one script per bot and ten thousand claims (the script
    /// sends them on in multi-field commands).
    async fn settle(&self, bot: &str, keep: &[IdHash], drop: &[IdHash]) -> Result<()> {
        const MOST: usize = 10_000;
        let keys = BotKeys::new(bot);
        let replica = &self.cluster.replica;
        let pending = keys.pending(replica);
        let mut conn = timed(self.cluster.redis.conn()).await?;
        let (mut keep, mut drop) = (keep, drop);
        while !keep.is_empty() || !drop.is_empty() {
            let k = keep.len().min(MOST);
            let d = drop.len().min(MOST - k);
            let mut cmd = evalsha(&self.settle_script, 1);
            cmd.arg(&pending)
                .arg(replica)
                .arg(self.window_ms())
                .arg(keys.prefix())
                .arg(k);
            for id in keep[..k].iter().chain(&drop[..d]) {
                cmd.arg(&BotKeys::id_field(*id)[..]);
            }
            timed(invoke::<i64>(&self.settle_script, &cmd, &mut conn)).await?;
            keep = &keep[k..];
            drop = &drop[d..];
        }
        Ok(())
    }

    /// The dedupe window, which is also the length of a claim bucket.
    fn window_ms(&self) -> u64 {
        self.cluster.dedupe_window.as_millis().max(1) as u64
    }

    /// Sends what was queued since the last call. A batch that fails is
    /// queued again: a retry elsewhere meanwhile is told to come back, never
    /// miscounted. While Redis is away no claim is made, so the queue holds
    /// only the requests that were in flight.
    pub async fn settle_once(&self) -> Result<()> {
        let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let mut failed = None;
        for (bot, (keep, drop)) in batch {
            match self.settle(&bot, &keep, &drop).await {
                Ok(()) => {
                    self.settled(&bot, keep.len() + drop.len());
                    let mut returning = self.returning.lock().unwrap_or_else(|e| e.into_inner());
                    for id in &drop {
                        returning.remove(&(bot.clone(), *id));
                    }
                }
                Err(e) => {
                    self.keep(&bot, keep);
                    self.give_back(&bot, drop);
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Before this replica makes any claim: its pending claims from before
    /// a restart (or `kill -9`) are confirmed when the journal holds their
    /// event (`dedupe` remembers every id the journal holds) and given back
    /// when it does not, since that request was never answered. Then claims
    /// are armed.
    pub async fn resolve_own(&self, bots: &[&str], dedupe: &Dedupe) -> Result<(usize, usize)> {
        let (mut kept, mut dropped) = (0, 0);
        for bot in bots {
            let keys = BotKeys::new(bot);
            let mut conn = timed(self.cluster.redis.conn()).await?;
            let pending: Vec<Vec<u8>> = timed(
                redis::cmd("SMEMBERS")
                    .arg(keys.pending(&self.cluster.replica))
                    .query_async(&mut conn),
            )
            .await?;
            let (mut keep, mut drop) = (Vec::new(), Vec::new());
            // A member of the per-id-key layout names a claim no script
            // of this build reads: it is left to expire with the set.
            for claim in pending.iter().filter(|m| m.len() == 8) {
                let Some(id) = keys.parse_id(claim) else {
                    continue;
                };
                if dedupe.contains(id) {
                    keep.push(id);
                } else {
                    drop.push(id);
                }
            }
            kept += keep.len();
            dropped += drop.len();
            self.settle(bot, &keep, &drop).await?;
        }
        self.armed.store(true, Ordering::Release);
        Ok((kept, dropped))
    }
}

/// `EVALSHA <script> <numkeys>`, to which the caller adds keys and
/// arguments. Built as one `Cmd` (one buffer) rather than through
/// `ScriptInvocation`, which copies every argument into a vector of its
/// own first: a request's claim carries one argument per id.
fn evalsha(script: &redis::Script, keys: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys);
    cmd
}

/// Runs an [`evalsha`] command, loading the script first if Redis does not
/// know it (a restarted or flushed Redis, a new node), as
/// `ScriptInvocation::invoke_async` does.
async fn invoke<T: redis::FromRedisValue>(
    script: &redis::Script,
    cmd: &redis::Cmd,
    conn: &mut super::connection::Conn,
) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.prepare_invoke().load_async(conn).await?;
            cmd.query_async(conn).await
        }
        answer => answer,
    }
}

impl Arbiter for Claims {
    // The arrival time is unused: the back-off runs on `health`'s own clock,
    // from when a failure is seen.
    fn claim<'a>(
        &'a self,
        bot: &'a str,
        ids: &'a [IdHash],
        _now_ms: i64,
    ) -> BoxFuture<'a, Claimed> {
        Box::pin(Claims::claim(self, bot, ids))
    }

    fn keep(&self, bot: &str, ids: Vec<IdHash>) {
        Claims::keep(self, bot, ids);
    }

    fn give_back(&self, bot: &str, ids: Vec<IdHash>) {
        Claims::give_back(self, bot, ids);
    }

    fn hold(&self) -> Duration {
        self.cluster.liveness / 2
    }
}

/// Confirms journaled claims every [`CONFIRM_EVERY`] until shutdown, then
/// once more; beside it, renews the liveness of bots with unsettled claims
/// three times per liveness period.
pub async fn confirm_loop(claims: Arc<Claims>, shutdown: CancellationToken) {
    // A failure keeps the batch (or the next beat renews); Redis' state is
    // logged by the sync.
    let confirm = crate::tasks::Every {
        interval: CONFIRM_EVERY,
        retry_sooner: false,
        log: None,
    };
    let heartbeat = crate::tasks::Every {
        interval: claims.cluster.liveness / 3,
        ..confirm
    };
    tokio::join!(
        crate::tasks::every(confirm, || claims.settle_once(), shutdown.clone()),
        crate::tasks::every(heartbeat, || claims.heartbeat_once(), shutdown),
    );
    let _ = claims.settle_once().await;
}
