//! "Today" figures for the summary: counts since local midnight in the
//! configured time zone.
//!
//! Prometheus answers "today" with `increase()`, but the bot's own /metrics
//! command needs the number without a Prometheus, and it must survive a
//! restart. Each counter packs the local day and the count into one atomic
//! word, so a day change and an increment can never interleave: an event of
//! a new day starts the count afresh, and an event of an earlier day (a late
//! retry) is not counted as today's.

use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use chrono::{NaiveDate, TimeZone};
use chrono_tz::Tz;

/// Bits of the packed word that hold the count; the day number (days since
/// 1970-01-01, local) sits above them.
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// The local day that contains a range of unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DayRange {
    day: u32,
    start: i64,
    end: i64,
}

/// Maps unix seconds to local day numbers for one time zone, remembering the
/// current day so the hot path does no time zone arithmetic.
#[derive(Debug)]
pub struct Calendar {
    tz: Tz,
    current: RwLock<DayRange>,
}

impl Calendar {
    pub fn new(tz: Tz) -> Self {
        Calendar {
            tz,
            current: RwLock::new(Self::range_of(tz, chrono::Utc::now().timestamp())),
        }
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    fn range_of(tz: Tz, ts: i64) -> DayRange {
        let date = tz
            .timestamp_opt(ts, 0)
            .single()
            .map_or_else(|| epoch_day(ts), |t| t.date_naive());
        let start_of = |d: NaiveDate| {
            // Midnight may not exist (a DST jump at 00:00): the first instant of
            // the day is then the earliest valid local time after it.
            let midnight = d.and_hms_opt(0, 0, 0).unwrap_or_default();
            (0..=3)
                .find_map(|h| {
                    tz.from_local_datetime(&(midnight + chrono::Duration::hours(h)))
                        .earliest()
                })
                .map_or(midnight.and_utc().timestamp(), |t| t.timestamp())
        };
        let next = date.succ_opt().unwrap_or(date);
        let day = (date - NaiveDate::default())
            .num_days()
            .clamp(0, i64::from(u32::MAX)) as u32;
        DayRange {
            day,
            start: start_of(date),
            end: start_of(next),
        }
    }

    /// The local day number of `ts`.
    pub fn day_of(&self, ts: i64) -> u32 {
        let current = *self.current.read().unwrap_or_else(|e| e.into_inner());
        if (current.start..current.end).contains(&ts) {
            return current.day;
        }
        let range = Self::range_of(self.tz, ts);
        if range.day > current.day {
            *self.current.write().unwrap_or_else(|e| e.into_inner()) = range;
        }
        range.day
    }

    /// The calendar date of a day number, for storage and display.
    pub fn date(day: u32) -> NaiveDate {
        NaiveDate::default() + chrono::Days::new(u64::from(day))
    }

    pub fn day_number(date: NaiveDate) -> u32 {
        (date - NaiveDate::default())
            .num_days()
            .clamp(0, i64::from(u32::MAX)) as u32
    }
}

fn epoch_day(ts: i64) -> NaiveDate {
    chrono::DateTime::from_timestamp(ts, 0)
        .unwrap_or_default()
        .date_naive()
}

/// A count that belongs to one local day.
#[derive(Debug, Default)]
pub struct DailyCounter(AtomicU64);

impl DailyCounter {
    fn pack(day: u32, count: u64) -> u64 {
        (u64::from(day) << COUNT_BITS) | (count & COUNT_MASK)
    }

    fn unpack(word: u64) -> (u32, u64) {
        ((word >> COUNT_BITS) as u32, word & COUNT_MASK)
    }

    /// Adds `n` if `day` is the counter's day or later (a later day starts
    /// over). Earlier days are ignored: they are no longer "today".
    pub fn add_on(&self, day: u32, n: u64) {
        let _ = self.0.fetch_update(Relaxed, Relaxed, |word| {
            let (current, count) = Self::unpack(word);
            match day.cmp(&current) {
                std::cmp::Ordering::Equal => Some(Self::pack(day, count + n)),
                std::cmp::Ordering::Greater => Some(Self::pack(day, n)),
                std::cmp::Ordering::Less => None,
            }
        });
    }

