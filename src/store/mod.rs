//! The store: the only module that speaks SQL.
//!
//! Two backends behind one narrow interface: PostgreSQL for production and
//! an embedded SQLite file as the zero-setup default. Queries are built at
//! run time (two dialects, no database needed to compile); every value is a
//! bound parameter.
//!
//! On PostgreSQL a flush and a history write are each one statement, one
//! round trip whatever the number of series, because whole columns are
//! bound as arrays and `unnest`-ed server-side. A load is one transaction
//! of six reads (one snapshot of every table); maintenance and taking the
//! lease are a few statements each.
//!
//! # Parts
//!
//! * this file: the public interface (the row types, the error, and
//!   [`Store`], whose methods hand the work to the lease or to the
//!   dialect), and what both dialects compute alike (which sketches
//!   maintenance prunes).
//! * `lease`: the one-writer lease, which keeps two processes from
//!   overwriting each other's totals.
//! * `load`: what a load reads and how its rows decode, once for both
//!   dialects.
//! * `postgres` and `sqlite`: each dialect's SQL, the same operations in the
//!   same order so the two files read side by side.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

use lease::Lease;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "unsupported scheme `{scheme}` in `{url}`: use postgres://user@host/db or sqlite://path/to/file.db"
    )]
    Url { scheme: String, url: String },
    /// A fault no retry mends (a missing directory, a wrong password, an
    /// unknown database): the process stops and says which.
    #[error("`{url}`: {cause}")]
    Unusable { url: String, cause: String },
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    #[error(
        "standby: another botmetrics process writes to this store ({0}); this one takes over when it stops"
    )]
    Standby(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One series' value, keyed as it is stored: metric name (with `_bucket`,
/// `_sum`, `_count` for histogram lines), bot, and the other labels as a
/// canonical JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesRow {
    pub metric: String,
    pub bot: String,
    pub labels: String,
    pub value: f64,
}

/// A "today" counter as stored: which local day it counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyRow {
    pub bot: String,
    pub name: String,
    pub day: NaiveDate,
    pub value: i64,
}

/// The bucket sizes of the active-user sketches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            _ => None,
        }
    }
}

/// One stored sketch: which bucket, and its registers in one of two forms:
///
/// * dense: exactly 2^14 bytes, register `i` at byte `i` (the only
///   form earlier versions wrote, and still read as such);
/// * sparse: the byte `0xFF`, then each entry as a big-endian `u32` (top 25
///   bits of the hash, then the rank in the low 7 bits), ascending.
///
/// The store keeps the bytes as given; `metrics::sketch` writes and reads
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SketchRow {
    pub granularity: Granularity,
    pub bucket: i64,
    pub registers: Vec<u8>,
}

/// A bot's sketch as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSketch {
    pub bot: String,
    pub sketch: SketchRow,
}

/// Everything a flush writes, in one transaction.
#[derive(Debug, Default)]
pub struct FlushBatch {
    /// Series the store already has a row for (the caller knows which, from
    /// its last successful flush): a bulk update, no conflict checks.
    pub changed: Vec<SeriesRow>,
    /// Series new to the store: inserted.
    pub added: Vec<SeriesRow>,
    pub sketches: Vec<StoredSketch>,
    pub daily: Vec<DailyRow>,
    /// (journal id, LSN): the snapshot holds that journal up to the LSN.
    /// Written in the same transaction as the totals, never apart.
    pub progress: Option<(String, i64)>,
    /// Cluster mode: Redis' sketches that changed, and how far Redis holds
    /// each replica's journal per bot, as of the same read as the totals.
    pub cluster_sketches: Vec<ClusterSketch>,
    pub cluster_progress: Vec<ClusterProgress>,
    /// Each bot's user book: users that changed (upserted) and users gone
    /// (their rows deleted).
    pub users: Vec<BotUsers>,
    /// Bots wiped (`DELETE /v1/admin/bots/{bot}?wipe=true`), with each
    /// wipe's generation: every row of theirs, in every table, is deleted
    /// first, in the same transaction, unless the store recorded that wipe
    /// (or a later one) already (table `bot_wipes`).
    pub wiped: Vec<WipeRow>,
}

/// A wipe the store is to apply: the bot and the wipe's generation (unix ms).
pub type WipeRow = (String, i64);

/// One remembered user as the store keeps it (`metrics::users` is the
/// book; the store only moves its rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRow {
    /// The user id's keyed hash, never the id.
    pub key: u64,
    pub entry: StoredUser,
}

