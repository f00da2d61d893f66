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
//! [`apply_run`] — the same rule, mirrored in Lua, tested against each
//! other below — and counts what the rule says (a new user, a returning
//! day, an ended session) into the bot's cluster series and "today"
//! counters, in the same atomic step.
//!
//! The hash's fields are the users' keyed hashes (8 bytes, never an id),
//! its values [`Entry::pack`]ed entries (20 bytes).

use super::BotKeys;
use crate::metrics::today::{Calendar, oldest_current};
use crate::metrics::users::{BookDelta, SESSION_DURATION_BUCKETS, SESSION_MESSAGE_BUCKETS};

#[cfg(test)]
use crate::metrics::users::{Entry, Run, apply_run};

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
                .map(|r| super::sync::field(&r.metric, &r.labels))
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
    // today deltas), with the first second of each and of the day after:
    // the script places a session's last event in its day without knowing
    // the time zone.
    let today = calendar.day_of(now);
    let first = oldest_current(calendar.day_of(now - 86_400));
    let days: Vec<u32> = (first..=today + 1).collect();
    push(&mut args, days.len().to_string());
    for day in days {
        push(&mut args, day.to_string());
        push(&mut args, calendar.start_of_day(day).to_string());
        push(&mut args, Calendar::date(day).to_string());
    }
    push(&mut args, delta.forgets.len().to_string());
    args.extend(delta.forgets.iter().map(|k| k.to_le_bytes().to_vec()));
    push(&mut args, delta.runs.len().to_string());
    for (key, runs) in &delta.runs {
        args.push(key.to_le_bytes().to_vec());
        push(&mut args, runs.len().to_string());
        for r in runs {
            for n in [u32::from(r.day), r.start, r.end, u32::from(r.messages)] {
                push(&mut args, n.to_string());
            }
        }
    }
    args
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
    use crate::metrics::users::{Session, Touched};

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
}
