//! One writer per store.
//!
//! Two processes that each overwrite the totals with their own would
//! silently lose each other's counts, so only the holder of the lease
//! writes; any other process on the same store is a standby. This file is
//! the lease alone, apart from the SQL it guards: how it is taken, named,
//! checked and given up on each backend.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use super::{ACQUIRE_TIMEOUT, Result, StoreError};

/// The advisory lock key: "botmetrics" in ASCII, folded into 64 bits.
const LEASE_KEY: i64 = 0x626f_746d_6574_7269;

/// This process's claim to be the store's one writer.
pub(super) enum Lease {
    /// PostgreSQL: a session-level advisory lock, held by the one connection
    /// every write goes through. If that connection drops, the server
    /// releases the lock and no write can follow on it: the lease cannot be
    /// lost silently.
    Postgres {
        options: Box<PgConnectOptions>,
        writer: Mutex<Option<sqlx::PgConnection>>,
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

impl Lease {
    /// The lease on the PostgreSQL database `options` connect to; not yet
    /// taken.
    pub(super) fn postgres(options: PgConnectOptions) -> Lease {
        Lease::Postgres {
            options: Box::new(options),
            writer: Mutex::new(None),
            idle_limit: None,
            used: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// See [`super::Store::with_writer_idle_limit`].
    pub(super) fn bound_idle(&mut self, limit: Duration) {
        if let Lease::Postgres { idle_limit, .. } = self {
            *idle_limit = Some(limit);
        }
    }

    /// See [`super::Store::writer_alive`].
    pub(super) async fn alive(&self) -> bool {
        let Lease::Postgres {
            writer,
            idle_limit: Some(limit),
            used,
            ..
        } = self
        else {
            return self.is_held().await;
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

    /// The lease on the SQLite database `file` (opened from `url`); not yet
    /// taken.
    pub(super) fn sqlite(file: &Path, url: &str) -> Lease {
        if file.as_os_str().is_empty() || file.as_os_str() == ":memory:" || url.contains(":memory:")
        {
            return Lease::Exclusive;
        }
        let mut path = file.as_os_str().to_owned();
        path.push(".lock");
        Lease::File {
            path: PathBuf::from(path),
            db: file.to_path_buf(),
            held: std::sync::Mutex::new(None),
        }
    }

    /// The SQLite database file, if the lease is on one.
    pub(super) fn sqlite_file(&self) -> Option<&Path> {
        match self {
            Lease::File { db, .. } => Some(db),
            _ => None,
        }
    }

    /// Names the database the lease is on, without credentials.
    pub(super) fn identity(&self) -> String {
        match self {
            Lease::Postgres { options, .. } => format!(
                "postgres://{}:{}/{}",
                options.get_host(),
                options.get_port(),
                options.get_database().unwrap_or_default()
            ),
            Lease::File { db, .. } => {
                let path = std::fs::canonicalize(db)
                    .or_else(|_| std::path::absolute(db))
                    .unwrap_or_else(|_| db.clone());
                format!("sqlite://{}", path.display())
            }
            Lease::Exclusive => "sqlite::memory:".to_owned(),
        }
    }

    /// True while this process holds the lease.
    pub(super) async fn is_held(&self) -> bool {
        match self {
            Lease::Postgres { writer, .. } => writer.lock().await.is_some(),
            Lease::File { held, .. } => lock_ignoring_poison(held).is_some(),
            Lease::Exclusive => true,
        }
    }

    /// Takes the lease if nobody holds it. `Err(Standby)` names the holder
    /// when another process has it.
    pub(super) async fn acquire(&self) -> Result<()> {
        match self {
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

    /// The PostgreSQL writer connection, held for as long as the guard
    /// lives. Every PostgreSQL write goes through it, so no write can
    /// happen without the lease. (It is checked alive when the lease is
    /// taken; a write on a dead one fails, and the caller then calls
    /// [`Lease::lost_connection`].)
    pub(super) async fn writer(&self) -> Result<MappedMutexGuard<'_, sqlx::PgConnection>> {
        let Lease::Postgres { writer, used, .. } = self else {
            return Err(StoreError::Standby("no PostgreSQL lease".to_owned()));
        };
        *lock_ignoring_poison(used) = Instant::now();
        MutexGuard::try_map(writer.lock().await, Option::as_mut)
            .map_err(|_| StoreError::Standby("the lease is not held".to_owned()))
    }

    /// Gives the PostgreSQL lease up if its writer connection no longer
    /// answers a ping.
    pub(super) async fn lost_connection(&self) {
        if let Lease::Postgres { writer, .. } = self {
            let mut writer = writer.lock().await;
            if let Some(conn) = writer.as_mut()
                && conn.ping().await.is_err()
            {
                *writer = None;
            }
        }
    }

    /// Gives the lease up: closes the writer connection, or unlocks the
    /// file.
    pub(super) async fn release(&self) {
        match self {
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
            tracing::warn!(setting, error = %super::cause(&e), "the store's writer session cannot be bounded: a stalled writer keeps the lease until it resumes");
        }
    }
}

fn lock_ignoring_poison<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