/// What the book knows of a user, as stored: local day numbers, the
/// first-31-days mask, the open session (unix seconds) and whether it was
/// counted as ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredUser {
    pub first_day: u16,
    pub last_day: u16,
    pub days: u32,
    pub last_ts: u32,
    pub session_start: u32,
    pub session_messages: u16,
    pub ended: bool,
}

/// One bot's part of the user book in a flush.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BotUsers {
    pub bot: String,
    pub changed: Vec<UserRow>,
    pub gone: Vec<u64>,
}

/// A Redis HyperLogLog as the store keeps it (cluster mode): its name
/// within the bot's keys (`u:h:<hour>` or `u:d:<day>`) and its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSketch {
    pub bot: String,
    pub sketch: String,
    pub hll: Vec<u8>,
}

/// How far Redis holds one replica's journal for one bot (cluster mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterProgress {
    pub bot: String,
    pub replica: String,
    pub applied: i64,
}

impl FlushBatch {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
            && self.added.is_empty()
            && self.sketches.is_empty()
            && self.daily.is_empty()
            && self.progress.is_none()
            && self.cluster_sketches.is_empty()
            && self.cluster_progress.is_empty()
    }
}

/// What a flush found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Some rows the caller believed stored were not there (deleted by
    /// hand, say). Everything else was written; the caller should forget
    /// what it believes stored so the next flush inserts every series.
    pub missing: bool,
    /// Rows deleted for the batch's wiped bots, per bot, history included.
    pub wiped: Vec<(String, u64)>,
}

/// What a start-up restore reads.
#[derive(Debug, Default)]
pub struct Stored {
    /// Each bot's remembered users.
    pub users: std::collections::HashMap<String, Vec<UserRow>>,
    pub series: Vec<SeriesRow>,
    pub sketches: Vec<StoredSketch>,
    pub daily: Vec<DailyRow>,
    /// How far into each journal the store has applied.
    pub progress: std::collections::HashMap<String, u64>,
    pub cluster_sketches: Vec<ClusterSketch>,
    pub cluster_progress: Vec<ClusterProgress>,
}

/// A history query, already checked by the HTTP layer.
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    pub metric: String,
    pub bot: Option<String>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub step_seconds: i64,
    /// At most this many rows are read; one more tells the caller to narrow.
    pub limit: i64,
}

/// One downsampled point: the last value within its step.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPoint {
    pub bot: String,
    pub labels: String,
    pub at: DateTime<Utc>,
    pub value: f64,
}

/// What [`Store::maintain`] did, for the log.
#[derive(Debug, Default)]
pub struct MaintenanceReport {
    pub partitions_ensured: usize,
    pub partitions_dropped: Vec<String>,
    pub rows_deleted: u64,
}

/// `metrics_history_20261124`: one partition per UTC day.
pub fn partition_name(day: NaiveDate) -> String {
    format!("metrics_history_{}", day.format("%Y%m%d"))
}

/// A database URL fit for a log line: the password, if any, replaced.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

// `load` first: its `read_all!` is used by `postgres` and `sqlite`.
#[macro_use]
mod load;
mod lease;
mod postgres;
pub mod registry;
mod sqlite;

/// The database and, beside it, this process's claim to be its one writer.
pub struct Store {
    db: Db,
    lease: Lease,
}

#[derive(Debug, Clone)]
enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// How long an operation may wait for a connection before failing, so an
/// outage is noticed within a tick instead of hanging the task.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

