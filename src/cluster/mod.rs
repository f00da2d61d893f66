//! Cluster mode: several replicas share Redis (or a Redis Cluster) and one
//! store, and answer as one system (`--redis-url`).
//!
//! The tiers of the original review: each replica counts in memory and its
//! own journal as a single process does (the hot path never waits on
//! Redis, but for one pipelined round trip when a request carries
//! `event_id`s); every `--sync-interval` it adds what it counted since its
//! last confirmed sync to the cluster totals in Redis ([`sync`]); one
//! replica at a time, holding a lease in Redis, leads the one store writer
//! (`persist`) with those totals as its source ([`lead`]); `/v1/summary`
//! reads them on any replica ([`view`]). Each part plugs into a seam the
//! single-node code defines: [`claims`] is ingest's `Arbiter`, [`pending`]
//! its `UserNotes`, [`view`] the handlers' `Totals`, [`lead`] the writer's
//! `Source`.
//!
//! # Exactly once, one level up
//!
//! The journal's ideas carry over. A sync's deltas are cut under the same
//! gate as the journal (see `ingest`), so a sync covers exactly the journal
//! up to one LSN, and the Redis script that adds them records that LSN per
//! replica and bot in the same atomic step: a retried sync whose first
//! reply was lost is recognised and not added twice, and a replica that
//! restarts (or is killed) replays only its journal past what Redis holds.
//! The store keeps those marks with the totals (`cluster_progress`), so
//! that after Redis loses its data and is reseeded from the store, a
//! restarting replica replays exactly what the store lacks.
//!
//! # Keys
//!
//! Every key of a bot carries the hash tag `{bot}`, so in a Redis Cluster
//! a bot's keys live on one slot and every per-bot script is atomic
//! without a cross-slot operation; see [`BotKeys`].

pub mod book;
pub mod claims;
mod connection;
pub mod health;
pub mod lead;
pub mod pending;
pub mod sync;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub use connection::Redis;

use crate::metrics::reg;
use pending::{Pending, UserBudget};

/// Users waiting to be sent to Redis, across every bot, at most: about
/// 16 bytes each in the set, and about 60 more while in a batch (the
/// batch's copy and its script argument), so well under 100 MB however long
/// Redis is away.
pub const MAX_PENDING_USERS: usize = 1_000_000;

/// How long a Redis command may take before the caller falls back or
/// retries. The hot path's dedupe round trip uses its own, shorter bound.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis answered something unexpected: {0}")]
    Protocol(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// The bounds of [`Cluster::liveness`]: a replica that stops renewing its
/// claims (killed, partitioned, paused) has its in-flight requests' retries
/// decided elsewhere within this long, never later than 30 s.
pub const LIVENESS_MIN: Duration = Duration::from_secs(3);
pub const LIVENESS_MAX: Duration = Duration::from_secs(30);

/// How long a replica's released claims are remembered for its journal
/// replay: a replica back with its disk after longer would count them again.
pub const RELEASED_KEPT: Duration = Duration::from_secs(30 * 86_400);

/// Runs a Redis call with [`COMMAND_TIMEOUT`].
pub async fn timed<T>(f: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ClusterError::Timeout(COMMAND_TIMEOUT)),
    }
}

/// The field a series is kept under in the bot's `series` hash.
pub fn field(metric: &str, labels: &str) -> String {
    format!("{metric}{labels}")
}

/// `(metric, labels)` of a field: labels are the JSON object from `{`.
pub fn parse_field(field: &str) -> (&str, &str) {
    match field.find('{') {
        Some(i) => field.split_at(i),
        None => (field, "{}"),
    }
}

/// The names of one bot's keys. `{bot}` is the hash tag (bot names are
/// `[A-Za-z0-9_.:-]`, never a brace).
#[derive(Debug, Clone)]
pub struct BotKeys {
    prefix: String,
}

/// Hourly sketches in the 1d window, daily ones in the 30d window.
pub const HOURS: i64 = 24;
pub const DAYS: i64 = 30;

