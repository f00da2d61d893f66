//! The answer to a bot's own `/metrics` chat command: a JSON object per bot,
//! or a short message ready to send to a chat.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::event::Status;
use crate::metrics::BotMetrics;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub bot: String,
    pub generated_at: String,
    pub uptime_seconds: u64,
    /// The IANA zone "today" is counted in.
    pub timezone: String,
    pub messages: Messages,
    pub users: Users,
    pub responses: Responses,
    pub cache: CacheSummary,
    pub limit_reached: LimitReached,
    pub errors: Errors,
    pub spend: Spend,
    pub feedback: Feedback,
    pub retention: Retention,
    pub sessions: Sessions,
}

/// Of the latest complete cohort for each day (users whose first day was
/// 2, 8 or 31 days ago), the share active again on day +1, +7, +30 (the
/// classic definition; `/v1/retention` has both). Null without a cohort.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Retention {
    pub d1: Option<f64>,
    pub d7: Option<f64>,
    pub d30: Option<f64>,
}

/// Sessions that ended today (a gap over `--session-gap` since their last
/// event), from the user book.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sessions {
    pub today: u64,
    /// Interpolated within its `bot_session_duration_seconds` bucket; null
    /// before the first session of the day.
    pub median_seconds_today: Option<f64>,
    /// Messages the users wrote per session; null before the first.
    pub messages_per_session_today: Option<f64>,
    pub total: u64,
}

/// What the LLM calls cost. Money is counted in integer micro-units and
/// shown in currency units.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spend {
    /// `--currency`.
    pub currency: String,
    pub today: f64,
    /// Since the first of this local month.
    pub month: f64,
    pub total: f64,
    /// Today's spend over today's active users (24 h); 0 without users.
    pub per_active_user_today: f64,
    /// All-time spend per model, the three largest then `other`.
    pub by_model: Vec<ModelSpend>,
    /// False while tokens of a model the price table does not know were
    /// reported without a cost: the figures above leave them out.
    pub complete: bool,
    pub unpriced_tokens: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelSpend {
    pub model: String,
    pub total: f64,
}

