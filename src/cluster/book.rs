//! The user book in cluster mode: one book per bot, in Redis, where every
//! replica's events meet.
//!
//! A replica does not decide whether a user is new or a session ended: it
//! sees only the events that reach it. It keeps, per bot, the runs of each
//! user's events since its last sync ([`BookDelta`]), and the sync sends
//! them in the same script call and under the same mark as the rest of the
//! bot's batch (`lua/sync.lua`, which calls `book_merge` of
//! `lua/book.lua`): a resent batch is skipped whole, so no run is merged
//! twice, and the sync stays one round trip per bot. The script applies
//! each run to the user's entry in the hash `bm:{bot}:book` with the rule of
//! [`apply_run`](crate::metrics::users::apply_run) — the same rule, mirrored in Lua, tested against each
//! other below — and counts what the rule says (a new user, a returning
//! day, an ended session) into the bot's cluster series and "today"
//! counters, in the same atomic step.
//!
//! The hash's fields are the users' keyed hashes (8 bytes, never an id),
//! its values [`Entry::pack`]ed entries (20 bytes).

use super::BotKeys;
use crate::metrics::today::{Calendar, oldest_current};
use crate::metrics::users::{
    BookDelta, BookLimits, Cohort, CohortCount, Entry, SESSION_DURATION_BUCKETS,
    SESSION_MESSAGE_BUCKETS, Scan, Session, cohorts_of, count_cohort, scan_entry,
};

#[cfg(test)]
use crate::metrics::users::{Run, apply_run};

/// The series fields the script adds to, named exactly as the store and the
/// exposition name them (taken from a scratch bot's own rows, so they
/// cannot disagree).
#[derive(Debug, Clone)]
pub struct BookFields {
    new: String,
    sessions: String,
    duration: HistogramFields,
    messages: HistogramFields,
}

#[derive(Debug, Clone, Default)]
struct HistogramFields {
    bounds: &'static [f64],
    /// One per bound, then +Inf.
    buckets: Vec<String>,
    sum: String,
    count: String,
}

impl BookFields {
    /// The fields of this build.
    pub fn new() -> super::Result<Self> {
        let bot: std::sync::Arc<str> = "scratch".into();
        let scratch = crate::metrics::Metrics::new(
            std::slice::from_ref(&bot),
            1,
            chrono_tz::UTC,
            0.0,
            crate::metrics::users::BookLimits::DEFAULT,
        )
        .map_err(|e| super::ClusterError::Protocol(e.to_string()))?;
        let rows = scratch
            .bot(&bot)
            .map(|b| crate::persist::bot_rows(&b))
            .unwrap_or_default();
        let field = |metric: &str| {
            rows.iter()
                .filter(|r| r.metric == metric)
                .map(|r| super::field(&r.metric, &r.labels))
                .collect::<Vec<_>>()
        };
        let one = |metric: &str| field(metric).into_iter().next().unwrap_or_default();
        let histogram = |family: &str, bounds: &'static [f64]| HistogramFields {
            bounds,
            // The flattening writes buckets in bound order, +Inf last.
            buckets: field(&format!("{family}_bucket")),
            sum: one(&format!("{family}_sum")),
            count: one(&format!("{family}_count")),
        };
        let fields = BookFields {
            new: one("bot_users_new_total"),
            sessions: one("bot_sessions_total"),
            duration: histogram("bot_session_duration_seconds", SESSION_DURATION_BUCKETS),
            messages: histogram("bot_session_messages", SESSION_MESSAGE_BUCKETS),
        };
        if fields.new.is_empty()
            || fields.duration.buckets.len() != SESSION_DURATION_BUCKETS.len() + 1
        {
            return Err(super::ClusterError::Protocol(
                "the user book's series are missing from a scratch bot".into(),
            ));
        }
        Ok(fields)
    }
}