impl BotKeys {
    pub fn new(bot: &str) -> Self {
        BotKeys {
            prefix: format!("bm:{{{bot}}}:"),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Field `<metric>{<labels>}` → cluster total.
    pub fn series(&self) -> String {
        self.key("series")
    }

    /// Field `<replica>` → the journal LSN Redis holds that replica up to.
    pub fn applied(&self) -> String {
        self.key("applied")
    }

    /// Set once the bot's totals were seeded from the store.
    pub fn seeded(&self) -> String {
        self.key("seeded")
    }

    /// Field `<YYYY-MM-DD>:<counter>` → that local day's count.
    pub fn today(&self) -> String {
        self.key("today")
    }

    /// Sketches changed since the store last got them.
    pub fn dirty(&self) -> String {
        self.key("dirty")
    }

    /// The shared user book: field = a user's keyed hash (8 bytes, little
    /// endian) → the packed entry (`users::Entry::pack`, 20 bytes).
    pub fn book(&self) -> String {
        self.key("book")
    }

    /// Users of the book changed (or erased) since the store last got them.
    pub fn book_changed(&self) -> String {
        self.key("book:changed")
    }

    /// Claims a reseed's load of the book for one replica (`book_seed.lua`).
    pub fn book_load(&self) -> String {
        self.key("book:load")
    }

    /// Every cohort of the book as of the lead's last scan (see
    /// `users::Cohort::encode_all`).
    pub fn cohorts(&self) -> String {
        self.key("cohorts")
    }

    pub fn hour_sketch(&self, hour: i64) -> String {
        format!("{}u:h:{hour}", self.prefix)
    }

    pub fn day_sketch(&self, day: i64) -> String {
        format!("{}u:d:{day}", self.prefix)
    }

    /// Every user seen in the 30d window while there are few (see
    /// `lua/exact.lua`): member = the user's keyed hash, score = the last
    /// unix hour seen. The store keeps it as it keeps a sketch.
    pub fn seen(&self) -> String {
        self.key("u:seen")
    }

    /// The unix hour from which [`BotKeys::seen`] holds every user, or
    /// `off` while the bot has too many.
    pub fn seen_since(&self) -> String {
        self.key("u:seen:since")
    }

    /// `bm:{bot}:`: the scripts that name keys from Redis' clock (the
    /// claim buckets, see `lua/claim.lua`) or from a holder's name build
    /// them from it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The claims of one dedupe-window-long time bucket (Redis' clock):
    /// field = an `event_id`'s keyed hash ([`BotKeys::id_field`]) → the
    /// claiming replica. Named by `lua/claim.lua`; here for tools and tests.
    pub fn claims(&self, bucket: i64) -> String {
        format!("{}ids:{bucket}", self.prefix)
    }

    /// An `event_id`'s keyed hash as the claim scripts and sets hold it: 8
    /// bytes, little-endian, as the user book's fields.
    pub fn id_field(id: crate::dedupe::IdHash) -> [u8; 8] {
        id.0.to_le_bytes()
    }

    /// The id a member of a pending or released set names: 8 bytes, or a
    /// claim key of the layout before claim buckets (`bm:{bot}:id:<16 hex>`),
    /// which a released set made by an older build may still hold.
    pub fn parse_id(&self, member: &[u8]) -> Option<crate::dedupe::IdHash> {
        if let Ok(bytes) = <[u8; 8]>::try_from(member) {
            return Some(crate::dedupe::IdHash(u64::from_le_bytes(bytes)));
        }
        let key = std::str::from_utf8(member).ok()?;
        let hex = key.strip_prefix(&self.prefix)?.strip_prefix("id:")?;
        u64::from_str_radix(hex, 16).ok().map(crate::dedupe::IdHash)
    }

    /// A replica's claims whose events are not yet in its journal.
    pub fn pending(&self, replica: &str) -> String {
        format!("{}pending:{replica}", self.prefix)
    }

    /// Present while `replica` renews it: it may still count its pending
    /// claims. Expired, they are taken over (see `lua/claim.lua`).
    pub fn alive(&self, replica: &str) -> String {
        format!("{}alive:{replica}", self.prefix)
    }

    /// Claims of `replica` that another replica took over and counted:
    /// its journal replay leaves their records out.
    pub fn released(&self, replica: &str) -> String {
        format!("{}released:{replica}", self.prefix)
    }

    /// The keys every sync and read script takes, in their order: the five
    /// per-bot keys, the 24 hourly sketches ending at `now`'s hour and the
    /// 30 daily ones ending at its day (oldest first).
    pub fn script_keys(&self, now: i64) -> Vec<String> {
        let hour = now.div_euclid(3600);
        let day = now.div_euclid(86_400);
        let mut keys = vec![
            self.series(),
            self.applied(),
            self.seeded(),
            self.today(),
            self.dirty(),
        ];
        keys.extend((hour - HOURS + 1..=hour).map(|h| self.hour_sketch(h)));
        keys.extend((day - DAYS + 1..=day).map(|d| self.day_sketch(d)));
        keys
    }

    /// The sketch a stored name stands for: `(hour?, bucket)`.
    pub fn parse_sketch(&self, key: &str) -> Option<(bool, i64)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("u:")?;
        let (kind, n) = rest.split_once(':')?;
        Some((kind == "h", n.parse().ok()?))
    }

    /// Whether the store keeps `key` as a sketch: an hourly or daily one,
    /// or [`BotKeys::seen`].
    pub fn is_stored_sketch(&self, key: &str) -> bool {
        key == self.seen() || self.parse_sketch(key).is_some()
    }

    /// The seconds a key the store keeps as a sketch (an hourly or daily
    /// one, or [`BotKeys::seen`]) has left in Redis at `now`, unix seconds:
    /// `None` for another key, or one past its time.
    pub fn stored_sketch_ttl(&self, key: &str, now: i64) -> Option<i64> {
        let left = if key == self.seen() {
            SEEN_TTL as i64
        } else {
            let (hourly, bucket) = self.parse_sketch(key)?;
            let span = if hourly { 3600 } else { 86_400 };
            (bucket + 1) * span + sketch_ttl(hourly) as i64 - now
        };
        (left > 0).then_some(left)
    }
}

/// The seconds a sketch is kept in Redis: as long as a window can read it.
pub fn sketch_ttl(hourly: bool) -> u64 {
    if hourly {
        (HOURS as u64 + 2) * 3600
    } else {
        (DAYS as u64 + 2) * 86_400
    }
}

/// The seconds [`BotKeys::seen`] is kept past its last change, as
/// `SEEN_TTL` in `lua/exact.lua`.
const SEEN_TTL: u64 = (DAYS as u64 + 2) * 86_400;

/// botmetrics' own view of the Redis tier, registered only in cluster mode.
pub struct ClusterMetrics {
    pub redis_up: IntGauge,
    pub sync_duration: Histogram,
    pub sync_failures: IntCounter,
    pub last_sync: prometheus::Gauge,
    pub dedupe_fallbacks: IntCounterVec,
    pub writer: IntGauge,
    pub pending_users: IntGauge,
    pub users_dropped: IntCounter,
    pub reseeds: IntCounter,
}

impl ClusterMetrics {
    pub fn register(registry: &Registry, sync_interval: Duration) -> prometheus::Result<Self> {
        let interval = reg(
            registry,
            prometheus::Gauge::new(
                "botmetrics_sync_interval_seconds",
                "How often this replica sends what it counted to Redis (--sync-interval).",
            )?,
        )?;
        interval.set(sync_interval.as_secs_f64());
        let metrics = ClusterMetrics {
            redis_up: reg(
                registry,
                IntGauge::new(
                    "botmetrics_redis_up",
                    "1 when the last Redis operation succeeded, 0 when Redis is unreachable.",
                )?,
            )?,
            sync_duration: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "botmetrics_sync_duration_seconds",
                        "Time to send one sync (every bot's deltas) to Redis.",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                )?,
            )?,
            sync_failures: reg(
                registry,
                IntCounter::new(
                    "botmetrics_sync_failures_total",
                    "Syncs to Redis that failed; their deltas are kept and sent again.",
                )?,
            )?,
            last_sync: reg(
                registry,
                prometheus::Gauge::new(
                    "botmetrics_last_sync_timestamp_seconds",
                    "Unix time of the last sync Redis confirmed for every bot.",
                )?,
            )?,
            dedupe_fallbacks: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "botmetrics_dedupe_fallbacks_total",
                        "event_ids checked against this replica's memory only, because Redis did not answer: a retry sent to another replica meanwhile may count twice.",
                    ),
                    &["bot"],
                )?,
            )?,
            writer: reg(
                registry,
                IntGauge::new(
                    "botmetrics_cluster_writer",
                    "1 while this replica holds the lease and writes the cluster totals to the store.",
                )?,
            )?,
            pending_users: reg(
                registry,
                IntGauge::new(
                    "botmetrics_sync_pending_users",
                    "Active users counted here and not yet confirmed by Redis.",
                )?,
            )?,
            users_dropped: reg(
                registry,
                IntCounter::new(
                    "botmetrics_sync_users_dropped_total",
                    "Active users left out of the cluster-wide count because too many were waiting for Redis.",
                )?,
            )?,
            reseeds: reg(
                registry,
                IntCounter::new(
                    "botmetrics_redis_reseeds_total",
                    "Bots whose cluster totals this replica seeded into Redis from the store (at first start, or after Redis lost its data).",
                )?,
            )?,
        };
        Ok(metrics)
    }
}