/// How users rated the answers: positive is a thumbs-up or a 4-5 rating.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Feedback {
    pub rated_today: u64,
    /// Positive share of today's ratings; null before the first.
    pub satisfaction_today: Option<f64>,
    /// The seven local days ending today.
    pub rated_7d: u64,
    pub satisfaction_7d: Option<f64>,
    pub rated_total: u64,
    pub satisfaction_total: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Messages {
    pub total: u64,
    pub today: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Users {
    pub active_1d: u64,
    pub active_7d: u64,
    pub active_30d: u64,
    pub registered_total: u64,
    pub registered_today: u64,
    /// First seen today (within `--user-memory`), from the user book.
    pub new_today: u64,
    /// Active today, first seen on an earlier day.
    pub returning_today: u64,
    pub new_total: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Responses {
    pub total: u64,
    /// Successful share of all responses; 1.0 before the first response.
    pub success_rate: f64,
    /// Interpolated from the response-time histogram, as PromQL's
    /// `histogram_quantile` does; 0 before the first response.
    pub p50_ms: f64,
    pub p95_ms: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CacheSummary {
    /// Hits over all lookups of every cache; 0.0 before the first lookup.
    pub hit_rate: f64,
    pub requests: u64,
    /// The same per cache, by cache name, for caches with lookups: caches
    /// differ by design (one may hit 80 %, another 25 %), so the blend alone
    /// hides which one changed.
    pub caches: Vec<CacheHits>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CacheHits {
    pub cache: String,
    pub hit_rate: f64,
    pub requests: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LimitReached {
    pub today: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Errors {
    /// `error` events the bot reported; failed LLM answers are counted in
    /// `responses` (its success rate), not here.
    pub total: u64,
}

/// The three largest of `spend` (micro-units), then the rest as `other`.
fn top_three(mut spend: Vec<(String, u64)>) -> Vec<ModelSpend> {
    spend.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let rest: u64 = spend.iter().skip(3).map(|(_, m)| m).sum();
    let mut out: Vec<ModelSpend> = spend
        .into_iter()
        .take(3)
        .map(|(model, micros)| ModelSpend {
            model,
            total: money(micros),
        })
        .collect();
    if rest > 0 {
        out.push(ModelSpend {
            model: "other".into(),
            total: money(rest),
        });
    }
    out
}

/// The latest complete cohorts' classic retention, as of the book's last
/// scan.
fn retention(bot: &BotMetrics, now: i64) -> Retention {
    let today = bot.today.calendar().day_of(now);
    let cohorts = bot.cohorts();
    let ratio = |i: usize| {
        let day = today.checked_sub(crate::metrics::users::RETENTION_DAYS[i] + 1)?;
        let c = cohorts.iter().find(|c| c.day == day && c.size > 0)?;
        Some(f64::from(c.classic[i]) / f64::from(c.size))
    };
    Retention {
        d1: ratio(0),
        d7: ratio(1),
        d30: ratio(2),
    }
}

/// Micro-units → currency units.
fn money(micros: u64) -> f64 {
    micros as f64 / 1e6
}

impl Summary {
    pub fn build(bot: &BotMetrics, now: DateTime<Utc>, uptime_seconds: u64) -> Summary {
        let ts = now.timestamp();
        let [(_, active_1d), (_, active_7d), (_, active_30d)] = bot.active.estimates_at(ts);
        let responses: f64 = Status::ALL.iter().map(|s| bot.responses(*s)).sum();
        let success = bot.responses(Status::Success);
        let durations = bot.response_duration();
        let quantile_ms = |q| durations.quantile(q).map_or(0.0, |s| (s * 1000.0).round());
        let (hits, misses) = bot.cache_totals();
        let caches = bot
            .cache_lookups()
            .into_iter()
            .filter(|(_, hits, misses)| hits + misses > 0.0)
            .map(|(cache, hits, misses)| CacheHits {
                cache,
                hit_rate: hits / (hits + misses),
                requests: (hits + misses) as u64,
            })
            .collect();
        let spend_today = bot.today.spend.get_at(ts);
        let by_model = bot.spend_by_model();
        let spend_total: u64 = by_model.iter().map(|(_, m)| m).sum();
        let unpriced = bot.unpriced_tokens() as u64;
        let rated_today = bot.today.feedback_rated.get_at(ts);
        let liked_today = bot.today.feedback_positive.get_at(ts);
        let (rated_7d, liked_7d) = bot.today.feedback_week_at(ts);
        let (rated_total, liked_total) = bot.feedback_totals();
        let share = |liked: f64, rated: f64| (rated > 0.0).then(|| liked / rated);
        Summary {
            bot: bot.bot.to_string(),
            generated_at: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            uptime_seconds,
            timezone: bot.today.calendar().tz().name().to_owned(),
            messages: Messages {
                total: bot.messages_total() as u64,
                today: bot.today.messages.get_at(ts),
            },
            users: Users {
                active_1d,
                active_7d,
                active_30d,
                registered_total: bot.registered_total() as u64,
                registered_today: bot.today.registered.get_at(ts),
                new_today: bot.today.users_new.get_at(ts),
                returning_today: bot.today.users_returning.get_at(ts),
                new_total: bot.users_new_total() as u64,
            },
            responses: Responses {
                total: responses as u64,
                success_rate: if responses > 0.0 {
                    success / responses
                } else {
                    1.0
                },
                p50_ms: quantile_ms(0.5),
                p95_ms: quantile_ms(0.95),
            },
            cache: CacheSummary {
                hit_rate: if hits + misses > 0.0 {
                    hits / (hits + misses)
                } else {
                    0.0
                },
                requests: (hits + misses) as u64,
                caches,
            },
            limit_reached: LimitReached {
                today: bot.today.limit_reached.get_at(ts),
            },
            errors: Errors {
                total: bot.errors_total() as u64,
            },
            spend: Spend {
                currency: "USD".into(),
                today: money(spend_today),
                month: money(bot.today.spend_month_at(ts)),
                total: money(spend_total),
                per_active_user_today: if active_1d > 0 {
                    money(spend_today) / active_1d as f64
                } else {
                    0.0
                },
                by_model: top_three(by_model),
                complete: unpriced == 0,
                unpriced_tokens: unpriced,
            },
            feedback: Feedback {
                rated_today,
                satisfaction_today: share(liked_today as f64, rated_today as f64),
                rated_7d,
                satisfaction_7d: share(liked_7d as f64, rated_7d as f64),
                rated_total: rated_total as u64,
                satisfaction_total: share(liked_total, rated_total),
            },
            retention: retention(bot, ts),
            sessions: {
                let today = bot.today.sessions.get_at(ts);
                Sessions {
                    today,
                    median_seconds_today: bot.today.session_median_at(ts).map(f64::round),
                    messages_per_session_today: (today > 0)
                        .then(|| bot.today.session_messages.get_at(ts) as f64 / today as f64),
                    total: bot.sessions_total() as u64,
                }
            },
        }
    }

    /// The same summary with money in `currency` (`--currency`).
    pub fn in_currency(mut self, currency: &str) -> Summary {
        currency.clone_into(&mut self.spend.currency);
        self
    }

    /// A few lines for a chat, numbers formatted for people: today's
    /// figures on one line, the all-time totals on others, each saying which
    /// it is and what it counts. Spaces inside a figure (thousands, units,
    /// percent) do not break, so a narrow chat window never splits "1 234"
    /// over two lines. Short enough for one Telegram message.
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        // The answer may be up to --summary-cache-ttl old: say when it was.
        let as_of = chrono::DateTime::parse_from_rfc3339(&self.generated_at)
            .ok()
            .zip(self.timezone.parse::<chrono_tz::Tz>().ok())
            .map(|(at, tz)| at.with_timezone(&tz).format("%H:%M").to_string());
        match as_of {
            Some(at) => {
                let _ = writeln!(t, "📊 {} (as of {at})", self.bot);
            }
            None => {
                let _ = writeln!(t, "📊 {}", self.bot);
            }
        }
        let _ = writeln!(
            t,
            "Today (since midnight, {}): {} (users' and the bot's), {}, {}",
            self.timezone,
            count(self.messages.today, "message", "messages"),
            count(self.users.registered_today, "registration", "registrations"),
            count(
                self.limit_reached.today,
                "daily-limit hit",
                "daily-limit hits"
            )
        );
        let _ = writeln!(
            t,
            "Active users: {} (24{NBSP}h), {} (7{NBSP}d), {} (30{NBSP}d)",
            group(self.users.active_1d),
            group(self.users.active_7d),
            group(self.users.active_30d)
        );
        let share = |r: Option<f64>| r.map_or_else(|| "–".to_owned(), percent);
        let _ = writeln!(
            t,
            "Users today: {} new, {} returning; retention D1 {}, D7 {}, D30 {}",
            group(self.users.new_today),
            group(self.users.returning_today),
            share(self.retention.d1),
            share(self.retention.d7),
            share(self.retention.d30)
        );
        if let (Some(median), Some(messages)) = (
            self.sessions.median_seconds_today,
            self.sessions.messages_per_session_today,
        ) {
            let _ = writeln!(
                t,
                "Sessions today: {}, median {}, {messages:.1} messages each",
                group(self.sessions.today),
                duration(median * 1000.0),
            );
        }
        let _ = writeln!(
            t,
            "All time: {}, {}, {}",
            count(self.messages.total, "message", "messages"),
            count(
                self.users.registered_total,
                "registered user",
                "registered users"
            ),
            count(self.errors.total, "error reported", "errors reported")
        );
        if self.responses.total > 0 {
            let not_ok =
                (self.responses.total as f64 * (1.0 - self.responses.success_rate)).round() as u64;
            let _ = writeln!(
                t,
                "Responses, all time: {}, {} ok ({} failed, limited or timed out), median {}, p95 {}",
                group(self.responses.total),
                percent(self.responses.success_rate),
                group(not_ok),
                duration(self.responses.p50_ms),
                duration(self.responses.p95_ms)
            );
        } else {
            let _ = writeln!(t, "Responses: none yet");
        }
        match self.cache.caches.as_slice() {
            [] => {}
            [one] => {
                let _ = writeln!(
                    t,
                    "Cache hits, all time: {} ({})",
                    percent(one.hit_rate),
                    one.cache
                );
            }
            several => {
                let each: Vec<String> = several
                    .iter()
                    .map(|c| format!("{} {}", c.cache, percent(c.hit_rate)))
                    .collect();
                let _ = writeln!(t, "Cache hits, all time: {}", each.join(", "));
            }
        }
        let spend = &self.spend;
        if spend.total > 0.0 || !spend.complete {
            let models: Vec<String> = spend
                .by_model
                .iter()
                .map(|m| format!("{} {}", m.model, amount(m.total)))
                .collect();
            let _ = write!(
                t,
                "Spend today: {}{NBSP}{} ({} per active user); this month {}; all time {}",
                amount(spend.today),
                spend.currency,
                amount(spend.per_active_user_today),
                amount(spend.month),
                amount(spend.total)
            );
            if !models.is_empty() {
                let _ = write!(t, " ({})", models.join(", "));
            }
            if !spend.complete {
                let _ = write!(
                    t,
                    "; incomplete: {} tokens of unpriced models",
                    group(spend.unpriced_tokens)
                );
            }
            t.push('\n');
        }
        let f = &self.feedback;
        if f.rated_total > 0 {
            let today = match f.satisfaction_today {
                Some(s) => format!("{} rated, {} liked", group(f.rated_today), percent(s)),
                None => "none rated".to_owned(),
            };
            let _ = write!(t, "Answers today: {today}");
            if let Some(week) = f.satisfaction_7d {
                let _ = write!(
                    t,
                    "; 7 days {} rated, {} liked",
                    group(f.rated_7d),
                    percent(week)
                );
            }
            let _ = writeln!(
                t,
                "; all time {} rated, {} liked",
                group(f.rated_total),
                percent(f.satisfaction_total.unwrap_or(0.0))
            );
        }
        t.truncate(t.trim_end().len());
        t
    }
}

/// Money for people: cents for amounts of a unit or more, four decimals
/// below (a per-user cost is often a fraction of a cent).
///
/// ```
/// assert_eq!(botmetrics::summary::amount(12.345), "12.35");
/// assert_eq!(botmetrics::summary::amount(0.00123), "0.0012");
/// assert_eq!(botmetrics::summary::amount(0.000002), "<0.0001");
/// ```
pub fn amount(v: f64) -> String {
    if v >= 1.0 || v == 0.0 {
        format!("{v:.2}")
    } else if v < 0.0001 {
        // Not "0.0000": a model that cost something is never shown as free.
        "<0.0001".to_owned()
    } else {
        format!("{v:.4}")
    }
}

/// U+202F NARROW NO-BREAK SPACE: groups thousands and separates the percent
/// sign without letting a chat client wrap a number in two.
pub const THIN: char = '\u{202F}';
/// U+00A0 NO-BREAK SPACE: between a number and its unit.
pub const NBSP: char = '\u{00A0}';

/// Groups digits by thousands for a chat message, with a narrow no-break
/// space.
///
/// ```
/// assert_eq!(botmetrics::summary::group(1234567), "1\u{202F}234\u{202F}567");
/// ```
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 * THIN.len_utf8());
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(THIN);
        }
        out.push(c);
    }
    out
}

/// `1, "error", "errors"` → `1 error`; `1234, …` → `1 234 errors`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", group(n), if n == 1 { one } else { many })
}