/// The counting section of the book scripts (see `book_counting` in
/// `lua/book.lua`): the fields to add to and the local days Redis keeps
/// "today" counters for.
fn counting(fields: &BookFields, calendar: &Calendar, now: i64) -> Vec<Vec<u8>> {
    let mut args: Vec<Vec<u8>> = Vec::new();
    let push = |a: &mut Vec<Vec<u8>>, v: String| a.push(v.into_bytes());
    push(&mut args, fields.new.clone());
    push(&mut args, fields.sessions.clone());
    for h in [&fields.duration, &fields.messages] {
        push(&mut args, h.bounds.len().to_string());
        for b in h.bounds {
            push(&mut args, b.to_string());
        }
        for f in h.buckets.iter().chain([&h.sum, &h.count]) {
            push(&mut args, f.clone());
        }
    }
    // The local days whose "today" counters Redis keeps (as the sync's own
    // today deltas), with the first second of each and of the day after.
    let today = calendar.day_of(now);
    let first = oldest_current(calendar.day_of(now - 86_400));
    let days: Vec<u32> = (first..=today + 1).collect();
    push(&mut args, days.len().to_string());
    for day in days {
        push(&mut args, day.to_string());
        push(&mut args, calendar.start_of_day(day).to_string());
        push(&mut args, Calendar::date(day).to_string());
    }
    args
}

/// The script arguments of one bot's book section (see `book_merge` in
/// `lua/book.lua`), with the two keys it names appended to `keys`.
pub fn section(
    delta: &BookDelta,
    keys: &mut Vec<String>,
    bot: &BotKeys,
    fields: &BookFields,
    calendar: &Calendar,
    now: i64,
    gap: u32,
) -> Vec<Vec<u8>> {
    let mut args: Vec<Vec<u8>> = Vec::new();
    let push = |a: &mut Vec<Vec<u8>>, v: String| a.push(v.into_bytes());
    for key in [bot.book(), bot.book_changed()] {
        keys.push(key);
        push(&mut args, keys.len().to_string());
    }
    push(&mut args, gap.to_string());
    args.extend(counting(fields, calendar, now));
    push(&mut args, delta.forgets.len().to_string());
    args.extend(delta.forgets.iter().map(|k| k.to_le_bytes().to_vec()));
    push(&mut args, delta.runs.len().to_string());
    for (key, runs) in &delta.runs {
        let mut user = Vec::with_capacity(8 + RUN_BYTES * runs.len());
        user.extend_from_slice(&key.to_le_bytes());
        for r in runs {
            user.extend_from_slice(&r.day.to_le_bytes());
            user.extend_from_slice(&r.start.to_le_bytes());
            user.extend_from_slice(&r.end.to_le_bytes());
            user.extend_from_slice(&r.messages.to_le_bytes());
        }
        args.push(user);
    }
    args
}

/// Bytes of one run in a user's sync argument (`struct` format '<HIIH').
const RUN_BYTES: usize = 12;

/// What a script answered it found: new users, then (seconds, messages)
/// per ended session.
pub fn found(answer: &[i64]) -> (u64, Vec<(u32, u16)>) {
    let new = answer.first().copied().unwrap_or(0).max(0) as u64;
    let sessions = answer
        .get(1..)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|c| {
            (
                u32::try_from(c[0]).unwrap_or(0),
                u16::try_from(c[1]).unwrap_or(0),
            )
        })
        .collect();
    (new, sessions)
}

/// Whether this replica holds the writer lease now: only that replica
/// scans the books (`lead::Lead` answers it).
pub trait Leading: Send + Sync {
    fn holds(&self) -> bool;
}

/// Users per HSCAN step and per settling call of the lead's scan.
const SCAN_CHUNK: usize = 2_000;

/// The periodic pass over Redis' books (cluster mode, the user-scan
/// interval): on the replica holding the writer lease, ends the sessions
/// whose gap passed, forgets users past `--user-memory` and, past
/// `--max-users-per-bot`, the least recently seen, and counts the cohorts
/// into `bm:{bot}:cohorts`; on every replica, reads those cohorts for
/// `/v1/retention`, the summary and `bot_retention_ratio`.
///
/// The decisions are the book's own rule ([`scan_entry`]) made in Rust on
/// what HSCAN read; `lua/book_scan.lua` applies each only if the entry is
/// still what was read (a sync may have merged into it since), so one
/// session is counted once however scans and syncs interleave.
pub struct BookScanner {
    cluster: std::sync::Arc<super::Cluster>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    lead: std::sync::Arc<dyn Leading>,
    limits: BookLimits,
    fields: BookFields,
    settle: redis::Script,
}

/// What a lead's scan of one bot did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BookScanReport {
    pub users: usize,
    pub ended: usize,
    pub expired: usize,
    pub evicted: usize,
}

impl BookScanner {
    pub fn new(
        cluster: std::sync::Arc<super::Cluster>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        lead: std::sync::Arc<dyn Leading>,
        limits: BookLimits,
    ) -> super::Result<Self> {
        Ok(BookScanner {
            cluster,
            metrics,
            lead,
            limits,
            fields: BookFields::new()?,
            settle: redis::Script::new(concat!(
                include_str!("lua/book.lua"),
                include_str!("lua/book_scan.lua")
            )),
        })
    }