/// A replica name for a process without a journal: new at every start,
/// since nothing it counted survives it anyway.
pub fn fresh_replica_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "p-{:016x}",
        RandomState::new().hash_one((nanos, std::process::id()))
    )
}

/// What every part of cluster mode shares.
pub struct Cluster {
    pub redis: Redis,
    /// This replica's name in Redis: its journal's id, or a fresh one per
    /// process without a journal.
    pub replica: String,
    pub sync_interval: Duration,
    pub dedupe_window: Duration,
    /// How long a replica's pending claims stay its own without a renewal
    /// (see `claims`): three sync intervals, 3 s to 30 s.
    pub liveness: Duration,
    pub metrics: ClusterMetrics,
    /// The users counted here and not yet in Redis' sketches.
    pub pending: Arc<Pending>,
    /// Whether the hot path and the summary wait on Redis at all.
    pub health: Arc<health::Health>,
}

impl Cluster {
    pub fn new(
        redis: Redis,
        replica: String,
        config: &crate::config::Config,
        metrics: ClusterMetrics,
    ) -> Self {
        let budget = Arc::new(UserBudget::new(
            MAX_PENDING_USERS,
            metrics.users_dropped.clone(),
        ));
        Cluster {
            redis,
            replica,
            sync_interval: config.sync_interval,
            dedupe_window: config.dedupe_window,
            liveness: (config.sync_interval * 3).clamp(LIVENESS_MIN, LIVENESS_MAX),
            metrics,
            pending: Arc::new(Pending::new(budget)),
            health: Arc::new(health::Health::new()),
        }
    }

