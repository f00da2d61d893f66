//! "Today" figures for the summary: counts since local midnight in the
//! configured time zone.
//!
//! Prometheus answers "today" with `increase()`, but the bot's own /metrics
//! command needs the number without a Prometheus, and it must survive a
//! restart. Each counter packs the local day and the count into one atomic
//! word, so a day change and an increment can never interleave: an event of
//! a new day starts the count afresh, and an event of an earlier day (a late
//! retry) is not counted as today's.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering, Ordering::Relaxed, fence};
use std::sync::{Arc, Mutex};

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

/// Unix seconds of the first instant of local date `d` in `tz`.
fn start_of(tz: Tz, d: NaiveDate) -> i64 {
    // Midnight may not exist (a DST jump at 00:00): the first instant of
    // the day is then the earliest valid local time after it.
    let midnight = d.and_hms_opt(0, 0, 0).unwrap_or_default();
    (0..=3)
        .find_map(|h| {
            tz.from_local_datetime(&(midnight + chrono::Duration::hours(h)))
                .earliest()
        })
        .map_or(midnight.and_utc().timestamp(), |t| t.timestamp())
}

/// The current day's range, read without a lock: every event of a batch
/// asks for its day once or twice, and a lock's two atomic read-modify-
/// writes per ask were a visible part of counting one. A sequence lock:
/// the writer makes `seq` odd while it writes, and a reader keeps a read
/// only if `seq` was even and unchanged around it.
#[derive(Debug)]
struct CurrentDay {
    seq: AtomicU64,
    day: AtomicU32,
    start: AtomicI64,
    end: AtomicI64,
    /// One writer at a time (a day change, once a day).
    writer: Mutex<()>,
}

impl CurrentDay {
    fn new(r: DayRange) -> Self {
        CurrentDay {
            seq: AtomicU64::new(0),
            day: AtomicU32::new(r.day),
            start: AtomicI64::new(r.start),
            end: AtomicI64::new(r.end),
            writer: Mutex::new(()),
        }
    }

    fn get(&self) -> DayRange {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            let r = DayRange {
                day: self.day.load(Relaxed),
                start: self.start.load(Relaxed),
                end: self.end.load(Relaxed),
            };
            fence(Ordering::Acquire);
            if before & 1 == 0 && self.seq.load(Relaxed) == before {
                return r;
            }
            std::hint::spin_loop();
        }
    }

    /// Moves to `r` if it is a later day than the current one.
    fn advance(&self, r: DayRange) {
        let _one = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if r.day <= self.day.load(Relaxed) {
            return;
        }
        let seq = self.seq.load(Relaxed);
        self.seq.store(seq + 1, Relaxed);
        fence(Ordering::Release);
        self.day.store(r.day, Relaxed);
        self.start.store(r.start, Relaxed);
        self.end.store(r.end, Relaxed);
        self.seq.store(seq + 2, Ordering::Release);
    }
}

/// Maps unix seconds to local day numbers for one time zone, remembering the
/// current day so the hot path does no time zone arithmetic.
#[derive(Debug)]
pub struct Calendar {
    tz: Tz,
    current: CurrentDay,
}

