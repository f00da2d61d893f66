//! The store: the only module that speaks SQL.
//!
//! Two backends behind one narrow interface: PostgreSQL for production and
//! an embedded SQLite file as the zero-setup default. Queries are built at
//! run time (two dialects, no database needed to compile); every value is a
//! bound parameter. Each public method is one round trip to PostgreSQL,
//! whatever the number of series, by passing whole columns as arrays and
//! `unnest`-ing them server-side.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};

use crate::metrics::active::{Granularity, SketchRow};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    /// Some rows the caller believed stored were not there (deleted by
    /// hand, say). Everything else was written; the caller should forget
    /// what it believes stored so the next flush inserts every series.
    pub missing: bool,
}

/// What a start-up restore reads.
#[derive(Debug, Default)]
pub struct Stored {
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

/// One writer per store. Two processes that each overwrite the totals with
/// their own would silently lose each other's counts, so only the holder of
/// the lease writes; any other process on the same store is a standby.
enum Lease {
    /// PostgreSQL: a session-level advisory lock, held by the one connection
    /// every write goes through. If that connection drops, the server
    /// releases the lock and no write can follow on it: the lease cannot be
    /// lost silently.
    Postgres {
        options: Box<PgConnectOptions>,
        writer: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
        /// The longest the writer's session may sit idle (or idle in a
        /// transaction) before PostgreSQL ends it and so frees the lock:
        /// a writer stalled by SIGSTOP, a VM pause or a debugger does not
        /// answer, and without this its session would hold the lease for
        /// as long as it is stalled. `None`: no limit.
        idle_limit: Option<Duration>,
        /// When the writer connection was last used, so a live writer that
        /// has nothing to write touches it before PostgreSQL would end it.
        used: std::sync::Mutex<Instant>,
    },
    /// SQLite: an OS file lock on `<database>.lock`, released when the
    /// process exits or dies.
    File {
        path: PathBuf,
        db: PathBuf,
        held: std::sync::Mutex<Option<std::fs::File>>,
    },
    /// An in-memory SQLite database: nobody else can open it.
    Exclusive,
}

/// Asks PostgreSQL to end the writer's session once it has been idle, in
/// a transaction or not, for `limit`: the advisory lock goes with it, so a
/// stalled writer holds the lease at most that long. A server without
/// `idle_session_timeout` (before PostgreSQL 14) keeps the old behaviour,
/// said once per connection.
async fn bound_idle_session(conn: &mut sqlx::PgConnection, limit: Duration) {
    let ms = format!("{}ms", limit.as_millis().max(1));
    for setting in [
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
    ] {
        let set = sqlx::query("select set_config($1, $2, false)")
            .bind(setting)
            .bind(&ms)
            .execute(&mut *conn)
            .await;
        if let Err(e) = set {
            tracing::warn!(setting, error = %cause(&e), "the store's writer session cannot be bounded: a stalled writer keeps the lease until it resumes");
        }
    }
}

/// The advisory lock key: "botmetrics" in ASCII, folded into 64 bits.
const LEASE_KEY: i64 = 0x626f_746d_6574_7269;

/// How long an operation may wait for a connection before failing, so an
/// outage is noticed within a tick instead of hanging the task.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the start-up check waits for PostgreSQL to answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The innermost message of an sqlx error: the database's own words, or
/// the I/O error, without sqlx's wrapping.
fn cause(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

impl Store {
    /// Builds a pool without connecting: the process starts (and serves from
    /// memory) even while the database is down. [`Store::migrate`] is the
    /// first real contact.
    pub fn open(url: &str) -> Result<Store> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?
                .log_statements(tracing::log::LevelFilter::Trace)
                // Names this process in pg_stat_activity, which is how a
                // standby tells the operator who holds the store.
                .application_name(&format!("botmetrics pid {}", std::process::id()));
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_lazy_with(options.clone());
            Ok(Store {
                db: Db::Postgres(pool),
                lease: Lease::Postgres {
                    options: Box::new(options),
                    writer: tokio::sync::Mutex::new(None),
                    idle_limit: None,
                    used: std::sync::Mutex::new(Instant::now()),
                },
            })
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                // WAL lets /v1/history read while a flush writes.
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5))
                .log_statements(tracing::log::LevelFilter::Trace);
            let file = options.get_filename();
            let lease = if file.as_os_str().is_empty()
                || file.as_os_str() == ":memory:"
                || url.contains(":memory:")
            {
                Lease::Exclusive
            } else {
                let mut path = file.as_os_str().to_owned();
                path.push(".lock");
                Lease::File {
                    path: PathBuf::from(path),
                    db: file.to_path_buf(),
                    held: std::sync::Mutex::new(None),
                }
            };
            let pool = SqlitePoolOptions::new()
                .max_connections(2)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_lazy_with(options);
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
        let unusable = |cause: String| StoreError::Unusable {
            url: redacted(url),
            cause,
        };
        match &self.db {
            Db::Sqlite(pool) => {
                let options = pool.connect_options();
                let file = options.get_filename();
                if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty())
                    && !dir.is_dir()
                {
                    return Err(unusable(format!(
                        "the directory {} does not exist; create it or choose another path",
                        dir.display()
                    )));
                }
                match options.connect().await {
                    Ok(conn) => {
                        let _ = conn.close().await;
                        Ok(None)
                    }
                    Err(e) => Err(unusable(format!(
                        "cannot open the SQLite file {}: {}",
                        file.display(),
                        cause(&e)
                    ))),
                }
            }
            Db::Postgres(pool) => {
                let options = pool.connect_options();
                let at = format!("{}:{}", options.get_host(), options.get_port());
                let connected = tokio::time::timeout(CHECK_TIMEOUT, options.connect()).await;
                let e = match connected {
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                        return Ok(None);
                    }
                    Ok(Err(e)) => e,
                    Err(_) => {
                        return Ok(Some(format!(
                            "PostgreSQL at {at} did not answer within {} s",
                            CHECK_TIMEOUT.as_secs()
                        )));
                    }
                };
                match &e {
                    // Authentication (class 28), an unknown database (3D000)
                    // and TLS or URL mistakes are the operator's to fix.
                    sqlx::Error::Database(db)
                        if db
                            .code()
                            .is_some_and(|c| c.starts_with("28") || c == "3D000") =>
                    {
                        Err(unusable(format!("PostgreSQL at {at}: {}", db.message())))
                    }
                    sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) => {
                        Err(unusable(format!("PostgreSQL at {at}: {}", cause(&e))))
                    }
                    sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                        Ok(Some(format!(
                            "PostgreSQL at {at} refused the connection (is it running, on that port?)"
                        )))
                    }
                    _ => Ok(Some(format!(
                        "cannot reach PostgreSQL at {at}: {}",
                        cause(&e)
                    ))),
                }
            }
        }
    }

    /// The SQLite database file, if this is one (the journal lives beside it
    /// by default).
    pub fn sqlite_file(&self) -> Option<&std::path::Path> {
        match &self.lease {
            Lease::File { db, .. } => Some(db),
            _ => None,
        }
    }

    /// Names the database without credentials: which store a journal feeds.
    pub fn identity(&self) -> String {
        match (&self.lease, &self.db) {
            (Lease::Postgres { options, .. }, _) => format!(
                "postgres://{}:{}/{}",
                options.get_host(),
                options.get_port(),
                options.get_database().unwrap_or_default()
            ),
            (Lease::File { db, .. }, _) => {
                let path = std::fs::canonicalize(db)
                    .or_else(|_| std::path::absolute(db))
                    .unwrap_or_else(|_| db.clone());
                format!("sqlite://{}", path.display())
            }
            (Lease::Exclusive, _) => "sqlite::memory:".to_owned(),
        }
    }

    /// True while this process holds the lease (it is the store's writer).
    pub async fn is_writer(&self) -> bool {
        match &self.lease {
            Lease::Postgres { writer, .. } => writer.lock().await.is_some(),
            Lease::File { held, .. } => lock_ignoring_poison(held).is_some(),
            Lease::Exclusive => true,
        }
    }

    /// Bounds how long the writer's PostgreSQL session (and so the lease)
    /// outlives a writer that stopped answering; see [`Lease::Postgres`].
    /// No effect on SQLite, whose file lock a stalled process keeps, but
    /// where no other process can write the file anyway.
    pub fn with_writer_idle_limit(mut self, limit: Duration) -> Self {
        if let Lease::Postgres { idle_limit, .. } = &mut self.lease {
            *idle_limit = Some(limit);
        }
        self
    }

    /// [`Store::is_writer`] for a writer that has nothing to write this
    /// tick: a session idle for half its limit is touched, so PostgreSQL
    /// ends only a stalled writer's session; one that PostgreSQL ended
    /// meanwhile (this process was stalled) is given up, so the caller
    /// takes the lease anew, or learns who holds it now, before writing.
    pub async fn writer_alive(&self) -> bool {
        let Lease::Postgres {
            writer,
            idle_limit: Some(limit),
            used,
            ..
        } = &self.lease
        else {
            return self.is_writer().await;
        };
        let mut writer = writer.lock().await;
        let Some(conn) = writer.as_mut() else {
            return false;
        };
        if lock_ignoring_poison(used).elapsed() < *limit / 2 {
            return true;
        }
        if conn.ping().await.is_err() {
            tracing::warn!(
                "the store's writer session ended (idle past its limit, or dropped): the lease is taken again before any write"
            );
            *writer = None;
            return false;
        }
        *lock_ignoring_poison(used) = Instant::now();
        true
    }

    /// Takes the lease if nobody holds it. `Err(Standby)` names the holder
    /// when another process has it.
    pub async fn acquire_writer(&self) -> Result<()> {
        match &self.lease {
            Lease::Exclusive => Ok(()),
            Lease::File { path, held, .. } => {
                if lock_ignoring_poison(held).is_some() {
                    return Ok(());
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                    && !dir.is_dir()
                {
                    return Err(StoreError::Sql(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("directory {} does not exist", dir.display()),
                    ))));
                }
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| StoreError::Sql(sqlx::Error::Io(e)))?;
                match file.try_lock() {
                    Ok(()) => {
                        use std::io::Write;
                        // Who holds it, for the standby's message; advisory.
                        let _ = file.set_len(0);
                        let _ =
                            (&file).write_all(format!("pid {}\n", std::process::id()).as_bytes());
                        *lock_ignoring_poison(held) = Some(file);
                        Ok(())
                    }
                    Err(std::fs::TryLockError::WouldBlock) => {
                        let holder = std::fs::read_to_string(path).unwrap_or_default();
                        Err(StoreError::Standby(format!(
                            "{} holds {}",
                            holder.trim(),
                            path.display()
                        )))
                    }
                    Err(std::fs::TryLockError::Error(e)) => {
                        Err(StoreError::Sql(sqlx::Error::Io(e)))
                    }
                }
            }
            Lease::Postgres {
                options,
                writer,
                idle_limit,
                used,
            } => {
                let mut writer = writer.lock().await;
                if let Some(conn) = writer.as_mut() {
                    // A dropped connection has lost the lock with it.
                    if conn.ping().await.is_ok() {
                        return Ok(());
                    }
                    tracing::warn!("the store's writer connection dropped; taking the lease again");
                    *writer = None;
                }
                let mut conn = tokio::time::timeout(ACQUIRE_TIMEOUT, options.connect())
                    .await
                    .map_err(|_| StoreError::Sql(sqlx::Error::PoolTimedOut))??;
                if let Some(limit) = idle_limit {
                    bound_idle_session(&mut conn, *limit).await;
                }
                *lock_ignoring_poison(used) = Instant::now();
                let got: bool = sqlx::query_scalar("select pg_try_advisory_lock($1)")
                    .bind(LEASE_KEY)
                    .fetch_one(&mut conn)
                    .await?;
                if got {
                    *writer = Some(conn);
                    return Ok(());
                }
                let holder: Option<String> = sqlx::query_scalar(
                    "select coalesce(a.application_name, '') || ' on ' || coalesce(host(a.client_addr), 'local socket')
                     from pg_locks l join pg_stat_activity a on a.pid = l.pid
                     where l.locktype = 'advisory' and l.granted
                       and ((l.classid::int8 << 32) | l.objid::int8) = $1
                     limit 1",
                )
                .bind(LEASE_KEY)
                .fetch_optional(&mut conn)
                .await
                .ok()
                .flatten();
                let _ = conn.close().await;
                Err(StoreError::Standby(
                    holder.unwrap_or_else(|| "another session".to_owned()),
                ))
            }
        }
    }

    /// The writer connection, checked alive. Every PostgreSQL write goes
    /// through it, so no write can happen without the lease.
    async fn pg_writer(&self) -> Result<tokio::sync::MutexGuard<'_, Option<sqlx::PgConnection>>> {
        let Lease::Postgres { writer, used, .. } = &self.lease else {
            return Err(StoreError::Standby("no PostgreSQL lease".to_owned()));
        };
        let guard = writer.lock().await;
        if guard.is_none() {
            return Err(StoreError::Standby("the lease is not held".to_owned()));
        }
        *lock_ignoring_poison(used) = Instant::now();
        Ok(guard)
    }

    /// Gives the lease up (and the writer connection with it) after a write
    /// failed on a connection that may be gone, so the next tick takes it
    /// again and restores what others wrote meanwhile.
    pub async fn lost_connection(&self) {
        if let Lease::Postgres { writer, .. } = &self.lease {
            let mut writer = writer.lock().await;
            if let Some(conn) = writer.as_mut()
                && conn.ping().await.is_err()
            {
                *writer = None;
            }
        }
    }

    /// Gives the lease up on purpose (cluster mode: another replica now
    /// holds the writer lease in Redis), so that replica can take it here.
    pub async fn release_writer(&self) {
        match &self.lease {
            Lease::Postgres { writer, .. } => {
                if let Some(conn) = writer.lock().await.take() {
                    let _ = conn.close().await;
                }
            }
            Lease::File { held, .. } => {
                lock_ignoring_poison(held).take();
            }
            Lease::Exclusive => {}
        }
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
            // On the pool, not the writer connection: sqlx's migrator takes
            // its own advisory lock, so two processes never migrate at once.
            Db::Postgres(pool) => sqlx::migrate!("migrations/postgres").run(pool).await?,
            Db::Sqlite(pool) => sqlx::migrate!("migrations/sqlite").run(pool).await?,
        }
        Ok(())
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

    pub async fn close(&self) {
        if let Lease::Postgres { writer, .. } = &self.lease
            && let Some(conn) = writer.lock().await.take()
        {
            let _ = conn.close().await;
        }
        if let Lease::File { held, .. } = &self.lease {
            lock_ignoring_poison(held).take();
        }
        match &self.db {
            Db::Postgres(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }

    /// Reads everything a restart restores.
    pub async fn load(&self) -> Result<Stored> {
        let series_sql = "select metric, bot, labels, value from real_time_metrics";
        let sketches_sql = "select bot, granularity, bucket, registers from active_user_sketches";
        let daily_sql = "select bot, name, day::text as day, value from daily_counters";
        let progress_sql = "select journal, applied from journal_progress";
        let cluster_sketches_sql = "select bot, sketch, hll from cluster_sketches";
        let cluster_progress_sql = "select bot, replica, applied from cluster_progress";
        type Marks = Vec<(String, i64)>;
        type Sketches = Vec<(String, String, Vec<u8>)>;
        type ReplicaMarks = Vec<(String, String, i64)>;
        let mut stored = Stored::default();
        // One snapshot for every table: totals and the marks that say what
        // they hold are read as of one instant, even while a writer commits
        // (a reseed from a torn read would lose or double a flush).
        // The same reads on either backend's transaction.
        macro_rules! read_all {
            ($tx:expr, $daily:expr) => {{
                decode(
                    &mut stored,
                    &sqlx::query(series_sql).fetch_all(&mut *$tx).await?,
                    &sqlx::query(sketches_sql).fetch_all(&mut *$tx).await?,
                    &sqlx::query($daily).fetch_all(&mut *$tx).await?,
                )?;
                let read: (Marks, Sketches, ReplicaMarks) = (
                    sqlx::query_as(progress_sql).fetch_all(&mut *$tx).await?,
                    sqlx::query_as(cluster_sketches_sql)
                        .fetch_all(&mut *$tx)
                        .await?,
                    sqlx::query_as(cluster_progress_sql)
                        .fetch_all(&mut *$tx)
                        .await?,
                );
                read
            }};
        }
        let (progress, sketches, marks) = match &self.db {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("set transaction isolation level repeatable read read only")
                    .execute(&mut *tx)
                    .await?;
                let read = read_all!(tx, daily_sql);
                tx.commit().await?;
                read
            }
            // SQLite keeps labels and days as text already; a transaction
            // reads one snapshot of the file.
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                let read = read_all!(tx, AssertSqlSafe(daily_sql.replace("::text", "")));
                tx.commit().await?;
                read
            }
        };
        stored.progress = progress
            .into_iter()
            .map(|(journal, applied)| (journal, applied.max(0) as u64))
            .collect();
        stored.cluster_sketches = sketches
            .into_iter()
            .map(|(bot, sketch, hll)| ClusterSketch { bot, sketch, hll })
            .collect();
        stored.cluster_progress = marks
            .into_iter()
            .map(|(bot, replica, applied)| ClusterProgress {
                bot,
                replica,
                applied,
            })
            .collect();
        Ok(stored)
    }

    /// Writes changed series, sketches and "today" counters in one
    /// transaction: on PostgreSQL one statement, one round trip.
    pub async fn flush(&self, batch: &FlushBatch, now: DateTime<Utc>) -> Result<FlushReport> {
        match &self.db {
            Db::Postgres(_) => {
                let mut writer = self.pg_writer().await?;
                let pool = writer.as_mut().ok_or_else(not_writer)?;
                let sql = "
                    with updated as (
                        -- rows known to exist: one hash join, cheaper than an
                        -- upsert's per-row conflict check
                        update real_time_metrics r set value = i.value, last_updated = $5
                        from unnest($1::text[], $2::text[], $3::text[], $4::float8[]) as i(metric, bot, labels, value)
                        where r.metric = i.metric and r.bot = i.bot and r.labels = i.labels
                        returning 1
                    ), added as (
                        insert into real_time_metrics (metric, bot, labels, value, last_updated)
                        select metric, bot, labels, value, $5
                        from unnest($14::text[], $15::text[], $16::text[], $17::float8[]) as t(metric, bot, labels, value)
                        on conflict (metric, bot, labels)
                        do update set value = excluded.value, last_updated = excluded.last_updated
                        returning 1
                    ), sketches as (
                        insert into active_user_sketches (bot, granularity, bucket, registers, last_updated)
                        select bot, granularity, bucket, registers, $5
                        from unnest($6::text[], $7::text[], $8::int8[], $9::bytea[]) as t(bot, granularity, bucket, registers)
                        on conflict (bot, granularity, bucket)
                        do update set registers = excluded.registers, last_updated = excluded.last_updated
                        returning 1
                    ), daily as (
                        insert into daily_counters (bot, name, day, value, last_updated)
                        select bot, name, day::date, value, $5
                        from unnest($10::text[], $11::text[], $12::text[], $13::int8[]) as t(bot, name, day, value)
                        on conflict (bot, name)
                        do update set day = excluded.day, value = excluded.value, last_updated = excluded.last_updated
                        returning 1
                    ), progress as (
                        insert into journal_progress (journal, applied, last_updated)
                        select journal, applied, $5
                        from unnest($18::text[], $19::int8[]) as t(journal, applied)
                        on conflict (journal)
                        do update set applied = excluded.applied, last_updated = excluded.last_updated
                        returning 1
                    ), cluster_sketches as (
                        insert into cluster_sketches (bot, sketch, hll, last_updated)
                        select bot, sketch, hll, $5
                        from unnest($20::text[], $21::text[], $22::bytea[]) as t(bot, sketch, hll)
                        on conflict (bot, sketch)
                        do update set hll = excluded.hll, last_updated = excluded.last_updated
                        returning 1
                    ), cluster_progress as (
                        insert into cluster_progress (bot, replica, applied, last_updated)
                        select bot, replica, applied, $5
                        from unnest($23::text[], $24::text[], $25::int8[]) as t(bot, replica, applied)
                        on conflict (bot, replica)
                        do update set applied = excluded.applied, last_updated = excluded.last_updated
                        returning 1
                    )
                    select (select count(*) from updated) as updated,
                           (select count(*) from added) + (select count(*) from sketches) + (select count(*) from daily) + (select count(*) from progress)
                           + (select count(*) from cluster_sketches) + (select count(*) from cluster_progress) as others";
                let cs = &batch.cluster_sketches;
                let cp = &batch.cluster_progress;
                let s = &batch.changed;
                let n = &batch.added;
                let k = &batch.sketches;
                let d = &batch.daily;
                let row = sqlx::query(sql)
                    .bind(s.iter().map(|r| r.metric.as_str()).collect::<Vec<_>>())
                    .bind(s.iter().map(|r| r.bot.as_str()).collect::<Vec<_>>())
                    .bind(s.iter().map(|r| r.labels.as_str()).collect::<Vec<_>>())
                    .bind(s.iter().map(|r| r.value).collect::<Vec<_>>())
                    .bind(now)
                    .bind(k.iter().map(|r| r.bot.as_str()).collect::<Vec<_>>())
                    .bind(
                        k.iter()
                            .map(|r| r.sketch.granularity.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(k.iter().map(|r| r.sketch.bucket).collect::<Vec<_>>())
                    .bind(
                        k.iter()
                            .map(|r| r.sketch.registers.as_slice())
                            .collect::<Vec<_>>(),
                    )
                    .bind(d.iter().map(|r| r.bot.as_str()).collect::<Vec<_>>())
                    .bind(d.iter().map(|r| r.name.as_str()).collect::<Vec<_>>())
                    .bind(d.iter().map(|r| r.day.to_string()).collect::<Vec<_>>())
                    .bind(d.iter().map(|r| r.value).collect::<Vec<_>>())
                    .bind(n.iter().map(|r| r.metric.as_str()).collect::<Vec<_>>())
                    .bind(n.iter().map(|r| r.bot.as_str()).collect::<Vec<_>>())
                    .bind(n.iter().map(|r| r.labels.as_str()).collect::<Vec<_>>())
                    .bind(n.iter().map(|r| r.value).collect::<Vec<_>>())
                    .bind(
                        batch
                            .progress
                            .iter()
                            .map(|p| p.0.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(batch.progress.iter().map(|p| p.1).collect::<Vec<_>>())
                    .bind(cs.iter().map(|r| r.bot.as_str()).collect::<Vec<_>>())
                    .bind(cs.iter().map(|r| r.sketch.as_str()).collect::<Vec<_>>())
                    .bind(cs.iter().map(|r| r.hll.as_slice()).collect::<Vec<_>>())
                    .bind(cp.iter().map(|r| r.bot.as_str()).collect::<Vec<_>>())
                    .bind(cp.iter().map(|r| r.replica.as_str()).collect::<Vec<_>>())
                    .bind(cp.iter().map(|r| r.applied).collect::<Vec<_>>())
                    .fetch_one(&mut *pool)
                    .await?;
                let updated: i64 = row.try_get("updated")?;
                if updated != s.len() as i64 {
                    return Ok(FlushReport { missing: true });
                }
            }
            Db::Sqlite(pool) => {
                // A local file: per-row statements inside one transaction
                // cost no network round trips, and stay under SQLite's
                // bound-parameter limit whatever the batch size.
                let mut tx = pool.begin().await?;
                let now = now.timestamp();
                for r in batch.changed.iter().chain(&batch.added) {
                    sqlx::query(
                        "insert into real_time_metrics (metric, bot, labels, value, last_updated)
                         values (?, ?, ?, ?, ?)
                         on conflict (metric, bot, labels)
                         do update set value = excluded.value, last_updated = excluded.last_updated",
                    )
                    .bind(&r.metric)
                    .bind(&r.bot)
                    .bind(&r.labels)
                    .bind(r.value)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                for r in &batch.sketches {
                    sqlx::query(
                        "insert into active_user_sketches (bot, granularity, bucket, registers, last_updated)
                         values (?, ?, ?, ?, ?)
                         on conflict (bot, granularity, bucket)
                         do update set registers = excluded.registers, last_updated = excluded.last_updated",
                    )
                    .bind(&r.bot)
                    .bind(r.sketch.granularity.as_str())
                    .bind(r.sketch.bucket)
                    .bind(&r.sketch.registers)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                for r in &batch.daily {
                    sqlx::query(
                        "insert into daily_counters (bot, name, day, value, last_updated)
                         values (?, ?, ?, ?, ?)
                         on conflict (bot, name)
                         do update set day = excluded.day, value = excluded.value, last_updated = excluded.last_updated",
                    )
                    .bind(&r.bot)
                    .bind(&r.name)
                    .bind(r.day.to_string())
                    .bind(r.value)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                if let Some((journal, applied)) = &batch.progress {
                    sqlx::query(
                        "insert into journal_progress (journal, applied, last_updated)
                         values (?, ?, ?)
                         on conflict (journal)
                         do update set applied = excluded.applied, last_updated = excluded.last_updated",
                    )
                    .bind(journal)
                    .bind(applied)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                for r in &batch.cluster_sketches {
                    sqlx::query(
                        "insert into cluster_sketches (bot, sketch, hll, last_updated)
                         values (?, ?, ?, ?)
                         on conflict (bot, sketch)
                         do update set hll = excluded.hll, last_updated = excluded.last_updated",
                    )
                    .bind(&r.bot)
                    .bind(&r.sketch)
                    .bind(&r.hll)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                for r in &batch.cluster_progress {
                    sqlx::query(
                        "insert into cluster_progress (bot, replica, applied, last_updated)
                         values (?, ?, ?, ?)
                         on conflict (bot, replica)
                         do update set applied = excluded.applied, last_updated = excluded.last_updated",
                    )
                    .bind(&r.bot)
                    .bind(&r.replica)
                    .bind(r.applied)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(FlushReport { missing: false })
    }

    /// Appends one point per series at `at`: one statement.
    pub async fn write_history(&self, rows: &[SeriesRow], at: DateTime<Utc>) -> Result<()> {
        match &self.db {
            Db::Postgres(_) => {
                let mut writer = self.pg_writer().await?;
                let pool = writer.as_mut().ok_or_else(not_writer)?;
                sqlx::query(
                    "insert into metrics_history (recorded_at, metric, bot, labels, value)
                     select $1, metric, bot, labels::jsonb, value
                     from unnest($2::text[], $3::text[], $4::text[], $5::float8[]) as t(metric, bot, labels, value)",
                )
                .bind(at)
                .bind(rows.iter().map(|r| r.metric.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|r| r.bot.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|r| r.labels.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|r| r.value).collect::<Vec<_>>())
                .execute(&mut *pool)
                .await?;
            }
            Db::Sqlite(pool) => {
                // SQLite's json_each turns one bound JSON document into rows,
                // so the whole tick is still one statement.
                let doc = serde_json::to_string(
                    &rows
                        .iter()
                        .map(|r| (&r.metric, &r.bot, &r.labels, r.value))
                        .collect::<Vec<_>>(),
                )
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                sqlx::query(
                    "insert into metrics_history (recorded_at, metric, bot, labels, value)
                     select ?, value ->> 0, value ->> 1, value ->> 2, value ->> 3 from json_each(?)",
                )
                .bind(at.timestamp())
                .bind(doc)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Creates history partitions for the days around `now` (PostgreSQL),
    /// drops history older than `cutoff`, and prunes sketches that no
    /// window can reach any more. Run at start and once a day.
    pub async fn maintain(
        &self,
        now: DateTime<Utc>,
        cutoff: DateTime<Utc>,
    ) -> Result<MaintenanceReport> {
        let mut report = MaintenanceReport::default();
        let hour_floor = now.timestamp().div_euclid(3600) - 48;
        let day_floor = now.timestamp().div_euclid(86_400) - 32;
        match &self.db {
            Db::Postgres(_) => {
                let mut writer = self.pg_writer().await?;
                let pool = writer.as_mut().ok_or_else(not_writer)?;
                let today = now.date_naive();
                for offset in 0..3 {
                    let day = today + chrono::Days::new(offset);
                    let next = day + chrono::Days::new(1);
                    // Identifiers cannot be bound; the name is built from a
                    // date this process formatted, never from input.
                    let created = sqlx::query(AssertSqlSafe(format!(
                        "create table if not exists {} partition of metrics_history for values from ('{day}') to ('{next}')",
                        partition_name(day)
                    )))
                    .execute(&mut *pool)
                    .await;
                    created?;
                    report.partitions_ensured += 1;
                }
                let partitions: Vec<String> = sqlx::query_scalar(
                    "select c.relname::text from pg_inherits i
                     join pg_class c on c.oid = i.inhrelid
                     join pg_class p on p.oid = i.inhparent
                     where p.relname = 'metrics_history'",
                )
                .fetch_all(&mut *pool)
                .await?;
                for name in partitions {
                    let Some(day) = partition_day(&name) else {
                        continue;
                    };
                    // A partition goes once all of it is past the cutoff.
                    if day + chrono::Days::new(1) <= cutoff.date_naive() {
                        sqlx::query(AssertSqlSafe(format!("drop table if exists {name}")))
                            .execute(&mut *pool)
                            .await?;
                        report.partitions_dropped.push(name);
                    }
                }
                sqlx::query(
                    "delete from active_user_sketches
                     where (granularity = 'hour' and bucket < $1) or (granularity = 'day' and bucket < $2)",
                )
                .bind(hour_floor)
                .bind(day_floor)
                .execute(&mut *pool)
                .await?;
                // Redis expires these itself; the store drops them a day
                // after no window can read them.
                sqlx::query("delete from cluster_sketches where last_updated < $1")
                    .bind(now - chrono::Duration::days(32))
                    .execute(&mut *pool)
                    .await?;
            }
            Db::Sqlite(pool) => {
                let deleted = sqlx::query("delete from metrics_history where recorded_at < ?")
                    .bind(cutoff.timestamp())
                    .execute(pool)
                    .await?;
                report.rows_deleted = deleted.rows_affected();
                sqlx::query(
                    "delete from active_user_sketches
                     where (granularity = 'hour' and bucket < ?) or (granularity = 'day' and bucket < ?)",
                )
                .bind(hour_floor)
                .bind(day_floor)
                .execute(pool)
                .await?;
                sqlx::query("delete from cluster_sketches where last_updated < ?")
                    .bind((now - chrono::Duration::days(32)).timestamp())
                    .execute(pool)
                    .await?;
            }
        }
        Ok(report)
    }

    /// History points, downsampled server-side to the last value per step.
    pub async fn history(&self, q: &HistoryQuery) -> Result<Vec<HistoryPoint>> {
        let rows = match &self.db {
            Db::Postgres(pool) => {
                sqlx::query(
                    "select bot, labels, recorded_at, value from (
                        select bot, labels::text as labels, recorded_at, value,
                               row_number() over (
                                   partition by bot, labels, floor(extract(epoch from recorded_at) / $5)
                                   order by recorded_at desc) as rn
                        from metrics_history
                        where metric = $1 and ($2::text is null or bot = $2)
                          and recorded_at >= $3 and recorded_at <= $4
                     ) t where rn = 1
                     order by bot, labels, recorded_at
                     limit $6",
                )
                .bind(&q.metric)
                .bind(&q.bot)
                .bind(q.from)
                .bind(q.to)
                .bind(q.step_seconds as f64)
                .bind(q.limit)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|r| {
                    Ok(HistoryPoint {
                        bot: r.try_get("bot")?,
                        labels: r.try_get("labels")?,
                        at: r.try_get("recorded_at")?,
                        value: r.try_get("value")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?
            }
            Db::Sqlite(pool) => sqlx::query(
                "select bot, labels, recorded_at, value from (
                    select bot, labels, recorded_at, value,
                           row_number() over (
                               partition by bot, labels, recorded_at / ?5
                               -- Whole seconds: two writes in one second tie,
                               -- and the later insert is the last value.
                               order by recorded_at desc, rowid desc) as rn
                    from metrics_history
                    where metric = ?1 and (?2 is null or bot = ?2)
                      and recorded_at >= ?3 and recorded_at <= ?4
                 ) where rn = 1
                 order by bot, labels, recorded_at
                 limit ?6",
            )
            .bind(&q.metric)
            .bind(&q.bot)
            .bind(q.from.timestamp())
            .bind(q.to.timestamp())
            .bind(q.step_seconds)
            .bind(q.limit)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| {
                let at: i64 = r.try_get("recorded_at")?;
                Ok(HistoryPoint {
                    bot: r.try_get("bot")?,
                    labels: r.try_get("labels")?,
                    at: DateTime::from_timestamp(at, 0).unwrap_or_default(),
                    value: r.try_get("value")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?,
        };
        Ok(rows)
    }
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

fn not_writer() -> StoreError {
    StoreError::Standby("the lease is not held".to_owned())
}

fn lock_ignoring_poison<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn partition_day(name: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(name.strip_prefix("metrics_history_")?, "%Y%m%d").ok()
}

fn decode<R: Row>(stored: &mut Stored, series: &[R], sketches: &[R], daily: &[R]) -> Result<()>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    for r in series {
        stored.series.push(SeriesRow {
            metric: r.try_get("metric")?,
            bot: r.try_get("bot")?,
            labels: r.try_get("labels")?,
            value: r.try_get("value")?,
        });
    }
    for r in sketches {
        let granularity: String = r.try_get("granularity")?;
        let granularity = Granularity::parse(&granularity).ok_or_else(|| {
            StoreError::Corrupt(format!("unknown sketch granularity `{granularity}`"))
        })?;
        stored.sketches.push(StoredSketch {
            bot: r.try_get("bot")?,
            sketch: SketchRow {
                granularity,
                bucket: r.try_get("bucket")?,
                registers: r.try_get("registers")?,
            },
        });
    }
    for r in daily {
        let day: String = r.try_get("day")?;
        stored.daily.push(DailyRow {
            bot: r.try_get("bot")?,
            name: r.try_get("name")?,
            day: NaiveDate::parse_from_str(&day, "%Y-%m-%d")
                .map_err(|e| StoreError::Corrupt(format!("daily counter day `{day}`: {e}")))?,
            value: r.try_get("value")?,
        });
    }
    Ok(())
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
