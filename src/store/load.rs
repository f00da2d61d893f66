//! What a load reads, once for both dialects: the statements (the same
//! text on PostgreSQL and SQLite, but for the "today" counters, whose day
//! each dialect reads as text its own way) and how their rows decode into
//! a [`Stored`]. Each dialect runs them inside its own snapshot
//! transaction (`postgres::load`, `sqlite::load`).

use chrono::NaiveDate;
use sqlx::Row;

use super::{
    ClusterProgress, ClusterSketch, DailyRow, Granularity, Result, SeriesRow, SketchRow,
    StoreError, Stored, StoredSketch,
};

// The reads, but for the "today" counters' (`$daily` below).
pub(super) const SERIES_SQL: &str = "select metric, bot, labels, value from real_time_metrics";
pub(super) const SKETCHES_SQL: &str =
    "select bot, granularity, bucket, registers from active_user_sketches";
pub(super) const PROGRESS_SQL: &str = "select journal, applied from journal_progress";
pub(super) const CLUSTER_SKETCHES_SQL: &str = "select bot, sketch, hll from cluster_sketches";
pub(super) const USERS_SQL: &str = "select bot, user_key, first_day, last_day, days, last_ts, session_start, session_messages, session_ended from user_book";
pub(super) const CLUSTER_PROGRESS_SQL: &str = "select bot, replica, applied from cluster_progress";

/// Reads every table a restart restores on one open transaction (`$tx`, of
/// either dialect) into a [`Stored`]; `$daily` is the dialect's read of the
/// "today" counters. A macro, not a function, because the reads are the
/// same text on two different sqlx connection types.
macro_rules! read_all {
    ($tx:expr, $daily:expr) => {{
        let mut stored = $crate::store::Stored::default();
        $crate::store::load::decode(
            &mut stored,
            &sqlx::query($crate::store::load::SERIES_SQL)
                .fetch_all(&mut *$tx)
                .await?,
            &sqlx::query($crate::store::load::SKETCHES_SQL)
                .fetch_all(&mut *$tx)
                .await?,
            &sqlx::query($daily).fetch_all(&mut *$tx).await?,
        )?;
        $crate::store::load::decode_marks(
            &mut stored,
            sqlx::query_as($crate::store::load::PROGRESS_SQL)
                .fetch_all(&mut *$tx)
                .await?,
            sqlx::query_as($crate::store::load::CLUSTER_SKETCHES_SQL)
                .fetch_all(&mut *$tx)
                .await?,
            sqlx::query_as($crate::store::load::CLUSTER_PROGRESS_SQL)
                .fetch_all(&mut *$tx)
                .await?,
        );
        $crate::store::load::decode_users(
            &mut stored,
            sqlx::query_as($crate::store::load::USERS_SQL)
                .fetch_all(&mut *$tx)
                .await?,
        );
        stored
    }};
}

/// A user-book row as read: bot, then the numbers in [`USERS_SQL`]' order.
pub(super) type UserTuple = (String, i64, i64, i64, i64, i64, i64, i64, i64);

/// The user book of a load, grouped by bot. Numbers out of their range
/// (a hand-edited row) are clamped, never a failed start.
pub(super) fn decode_users(stored: &mut Stored, rows: Vec<UserTuple>) {
    use super::{StoredUser, UserRow};
    let u16_of = |v: i64| u16::try_from(v.max(0)).unwrap_or(u16::MAX);
    let u32_of = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
    for (bot, key, first, last, days, last_ts, start, messages, ended) in rows {
        stored.users.entry(bot).or_default().push(UserRow {
            key: key as u64,
            entry: StoredUser {
                first_day: u16_of(first),
                last_day: u16_of(last),
                days: u32_of(days),
                last_ts: u32_of(last_ts),
                session_start: u32_of(start),
                session_messages: u16_of(messages),
                ended: ended != 0,
            },
        });
    }
}

/// The series, sketches and "today" counters of a load, as read by
/// [`SERIES_SQL`], [`SKETCHES_SQL`] and the dialect's read of the counters.
pub(super) fn decode<R: Row>(
    stored: &mut Stored,
    series: &[R],
    sketches: &[R],
    daily: &[R],
) -> Result<()>
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

/// The journal marks and Redis' sketches and marks of a load, as read by
/// [`PROGRESS_SQL`], [`CLUSTER_SKETCHES_SQL`] and [`CLUSTER_PROGRESS_SQL`].
pub(super) fn decode_marks(
    stored: &mut Stored,
    progress: Vec<(String, i64)>,
    sketches: Vec<(String, String, Vec<u8>)>,
    marks: Vec<(String, String, i64)>,
) {
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
}
