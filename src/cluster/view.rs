//! Reads the cluster totals back from Redis: for `/v1/summary` on any
//! replica, and for the replica that writes them to the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use redis::Value;

use super::health::Admit;
use super::parse_field;
use super::sync::Syncer;
use super::{BotKeys, Cluster, ClusterError, Result, timed};
use crate::BoxFuture;
use crate::metrics::bot::ACTIVE_USERS;
use crate::metrics::{BotMetrics, Metrics};
use crate::persist::{restore_into, whole_histograms};
use crate::store::{DailyRow, SeriesRow, Store, Stored};
use crate::summary::Summary;
use crate::totals::Totals;

/// One bot's cluster totals at one instant.
#[derive(Debug, Clone, Default)]
pub struct BotView {
    pub bot: String,
    pub series: Vec<SeriesRow>,
    pub daily: Vec<DailyRow>,
    /// Distinct users, 1d / 7d / 30d: the union of every replica's.
    pub users: [u64; 3],
    /// (replica, mark), when read for the store.
    pub applied: Vec<(String, i64)>,
    /// (sketch name within the bot's keys, raw HyperLogLog), changed since
    /// the store last got them; when read for the store.
    pub sketches: Vec<(String, Vec<u8>)>,
    /// The user book's users changed since the store last got them: (key,
    /// packed entry, empty for a user gone); when read for the store.
    pub book_users: Vec<(u64, Vec<u8>)>,
}

/// Changed users one flush writes at most: a reseed or a busy day's
/// changes go over several flushes rather than in one huge transaction.
pub const USERS_PER_FLUSH: usize = 100_000;

/// The longest a summary waits for Redis before answering from the last
/// good read: a hung Redis must not hold a dashboard's refresh.
pub const SUMMARY_WAIT: Duration = Duration::from_millis(90);

pub struct View {
    cluster: Arc<Cluster>,
    store: Arc<Store>,
    script: redis::Script,
    /// The last good read of each bot: what the summary answers with while
    /// Redis is away, rather than fail the bot's own command.
    last: Mutex<HashMap<String, BotView>>,
}

impl View {
    pub fn new(cluster: Arc<Cluster>, store: Arc<Store>) -> Self {
        View {
            cluster,
            store,
            script: redis::Script::new(concat!(
                include_str!("lua/exact.lua"),
                include_str!("lua/read.lua")
            )),
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Reads `bots`' totals, one script call each, concurrently. `None` for
    /// a bot Redis does not hold (not seeded yet).
    pub async fn read(&self, bots: &[&str], for_store: bool) -> Result<Vec<Option<BotView>>> {
        let now = chrono::Utc::now().timestamp();
        let conn = timed(self.cluster.redis.conn()).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, bot) in bots.iter().enumerate() {
            let keys = BotKeys::new(bot);
            let script = self.script.clone();
            let mut conn = conn.clone();
            let bot = (*bot).to_owned();
            tasks.spawn(async move {
                let mut invocation = script.prepare_invoke();
                for key in keys.script_keys(now) {
                    invocation.key(key);
                }
                invocation.arg(if for_store { "1" } else { "0" });
                invocation.arg(USERS_PER_FLUSH);
                let answer: Result<Value> = timed(invocation.invoke_async(&mut conn)).await;
                (i, answer.and_then(|v| parse(&keys, &bot, v)))
            });
        }
        let mut out: Vec<Option<BotView>> = vec![None; bots.len()];
        let mut error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Ok(view))) => out[i] = view,
                Ok((_, Err(e))) => {
                    error.get_or_insert(e);
                }
                Err(e) => {
                    error.get_or_insert(ClusterError::Protocol(e.to_string()));
                }
            }
        }
        let result = match error {
            Some(e) => Err(e),
            None => Ok(out),
        };
        self.cluster.observe(&result);
        result
    }

    /// Each bot's cluster totals for a summary: a read of Redis that
    /// answers within [`SUMMARY_WAIT`]; while Redis is in doubt (see
    /// `health`) or does not answer in time, its last good read of the bot,
    /// else the cluster totals the store holds (at most a flush interval
    /// older). `None` for a bot none of them has.
    async fn for_summary(&self, names: &[&str]) -> Vec<Option<BotView>> {
        let read = match self.cluster.health.admit() {
            Admit::Ask => tokio::time::timeout(SUMMARY_WAIT, self.read(names, false))
                .await
                .map_err(|_| ClusterError::Timeout(SUMMARY_WAIT))
                .and_then(|read| read),
            Admit::Local => Err(ClusterError::Timeout(Duration::ZERO)),
            Admit::Probe(watch) => {
                self.cluster.probe(watch);
                Err(ClusterError::Timeout(Duration::ZERO))
            }
        };
        let mut views: Vec<Option<BotView>> = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(views) = &read {
                for view in views.iter().flatten() {
                    last.insert(view.bot.clone(), view.clone());
                }
            }
            names.iter().map(|name| last.get(*name).cloned()).collect()
        };
        if views.iter().any(Option::is_none)
            && let Ok(Ok(stored)) =
                tokio::time::timeout(super::COMMAND_TIMEOUT, self.store.load()).await
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            for (name, view) in names.iter().zip(views.iter_mut()) {
                if view.is_none() {
                    let from = from_store(&stored, name);
                    // Read once: later answers use it until Redis answers.
                    last.insert((*name).to_owned(), from.clone());
                    *view = Some(from);
                }
            }
        }
        views
    }
}