    /// Asks Redis, in the background, whether it answers again while it is
    /// in doubt: nobody waits on the probe, and `watch` keeps a second one
    /// from starting until it has its answer.
    pub fn probe(self: &Arc<Self>, watch: health::Watch) {
        let cluster = self.clone();
        tokio::spawn(async move {
            let ping = async {
                let mut conn = cluster.redis.conn().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await
            };
            let answer = match tokio::time::timeout(claims::CLAIM_TIMEOUT, ping).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(ClusterError::Redis(e)),
                Err(_) => Err(ClusterError::Timeout(claims::CLAIM_TIMEOUT)),
            };
            match &answer {
                Ok(()) => cluster.health.answered(),
                Err(_) => cluster.health.failed(),
            }
            cluster.observe(&answer);
            drop(watch);
        });
    }

    /// Notes the outcome of a Redis operation: the up gauge, and one log
    /// line per change of state.
    pub fn observe<T>(&self, result: &Result<T>) {
        self.redis
            .observe(result.is_ok(), &self.metrics.redis_up, || {
                result
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_bot_shares_its_hash_tag() {
        let keys = BotKeys::new("shop.bot-1");
        let all = keys.script_keys(1_700_000_000);
        assert_eq!(all.len(), 5 + 24 + 30);
        for key in all.iter().chain([&keys.claims(7)]) {
            assert!(key.starts_with("bm:{shop.bot-1}:"), "{key}");
        }
        let id = crate::dedupe::IdHash(0xdead_beef);
        assert_eq!(keys.parse_id(&BotKeys::id_field(id)), Some(id));
        assert_eq!(
            keys.parse_id(b"bm:{shop.bot-1}:id:00000000deadbeef"),
            Some(id),
            "a released set of the per-id-key layout"
        );
        assert_eq!(keys.parse_id(b"bm:{other}:id:00000000deadbeef"), None);
        assert_eq!(keys.parse_id(b"short"), None);
        assert!(keys.pending("r1").starts_with("bm:{shop.bot-1}:"));
        let hour = keys.hour_sketch(5);
        assert_eq!(keys.parse_sketch(&hour), Some((true, 5)));
        assert_eq!(keys.parse_sketch(&keys.day_sketch(9)), Some((false, 9)));
        assert_eq!(keys.parse_sketch("bm:{other}:u:h:5"), None);
        let now = 5 * 3600 + 10;
        assert_eq!(
            keys.stored_sketch_ttl(&hour, now),
            Some(6 * 3600 + sketch_ttl(true) as i64 - now)
        );
        assert_eq!(keys.stored_sketch_ttl(&keys.hour_sketch(-30), now), None);
        assert_eq!(
            keys.stored_sketch_ttl(&keys.seen(), now),
            Some(SEEN_TTL as i64)
        );
        assert_eq!(keys.stored_sketch_ttl(&keys.series(), now), None);
        assert!(keys.is_stored_sketch(&keys.seen()) && keys.is_stored_sketch(&hour));
        assert!(!keys.is_stored_sketch(&keys.seen_since()) && !keys.is_stored_sketch(&keys.book()));
    }
}