impl Calendar {
    pub fn new(tz: Tz) -> Self {
        Calendar {
            tz,
            current: CurrentDay::new(Self::range_of(tz, chrono::Utc::now().timestamp())),
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
        let start_of = |d: NaiveDate| start_of(tz, d);
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

    /// Unix seconds of the first instant of local day `day`.
    pub fn start_of_day(&self, day: u32) -> i64 {
        start_of(self.tz, Self::date(day))
    }

    /// The local day number of `ts`.
    pub fn day_of(&self, ts: i64) -> u32 {
        let current = self.current.get();
        if (current.start..current.end).contains(&ts) {
            return current.day;
        }
        let range = Self::range_of(self.tz, ts);
        if range.day > current.day {
            self.current.advance(range);
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

/// How long a stored count stays current: what a restore takes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Today only.
    Day,
    /// The local month: the count's day is the month's first.
    Month,
    /// Seven days, today included: one of seven slots, by day number.
    Week,
}

impl Keep {
    /// Whether a count stored for `day` still counts on `today`.
    fn current(self, day: u32, today: u32) -> bool {
        match self {
            Keep::Day => day == today,
            Keep::Month => day == month_start(today),
            Keep::Week => day <= today && today - day < 7,
        }
    }
}

/// The day number of the first day of `day`'s month. Integer arithmetic (the days-to-date
/// step of Howard Hinnant's `civil_from_days`) rather than calendar types:
/// it runs for every priced answer, and the chrono round trip was a visible
/// share of a batch's count. `month_start_is_the_calendars` holds it to chrono.
fn month_start(day: u32) -> u32 {
    // Days since 0000-03-01, in 400-year eras of 146,097 days; a March-based
    // year puts the leap day last.
    let z = i64::from(day) + 719_468;
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month = (5 * day_of_year + 2) / 153;
    let day_of_month = day_of_year - (153 * month + 2) / 5;
    day - day_of_month as u32
}

/// A count per day for the last seven days: slot `day % 7` holds its day,
/// so a day's slot is taken over a week later and nothing else is kept.
#[derive(Debug, Default)]
pub struct WeekCounter([DailyCounter; 7]);

impl WeekCounter {
    fn add_on(&self, day: u32, n: u64) {
        self.0[day as usize % 7].add_on(day, n);
    }

    /// The seven days ending on `today`.
    fn sum_to(&self, today: u32) -> u64 {
        self.0
            .iter()
            .map(|slot| slot.load())
            .filter(|(day, _)| Keep::Week.current(*day, today))
            .map(|(_, count)| count)
            .sum()
    }
}

/// The names under which the counters are stored, in [`Today::counters`]'
/// order, with how long each stays current.
const STORED: [(&str, Keep); STORED_LEN] = [
    ("messages", Keep::Day),
    ("users_registered", Keep::Day),
    ("limit_reached", Keep::Day),
    ("spend_micros", Keep::Day),
    ("feedback_rated", Keep::Day),
    ("feedback_positive", Keep::Day),
    ("spend_month_micros", Keep::Month),
    ("feedback_rated_7d.0", Keep::Week),
    ("feedback_rated_7d.1", Keep::Week),
    ("feedback_rated_7d.2", Keep::Week),
    ("feedback_rated_7d.3", Keep::Week),
    ("feedback_rated_7d.4", Keep::Week),
    ("feedback_rated_7d.5", Keep::Week),
    ("feedback_rated_7d.6", Keep::Week),
    ("feedback_positive_7d.0", Keep::Week),
    ("feedback_positive_7d.1", Keep::Week),
    ("feedback_positive_7d.2", Keep::Week),
    ("feedback_positive_7d.3", Keep::Week),
    ("feedback_positive_7d.4", Keep::Week),
    ("feedback_positive_7d.5", Keep::Week),
    ("feedback_positive_7d.6", Keep::Week),
    ("users_new", Keep::Day),
    ("users_returning", Keep::Day),
    ("sessions", Keep::Day),
    ("session_messages", Keep::Day),
    ("session_seconds.0", Keep::Day),
    ("session_seconds.1", Keep::Day),
    ("session_seconds.2", Keep::Day),
    ("session_seconds.3", Keep::Day),
    ("session_seconds.4", Keep::Day),
    ("session_seconds.5", Keep::Day),
    ("session_seconds.6", Keep::Day),
    ("session_seconds.7", Keep::Day),
    ("session_seconds.8", Keep::Day),
    ("session_seconds.9", Keep::Day),
    ("session_seconds.10", Keep::Day),
    ("session_seconds.11", Keep::Day),
];

/// How many counters [`Today::counters`] lists.
pub const STORED_LEN: usize = 37;
/// Where the session counters start in [`STORED`].
const SESSIONS_AT: usize = 21;

/// The oldest day a stored count of any kind can still be current on
/// `today`: the month's first day or six days ago, whichever is earlier.
pub fn oldest_current(today: u32) -> u32 {
    month_start(today).min(today.saturating_sub(6))
}

/// One bot's "today" counters, sharing the process's calendar, and the
/// few longer ones the summary reads (this month's spend, the last seven
/// days' ratings), kept the same way.
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
    /// This month's spend in micro-units (40 bits: 1.1 million units).
    spend_month: DailyCounter,
    rated_week: WeekCounter,
    positive_week: WeekCounter,
    /// Users whose first event (within the user book's memory) was today,
    /// and users of an earlier first day back today.
    pub users_new: TodayCounter,
    pub users_returning: TodayCounter,
    /// Sessions that ended today (their last event was today), their
    /// messages, and their durations by `users::SESSION_DURATION_BUCKETS`
    /// (one more for longer ones), for today's median.
    pub sessions: TodayCounter,
    pub session_messages: TodayCounter,
    session_seconds: [DailyCounter; 12],
}

/// A [`DailyCounter`] that knows its calendar.
#[derive(Debug)]
pub struct TodayCounter {
    calendar: Arc<Calendar>,
    counter: DailyCounter,
}

impl TodayCounter {
    pub fn add(&self, ts: i64, n: u64) {
        self.add_on(self.calendar.day_of(ts), n);
    }

    /// [`Self::add`] for a local day already known.
    pub fn add_on(&self, day: u32, n: u64) {
        self.counter.add_on(day, n);
    }

    /// Today's count at `now`.
    pub fn get_at(&self, now: i64) -> u64 {
        self.counter.get_on(self.calendar.day_of(now))
    }

    pub fn load(&self) -> (u32, u64) {
        self.counter.load()
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
            spend_month: DailyCounter::default(),
            rated_week: WeekCounter::default(),
            positive_week: WeekCounter::default(),
            users_new: counter(),
            users_returning: counter(),
            sessions: counter(),
            session_messages: counter(),
            session_seconds: Default::default(),
            calendar,
        }
    }

    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// Counts spend of an event at `ts`: today's and this month's.
    pub fn add_spend(&self, ts: i64, micros: u64) {
        let day = self.calendar.day_of(ts);
        self.spend.counter.add_on(day, micros);
        self.spend_month.add_on(month_start(day), micros);
    }

    /// Counts a rating at `ts`: today's and the week's.
    pub fn add_feedback(&self, ts: i64, positive: bool) {
        let day = self.calendar.day_of(ts);
        self.feedback_rated.counter.add_on(day, 1);
        self.rated_week.add_on(day, 1);
        if positive {
            self.feedback_positive.counter.add_on(day, 1);
            self.positive_week.add_on(day, 1);
        }
    }

    /// Counts a session that ended, on the day of its last event.
    pub fn add_session(&self, last_ts: i64, seconds: u32, messages: u16) {
        let day = self.calendar.day_of(last_ts);
        self.sessions.counter.add_on(day, 1);
        self.session_messages
            .counter
            .add_on(day, u64::from(messages));
        let bucket = crate::metrics::users::SESSION_DURATION_BUCKETS
            .iter()
            .position(|b| f64::from(seconds) <= *b)
            .unwrap_or(self.session_seconds.len() - 1);
        self.session_seconds[bucket].add_on(day, 1);
    }

    /// The median duration of today's ended sessions at `now`, seconds,
    /// interpolated within its bucket; `None` without a session.
    pub fn session_median_at(&self, now: i64) -> Option<f64> {
        let day = self.calendar.day_of(now);
        let counts: Vec<u64> = self.session_seconds.iter().map(|c| c.get_on(day)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let bounds = crate::metrics::users::SESSION_DURATION_BUCKETS;
        let half = total as f64 / 2.0;
        let mut below = 0.0;
        for (i, n) in counts.iter().enumerate() {
            let n = *n as f64;
            if below + n >= half && n > 0.0 {
                let low = if i == 0 { 0.0 } else { bounds[i - 1] };
                // Past the last bound there is no upper edge: its low edge.
                let Some(high) = bounds.get(i) else {
                    return Some(low);
                };
                return Some(low + (high - low) * (half - below) / n);
            }
            below += n;
        }
        None
    }

    /// This month's spend at `now`, in micro-units.
    pub fn spend_month_at(&self, now: i64) -> u64 {
        self.spend_month
            .get_on(month_start(self.calendar.day_of(now)))
    }

    /// Answers rated, and liked, in the seven local days ending at `now`.
    pub fn feedback_week_at(&self, now: i64) -> (u64, u64) {
        let today = self.calendar.day_of(now);
        (
            self.rated_week.sum_to(today),
            self.positive_week.sum_to(today),
        )
    }

    /// Every stored counter with its storage name: its day (the month's
    /// first for the month's count) and value are what is stored.
    pub fn counters(&self) -> [(&'static str, &DailyCounter); STORED_LEN] {
        let mut cells: [&DailyCounter; STORED_LEN] = [&self.spend_month; STORED_LEN];
        cells[0] = &self.messages.counter;
        cells[1] = &self.registered.counter;
        cells[2] = &self.limit_reached.counter;
        cells[3] = &self.spend.counter;
        cells[4] = &self.feedback_rated.counter;
        cells[5] = &self.feedback_positive.counter;
        // cells[6] is the month's spend.
        for slot in 0..7 {
            cells[7 + slot] = &self.rated_week.0[slot];
            cells[14 + slot] = &self.positive_week.0[slot];
        }
        cells[SESSIONS_AT] = &self.users_new.counter;
        cells[SESSIONS_AT + 1] = &self.users_returning.counter;
        cells[SESSIONS_AT + 2] = &self.sessions.counter;
        cells[SESSIONS_AT + 3] = &self.session_messages.counter;
        for (i, c) in self.session_seconds.iter().enumerate() {
            cells[SESSIONS_AT + 4 + i] = c;
        }
        std::array::from_fn(|i| (STORED[i].0, cells[i]))
    }

    /// Adds a stored count back in, if it is still current on `today`
    /// (yesterday's count is not today's; it stays stored until replaced).
    /// `None` for a name this build does not store.
    pub fn restore(&self, name: &str, day: u32, value: u64, today: u32) -> Option<bool> {
        let i = STORED.iter().position(|(n, _)| *n == name)?;
        // A week's slot holds only days of its own number.
        let slot_fits = STORED[i].1 != Keep::Week || day as usize % 7 == (i - 7) % 7;
        let current = slot_fits && STORED[i].1.current(day, today);
        if current {
            self.counters()[i].1.add_on(day, value);
        }
        Some(current)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn month_start_is_the_calendars() {
        use chrono::Datelike;
        // 1970 to past 2500: every day, leap years and centuries included.
        for day in 0..200_000 {
            let date = super::Calendar::date(day);
            let first = super::Calendar::day_number(date.with_day(1).unwrap());
            assert_eq!(super::month_start(day), first, "{date}");
        }
    }

    #[test]
    fn the_current_day_is_never_read_torn() {
        // Readers on other threads while the day moves on 20,000 times:
        // every range read is one the writer wrote whole.
        let current = Arc::new(CurrentDay::new(DayRange {
            day: 1,
            start: 86_400,
            end: 2 * 86_400,
        }));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (current, stop, started) = (current.clone(), stop.clone(), started.clone());
                std::thread::spawn(move || {
                    started.fetch_add(1, Relaxed);
                    let mut reads = 0u64;
                    while !stop.load(Relaxed) {
                        let r = current.get();
                        assert_eq!(r.start, i64::from(r.day) * 86_400, "{r:?}");
                        assert_eq!(r.end, r.start + 86_400, "{r:?}");
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        while started.load(Relaxed) < 2 {
            std::thread::yield_now();
        }
        for day in 2..20_000u32 {
            let start = i64::from(day) * 86_400;
            current.advance(DayRange {
                day,
                start,
                end: start + 86_400,
            });
        }
        // An earlier day never moves it back.
        current.advance(DayRange {
            day: 5,
            start: 5 * 86_400,
            end: 6 * 86_400,
        });
        stop.store(true, Relaxed);
        for r in readers {
            assert!(r.join().expect("reader") > 0);
        }
        assert_eq!(current.get().day, 19_999);
    }

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

    fn noon(y: i32, m: u32, d: u32) -> i64 {
        chrono::Utc
            .with_ymd_and_hms(y, m, d, 12, 0, 0)
            .unwrap()
            .timestamp()
    }

    #[test]
    fn the_month_starts_over_on_the_first_and_ignores_earlier_months() {
        let today = Today::new(Arc::new(Calendar::new(chrono_tz::UTC)));
        today.add_spend(noon(2026, 11, 30), 7);
        today.add_spend(noon(2026, 12, 1), 5);
        today.add_spend(noon(2026, 11, 29), 100);
        today.add_spend(noon(2026, 12, 31), 2);
        assert_eq!(today.spend_month_at(noon(2026, 12, 31)), 7);
        assert_eq!(today.spend_month_at(noon(2027, 1, 1)), 0);
        assert_eq!(today.spend.get_at(noon(2026, 12, 31)), 2);
    }

    #[test]
    fn the_week_is_today_and_the_six_days_before() {
        let today = Today::new(Arc::new(Calendar::new(chrono_tz::UTC)));
        for (day, positive) in [(1, true), (2, false), (7, true), (8, true), (8, false)] {
            today.add_feedback(noon(2026, 12, day), positive);
        }
        // On the 8th: the 2nd to the 8th (the 1st is a week old).
        assert_eq!(today.feedback_week_at(noon(2026, 12, 8)), (4, 2));
        // On the 14th only the 8th is left; on the 15th nothing.
        assert_eq!(today.feedback_week_at(noon(2026, 12, 14)), (2, 1));
        assert_eq!(today.feedback_week_at(noon(2026, 12, 15)), (0, 0));
        // The 15th takes over the 8th's slot.
        today.add_feedback(noon(2026, 12, 15), true);
        assert_eq!(today.feedback_week_at(noon(2026, 12, 15)), (1, 1));
    }

    #[test]
    fn a_restore_takes_back_only_what_is_still_current() {
        let source = Today::new(Arc::new(Calendar::new(chrono_tz::UTC)));
        source.add_spend(noon(2026, 12, 2), 9);
        source.add_feedback(noon(2026, 12, 3), true);
        source.add_feedback(noon(2026, 12, 9), false);
        source.messages.add(noon(2026, 12, 9), 4);
        let on = |y, m, d| Calendar::day_number(NaiveDate::from_ymd_opt(y, m, d).unwrap());
        let restore_on = |today: u32| {
            let target = Today::new(Arc::new(Calendar::new(chrono_tz::UTC)));
            for (name, counter) in source.counters() {
                let (day, value) = counter.load();
                if value > 0 {
                    assert!(target.restore(name, day, value, today).is_some(), "{name}");
                }
            }
            target
        };
        let t = restore_on(on(2026, 12, 9));
        assert_eq!(t.spend_month_at(noon(2026, 12, 9)), 9);
        assert_eq!(t.feedback_week_at(noon(2026, 12, 9)), (2, 1));
        assert_eq!(t.messages.get_at(noon(2026, 12, 9)), 4);
        // A day later the 3rd is past the week and the messages are
        // yesterday's; a month later the spend is last month's.
        let t = restore_on(on(2026, 12, 10));
        assert_eq!(t.feedback_week_at(noon(2026, 12, 10)), (1, 0));
        assert_eq!(t.messages.get_at(noon(2026, 12, 10)), 0);
        let t = restore_on(on(2027, 1, 1));
        assert_eq!(t.spend_month_at(noon(2027, 1, 1)), 0);
        // A slot stored with a day not its own is refused, and a name this
        // build does not store is unknown.
        let t = Today::new(Arc::new(Calendar::new(chrono_tz::UTC)));
        let day = on(2026, 12, 9);
        let wrong = format!("feedback_rated_7d.{}", (day as usize + 1) % 7);
        assert_eq!(t.restore(&wrong, day, 3, day), Some(false));
        assert_eq!(t.restore("nonsense", day, 3, day), None);
    }
}