/// Cluster mode's [`Totals`]: what every replica counted, from Redis.
pub struct ClusterTotals {
    pub view: Arc<View>,
    pub syncer: Arc<Syncer>,
    pub local: Arc<Metrics>,
}

impl Totals for ClusterTotals {
    /// Each bot's cluster totals go into a scratch copy of its cells and are
    /// summarised as one process's own are; a bot no read has answers with
    /// this replica's own counts.
    fn summaries<'a>(
        &'a self,
        bots: &'a [Arc<BotMetrics>],
        now: DateTime<Utc>,
        uptime_seconds: u64,
    ) -> BoxFuture<'a, Vec<Summary>> {
        Box::pin(async move {
            let names: Vec<&str> = bots.iter().map(|b| &*b.bot).collect();
            let views = self.view.for_summary(&names).await;
            let ts = now.timestamp();
            let calendar = self.local.calendar();
            bots.iter()
                .zip(views)
                .map(|(own, view)| {
                    let Some(view) = view else {
                        return Summary::build(own, now, uptime_seconds);
                    };
                    let Some(scratch) = self.local.scratch(&own.bot) else {
                        return Summary::build(own, now, uptime_seconds);
                    };
                    let stored = Stored {
                        series: view.series,
                        daily: view.daily,
                        ..Stored::default()
                    };
                    restore_into(|_| Some(&scratch), calendar, &stored, ts);
                    scratch.active.set_cluster(view.users);
                    // The cohorts of the shared book, as of the lead's scan.
                    scratch.set_cohorts((*own.cohorts()).clone(), calendar.day_of(ts));
                    Summary::build(&scratch, now, uptime_seconds)
                })
                .collect()
        })
    }

    /// The shared book in Redis, or this replica's runs not synced yet;
    /// with Redis away, only the latter.
    fn knows_user<'a>(&'a self, bot: &'a BotMetrics, key: u64) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            if bot.shared_book_gap().is_none() {
                return bot.book.contains(key);
            }
            if bot.has_unsynced_runs(key) {
                return true;
            }
            let keys = BotKeys::new(&bot.bot);
            let asked = async {
                let mut conn = timed(self.view.cluster.redis.conn()).await?;
                timed(
                    redis::cmd("HEXISTS")
                        .arg(keys.book())
                        .arg(
                            crate::metrics::users::stored_key(key)
                                .to_le_bytes()
                                .as_slice(),
                        )
                        .query_async::<bool>(&mut conn),
                )
                .await
            };
            match asked.await {
                Ok(known) => known,
                Err(e) => {
                    tracing::warn!(error = %e, bot = %bot.bot, "redis did not say whether it knew the user being forgotten; the erasure goes on");
                    false
                }
            }
        })
    }

    fn ready_without_store(&self) -> Option<Vec<(&'static str, serde_json::Value)>> {
        Some(vec![
            ("cluster", true.into()),
            ("journal_counted", self.syncer.is_prepared().into()),
        ])
    }
}

