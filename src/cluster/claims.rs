//! Dedupe across replicas: an `event_id` seen by any replica within
//! `--dedupe-window` is a duplicate everywhere, decided before the answer.
//!
//! A request's ids are claimed in one pipelined round trip, one
//! `SET <claim> <replica> NX GET PX <window>` each (every key of a bot is
//! on one slot, so a Redis Cluster answers it from one node). A claim Redis
//! had not seen is this request's; a claim held by another replica makes
//! the event a duplicate; a claim this replica holds (a retry after its own
//! restart) is decided by its own dedupe, which the journal refills at
//! start, so the retry of an event that never reached the journal counts.
//!
//! Redis unreachable or slow: the ids are checked against this replica's
//! memory only, counted in `botmetrics_dedupe_fallbacks_total`, and the
//! request is answered as before. For a second after a failure the round
//! trip is not tried at all, so an outage costs no request a timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use super::{BotKeys, Cluster};
use crate::dedupe::IdHash;

/// The longest a request waits for its claims before deciding locally.
const CLAIM_TIMEOUT: Duration = Duration::from_millis(500);
/// How long after a failed round trip requests decide locally at once.
const BACKOFF_MS: i64 = 1000;

/// What Redis said of one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Claimed now, by this request.
    Fresh,
    /// Already held by this replica: its own dedupe decides.
    Mine,
    /// Held by another replica: a duplicate.
    Taken,
}

pub struct Claims {
    cluster: Arc<Cluster>,
    /// Unix ms before which no round trip is tried (after a failure).
    retry_at: AtomicI64,
}

impl Claims {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Claims {
            cluster,
            retry_at: AtomicI64::new(0),
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
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("SET")
                .arg(keys.claim(*id))
                .arg(&self.cluster.replica)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(window_ms);
        }
        let round_trip = async {
            let mut conn = self.cluster.redis.conn().await?;
            pipe.query_async::<Vec<Option<String>>>(&mut conn).await
        };
        let answer = match tokio::time::timeout(CLAIM_TIMEOUT, round_trip).await {
            Ok(Ok(answer)) if answer.len() == ids.len() => Ok(answer),
            Ok(Ok(answer)) => Err(format!("{} answers for {} ids", answer.len(), ids.len())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CLAIM_TIMEOUT:?}")),
        };
        let ok = answer.is_ok();
        self.cluster
            .redis
            .observe(ok, &self.cluster.metrics.redis_up, || {
                answer.as_ref().err().cloned().unwrap_or_default()
            });
        match answer {
            Ok(holders) => Some(
                holders
                    .into_iter()
                    .map(|holder| match holder {
                        None => Claim::Fresh,
                        Some(h) if h == self.cluster.replica => Claim::Mine,
                        Some(_) => Claim::Taken,
                    })
                    .collect(),
            ),
            Err(_) => {
                self.retry_at.store(now_ms + BACKOFF_MS, Ordering::Relaxed);
                fallback()
            }
        }
    }

    /// Gives back claims this request made but could not keep (the journal
    /// refused the batch), so the client's retry is counted. Best effort:
    /// a claim left behind only ends early what the window would end.
    pub async fn release(&self, bot: &str, ids: &[IdHash]) {
        if ids.is_empty() {
            return;
        }
        let keys = BotKeys::new(bot);
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("DEL").arg(keys.claim(*id)).ignore();
        }
        let release = async {
            let mut conn = self.cluster.redis.conn().await?;
            pipe.query_async::<()>(&mut conn).await
        };
        let failed = match tokio::time::timeout(CLAIM_TIMEOUT, release).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {CLAIM_TIMEOUT:?}"),
        };
        tracing::warn!(error = %failed, bot, "claims of a refused batch not released; they expire with the dedupe window");
    }
}
