//! Dedupe across replicas: an `event_id` seen by any replica within
//! `--dedupe-window` is a duplicate everywhere, decided before the answer.
//!
//! A request's ids are claimed in one round trip (a script: every key of a
//! bot is on one slot, so a Redis Cluster answers it from one node). A
//! claim stays *pending* in the replica's pending set until the event is in
//! its journal; then it is *confirmed* (taken out of the set, in batches,
//! off the request path), or, if the journal refused the batch, given back.
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
//!   so the retry is then decided for good.
//!
//! Redis unreachable or slow: the ids are checked against this replica's
//! memory only, counted in `botmetrics_dedupe_fallbacks_total`, and the
//! request is answered as before. For a second after a failure the round
//! trip is not tried at all, so an outage costs no request a timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{BotKeys, Cluster, Result, timed};
use crate::dedupe::{Dedupe, IdHash};

/// The longest a request waits for its claims before deciding locally.
const CLAIM_TIMEOUT: Duration = Duration::from_millis(500);
/// How long after a failed round trip requests decide locally at once.
const BACKOFF_MS: i64 = 1000;
/// How often confirmations are sent, batched.
const CONFIRM_EVERY: Duration = Duration::from_millis(20);

/// What Redis said of one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Claimed now, by this request.
    Fresh,
    /// Already held by this replica: its own dedupe decides.
    Mine,
    /// Held and confirmed by another replica: a duplicate.
    Taken,
    /// Held by another replica that has not confirmed it: retry later.
    Pending,
}

pub struct Claims {
    cluster: Arc<Cluster>,
    /// Unix ms before which no round trip is tried (after a failure).
    retry_at: AtomicI64,
    script: redis::Script,
    /// Claims whose events are journaled, to be confirmed: bot → ids.
    confirm: Mutex<HashMap<String, Vec<IdHash>>>,
}

