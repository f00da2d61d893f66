//! The SQLite dialect of every store operation, in the order of
//! `postgres.rs`, so the two read side by side.
//!
//! Writes go through the pool, not a writer connection: on SQLite the
//! lease is a file lock beside the database, which these functions do not
//! check; the store's callers take it (`Store::acquire_writer`) before they
//! write. Times are bound and stored as Unix seconds.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection, Row};

use super::{
    ACQUIRE_TIMEOUT, FlushBatch, FlushReport, HistoryPoint, HistoryQuery, MaintenanceReport, Prune,
    Result, SeriesRow, StoreError, Stored, cause, unusable,
};

/// SQLite keeps days as text already.
const DAILY_SQL: &str = "select bot, name, day, value from daily_counters";

/// A pool that opens the file on first use, creating it if missing.
pub(super) fn open(url: &str) -> Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        // WAL lets /v1/history read while a flush writes.
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5))
        .log_statements(tracing::log::LevelFilter::Trace);
    Ok(SqlitePoolOptions::new()
        .max_connections(2)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(options))
}

pub(super) async fn check(pool: &SqlitePool, url: &str) -> Result<Option<String>> {
    let options = pool.connect_options();
    let file = options.get_filename();
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(unusable(
            url,
            format!(
                "the directory {} does not exist; create it or choose another path",
                dir.display()
            ),
        ));
    }
    match options.connect().await {
        Ok(conn) => {
            let _ = conn.close().await;
            Ok(None)
        }
        Err(e) => Err(unusable(
            url,
            format!(
                "cannot open the SQLite file {}: {}",
                file.display(),
                cause(&e)
            ),
        )),
    }
}

pub(super) async fn migrate(pool: &SqlitePool) -> Result<()> {
    sqlx::migrate!("migrations/sqlite").run(pool).await?;
    Ok(())
}

/// A transaction reads one snapshot of the file.
pub(super) async fn load(pool: &SqlitePool) -> Result<Stored> {
    let mut tx = pool.begin().await?;
    let stored = read_all!(tx, DAILY_SQL);
    tx.commit().await?;
    Ok(stored)
}

/// What a wipe deletes: every table that keeps rows per bot. The registry
/// (`bots`, `bot_tokens`) is not here: the revocation removed it already.
const WIPE: [&str; 7] = [
    "delete from real_time_metrics where bot = ?",
    "delete from metrics_history where bot = ?",
    "delete from active_user_sketches where bot = ?",
    "delete from daily_counters where bot = ?",
    "delete from user_book where bot = ?",
    "delete from cluster_sketches where bot = ?",
    "delete from cluster_progress where bot = ?",
];

