//! Where handlers read totals: the seam between what an answer shows and
//! where its figures live. One process reads its own memory ([`Memory`]);
//! cluster mode reads the cluster totals from Redis (`cluster::view`). The
//! handlers never ask which.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::BoxFuture;
use crate::metrics::BotMetrics;
use crate::summary::Summary;

pub trait Totals: Send + Sync {
    /// The summaries of `bots`, in their order, as of `now`.
    fn summaries<'a>(
        &'a self,
        bots: &'a [Arc<BotMetrics>],
        now: DateTime<Utc>,
        uptime_seconds: u64,
    ) -> BoxFuture<'a, Vec<Summary>>;

    /// `None`: readiness follows the store (a balancer should not route to
    /// a process that would show reset counters). `Some(fields)`: ready
    /// whatever the store does, and these fields say why (cluster mode:
    /// every replica counts into its journal and reads the cluster).
    fn ready_without_store(&self) -> Option<Vec<(&'static str, Value)>>;

    /// Whether the book of `bot` knows the user of keyed hash `key` (the
    /// answer of an erasure): this process's book, or in cluster mode the
    /// shared one in Redis.
    fn knows_user<'a>(&'a self, bot: &'a BotMetrics, key: u64) -> BoxFuture<'a, bool> {
        let known = bot.book.contains(key);
        Box::pin(async move { known })
    }
}

/// One process: its own memory is the truth.
pub struct Memory;

impl Totals for Memory {
    fn summaries<'a>(
        &'a self,
        bots: &'a [Arc<BotMetrics>],
        now: DateTime<Utc>,
        uptime_seconds: u64,
    ) -> BoxFuture<'a, Vec<Summary>> {
        let summaries = bots
            .iter()
            .map(|b| Summary::build(b, now, uptime_seconds))
            .collect();
        Box::pin(async move { summaries })
    }

    fn ready_without_store(&self) -> Option<Vec<(&'static str, Value)>> {
        None
    }
}
