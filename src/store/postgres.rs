//! The PostgreSQL dialect of every store operation, in the order of
//! `sqlite.rs`, so the two read side by side.
//!
//! Writes take the lease's writer connection (the one that holds the
//! advisory lock), never the pool: a write cannot happen without the
//! lease. Reads (`load`, `history`) and `migrate` use the pool. Bulk
//! writes bind whole columns as arrays and `unnest` them server-side, so a
//! flush is one statement whatever the number of series.

use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};

use super::{
    ACQUIRE_TIMEOUT, FlushBatch, FlushReport, HistoryPoint, HistoryQuery, MaintenanceReport, Prune,
    Result, SeriesRow, Stored, cause, partition_name, unusable,
};

/// How long the start-up check waits for PostgreSQL to answer.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// PostgreSQL keeps days as `date`; a load reads them as text, as SQLite
/// stores them.
const DAILY_SQL: &str = "select bot, name, day::text as day, value from daily_counters";

/// A pool that connects on first use, and the options the lease connects
/// its writer with.
pub(super) fn open(url: &str) -> Result<(PgPool, PgConnectOptions)> {
    let options = PgConnectOptions::from_str(url)?
        .log_statements(tracing::log::LevelFilter::Trace)
        // Names this process in pg_stat_activity, which is how a
        // standby tells the operator who holds the store.
        .application_name(&format!("botmetrics pid {}", std::process::id()));
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(options.clone());
    Ok((pool, options))
}

pub(super) async fn check(pool: &PgPool, url: &str) -> Result<Option<String>> {
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
            Err(unusable(
                url,
                format!("PostgreSQL at {at}: {}", db.message()),
            ))
        }
        sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) => {
            Err(unusable(url, format!("PostgreSQL at {at}: {}", cause(&e))))
        }
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => Ok(Some(
            format!("PostgreSQL at {at} refused the connection (is it running, on that port?)"),
        )),
        _ => Ok(Some(format!(
            "cannot reach PostgreSQL at {at}: {}",
            cause(&e)
        ))),
    }
}

pub(super) async fn migrate(pool: &PgPool) -> Result<()> {
    // On the pool, not the writer connection: sqlx's migrator takes
    // its own advisory lock, so two processes never migrate at once.
    sqlx::migrate!("migrations/postgres").run(pool).await?;
    Ok(())
}

/// A repeatable-read, read-only transaction: one snapshot of every table.
pub(super) async fn load(pool: &PgPool) -> Result<Stored> {
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction isolation level repeatable read read only")
        .execute(&mut *tx)
        .await?;
    let stored = read_all!(tx, DAILY_SQL);
    tx.commit().await?;
    Ok(stored)
}

/// What a wipe deletes: every table that keeps rows per bot. The registry
/// (`bots`, `bot_tokens`) is not here: the revocation removed it already.
const WIPE: [&str; 7] = [
    "delete from real_time_metrics where bot = $1",
    "delete from metrics_history where bot = $1",
    "delete from active_user_sketches where bot = $1",
    "delete from daily_counters where bot = $1",
    "delete from user_book where bot = $1",
    "delete from cluster_sketches where bot = $1",
    "delete from cluster_progress where bot = $1",
];