    /// One pass at unix seconds `now` over every bot whose book is shared.
    pub async fn scan_once(&self, now: i64) -> super::Result<()> {
        let mut first_error = None;
        for bot in self.metrics.bots().iter() {
            if bot.shared_book_gap().is_none() {
                continue;
            }
            let keys = BotKeys::new(&bot.bot);
            if self.lead.holds() {
                match self.scan_bot(bot, &keys, now).await {
                    Ok(report) => {
                        let s = &bot.counters;
                        s.book_users.set(report.users as i64);
                        s.book_fill
                            .set(report.users as f64 / self.limits.max_users.max(1) as f64);
                        s.book_evicted.inc_by(report.evicted as u64);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            match self.read_cohorts(&keys).await {
                Ok(Some(cohorts)) => {
                    let today = bot.today.calendar().day_of(now);
                    bot.set_cohorts(cohorts, today);
                }
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn read_cohorts(&self, keys: &BotKeys) -> super::Result<Option<Vec<Cohort>>> {
        let mut conn = super::timed(self.cluster.redis.conn()).await?;
        let bytes: Option<Vec<u8>> =
            super::timed(redis::cmd("GET").arg(keys.cohorts()).query_async(&mut conn)).await?;
        Ok(bytes.map(|b| Cohort::decode_all(&b)))
    }

    /// The lead's pass over one bot's book.
    pub async fn scan_bot(
        &self,
        bot: &crate::metrics::BotMetrics,
        keys: &BotKeys,
        now: i64,
    ) -> super::Result<BookScanReport> {
        let mut report = BookScanReport::default();
        let Some(gap) = bot.shared_book_gap() else {
            return Ok(report);
        };
        let calendar = bot.today.calendar();
        let today = calendar.day_of(now);
        let oldest = today.saturating_sub(self.limits.memory_days);
        let now32 = u32::try_from(now.max(0)).unwrap_or(u32::MAX);
        let mut conn = super::timed(self.cluster.redis.conn()).await?;
        let held: usize =
            super::timed(redis::cmd("HLEN").arg(keys.book()).query_async(&mut conn)).await?;
        // Past the bound, (last day, last ts, key, bytes) of every user
        // kept, to evict the least recently seen; else only their count.
        let over = held > self.limits.max_users;
        let mut kept: Vec<(u16, u32, u64, Vec<u8>)> = Vec::new();
        let mut kept_count = 0usize;
        let mut cursor: u64 = 0;
        let mut cohorts = CohortCount::new();
        let mut seen = std::collections::HashSet::with_capacity(held);
        let mut changes: Vec<Change> = Vec::new();
        loop {
            let (next, items): (u64, Vec<Field>) = super::timed(
                redis::cmd("HSCAN")
                    .arg(keys.book())
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(SCAN_CHUNK)
                    .query_async(&mut conn),
            )
            .await?;
            for (field, value) in items {
                let (Ok(k), Some(mut e)) =
                    (<[u8; 8]>::try_from(field.as_slice()), Entry::unpack(&value))
                else {
                    continue;
                };
                let key = u64::from_le_bytes(k);
                // HSCAN may return a field twice (a rehash between calls):
                // counted once.
                if !seen.insert(key) {
                    continue;
                }
                match scan_entry(&mut e, now32, gap, oldest) {
                    Scan::Expired => {
                        report.expired += 1;
                        changes.push(Change {
                            key,
                            read: value,
                            write: Vec::new(),
                            ended: None,
                        });
                    }
                    Scan::Kept(ended) => {
                        count_cohort(&mut cohorts, &e);
                        kept_count += 1;
                        let entry = if ended.is_some() {
                            let write = e.pack().to_vec();
                            changes.push(Change {
                                key,
                                read: value,
                                write: write.clone(),
                                ended,
                            });
                            write
                        } else {
                            value
                        };
                        if over {
                            kept.push((e.last_day, e.last_ts, key, entry));
                        }
                    }
                }
            }
            if changes.len() >= SCAN_CHUNK {
                self.settle_changes(bot, keys, &mut conn, &changes, now, &mut report)
                    .await?;
                changes.clear();
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        self.settle_changes(bot, keys, &mut conn, &changes, now, &mut report)
            .await?;
        // Past the bound the least recently seen go (as the book's own
        // eviction), out of the cohorts too.
        if over && kept.len() > self.limits.max_users {
            kept.sort_unstable_by_key(|(day, ts, key, _)| (*day, *ts, *key));
            let excess = kept.len() - self.limits.max_users;
            let gone: Vec<Change> = kept
                .drain(..excess)
                .map(|(_, _, key, read)| Change {
                    key,
                    read,
                    write: Vec::new(),
                    ended: None,
                })
                .collect();
            for c in &gone {
                if let Some(e) = Entry::unpack(&c.read)
                    && let Some(cohort) = cohorts.get_mut(&e.first_day)
                {
                    uncount_cohort(cohort, &e);
                }
            }
            report.evicted = gone.len();
            for part in gone.chunks(SCAN_CHUNK) {
                self.settle_changes(bot, keys, &mut conn, part, now, &mut report)
                    .await?;
            }
        }
        cohorts.retain(|_, c| c.size > 0);
        report.users = kept_count - report.evicted;
        let _: () = super::timed(
            redis::cmd("SET")
                .arg(keys.cohorts())
                .arg(Cohort::encode_all(&cohorts_of(cohorts)))
                .query_async(&mut conn),
        )
        .await?;
        Ok(report)
    }

    async fn settle_changes(
        &self,
        bot: &crate::metrics::BotMetrics,
        keys: &BotKeys,
        conn: &mut super::connection::Conn,
        changes: &[Change],
        now: i64,
        report: &mut BookScanReport,
    ) -> super::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut invocation = self.settle.prepare_invoke();
        for key in [
            keys.series(),
            keys.today(),
            keys.book(),
            keys.book_changed(),
            keys.seeded(),
        ] {
            invocation.key(key);
        }
        for a in counting(&self.fields, bot.today.calendar(), now) {
            invocation.arg(a);
        }
        invocation.arg(changes.len());
        for c in changes {
            invocation.arg(c.key.to_le_bytes().as_slice());
            invocation.arg(c.read.as_slice());
            invocation.arg(c.write.as_slice());
            match c.ended {
                Some(s) => invocation.arg(s.seconds).arg(s.messages).arg(s.last_ts),
                None => invocation.arg(-1).arg(-1).arg(-1),
            };
        }
        let answer: Vec<i64> = super::timed(invocation.invoke_async(conn)).await?;
        let (new, sessions) = found(answer.get(1..).unwrap_or_default());
        report.ended += sessions.len();
        bot.credit_book(new, &sessions);
        Ok(())
    }
}

/// [`BookScanner::scan_once`] every `interval`.
pub async fn scan_loop(
    scanner: std::sync::Arc<BookScanner>,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let task = crate::tasks::Every {
        interval,
        retry_sooner: false,
        log: Some(crate::tasks::Log {
            failed: "the scan of the shared user book failed; it runs again at the next interval",
            recovered: "the scan of the shared user book works again",
        }),
    };
    crate::tasks::every(
        task,
        || scanner.scan_once(chrono::Utc::now().timestamp()),
        shutdown,
    )
    .await;
}

/// One field of the book as HSCAN answers it: (key, entry).
type Field = (Vec<u8>, Vec<u8>);

/// One decision of the lead's scan.
struct Change {
    key: u64,
    read: Vec<u8>,
    /// Empty: the user goes.
    write: Vec<u8>,
    ended: Option<Session>,
}

/// Takes `e` out of its cohort's counts (an eviction after counting).
fn uncount_cohort(c: &mut Cohort, e: &Entry) {
    let mut alone = CohortCount::new();
    count_cohort(&mut alone, e);
    if let Some(one) = alone.get(&e.first_day) {
        c.size -= one.size.min(c.size);
        for n in 0..3 {
            c.classic[n] -= one.classic[n].min(c.classic[n]);
            c.rolling[n] -= one.rolling[n].min(c.rolling[n]);
        }
    }
}

/// Script arguments a test of the rule sends: an entry (or empty) and runs.
#[cfg(test)]
fn rule_args(entry: Option<Entry>, runs: &[Run], gap: u32) -> Vec<Vec<u8>> {
    let mut args = vec![
        entry.map_or_else(Vec::new, |e| e.pack().to_vec()),
        gap.to_string().into_bytes(),
    ];
    for r in runs {
        for n in [u32::from(r.day), r.start, r.end, u32::from(r.messages)] {
            args.push(n.to_string().into_bytes());
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::users::Touched;

    /// Runs `lua/book.lua`'s rule: answers the packed entry, then per run
    /// {new, returning, ended seconds, messages, last ts} (-1 when none).
    const RULE_DRIVER: &str = r#"
local e = nil
if #ARGV[1] > 0 then e = book_unpack(ARGV[1]) end
local gap = tonumber(ARGV[2])
local out = {''}
local i = 3
while i <= #ARGV do
  local new, returning, ended
  e, new, returning, ended = book_apply(e, tonumber(ARGV[i]), tonumber(ARGV[i + 1]),
    tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), gap)
  i = i + 4
  out[#out + 1] = new and 1 or 0
  out[#out + 1] = returning and 1 or 0
  if ended then
    out[#out + 1] = ended[1]; out[#out + 1] = ended[2]; out[#out + 1] = ended[3]
  else
    out[#out + 1] = -1; out[#out + 1] = -1; out[#out + 1] = -1
  end
end
out[1] = book_pack(e)
return out
"#;

    struct Server(std::process::Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A private `redis-server` on a free port, or `None` (skipped loudly)
    /// where the machine has none and CI is not set.
    fn redis_server() -> Option<(Server, u16)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .ok()?;
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(child) => Some((Server(child), port)),
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "redis-server: {e}");
                eprintln!("SKIPPED: no redis-server ({e})");
                None
            }
        }
    }

    fn lua_rule(
        conn: &mut redis::Connection,
        script: &redis::Script,
        entry: Option<Entry>,
        runs: &[Run],
        gap: u32,
    ) -> (Entry, Vec<Touched>) {
        let mut invocation = script.prepare_invoke();
        for a in rule_args(entry, runs, gap) {
            invocation.arg(a);
        }
        let out: Vec<redis::Value> = invocation.invoke(conn).expect("the rule runs");
        let bytes: Vec<u8> = redis::from_redis_value(out[0].clone()).expect("bytes");
        let ints: Vec<i64> = out[1..]
            .iter()
            .map(|v| redis::from_redis_value(v.clone()).expect("an integer"))
            .collect();
        let touched = ints
            .chunks(5)
            .map(|c| Touched {
                new: c[0] == 1,
                returning: c[1] == 1,
                ended: (c[2] >= 0).then(|| Session {
                    seconds: c[2] as u32,
                    messages: c[3] as u16,
                    last_ts: c[4] as u32,
                }),
            })
            .collect();
        (Entry::unpack(&bytes).expect("a packed entry"), touched)
    }

    fn rust_rule(entry: Option<Entry>, runs: &[Run], gap: u32) -> (Entry, Vec<Touched>) {
        let mut e = entry;
        let mut touched = Vec::new();
        for r in runs {
            let (next, t) = apply_run(e, r, gap);
            e = Some(next);
            touched.push(t);
        }
        let e = e.expect("at least one run");
        // Redis keeps only the "ended" flag.
        (Entry::unpack(&e.pack()).expect("packs"), touched)
    }

    /// A small deterministic generator: the test needs varied inputs, not
    /// a dependency.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn the_lua_rule_is_the_rust_rule() {
        let Some((_server, port)) = redis_server() else {
            return;
        };
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("a url");
        let mut conn = (0..200)
            .find_map(|_| {
                client.get_connection().ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                    None
                })
            })
            .expect("redis-server answers");
        let script = redis::Script::new(&format!(
            "{}\n{}",
            include_str!("lua/book.lua"),
            RULE_DRIVER
        ));
        const DAY: u32 = 86_400;
        let base_day = 20_400u32;
        let mut rng = Lcg(7);
        for case in 0..3_000 {
            let gap = [60, 1800, 7200][rng.below(3) as usize];
            // Runs spread over 40 days (past the 31 remembered), some late,
            // some within and some just past the gap of each other.
            let n = 1 + rng.below(6) as usize;
            let mut runs: Vec<Run> = Vec::new();
            for _ in 0..n {
                let day = base_day + rng.below(40) as u32;
                let mut start = day * DAY + 4000 + rng.below(u64::from(DAY) - 16000) as u32;
                let len = rng.below(u64::from(gap) * 2) as u32;
                // Often exactly at, or one second past, the gap after the
                // last run, or before its start: the rule's edges.
                if let Some(prev) = runs.last() {
                    let edge = rng.below(2) as u32;
                    match rng.below(4) {
                        0 => start = prev.end + gap + edge,
                        1 => start = prev.start.saturating_sub(gap + len + edge),
                        _ => {}
                    }
                }
                runs.push(Run {
                    day: (start / DAY) as u16,
                    start,
                    end: start + len,
                    messages: rng.below(70_000) as u16,
                });
            }
            let expected = rust_rule(None, &runs, gap);
            let got = lua_rule(&mut conn, &script, None, &runs, gap);
            assert_eq!(got, expected, "case {case}: {runs:?}, gap {gap}");
            // And from an entry Redis already holds.
            let held = Some(expected.0);
            let more = [runs[0]];
            assert_eq!(
                lua_rule(&mut conn, &script, held, &more, gap),
                rust_rule(held, &more, gap),
                "case {case}, again"
            );
        }
    }

    #[test]
    fn the_fields_are_the_series_names_of_the_store() {
        let f = BookFields::new().expect("fields");
        assert_eq!(f.new, "bot_users_new_total{}");
        assert_eq!(f.sessions, "bot_sessions_total{}");
        assert_eq!(f.duration.buckets.len(), SESSION_DURATION_BUCKETS.len() + 1);
        assert_eq!(
            f.duration.buckets[0],
            r#"bot_session_duration_seconds_bucket{"le":"10"}"#
        );
        assert!(
            f.duration
                .buckets
                .last()
                .is_some_and(|b| b.contains("+Inf"))
        );
        assert_eq!(f.messages.count, "bot_session_messages_count{}");
    }

    #[test]
    fn a_sync_section_merges_every_user_and_run_as_the_rule_does() {
        let Some((_server, port)) = redis_server() else {
            return;
        };
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("a url");
        let mut conn = (0..200)
            .find_map(|_| {
                client.get_connection().ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                    None
                })
            })
            .expect("redis-server answers");
        // book_merge as sync.lua calls it, its section from ARGV[1].
        let script = redis::Script::new(&format!(
            "{}\nreturn book_merge(1)",
            include_str!("lua/book.lua")
        ));
        let calendar = Calendar::new(chrono_tz::UTC);
        let fields = BookFields::new().expect("fields");
        let keys = BotKeys::new("t");
        let gap = 1800;
        const DAY: i64 = 86_400;
        let now = chrono::Utc::now().timestamp();
        let mut rng = Lcg(11);
        let mut rust: std::collections::HashMap<u64, Entry> = Default::default();
        let (mut new, mut ended) = (0u64, 0usize);
        for round in 0..5 {
            let mut delta = BookDelta::default();
            for _ in 0..200 {
                let user = 1 + rng.below(60);
                let ts = now - 10 * DAY + rng.below(10 * DAY as u64) as i64;
                delta.add(user, ts, calendar.day_of(ts), rng.below(2) == 1, gap);
            }
            if round == 3 {
                delta.forget(5);
                rust.remove(&5);
            }
            for (key, runs) in &delta.runs {
                let mut e = rust.get(key).copied();
                for r in runs {
                    let (next, t) = apply_run(e, r, gap);
                    new += u64::from(t.new);
                    ended += usize::from(t.ended.is_some());
                    e = Some(next);
                }
                if let Some(e) = e {
                    rust.insert(*key, e);
                }
            }
            let mut script_keys = vec![keys.series(), keys.applied(), keys.seeded(), keys.today()];
            let args = section(
                &delta,
                &mut script_keys,
                &keys,
                &fields,
                &calendar,
                now,
                gap,
            );
            let mut invocation = script.prepare_invoke();
            for k in &script_keys {
                invocation.key(k);
            }
            for a in args {
                invocation.arg(a);
            }
            let _: Vec<i64> = invocation.invoke(&mut conn).expect("the merge runs");
        }
        let held: std::collections::HashMap<Vec<u8>, Vec<u8>> = redis::cmd("HGETALL")
            .arg(keys.book())
            .query(&mut conn)
            .expect("the book");
        assert_eq!(held.len(), rust.len());
        for (key, e) in &rust {
            let got = held
                .get(key.to_le_bytes().as_slice())
                .expect("the user is held");
            assert_eq!(Entry::unpack(got), Entry::unpack(&e.pack()), "user {key}");
        }
        let series: std::collections::HashMap<String, f64> = redis::cmd("HGETALL")
            .arg(keys.series())
            .query(&mut conn)
            .expect("series");
        assert_eq!(series.get(&fields.new).copied(), Some(new as f64));
        assert_eq!(
            series.get(&fields.sessions).copied().unwrap_or(0.0),
            ended as f64
        );
        assert!(ended > 0, "the inputs end sessions");
    }
}