/// A bot's cluster totals as the store keeps them.
fn from_store(stored: &Stored, bot: &str) -> BotView {
    let mut view = BotView {
        bot: bot.to_owned(),
        ..BotView::default()
    };
    for row in stored.series.iter().filter(|r| r.bot == bot) {
        if row.metric == ACTIVE_USERS.name {
            let window = ["1d", "7d", "30d"]
                .iter()
                .position(|w| row.labels == format!(r#"{{"window":"{w}"}}"#));
            if let Some(i) = window {
                view.users[i] = row.value.max(0.0) as u64;
            }
        } else {
            view.series.push(row.clone());
        }
    }
    view.daily = stored
        .daily
        .iter()
        .filter(|d| d.bot == bot)
        .cloned()
        .collect();
    view
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// A flat `[k1, v1, k2, v2, …]` array.
fn pairs(v: &Value) -> Option<Vec<(&Value, &Value)>> {
    match v {
        Value::Array(items) => Some(items.chunks_exact(2).map(|c| (&c[0], &c[1])).collect()),
        Value::Map(items) => Some(items.iter().map(|(k, v)| (k, v)).collect()),
        _ => None,
    }
}

fn parse(keys: &BotKeys, bot: &str, v: Value) -> Result<Option<BotView>> {
    let bad = |what: &str| ClusterError::Protocol(format!("read script: {what}"));
    let Value::Array(items) = v else {
        return Err(bad("not an array"));
    };
    match items.first().and_then(int) {
        Some(0) => return Ok(None),
        Some(1) if items.len() >= 6 => {}
        _ => return Err(bad("unexpected status")),
    }
    let mut view = BotView {
        bot: bot.to_owned(),
        ..BotView::default()
    };
    for (field, value) in pairs(&items[1]).ok_or_else(|| bad("series"))? {
        let (Some(field), Some(value)) = (text(field), text(value)) else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (metric, labels) = parse_field(&field);
        view.series.push(SeriesRow {
            metric: metric.to_owned(),
            bot: bot.to_owned(),
            labels: labels.to_owned(),
            value,
        });
    }
    // Redis holds only the histogram lines a sync ever moved: completed
    // here, so the summary, the store's rows and history all read whole
    // histograms.
    whole_histograms(&mut view.series);
    for (field, value) in pairs(&items[2]).ok_or_else(|| bad("today"))? {
        let (Some(field), Some(value)) = (text(field), int(value)) else {
            continue;
        };
        let Some((day, name)) = field.split_once(':') else {
            continue;
        };
        let Ok(day) = NaiveDate::parse_from_str(day, "%Y-%m-%d") else {
            continue;
        };
        view.daily.push(DailyRow {
            bot: bot.to_owned(),
            name: name.to_owned(),
            day,
            value,
        });
    }
    for (i, slot) in view.users.iter_mut().enumerate() {
        *slot = int(&items[3 + i]).unwrap_or(0).max(0) as u64;
    }
    if let Some(applied) = items.get(6) {
        for (replica, mark) in pairs(applied).ok_or_else(|| bad("applied"))? {
            if let (Some(replica), Some(mark)) = (text(replica), int(mark)) {
                view.applied.push((replica, mark));
            }
        }
    }
    if let Some(sketches) = items.get(7) {
        for (key, hll) in pairs(sketches).ok_or_else(|| bad("sketches"))? {
            let (Some(key), Some(hll)) = (text(key), bytes(hll)) else {
                continue;
            };
            // Expired since it was marked, or not a key the store keeps.
            if hll.is_empty() || !keys.is_stored_sketch(&key) {
                continue;
            }
            let name = key.split_once("}:").map_or(key.as_str(), |(_, n)| n);
            view.sketches.push((name.to_owned(), hll.to_vec()));
        }
    }
    if let Some(users) = items.get(8) {
        for (key, entry) in pairs(users).ok_or_else(|| bad("users"))? {
            let (Some(key), Some(entry)) = (bytes(key), bytes(entry)) else {
                continue;
            };
            let Ok(key) = <[u8; 8]>::try_from(key) else {
                continue;
            };
            view.book_users
                .push((u64::from_le_bytes(key), entry.to_vec()));
        }
    }
    Ok(Some(view))
}