/// One upsert per row, all in one transaction.
pub(super) async fn flush(
    pool: &SqlitePool,
    batch: &FlushBatch,
    now: DateTime<Utc>,
) -> Result<FlushReport> {
    // A local file: per-row statements inside one transaction
    // cost no network round trips, and stay under SQLite's
    // bound-parameter limit whatever the batch size.
    let mut tx = pool.begin().await?;
    let now = now.timestamp();
    let mut wiped = Vec::new();
    for (bot, generation) in &batch.wiped {
        // Applied once (see the PostgreSQL flush).
        let first = sqlx::query(
            "insert into bot_wipes (bot, generation) values (?, ?)
             on conflict (bot) do update set generation = excluded.generation
             where bot_wipes.generation < excluded.generation",
        )
        .bind(bot)
        .bind(generation)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if first == 0 {
            continue;
        }
        let mut rows = 0;
        for statement in WIPE {
            rows += sqlx::query(statement)
                .bind(bot)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        wiped.push((bot.clone(), rows));
    }
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
    for b in &batch.users {
        for u in &b.changed {
            let e = &u.entry;
            sqlx::query(
                "insert into user_book (bot, user_key, first_day, last_day, days, last_ts, session_start, session_messages, session_ended)
                 values (?, ?, ?, ?, ?, ?, ?, ?, ?)
                 on conflict (bot, user_key)
                 do update set first_day = excluded.first_day, last_day = excluded.last_day, days = excluded.days,
                     last_ts = excluded.last_ts, session_start = excluded.session_start,
                     session_messages = excluded.session_messages, session_ended = excluded.session_ended",
            )
            .bind(&b.bot)
            .bind(u.key as i64)
            .bind(i64::from(e.first_day))
            .bind(i64::from(e.last_day))
            .bind(i64::from(e.days))
            .bind(i64::from(e.last_ts))
            .bind(i64::from(e.session_start))
            .bind(i64::from(e.session_messages))
            .bind(i64::from(e.ended))
            .execute(&mut *tx)
            .await?;
        }
        for key in &b.gone {
            sqlx::query("delete from user_book where bot = ? and user_key = ?")
                .bind(&b.bot)
                .bind(*key as i64)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(FlushReport {
        missing: false,
        wiped,
    })
}

pub(super) async fn write_history(
    pool: &SqlitePool,
    rows: &[SeriesRow],
    at: DateTime<Utc>,
) -> Result<()> {
    // SQLite's json_each turns one bound JSON document into rows. A
    // document per few thousand rows, in one transaction: the point is
    // still all or nothing, and SQLite's copies of the document (bound,
    // parsed, as text) stay small; one for 1,000 bots' 87,000 rows held
    // some 15 MB at once.
    const ROWS_PER_STATEMENT: usize = 4096;
    let mut tx = pool.begin().await?;
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let doc = serde_json::to_string(
            &chunk
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
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// History is one table: rows older than `cutoff` are deleted.
pub(super) async fn maintain(
    pool: &SqlitePool,
    cutoff: DateTime<Utc>,
    prune: &Prune,
) -> Result<MaintenanceReport> {
    let mut report = MaintenanceReport::default();
    let deleted = sqlx::query("delete from metrics_history where recorded_at < ?")
        .bind(cutoff.timestamp())
        .execute(pool)
        .await?;
    report.rows_deleted = deleted.rows_affected();
    sqlx::query(
        "delete from active_user_sketches
         where (granularity = 'hour' and bucket < ?) or (granularity = 'day' and bucket < ?)",
    )
    .bind(prune.hour_floor)
    .bind(prune.day_floor)
    .execute(pool)
    .await?;
    sqlx::query("delete from cluster_sketches where last_updated < ?")
        .bind(prune.cluster_sketches_before.timestamp())
        .execute(pool)
        .await?;
    Ok(report)
}

pub(super) async fn history(pool: &SqlitePool, q: &HistoryQuery) -> Result<Vec<HistoryPoint>> {
    let points = sqlx::query(
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
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(points)
}

/// Reads the installation secret, storing `proposed` first if there is
/// none. Its table is created here, not by a migration: every process reads
/// it at start, standbys and replicas too, before any of them may migrate.
pub(super) async fn secret(pool: &SqlitePool, proposed: &[u8]) -> Result<Vec<u8>> {
    sqlx::query(
        "create table if not exists installation (name text primary key, value blob not null)",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "insert into installation (name, value) values (?, ?) on conflict (name) do nothing",
    )
    .bind("user_key")
    .bind(proposed)
    .execute(pool)
    .await?;
    let (value,): (Vec<u8>,) = sqlx::query_as("select value from installation where name = ?")
        .bind("user_key")
        .fetch_one(pool)
        .await?;
    Ok(value)
}

pub(super) async fn history_before(
    pool: &SqlitePool,
    metric: &str,
    bot: &str,
    before: DateTime<Utc>,
) -> Result<Vec<(String, f64)>> {
    let rows = sqlx::query(
        "select labels, value from metrics_history
         where metric = ?1 and bot = ?2 and recorded_at = (
             select max(recorded_at) from metrics_history
             where metric = ?1 and bot = ?2 and recorded_at < ?3)",
    )
    .bind(metric)
    .bind(bot)
    .bind(before.timestamp())
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| Ok((r.try_get("labels")?, r.try_get("value")?)))
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(rows)
}