/// `0.9871` → `98.7 %` (narrow no-break space).
pub fn percent(ratio: f64) -> String {
    format!("{:.1}{THIN}%", ratio * 100.0)
}

/// `850` → `850 ms`, `1234` → `1.2 s`, `75000` → `1 min 15 s` (no-break spaces).
pub fn duration(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0}{NBSP}ms")
    } else if ms < 60_000.0 {
        // Rounded on whole tenths first: 1950 ms is 2.0 s, where formatting
        // 1.95 (stored as 1.9499…) directly would print 1.9.
        format!("{:.1}{NBSP}s", (ms / 100.0).round() / 10.0)
    } else {
        let s = (ms / 1000.0).round() as u64;
        format!("{}{NBSP}min {}{NBSP}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_for_people() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(12345), "12\u{202F}345");
        assert_eq!(group(1234567), "1\u{202F}234\u{202F}567");
        assert_eq!(percent(0.9871), "98.7\u{202F}%");
        assert_eq!(count(1, "error", "errors"), "1 error");
        assert_eq!(count(0, "error", "errors"), "0 errors");
        assert_eq!(count(1234, "error", "errors"), "1\u{202F}234 errors");
        assert_eq!(duration(850.0), "850\u{A0}ms");
        assert_eq!(duration(1234.0), "1.2\u{A0}s");
        assert_eq!(duration(1950.0), "2.0\u{A0}s");
        assert_eq!(duration(75_000.0), "1\u{A0}min 15\u{A0}s");
    }
}