    /// The count for `day`: zero when the counter holds another day.
    pub fn get_on(&self, day: u32) -> u64 {
        match Self::unpack(self.0.load(Relaxed)) {
            (d, count) if d == day => count,
            _ => 0,
        }
    }

    /// The day and count held, for storage.
    pub fn load(&self) -> (u32, u64) {
        Self::unpack(self.0.load(Relaxed))
    }
}

/// The names under which today's counters are stored.
pub const TODAY_NAMES: [&str; 6] = [
    "messages",
    "users_registered",
    "limit_reached",
    "spend_micros",
    "feedback_rated",
    "feedback_positive",
];

/// One bot's "today" counters, sharing the process's calendar.
#[derive(Debug)]
pub struct Today {
    calendar: Arc<Calendar>,
    pub messages: TodayCounter,
    pub registered: TodayCounter,
    pub limit_reached: TodayCounter,
    /// Today's spend in micro-units (40 bits: up to 1.1 million currency
    /// units a day per bot).
    pub spend: TodayCounter,
    /// Answers rated today, and of them those the user liked.
    pub feedback_rated: TodayCounter,
    pub feedback_positive: TodayCounter,
}

/// A [`DailyCounter`] that knows its calendar.
#[derive(Debug)]
pub struct TodayCounter {
    calendar: Arc<Calendar>,
    counter: DailyCounter,
}

impl TodayCounter {
    pub fn add(&self, ts: i64, n: u64) {
        self.counter.add_on(self.calendar.day_of(ts), n);
    }

    /// Today's count at `now`.
    pub fn get_at(&self, now: i64) -> u64 {
        self.counter.get_on(self.calendar.day_of(now))
    }

    pub fn load(&self) -> (u32, u64) {
        self.counter.load()
    }

    pub fn restore(&self, day: u32, count: u64) {
        self.counter.add_on(day, count);
    }
}

impl Today {
    pub fn new(calendar: Arc<Calendar>) -> Self {
        let counter = || TodayCounter {
            calendar: calendar.clone(),
            counter: DailyCounter::default(),
        };
        Today {
            messages: counter(),
            registered: counter(),
            limit_reached: counter(),
            spend: counter(),
            feedback_rated: counter(),
            feedback_positive: counter(),
            calendar,
        }
    }

    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// The counters with their storage names.
    pub fn counters(&self) -> [(&'static str, &TodayCounter); 6] {
        [
            (TODAY_NAMES[0], &self.messages),
            (TODAY_NAMES[1], &self.registered),
            (TODAY_NAMES[2], &self.limit_reached),
            (TODAY_NAMES[3], &self.spend),
            (TODAY_NAMES[4], &self.feedback_rated),
            (TODAY_NAMES[5], &self.feedback_positive),
        ]
    }

    pub fn counter(&self, name: &str) -> Option<&TodayCounter> {
        self.counters()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_at_local_midnight_not_utc() {
        let tz: Tz = "Asia/Tokyo".parse().unwrap();
        let cal = Arc::new(Calendar::new(tz));
        let today = Today::new(cal.clone());
        // 2026-11-23 14:30 UTC is 23:30 in Tokyo; 15:30 UTC is 00:30 next day.
        let before = chrono::Utc
            .with_ymd_and_hms(2026, 11, 23, 14, 30, 0)
            .unwrap()
            .timestamp();
        let after = before + 3600;
        today.messages.add(before, 2);
        assert_eq!(today.messages.get_at(before), 2);
        assert_eq!(today.messages.get_at(after), 0, "a new local day has begun");
        today.messages.add(after, 1);
        assert_eq!(today.messages.get_at(after), 1);
        today.messages.add(before, 5);
        assert_eq!(
            today.messages.get_at(after),
            1,
            "a late event of yesterday is not today's"
        );
        let (day, count) = today.messages.load();
        assert_eq!(Calendar::date(day).to_string(), "2026-11-24");
        assert_eq!(count, 1);
    }

    #[test]
    fn days_follow_dst() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        // The night of 2026-10-25 has 25 hours in Berlin.
        let r = Calendar::range_of(
            tz,
            chrono::Utc
                .with_ymd_and_hms(2026, 10, 25, 12, 0, 0)
                .unwrap()
                .timestamp(),
        );
        assert_eq!(r.end - r.start, 25 * 3600);
        assert_eq!(Calendar::date(r.day).to_string(), "2026-10-25");
    }
}