/// One statement, one round trip (see [`write`]); with bots to wipe, their
/// rows are deleted first in the same transaction.
pub(super) async fn flush(
    conn: &mut PgConnection,
    batch: &FlushBatch,
    now: DateTime<Utc>,
) -> Result<FlushReport> {
    if batch.wiped.is_empty() {
        return write(conn, batch, now).await;
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let mut wiped = Vec::new();
    for (bot, generation) in &batch.wiped {
        // Applied once: a writer that learns of the same wipe later (every
        // replica of a cluster does) finds it recorded, and leaves a bot
        // created again under the name alone.
        let first = sqlx::query(
            "insert into bot_wipes (bot, generation) values ($1, $2)
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
    let mut report = write(&mut tx, batch, now).await?;
    tx.commit().await?;
    report.wiped = wiped;
    Ok(report)
}

/// One statement: an update of the series known to exist, and an upsert
/// per table for the rest.
async fn write(
    conn: &mut PgConnection,
    batch: &FlushBatch,
    now: DateTime<Utc>,
) -> Result<FlushReport> {
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
        ), users as (
            insert into user_book (bot, user_key, first_day, last_day, days, last_ts, session_start, session_messages, session_ended)
            select * from unnest($26::text[], $27::int8[], $28::int8[], $29::int8[], $30::int8[], $31::int8[], $32::int8[], $33::int8[], $34::int8[])
            on conflict (bot, user_key)
            do update set first_day = excluded.first_day, last_day = excluded.last_day, days = excluded.days,
                last_ts = excluded.last_ts, session_start = excluded.session_start,
                session_messages = excluded.session_messages, session_ended = excluded.session_ended
            returning 1
        ), users_gone as (
            -- never a key of `users` above: a cut leaves out of `gone`
            -- every user the book holds again
            delete from user_book b
            using unnest($35::text[], $36::int8[]) as g(bot, user_key)
            where b.bot = g.bot and b.user_key = g.user_key
            returning 1
        )
        select (select count(*) from updated) as updated,
               (select count(*) from added) + (select count(*) from sketches) + (select count(*) from daily) + (select count(*) from progress)
               + (select count(*) from cluster_sketches) + (select count(*) from cluster_progress)
               + (select count(*) from users) + (select count(*) from users_gone) as others";
    let cs = &batch.cluster_sketches;
    let cp = &batch.cluster_progress;
    let changed_users: Vec<(&str, &super::UserRow)> = batch
        .users
        .iter()
        .flat_map(|b| b.changed.iter().map(move |u| (b.bot.as_str(), u)))
        .collect();
    let gone_users: Vec<(&str, u64)> = batch
        .users
        .iter()
        .flat_map(|b| b.gone.iter().map(move |k| (b.bot.as_str(), *k)))
        .collect();
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
        .bind(
            changed_users
                .iter()
                .map(|(bot, _)| *bot)
                .collect::<Vec<_>>(),
        )
        .bind(
            changed_users
                .iter()
                .map(|(_, u)| u.key as i64)
                .collect::<Vec<_>>(),
        )
        .bind(
            changed_users
                .iter()
                .map(|(_, u)| i64::from(u.entry.first_day))
                .collect::<Vec<_>>(),
        )
        .bind(
            changed_users
                .iter()
                .map(|(_, u)| i64::from(u.entry.last_day))
                .collect::<Vec<_>>(),
        )
        .bind(
            changed_users
                .iter()
                .map(|(_, u)| i64::from(u.entry.days))
                .collect::<Vec<_>>(),
        )
        .bind(
            changed_users
                .iter()
                .map(|(_, u)| i64::from(u.entry.last_ts))
                .collect::<Vec<_>>(),
        )
        .bind(
            changed_users
                .iter()
                .map(|(_, u)| i64::from(u.entry.session_start))
                .collect::<Vec<_>>(),
        )
        .bind(
            changed_users
                .iter()
                .map(|(_, u)| i64::from(u.entry.session_messages))
                .collect::<Vec<_>>(),
        )
        .bind(
            changed_users
                .iter()
                .map(|(_, u)| i64::from(u.entry.ended))
                .collect::<Vec<_>>(),
        )
        .bind(gone_users.iter().map(|(bot, _)| *bot).collect::<Vec<_>>())
        .bind(
            gone_users
                .iter()
                .map(|(_, k)| *k as i64)
                .collect::<Vec<_>>(),
        )
        .fetch_one(&mut *conn)
        .await?;
    let updated: i64 = row.try_get("updated")?;
    Ok(FlushReport {
        missing: updated != s.len() as i64,
        wiped: Vec::new(),
    })
}

pub(super) async fn write_history(
    conn: &mut PgConnection,
    rows: &[SeriesRow],
    at: DateTime<Utc>,
) -> Result<()> {
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
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// History is partitioned by UTC day: the partitions for today and the next
/// two days are created, and a partition wholly past `cutoff` is dropped.
pub(super) async fn maintain(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    cutoff: DateTime<Utc>,
    prune: &Prune,
) -> Result<MaintenanceReport> {
    let mut report = MaintenanceReport::default();
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
        .execute(&mut *conn)
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
    .fetch_all(&mut *conn)
    .await?;
    for name in partitions {
        let Some(day) = partition_day(&name) else {
            continue;
        };
        // A partition goes once all of it is past the cutoff.
        if day + chrono::Days::new(1) <= cutoff.date_naive() {
            sqlx::query(AssertSqlSafe(format!("drop table if exists {name}")))
                .execute(&mut *conn)
                .await?;
            report.partitions_dropped.push(name);
        }
    }
    sqlx::query(
        "delete from active_user_sketches
         where (granularity = 'hour' and bucket < $1) or (granularity = 'day' and bucket < $2)",
    )
    .bind(prune.hour_floor)
    .bind(prune.day_floor)
    .execute(&mut *conn)
    .await?;
    sqlx::query("delete from cluster_sketches where last_updated < $1")
        .bind(prune.cluster_sketches_before)
        .execute(&mut *conn)
        .await?;
    Ok(report)
}

pub(super) async fn history(pool: &PgPool, q: &HistoryQuery) -> Result<Vec<HistoryPoint>> {
    let points = sqlx::query(
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
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(points)
}

pub(super) async fn history_before(
    pool: &PgPool,
    metric: &str,
    bot: &str,
    before: DateTime<Utc>,
) -> Result<Vec<(String, f64)>> {
    let rows = sqlx::query(
        "select labels::text as labels, value from metrics_history
         where metric = $1 and bot = $2 and recorded_at = (
             select max(recorded_at) from metrics_history
             where metric = $1 and bot = $2 and recorded_at < $3)",
    )
    .bind(metric)
    .bind(bot)
    .bind(before)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| Ok((r.try_get("labels")?, r.try_get("value")?)))
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(rows)
}

/// The day of a partition named by [`partition_name`].
fn partition_day(name: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(name.strip_prefix("metrics_history_")?, "%Y%m%d").ok()
}

/// Reads the installation secret, storing `proposed` first if there is
/// none. Its table is created here, not by a migration: every process reads
/// it at start, standbys and replicas too, before any of them may migrate.
pub(super) async fn secret(pool: &PgPool, proposed: &[u8]) -> Result<Vec<u8>> {
    sqlx::query(
        "create table if not exists installation (name text primary key, value bytea not null)",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "insert into installation (name, value) values ($1, $2) on conflict (name) do nothing",
    )
    .bind("user_key")
    .bind(proposed)
    .execute(pool)
    .await?;
    let (value,): (Vec<u8>,) = sqlx::query_as("select value from installation where name = $1")
        .bind("user_key")
        .fetch_one(pool)
        .await?;
    Ok(value)
}