impl Store {
    /// Builds a pool without connecting: the process starts (and serves from
    /// memory) even while the database is down. [`Store::migrate`] is the
    /// first real contact.
    pub fn open(url: &str) -> Result<Store> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (pool, options) = postgres::open(url)?;
            Ok(Store {
                db: Db::Postgres(pool),
                lease: Lease::postgres(options),
            })
        } else if url.starts_with("sqlite:") {
            let pool = sqlite::open(url)?;
            let lease = Lease::sqlite(pool.connect_options().get_filename(), url);
            Ok(Store {
                db: Db::Sqlite(pool),
                lease,
            })
        } else {
            let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
            Err(StoreError::Url {
                scheme: scheme.to_owned(),
                url: redacted(url),
            })
        }
    }

    /// The first contact at start, on one connection of its own rather
    /// than through the pool, whose errors only say that it timed out. A
    /// fault no retry mends is an `Err` that stops the start; a store that
    /// is merely not there yet is `Ok(Some(why))`: the caller serves from
    /// memory and the flush task keeps trying.
    pub async fn check(&self, url: &str) -> Result<Option<String>> {
        match &self.db {
            Db::Postgres(pool) => postgres::check(pool, url).await,
            Db::Sqlite(pool) => sqlite::check(pool, url).await,
        }
    }

    /// The SQLite database file, if this is one (the journal lives beside it
    /// by default).
    pub fn sqlite_file(&self) -> Option<&std::path::Path> {
        self.lease.sqlite_file()
    }

    /// Names the database without credentials: which store a journal feeds.
    pub fn identity(&self) -> String {
        self.lease.identity()
    }

    /// True while this process holds the lease (it is the store's writer).
    pub async fn is_writer(&self) -> bool {
        self.lease.is_held().await
    }

    /// Bounds how long the writer's PostgreSQL session (and so the lease)
    /// outlives a writer that stopped answering (see `lease.rs`). No
    /// effect on SQLite, whose file lock a stalled process keeps, but where
    /// no other process can write the file anyway.
    pub fn with_writer_idle_limit(mut self, limit: Duration) -> Self {
        self.lease.bound_idle(limit);
        self
    }

    /// [`Store::is_writer`] for a writer that has nothing to write this
    /// tick: a session idle for half its limit is touched, so PostgreSQL
    /// ends only a stalled writer's session; one that PostgreSQL ended
    /// meanwhile (this process was stalled) is given up, so the caller
    /// takes the lease anew, or learns who holds it now, before writing.
    pub async fn writer_alive(&self) -> bool {
        self.lease.alive().await
    }

    /// Takes the lease if nobody holds it. `Err(Standby)` names the holder
    /// when another process has it.
    pub async fn acquire_writer(&self) -> Result<()> {
        self.lease.acquire().await
    }

    /// After a write failed: gives the lease up (and the writer connection
    /// with it) if that connection no longer answers (PostgreSQL; a no-op on
    /// SQLite), so the next tick takes it again and restores what others
    /// wrote meanwhile.
    pub async fn lost_connection(&self) {
        self.lease.lost_connection().await
    }

    /// Gives the lease up on purpose (cluster mode: another replica now
    /// holds the writer lease in Redis), so that replica can take it here.
    pub async fn release_writer(&self) {
        self.lease.release().await
    }

    pub fn backend(&self) -> &'static str {
        match &self.db {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    /// Applies the embedded migrations of this backend.
    pub async fn migrate(&self) -> Result<()> {
        match &self.db {
            Db::Postgres(pool) => postgres::migrate(pool).await,
            Db::Sqlite(pool) => sqlite::migrate(pool).await,
        }
    }

    /// One trivial query: is the store reachable right now?
    pub async fn ping(&self) -> Result<()> {
        match &self.db {
            Db::Postgres(pool) => {
                sqlx::query("select 1").execute(pool).await?;
            }
            Db::Sqlite(pool) => {
                sqlx::query("select 1").execute(pool).await?;
            }
        }
        Ok(())
    }

    /// Gives the lease up, then closes the pool.
    pub async fn close(&self) {
        self.lease.release().await;
        match &self.db {
            Db::Postgres(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }

    /// Reads everything a restart restores, from one snapshot: totals and
    /// the marks that say what they hold are read as of one instant, even
    /// while a writer commits (a reseed from a torn read would lose or
    /// double a flush).
    pub async fn load(&self) -> Result<Stored> {
        match &self.db {
            Db::Postgres(pool) => postgres::load(pool).await,
            Db::Sqlite(pool) => sqlite::load(pool).await,
        }
    }

    /// Writes changed series, sketches and "today" counters in one
    /// transaction: on PostgreSQL one statement, one round trip.
    pub async fn flush(&self, batch: &FlushBatch, now: DateTime<Utc>) -> Result<FlushReport> {
        match &self.db {
            Db::Postgres(_) => {
                let mut writer = self.lease.writer().await?;
                postgres::flush(&mut writer, batch, now).await
            }
            Db::Sqlite(pool) => sqlite::flush(pool, batch, now).await,
        }
    }

    /// Appends one point per series at `at`: one statement.
    pub async fn write_history(&self, rows: &[SeriesRow], at: DateTime<Utc>) -> Result<()> {
        match &self.db {
            Db::Postgres(_) => {
                let mut writer = self.lease.writer().await?;
                postgres::write_history(&mut writer, rows, at).await
            }
            Db::Sqlite(pool) => sqlite::write_history(pool, rows, at).await,
        }
    }

    /// Creates history partitions for the days around `now` (PostgreSQL),
    /// drops history older than `cutoff`, and prunes sketches that no
    /// window can reach any more. Run at start and once a day.
    pub async fn maintain(
        &self,
        now: DateTime<Utc>,
        cutoff: DateTime<Utc>,
    ) -> Result<MaintenanceReport> {
        let prune = Prune {
            hour_floor: now.timestamp().div_euclid(3600) - 48,
            day_floor: now.timestamp().div_euclid(86_400) - 32,
            // Redis expires these itself; the store drops them a day
            // after no window can read them.
            cluster_sketches_before: now - chrono::Duration::days(32),
        };
        match &self.db {
            Db::Postgres(_) => {
                let mut writer = self.lease.writer().await?;
                postgres::maintain(&mut writer, now, cutoff, &prune).await
            }
            Db::Sqlite(pool) => sqlite::maintain(pool, cutoff, &prune).await,
        }
    }

    /// The installation's secret for user ids: the one the store holds, or
    /// `proposed` if it holds none yet (then stored). Concurrent first
    /// starts agree: the first insert wins and every process reads it.
    pub async fn secret(&self, proposed: [u8; 16]) -> Result<[u8; 16]> {
        let value = match &self.db {
            Db::Postgres(pool) => postgres::secret(pool, &proposed).await?,
            Db::Sqlite(pool) => sqlite::secret(pool, &proposed).await?,
        };
        value.try_into().map_err(|v: Vec<u8>| {
            StoreError::Corrupt(format!("installation secret of {} bytes, not 16", v.len()))
        })
    }

    /// History points, downsampled server-side to the last value per step.
    pub async fn history(&self, q: &HistoryQuery) -> Result<Vec<HistoryPoint>> {
        match &self.db {
            Db::Postgres(pool) => postgres::history(pool, q).await,
            Db::Sqlite(pool) => sqlite::history(pool, q).await,
        }
    }

    /// The last history point of `metric` for `bot` strictly before
    /// `before`: every series' value then, as `(labels, value)`. A history
    /// tick writes every series at one instant, so that point holds each
    /// series that existed; two index probes, however long the history.
    pub async fn history_before(
        &self,
        metric: &str,
        bot: &str,
        before: DateTime<Utc>,
    ) -> Result<Vec<(String, f64)>> {
        match &self.db {
            Db::Postgres(pool) => postgres::history_before(pool, metric, bot, before).await,
            Db::Sqlite(pool) => sqlite::history_before(pool, metric, bot, before).await,
        }
    }
}

/// Which stored sketches [`Store::maintain`] deletes: active-user buckets
/// below these floors (hour and day numbers since the epoch), and Redis
/// sketches last written before a time.
struct Prune {
    hour_floor: i64,
    day_floor: i64,
    cluster_sketches_before: DateTime<Utc>,
}

/// The error of a fault no retry mends, for [`Store::check`].
fn unusable(url: &str, cause: String) -> StoreError {
    StoreError::Unusable {
        url: redacted(url),
        cause,
    }
}

/// The innermost message of an sqlx error: the database's own words, or
/// the I/O error, without sqlx's wrapping.
fn cause(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// The bot registry (`registry`): what the admin API and `--tokens` keep.
impl Store {
    pub async fn load_registry(&self) -> Result<registry::RegistryRows> {
        registry::load(&self.db).await
    }

    pub async fn insert_bot(&self, bot: &str, now: i64) -> Result<bool> {
        registry::insert_bot(&self.db, bot, now).await
    }

    pub async fn insert_token(&self, row: &registry::TokenRow) -> Result<bool> {
        registry::insert_token(&self.db, row).await
    }

    pub async fn delete_token(&self, hash: &str) -> Result<bool> {
        registry::delete_token(&self.db, hash).await
    }

    pub async fn delete_bot(&self, bot: &str) -> Result<bool> {
        registry::delete_bot(&self.db, bot).await
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_message() {
        assert_eq!(
            redacted("postgres://bot:s3cret@db.example:5432/metrics?sslmode=require"),
            "postgres://bot:***@db.example:5432/metrics?sslmode=require"
        );
        assert_eq!(redacted("postgres://bot@db/m"), "postgres://bot@db/m");
        assert_eq!(redacted("sqlite://x.db"), "sqlite://x.db");
        let Err(e) = Store::open("mysql://root:pw@localhost/x") else {
            panic!("mysql:// was accepted");
        };
        let e = e.to_string();
        assert!(
            e.contains("`mysql`") && e.contains("mysql://root:***@localhost/x"),
            "{e}"
        );
        assert!(!e.contains("pw"), "{e}");
    }
}