impl Claims {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Claims {
            cluster,
            retry_at: AtomicI64::new(0),
            script: redis::Script::new(include_str!("lua/claim.lua")),
            confirm: Mutex::new(HashMap::new()),
        }
    }

    /// Claims `ids` for `bot`, in order. `None`: Redis did not answer, and
    /// the caller decides with its own memory (counted here).
    pub async fn claim(&self, bot: &str, ids: &[IdHash], now_ms: i64) -> Option<Vec<Claim>> {
        if ids.is_empty() {
            return Some(Vec::new());
        }
        let fallback = || {
            self.cluster
                .metrics
                .dedupe_fallbacks
                .with_label_values(&[bot])
                .inc_by(ids.len() as u64);
            None
        };
        if now_ms < self.retry_at.load(Ordering::Relaxed) {
            return fallback();
        }
        let keys = BotKeys::new(bot);
        let window_ms = self.cluster.dedupe_window.as_millis().max(1) as u64;
        let mut invocation = self.script.prepare_invoke();
        invocation.key(keys.pending(&self.cluster.replica));
        for id in ids {
            invocation.key(keys.claim(*id));
        }
        invocation
            .arg(&self.cluster.replica)
            .arg(window_ms)
            .arg(keys.pending(""));
        let round_trip = async {
            let mut conn = self.cluster.redis.conn().await?;
            invocation.invoke_async::<Vec<i64>>(&mut conn).await
        };
        let answer = match tokio::time::timeout(CLAIM_TIMEOUT, round_trip).await {
            Ok(Ok(answer)) if answer.len() == ids.len() => Ok(answer),
            Ok(Ok(answer)) => Err(format!("{} answers for {} ids", answer.len(), ids.len())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CLAIM_TIMEOUT:?}")),
        };
        self.cluster
            .redis
            .observe(answer.is_ok(), &self.cluster.metrics.redis_up, || {
                answer.as_ref().err().cloned().unwrap_or_default()
            });
        match answer {
            Ok(codes) => Some(
                codes
                    .into_iter()
                    .map(|code| match code {
                        0 => Claim::Fresh,
                        1 => Claim::Mine,
                        3 => Claim::Pending,
                        _ => Claim::Taken,
                    })
                    .collect(),
            ),
            Err(_) => {
                self.retry_at.store(now_ms + BACKOFF_MS, Ordering::Relaxed);
                fallback()
            }
        }
    }

    /// The events of these claims are in the journal: they are confirmed
    /// within [`CONFIRM_EVERY`], off the request path.
    pub fn journaled(&self, bot: &str, ids: impl IntoIterator<Item = IdHash>) {
        let mut confirm = self.confirm.lock().unwrap_or_else(|e| e.into_inner());
        confirm.entry(bot.to_owned()).or_default().extend(ids);
    }

    /// Gives back claims a request made but could not keep (the journal
    /// refused the batch, or another id of it is pending elsewhere), so the
    /// client's retry is counted. Best effort: a claim left behind stays
    /// pending until this replica's next start gives it back, or the window
    /// ends it.
    pub async fn release(&self, bot: &str, ids: &[IdHash]) {
        if ids.is_empty() {
            return;
        }
        let failed = match tokio::time::timeout(CLAIM_TIMEOUT, self.settle(bot, &[], ids)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {CLAIM_TIMEOUT:?}"),
        };
        tracing::warn!(error = %failed, bot, "claims of a refused batch not given back; they are at this replica's next start");
    }

    /// Takes `keep` out of the pending set (confirmed) and deletes `drop`
    /// (given back), in one round trip.
    async fn settle(&self, bot: &str, keep: &[IdHash], drop: &[IdHash]) -> Result<()> {
        let keys = BotKeys::new(bot);
        let pending = keys.pending(&self.cluster.replica);
        let mut pipe = redis::pipe();
        let settled: Vec<String> = keep.iter().chain(drop).map(|id| keys.claim(*id)).collect();
        for chunk in settled.chunks(1000) {
            pipe.cmd("SREM").arg(&pending).arg(chunk).ignore();
        }
        for chunk in drop.chunks(1000) {
            let claims: Vec<String> = chunk.iter().map(|id| keys.claim(*id)).collect();
            pipe.cmd("DEL").arg(claims).ignore();
        }
        let mut conn = timed(self.cluster.redis.conn()).await?;
        timed(pipe.query_async::<()>(&mut conn)).await
    }

    /// Sends the confirmations gathered since the last call.
    pub async fn confirm_once(&self) -> Result<()> {
        let batch = std::mem::take(&mut *self.confirm.lock().unwrap_or_else(|e| e.into_inner()));
        let mut failed = None;
        for (bot, ids) in batch {
            if let Err(e) = self.settle(&bot, &ids, &[]).await {
                // Kept for the next round: a retry elsewhere meanwhile is
                // told to come back, never miscounted.
                self.journaled(&bot, ids);
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// At start, before serving claims: this replica's pending claims from
    /// before a restart (or `kill -9`) are confirmed when the journal holds
    /// their event (`dedupe` remembers every id the journal holds) and
    /// given back when it does not, since that request was never answered.
    pub async fn resolve_own(&self, bots: &[&str], dedupe: &Dedupe) -> Result<(usize, usize)> {
        let (mut kept, mut dropped) = (0, 0);
        for bot in bots {
            let keys = BotKeys::new(bot);
            let mut conn = timed(self.cluster.redis.conn()).await?;
            let pending: Vec<String> = timed(
                redis::cmd("SMEMBERS")
                    .arg(keys.pending(&self.cluster.replica))
                    .query_async(&mut conn),
            )
            .await?;
            let (mut keep, mut drop) = (Vec::new(), Vec::new());
            for claim in &pending {
                let Some(id) = keys.parse_claim(claim) else {
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
        Ok((kept, dropped))
    }
}

/// Confirms journaled claims every [`CONFIRM_EVERY`] until shutdown, then
/// once more.
pub async fn confirm_loop(claims: Arc<Claims>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(CONFIRM_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        // A failure keeps the batch; Redis' state is logged by the sync.
        let _ = claims.confirm_once().await;
    }
    let _ = claims.confirm_once().await;
}
