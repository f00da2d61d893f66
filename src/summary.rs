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
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LimitReached {
    pub today: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Errors {
    pub total: u64,
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
            },
            limit_reached: LimitReached {
                today: bot.today.limit_reached.get_at(ts),
            },
            errors: Errors {
                total: bot.errors_total() as u64,
            },
        }
    }

    /// A few lines for a chat, numbers formatted for people.
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "📊 {} — today since midnight ({})",
            self.bot, self.timezone
        );
        let _ = writeln!(
            t,
            "Messages: {} today, {} total",
            group(self.messages.today),
            group(self.messages.total)
        );
        let _ = writeln!(
            t,
            "Active users: {} (24 h), {} (7 d), {} (30 d)",
            group(self.users.active_1d),
            group(self.users.active_7d),
            group(self.users.active_30d)
        );
        let _ = writeln!(
            t,
            "New users: {} today, {} total",
            group(self.users.registered_today),
            group(self.users.registered_total)
        );
        if self.responses.total > 0 {
            let _ = writeln!(
                t,
                "Responses: {} total, {} ok, median {}, p95 {}",
                group(self.responses.total),
                percent(self.responses.success_rate),
                duration(self.responses.p50_ms),
                duration(self.responses.p95_ms)
            );
        } else {
            let _ = writeln!(t, "Responses: none yet");
        }
        if self.cache.requests > 0 {
            let _ = writeln!(t, "Cache hit rate: {}", percent(self.cache.hit_rate));
        }
        let _ = writeln!(
            t,
            "Daily limit reached: {} today",
            group(self.limit_reached.today)
        );
        let _ = write!(t, "Errors: {} total", group(self.errors.total));
        t
    }
}

/// Groups digits by thousands for a chat message.
///
/// ```
/// assert_eq!(botmetrics::summary::group(1234567), "1 234 567");
/// ```
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// `0.9871` → `98.7 %`.
pub fn percent(ratio: f64) -> String {
    format!("{:.1} %", ratio * 100.0)
}

/// `850` → `850 ms`, `1234` → `1.2 s`, `75000` → `1 min 15 s`.
pub fn duration(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        let s = (ms / 1000.0).round() as u64;
        format!("{} min {} s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_for_people() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(12345), "12 345");
        assert_eq!(group(1234567), "1 234 567");
        assert_eq!(percent(0.9871), "98.7 %");
        assert_eq!(duration(850.0), "850 ms");
        assert_eq!(duration(1234.0), "1.2 s");
        assert_eq!(duration(75_000.0), "1 min 15 s");
    }
}
