//! One bot's series: every `bot_*` family of the design, with its closed
//! label sets allocated up front (so each exists at 0 from start-up) and its
//! free-form labels capped.
//!
//! About 600 lines, one concern: each family appears in four places here
//! (its cells, `apply`, `visit`, `restore_*`), side by side so that a new
//! family cannot be counted without being exposed, stored and restored.

use std::sync::Arc;

use crate::event::{
    CacheResult, CostSource, DEFAULT_CACHE, Decision, Event, EventBody, Role, Score, Status,
    TokenKind, UNKNOWN_MODEL,
};
use crate::metrics::active::ActiveUsers;
use crate::metrics::cells::{Counter, Family, Histogram, HistogramSnapshot, Micros};
use crate::metrics::today::Today;
use crate::metrics::users::{
    BookDelta, BookLimits, Cohort, RETENTION_DAYS, SESSION_DURATION_BUCKETS,
    SESSION_MESSAGE_BUCKETS, Session, UserBook,
};

/// How a family is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric family's name, help and label names (`bot` first, always).
#[derive(Debug)]
pub struct FamilyDesc {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

macro_rules! family {
    ($id:ident, $name:literal, $kind:ident, [$($label:literal),*], $help:literal) => {
        pub static $id: FamilyDesc =
            FamilyDesc { name: $name, help: $help, kind: Kind::$kind, labels: &["bot" $(, $label)*] };
    };
}

family!(
    MESSAGES,
    "bot_messages_total",
    Counter,
    ["role"],
    "Messages handled by the bot, by who wrote them."
);
family!(
    RESPONSES,
    "bot_responses_total",
    Counter,
    ["status"],
    "LLM responses, by outcome."
);
family!(
    RESPONSE_DURATION,
    "bot_response_duration_seconds",
    Histogram,
    [],
    "Time to produce an LLM response."
);
family!(
    DB_QUERIES,
    "bot_db_queries_per_message",
    Histogram,
    [],
    "Database queries the bot ran per message."
);
family!(
    CACHE,
    "bot_cache_requests_total",
    Counter,
    ["cache", "result"],
    "Cache lookups, by cache and outcome."
);
family!(
    REGISTERED,
    "bot_users_registered_total",
    Counter,
    [],
    "Users who registered with the bot."
);
family!(
    CONSENT,
    "bot_consent_total",
    Counter,
    ["decision"],
    "Consent decisions, granted or denied."
);
family!(
    LIMIT_REACHED,
    "bot_limit_reached_total",
    Counter,
    [],
    "Times a user hit the daily limit."
);
family!(
    ERRORS,
    "bot_errors_total",
    Counter,
    ["kind"],
    "Errors the bot reported, by kind."
);
family!(
    LLM_TOKENS,
    "bot_llm_tokens_total",
    Counter,
    ["model", "kind"],
    "LLM tokens spent, by model and kind (prompt includes cached and cache_write)."
);
family!(
    LLM_COST,
    "bot_llm_cost_total",
    Counter,
    ["model", "source"],
    "What LLM calls cost, in the currency named by --currency: reported by the bot, or from the price table."
);
family!(
    LLM_UNPRICED,
    "bot_llm_unpriced_tokens_total",
    Counter,
    ["model"],
    "Tokens of calls with no reported cost and a model the price table does not know: spend is incomplete while this grows."
);
family!(
    LLM_TTFT,
    "bot_llm_ttft_seconds",
    Histogram,
    [],
    "Time to the first token of a streamed LLM answer."
);
family!(
    FEEDBACK,
    "bot_feedback_total",
    Counter,
    ["score"],
    "Answers rated by users: thumbs (-1, +1) or a 1-5 rating."
);
family!(
    CUSTOM,
    "bot_custom_events_total",
    Counter,
    ["name"],
    "Custom events, summed by their value."
);
family!(
    USERS_NEW,
    "bot_users_new_total",
    Counter,
    [],
    "Users seen for the first time (within --user-memory): their first event."
);
family!(
    SESSIONS,
    "bot_sessions_total",
    Counter,
    [],
    "Sessions that ended: runs of a user's events with no gap over --session-gap."
);
family!(
    SESSION_DURATION,
    "bot_session_duration_seconds",
    Histogram,
    [],
    "Duration of ended sessions, first event to last."
);
family!(
    SESSION_MESSAGES,
    "bot_session_messages",
    Histogram,
    [],
    "Messages users wrote in ended sessions."
);
family!(
    RETENTION,
    "bot_retention_ratio",
    Gauge,
    ["day"],
    "Of the latest complete cohort (users whose first day it was), the share active again on day +1, +7 or +30; 0 for an empty cohort."
);
family!(
    ACTIVE_USERS,
    "bot_active_users",
    Gauge,
    ["window"],
    "Distinct active users in a rolling window (HyperLogLog estimate)."
);

/// Every family, in exposition order.
pub static FAMILIES: &[&FamilyDesc] = &[
    &MESSAGES,
    &RESPONSES,
    &RESPONSE_DURATION,
    &DB_QUERIES,
    &CACHE,
    &REGISTERED,
    &CONSENT,
    &LIMIT_REACHED,
    &ERRORS,
    &LLM_TOKENS,
    &LLM_COST,
    &LLM_UNPRICED,
    &LLM_TTFT,
    &FEEDBACK,
    &CUSTOM,
    &USERS_NEW,
    &SESSIONS,
    &SESSION_DURATION,
    &SESSION_MESSAGES,
    &RETENTION,
    &ACTIVE_USERS,
];

/// Whether a family is derived from other state (sketches, the user book)
/// rather than counted: such gauges are never restored, synced as deltas or
/// summed, only computed again.
pub fn derived(metric: &str) -> bool {
    metric == ACTIVE_USERS.name || metric == RETENTION.name
}

/// Whether a series is counted by the user book. With the book shared in
/// cluster mode Redis counts these, so a replica never sends them.
pub fn of_book(metric: &str) -> bool {
    metric == USERS_NEW.name
        || metric == SESSIONS.name
        || metric.starts_with(SESSION_DURATION.name)
        || metric.starts_with(SESSION_MESSAGES.name)
}

/// Response-time buckets for LLM calls: 50 ms to a minute.
pub const RESPONSE_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 45.0, 60.0,
];
/// Time to first token of a streamed answer: 50 ms to 30 s.
pub const TTFT_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0];
/// Database queries per message: 1 to 50.
pub const DB_QUERY_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 50.0];

/// The bounds of a histogram family of this build, by name.
pub fn histogram_bounds(family: &str) -> Option<&'static [f64]> {
    match family {
        "bot_response_duration_seconds" => Some(RESPONSE_BUCKETS),
        "bot_db_queries_per_message" => Some(DB_QUERY_BUCKETS),
        "bot_session_duration_seconds" => Some(SESSION_DURATION_BUCKETS),
        "bot_session_messages" => Some(SESSION_MESSAGE_BUCKETS),
        _ => None,
    }
}

/// Receives every series of a bot, one call per series. One walk serves the
/// exposition, the store's snapshot and the series count, so they cannot
/// disagree about what exists.
pub trait Visitor {
    /// Whether this walk wants `family`'s series: a walk that writes one
    /// family at a time skips reading (histogram snapshots, sketch
    /// estimates, label maps) what it would drop. A visitor must still
    /// ignore series it did not want: this is a hint, checked where it
    /// saves work.
    fn wants(&self, _family: &'static FamilyDesc) -> bool {
        true
    }
    fn scalar(&mut self, family: &'static FamilyDesc, labels: &[&str], value: f64);
    fn histogram(
        &mut self,
        family: &'static FamilyDesc,
        labels: &[&str],
        value: &HistogramSnapshot,
    );
}

/// A bot's own self-metric series, looked up once at start so the hot path
/// does not hash label values per request. Free-form label families are
/// capped by `--max-label-values`; each has its own overflow counter so an
/// operator sees which label overflowed.
#[derive(Clone)]
pub struct SelfCounters {
    pub accepted: prometheus::IntCounter,
    pub duplicates: prometheus::IntCounter,
    pub overflow_kind: prometheus::IntCounter,
    pub overflow_name: prometheus::IntCounter,
    pub overflow_model: prometheus::IntCounter,
    pub overflow_cache: prometheus::IntCounter,
    /// The user book's gauges and evictions, set by each scan of the book.
    pub book_users: prometheus::IntGauge,
    pub book_fill: prometheus::Gauge,
    pub book_evicted: prometheus::IntCounter,
}

pub struct BotMetrics {
    pub bot: Arc<str>,
    messages: [Counter; 2],
    responses: [Counter; 4],
    response_duration: Histogram,
    db_queries: Histogram,
    cache: Family<[Counter; 2]>,
    registered: Counter,
    consent: [Counter; 2],
    limit_reached: Counter,
    errors: Family<Counter>,
    /// Tokens, cost and unpriced tokens per model: one lookup per response.
    llm: Family<ModelCells>,
    ttft: Histogram,
    feedback: [Counter; 7],
    custom: Family<Counter>,
    users_new: Counter,
    sessions: Counter,
    session_duration: Histogram,
    session_messages: Histogram,
    /// Set by each scan of the book: the latest complete cohort's ratios,
    /// and every cohort (for `/v1/retention` and the summary).
    retention: [Counter; 3],
    cohorts: std::sync::RwLock<Arc<Vec<Cohort>>>,
    pub active: ActiveUsers,
    pub book: UserBook,
    /// Set in cluster mode once the book is shared: the users' runs since
    /// the last sync, which Redis merges into the one book of the bot (the
    /// local `book` is then off). See `cluster::book`.
    shared_book: std::sync::OnceLock<SharedBook>,
    pub today: Today,
    pub counters: SelfCounters,
    /// Set when the bot is wiped: these cells are no longer the bot's, and
    /// a request still holding them counts nothing.
    retired: std::sync::atomic::AtomicBool,
    /// Set after any series but the active-user estimates may have moved
    /// (an event, a restore, a session ended, a retention ratio changed),
    /// taken by a flush's cut: a quiet bot's series are not compared one by
    /// one with the store at every tick (see `persist::changed`). Set after
    /// the cells change and taken before they are read, so a change racing
    /// a cut is always seen by this cut or the next.
    touched: std::sync::atomic::AtomicBool,
}

/// A bot's shared book on this replica: what it saw since the last sync.
#[derive(Debug)]
struct SharedBook {
    gap: u32,
    /// Users the runs may hold at most (`--max-users-per-bot`): while
    /// Redis is away they wait here, and a user past the bound is left out
    /// of the shared book rather than let memory grow without end.
    max_users: usize,
    /// Users left out so, until the sync counts them.
    dropped: std::sync::atomic::AtomicU64,
    delta: std::sync::Mutex<BookDelta>,
}

impl SharedBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, BookDelta> {
        self.delta.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The user book as a run of events holds it: not yet locked, or locked
/// (this bot's own book, or in cluster mode the runs waiting for Redis)
/// until the run ends.
enum BookHold<'a> {
    Free,
    Held(HeldBook<'a>),
}

enum HeldBook<'a> {
    Own(crate::metrics::users::Held<'a>),
    Shared(&'a SharedBook, std::sync::MutexGuard<'a, BookDelta>),
}

impl<'a> BookHold<'a> {
    /// The book, locked at the first call.
    fn get(&mut self, bot: &'a BotMetrics) -> &mut HeldBook<'a> {
        if let BookHold::Free = self {
            *self = BookHold::Held(match bot.shared_book.get() {
                Some(shared) => HeldBook::Shared(shared, shared.lock()),
                None => HeldBook::Own(bot.book.held()),
            });
        }
        match self {
            BookHold::Held(held) => held,
            BookHold::Free => unreachable!("locked just above"),
        }
    }
}

/// What is counted per model: the three `bot_llm_*` families labelled by
/// model share one capped family, so a response costs one lookup and a
/// folded model is counted in `botmetrics_label_overflow_total` once.
#[derive(Debug, Default)]
struct ModelCells {
    tokens: [Counter; 5],
    cost: [Micros; 2],
    unpriced: Counter,
    /// Which families the model has appeared in (a model may report a
    /// cost and no tokens): [`TOKENS_SEEN`], [`UNPRICED_SEEN`], [`COST_SEEN`].
    seen: std::sync::atomic::AtomicU8,
}

const TOKENS_SEEN: u8 = 1;
const UNPRICED_SEEN: u8 = 2;
const COST_SEEN: u8 = 4;

impl ModelCells {
    fn see(&self, family: u8) {
        // A load first: the common case (seen already) writes nothing.
        if self.seen.load(std::sync::atomic::Ordering::Relaxed) & family == 0 {
            self.seen
                .fetch_or(family, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn has(&self, family: u8) -> bool {
        self.seen.load(std::sync::atomic::Ordering::Relaxed) & family != 0
    }
}

impl BotMetrics {
    pub fn new(
        bot: Arc<str>,
        max_label_values: usize,
        counters: SelfCounters,
        today: Today,
        book: BookLimits,
    ) -> Self {
        let metrics = BotMetrics {
            bot,
            messages: Default::default(),
            responses: Default::default(),
            response_duration: Histogram::new(RESPONSE_BUCKETS),
            db_queries: Histogram::new(DB_QUERY_BUCKETS),
            cache: Family::new(max_label_values, counters.overflow_cache.clone()),
            registered: Counter::default(),
            consent: Default::default(),
            limit_reached: Counter::default(),
            errors: Family::new(max_label_values, counters.overflow_kind.clone()),
            llm: Family::new(max_label_values, counters.overflow_model.clone()),
            ttft: Histogram::new(TTFT_BUCKETS),
            feedback: Default::default(),
            custom: Family::new(max_label_values, counters.overflow_name.clone()),
            users_new: Counter::default(),
            sessions: Counter::default(),
            session_duration: Histogram::new(SESSION_DURATION_BUCKETS),
            session_messages: Histogram::new(SESSION_MESSAGE_BUCKETS),
            retention: Default::default(),
            cohorts: Default::default(),
            active: ActiveUsers::new(),
            book: UserBook::new(book),
            shared_book: std::sync::OnceLock::new(),
            today,
            counters,
            retired: Default::default(),
            touched: std::sync::atomic::AtomicBool::new(true),
        };
        // The cache that events without a `cache` name count in exists
        // from start-up, like every closed label set.
        metrics.cache.with(DEFAULT_CACHE, |_| ());
        metrics
    }

    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Marks the bot's series as possibly moved: the next flush compares
    /// them all with the store. Called after the change.
    pub fn touch(&self) {
        self.touched
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether any series but the active-user estimates may have moved
    /// since the last call; clears the mark. Called before the cells are
    /// read.
    pub fn take_touched(&self) -> bool {
        self.touched
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// True once the bot was wiped (read under the ingest gate, which the
    /// wipe held exclusively while it set it).
    pub fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts one checked event (see [`Self::apply_all`]).
    pub fn apply(&self, event: &Event<'_>) {
        self.apply_all(std::iter::once(event));
    }

    /// Counts checked events, in order. Lock-free but for the shared read
    /// lock of a free-form family and the user book, which is locked once
    /// for all of them (at their first user) rather than once each; never
    /// touches the store.
    pub fn apply_all<'e, 'b: 'e>(&self, events: impl IntoIterator<Item = &'e Event<'b>>) {
        /// A run's users (hash, unix seconds), and one sketch's share.
        type Users = (Vec<(u64, i64)>, Vec<u64>);
        thread_local! {
            /// Kept between requests, so counting allocates nothing.
            static USERS: std::cell::RefCell<Users> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        USERS.with_borrow_mut(|(users, scratch)| {
            users.clear();
            let mut book = BookHold::Free;
            let mut tally = Tally::new(self);
            for event in events {
                self.apply_one(event, &mut book, users, &mut tally);
            }
            drop(book);
            drop(tally);
            // The sketches take the run's users together: each ring and
            // sketch read once, not once per event.
            self.active.insert_all(users, scratch);
        });
        self.touch();
    }

    fn apply_one<'a>(
        &'a self,
        event: &Event<'_>,
        book: &mut BookHold<'a>,
        users: &mut Vec<(u64, i64)>,
        tally: &mut Tally<'_>,
    ) {
        if let Some(user) = event.user {
            if event.body == EventBody::Forget {
                match book.get(self) {
                    HeldBook::Shared(_, delta) => delta.forget(user.0),
                    HeldBook::Own(held) => {
                        held.forget(user.0);
                    }
                }
                return;
            }
            users.push((user.0, event.ts));
            self.note_user(user.0, event, book);
        }
        match &event.body {
            EventBody::Message { role, db_queries } => {
                tally.messages[role.index()] += 1;
                let day = self.today.calendar().day_of(event.ts);
                if let Some((day, n)) = tally.today_messages.add(day) {
                    self.today.messages.add_on(day, n);
                }
                if let Some(q) = db_queries {
                    self.db_queries.observe(f64::from(*q));
                }
            }
            EventBody::Response {
                status,
                duration_seconds,
                model,
                tokens,
                ttft_seconds,
                cost,
                ..
            } => {
                tally.responses[status.index()] += 1;
                self.response_duration.observe(*duration_seconds);
                if let Some(ttft) = ttft_seconds {
                    self.ttft.observe(*ttft);
                }
                let model = model.as_ref().map_or(UNKNOWN_MODEL, |m| m.as_str());
                // A response with neither names no model series.
                if tokens.is_some() || cost.is_some() {
                    self.llm.with(model, |c| {
                        if let Some(t) = tokens {
                            c.see(TOKENS_SEEN);
                            for (cell, n) in c.tokens.iter().zip(t.by_kind()) {
                                if n > 0 {
                                    cell.add(n as f64);
                                }
                            }
                        }
                        match (cost, tokens) {
                            (Some(cost), _) => {
                                c.see(COST_SEEN);
                                c.cost[cost.source.index()].add(cost.micros);
                            }
                            // Tokens and no price: never counted as free.
                            (None, Some(t)) => {
                                c.see(UNPRICED_SEEN);
                                c.unpriced.add(t.total() as f64);
                            }
                            (None, None) => {}
                        }
                    });
                }
                if let Some(cost) = cost {
                    self.today.add_spend(event.ts, cost.micros);
                }
            }
            EventBody::Feedback { score, .. } => {
                self.feedback[score.index()].add(1.0);
                self.today.add_feedback(event.ts, score.is_positive());
            }
            EventBody::Cache { result, cache } => self
                .cache
                .with(cache.as_str(), |c| c[result.index()].add(1.0)),
            EventBody::UserRegistered => {
                self.registered.add(1.0);
                self.today.registered.add(event.ts, 1);
            }
            EventBody::Consent { decision } => self.consent[decision.index()].add(1.0),
            EventBody::LimitReached => {
                self.limit_reached.add(1.0);
                self.today.limit_reached.add(event.ts, 1);
            }
            EventBody::Error { kind } => self.errors.with(kind.as_str(), |c| c.add(1.0)),
            EventBody::Custom { name, value } => self.custom.with(name.as_str(), |c| c.add(*value)),
            // Without a user there is nothing to forget; a wipe acts on the
            // whole bot (`Metrics::wipe`), never on its cells.
            EventBody::Forget | EventBody::Wipe => {}
        }
    }

    /// The user book's part of an event: new, returning, a session ended.
    fn note_user<'a>(&'a self, user: u64, event: &Event<'_>, book: &mut BookHold<'a>) {
        let message = matches!(
            event.body,
            EventBody::Message {
                role: Role::User,
                ..
            }
        );
        let day = self.today.calendar().day_of(event.ts);
        let touched = match book.get(self) {
            HeldBook::Shared(shared, delta) => {
                // Redis decides new, returning and sessions for the cluster.
                if delta.users() >= shared.max_users && !delta.has(user) {
                    shared
                        .dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                delta.add(user, event.ts, day, message, shared.gap);
                return;
            }
            HeldBook::Own(held) => held.touch(user, event.ts, day, message),
        };
        if touched.new {
            self.users_new.add(1.0);
            self.today.users_new.add(event.ts, 1);
        }
        if touched.returning {
            self.today.users_returning.add(event.ts, 1);
        }
        if let Some(session) = touched.ended {
            self.end_session(session);
        }
    }

    /// Shares this bot's book through Redis (cluster mode): from now on
    /// events go to the runs [`BotMetrics::take_book_delta`] hands the sync,
    /// with sessions split at a gap over `gap` seconds.
    pub fn share_book(&self, gap: u32, max_users: usize) {
        let _ = self.shared_book.set(SharedBook {
            gap,
            max_users,
            dropped: Default::default(),
            delta: std::sync::Mutex::new(BookDelta::default()),
        });
    }

    /// Users left out of the shared book since the last call, because the
    /// runs waiting for Redis were at their bound.
    pub fn take_book_dropped(&self) -> u64 {
        self.shared_book.get().map_or(0, |s| {
            s.dropped.swap(0, std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// Whether this replica holds runs of `key` not synced yet.
    pub fn has_unsynced_runs(&self, key: u64) -> bool {
        self.shared_book.get().is_some_and(|s| s.lock().has(key))
    }

    /// The book's gap when it is shared, else `None`.
    pub fn shared_book_gap(&self) -> Option<u32> {
        self.shared_book.get().map(|s| s.gap)
    }

    /// The book's gap and bound when it is shared, else `None`.
    pub fn shared_book_limits(&self) -> Option<(u32, usize)> {
        self.shared_book.get().map(|s| (s.gap, s.max_users))
    }

    /// The runs and erasures since the last call (empty when the book is
    /// not shared). Taken under the ingest gate with the sync's cut, so a
    /// batch holds exactly the journal up to its mark.
    pub fn take_book_delta(&self) -> BookDelta {
        self.shared_book
            .get()
            .map(|s| std::mem::take(&mut *s.lock()))
            .unwrap_or_default()
    }

    fn end_session(&self, s: Session) {
        self.sessions.add(1.0);
        self.session_duration.observe(f64::from(s.seconds));
        self.session_messages.observe(f64::from(s.messages));
        self.today
            .add_session(i64::from(s.last_ts), s.seconds, s.messages);
        self.touch();
    }

    /// The periodic pass over the user book at unix seconds `now`: ends the
    /// sessions whose gap has passed, forgets users past memory, and counts
    /// the cohorts. Run with ingest's gate held shared, like a request, so
    /// a flush's cut never sees half of it.
    pub fn scan_users(&self, now: i64) -> crate::metrics::users::Scanned {
        let today = self.today.calendar().day_of(now);
        let scanned = self.book.scan(now, today);
        for s in &scanned.ended {
            self.end_session(*s);
        }
        self.set_cohorts(scanned.cohorts.clone(), today);
        scanned
    }

    /// Every cohort, as of a scan on local day `today` (this book's, or in
    /// cluster mode the lead's scan of Redis' book), and the gauges of the
    /// latest complete ones.
    /// How many rows the store keeps of this bot's series: one per scalar,
    /// and a histogram's bucket lines, sum and count.
    pub fn series_rows(&self) -> usize {
        struct Count(usize);
        impl Visitor for Count {
            fn scalar(&mut self, _: &'static FamilyDesc, _: &[&str], _: f64) {
                self.0 += 1;
            }
            fn histogram(&mut self, _: &'static FamilyDesc, _: &[&str], h: &HistogramSnapshot) {
                self.0 += h.cumulative.len() + 2;
            }
        }
        let mut count = Count(0);
        self.visit(&mut count);
        count.0
    }

    /// `bot_retention_ratio{day}` as `(day, ratio)`, while the book is on:
    /// gauges derived from the cohorts, which the cluster's writer stores
    /// beside the totals it reads from Redis.
    pub fn retention_ratios(&self) -> Option<[(&'static str, f64); 3]> {
        self.book.enabled().then(|| {
            let day = ["1", "7", "30"];
            std::array::from_fn(|i| (day[i], self.retention[i].get()))
        })
    }

    pub fn set_cohorts(&self, cohorts: Vec<Cohort>, today: u32) {
        // The latest complete cohort for day +N: its day +N has ended.
        for (i, n) in RETENTION_DAYS.iter().enumerate() {
            let ratio = today
                .checked_sub(n + 1)
                .and_then(|day| cohorts.iter().find(|c| c.day == day))
                .filter(|c| c.size > 0)
                .map_or(0.0, |c| f64::from(c.classic[i]) / f64::from(c.size));
            // Scanned every few seconds, the ratios move once a day: only a
            // move makes the next flush compare the bot's series.
            if self.retention[i].get() != ratio {
                self.retention[i].set(ratio);
                self.touch();
            }
        }
        *self.cohorts.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cohorts);
    }

    /// Counts what Redis' merge (or the lead's scan) found in this
    /// replica's batch: users new to the cluster and sessions that ended.
    /// Only this replica's `/metrics` sees them (summed across replicas
    /// like every counter); the sync never sends them back, Redis counted
    /// them already, and "today" is read from Redis.
    pub fn credit_book(&self, new_users: u64, sessions: &[(u32, u16)]) {
        self.users_new.add(new_users as f64);
        for &(seconds, messages) in sessions {
            self.sessions.add(1.0);
            self.session_duration.observe(f64::from(seconds));
            self.session_messages.observe(f64::from(messages));
        }
        self.touch();
    }

    /// Every cohort as of the last scan, oldest first.
    pub fn cohorts(&self) -> Arc<Vec<Cohort>> {
        self.cohorts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Walks every series of this bot in exposition order.
    pub fn visit(&self, v: &mut impl Visitor) {
        let bot = &*self.bot;
        for role in Role::ALL {
            v.scalar(
                &MESSAGES,
                &[bot, role.as_str()],
                self.messages[role.index()].get(),
            );
        }
        for status in Status::ALL {
            v.scalar(
                &RESPONSES,
                &[bot, status.as_str()],
                self.responses[status.index()].get(),
            );
        }
        if v.wants(&RESPONSE_DURATION) {
            v.histogram(
                &RESPONSE_DURATION,
                &[bot],
                &self.response_duration.snapshot(),
            );
        }
        if v.wants(&DB_QUERIES) {
            v.histogram(&DB_QUERIES, &[bot], &self.db_queries.snapshot());
        }
        if v.wants(&CACHE) {
            self.cache.for_each(|cache_name, cells| {
                for result in CacheResult::ALL {
                    v.scalar(
                        &CACHE,
                        &[bot, cache_name, result.as_str()],
                        cells[result.index()].get(),
                    );
                }
            });
        }
        v.scalar(&REGISTERED, &[bot], self.registered.get());
        for decision in Decision::ALL {
            v.scalar(
                &CONSENT,
                &[bot, decision.as_str()],
                self.consent[decision.index()].get(),
            );
        }
        v.scalar(&LIMIT_REACHED, &[bot], self.limit_reached.get());
        if v.wants(&ERRORS) {
            self.errors
                .for_each(|kind, c| v.scalar(&ERRORS, &[bot, kind], c.get()));
        }
        // Prompt and completion exist for every model named; the kinds and
        // sources most calls never have (cached, cache_write, reasoning; a
        // cost source a model was never counted under) appear with their
        // first count, so 1,000 bots do not carry thousands of series at 0.
        if v.wants(&LLM_TOKENS) || v.wants(&LLM_COST) || v.wants(&LLM_UNPRICED) {
            self.llm.for_each(|model, cells| {
                if cells.has(TOKENS_SEEN) {
                    for kind in TokenKind::ALL {
                        let value = cells.tokens[kind.index()].get();
                        if value > 0.0 || matches!(kind, TokenKind::Prompt | TokenKind::Completion)
                        {
                            v.scalar(&LLM_TOKENS, &[bot, model, kind.as_str()], value);
                        }
                    }
                }
                for source in CostSource::ALL {
                    let value = cells.cost[source.index()].get();
                    if value > 0.0 {
                        v.scalar(&LLM_COST, &[bot, model, source.as_str()], value);
                    }
                }
                if cells.has(UNPRICED_SEEN) {
                    v.scalar(&LLM_UNPRICED, &[bot, model], cells.unpriced.get());
                }
            });
        }
        // Optional families appear with their first event rather than at
        // 0 from start-up: a bot that never streams or never asks for
        // ratings carries none of their 21 series (1,000 such bots would
        // otherwise add 21,000 rows to every flush). Then all their label
        // values appear at once.
        if v.wants(&LLM_TTFT) {
            let ttft = self.ttft.snapshot();
            if ttft.count() > 0 {
                v.histogram(&LLM_TTFT, &[bot], &ttft);
            }
        }
        if self.feedback.iter().any(|c| c.get() > 0.0) {
            for score in Score::ALL {
                v.scalar(
                    &FEEDBACK,
                    &[bot, score.as_str()],
                    self.feedback[score.index()].get(),
                );
            }
        }
        if v.wants(&CUSTOM) {
            self.custom
                .for_each(|name, c| v.scalar(&CUSTOM, &[bot, name], c.get()));
        }
        // The book's series exist from start-up, as the closed sets do,
        // unless the book is off (`--user-memory 0`).
        if self.book.enabled() {
            v.scalar(&USERS_NEW, &[bot], self.users_new.get());
            v.scalar(&SESSIONS, &[bot], self.sessions.get());
            if v.wants(&SESSION_DURATION) {
                v.histogram(&SESSION_DURATION, &[bot], &self.session_duration.snapshot());
            }
            if v.wants(&SESSION_MESSAGES) {
                v.histogram(&SESSION_MESSAGES, &[bot], &self.session_messages.snapshot());
            }
            for (i, day) in ["1", "7", "30"].iter().enumerate() {
                v.scalar(&RETENTION, &[bot, day], self.retention[i].get());
            }
        }
        self.visit_timed(v);
    }

    /// The series that move with time alone, events or not: the active-user
    /// estimates, whose windows slide. The last of [`Self::visit`].
    pub fn visit_timed(&self, v: &mut impl Visitor) {
        if v.wants(&ACTIVE_USERS) {
            for (window, estimate) in self.active.estimates() {
                v.scalar(&ACTIVE_USERS, &[&*self.bot, window], estimate as f64);
            }
        }
    }

    /// Adds a stored counter value back into its series (the bot label
    /// already matched). Free-form label values are restored as stored,
    /// never folded into `other` (see `Family::with_restored`). Returns
    /// false for a series this build does not know, which the caller logs
    /// and skips.
    pub fn restore_scalar(&self, family: &str, labels: &[(&str, &str)], value: f64) -> bool {
        let restored = self.restore_scalar_cell(family, labels, value);
        self.touch();
        restored
    }

    fn restore_scalar_cell(&self, family: &str, labels: &[(&str, &str)], value: f64) -> bool {
        let label = |name: &str| labels.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let closed = |name: &str, all: &[&'static str]| {
            label(name).and_then(|v| all.iter().position(|a| *a == v))
        };
        let cell: Option<&Counter> = match family {
            "bot_messages_total" => closed("role", Role::NAMES).map(|i| &self.messages[i]),
            "bot_responses_total" => closed("status", Status::NAMES).map(|i| &self.responses[i]),
            "bot_users_registered_total" => Some(&self.registered),
            "bot_consent_total" => closed("decision", Decision::NAMES).map(|i| &self.consent[i]),
            "bot_limit_reached_total" => Some(&self.limit_reached),
            "bot_users_new_total" => Some(&self.users_new),
            "bot_sessions_total" => Some(&self.sessions),
            "bot_feedback_total" => closed("score", Score::NAMES).map(|i| &self.feedback[i]),
            "bot_llm_cost_total" => {
                return match (label("model"), closed("source", CostSource::NAMES)) {
                    (Some(model), Some(i)) => {
                        self.llm.with_restored(model, |c| {
                            c.see(COST_SEEN);
                            c.cost[i].restore(value);
                        });
                        true
                    }
                    _ => false,
                };
            }
            "bot_llm_unpriced_tokens_total" => {
                return match label("model") {
                    Some(model) => {
                        self.llm.with_restored(model, |c| {
                            c.see(UNPRICED_SEEN);
                            c.unpriced.add(value);
                        });
                        true
                    }
                    None => false,
                };
            }
            "bot_cache_requests_total" => {
                return match (label("cache"), closed("result", CacheResult::NAMES)) {
                    (Some(cache), Some(i)) => {
                        self.cache.with_restored(cache, |c| c[i].add(value));
                        true
                    }
                    _ => false,
                };
            }
            "bot_llm_tokens_total" => {
                return match (label("model"), closed("kind", TokenKind::NAMES)) {
                    (Some(model), Some(i)) => {
                        self.llm.with_restored(model, |c| {
                            c.see(TOKENS_SEEN);
                            c.tokens[i].add(value);
                        });
                        true
                    }
                    _ => false,
                };
            }
            "bot_errors_total" | "bot_custom_events_total" => {
                let (family, label_name) = if family == "bot_errors_total" {
                    (&self.errors, "kind")
                } else {
                    (&self.custom, "name")
                };
                return match label(label_name) {
                    Some(v) => {
                        family.with_restored(v, |c| c.add(value));
                        true
                    }
                    None => false,
                };
            }
            _ => None,
        };
        cell.map(|c| c.add(value)).is_some()
    }

    /// Restores a histogram from its stored cumulative buckets and sum;
    /// the lines may be any subset of its bounds (see `Histogram::restore`).
    pub fn restore_histogram(&self, family: &str, buckets: &[(f64, u64)], sum: f64) -> bool {
        let restored = match family {
            "bot_response_duration_seconds" => self.response_duration.restore(buckets, sum),
            "bot_db_queries_per_message" => self.db_queries.restore(buckets, sum),
            "bot_llm_ttft_seconds" => self.ttft.restore(buckets, sum),
            "bot_session_duration_seconds" => self.session_duration.restore(buckets, sum),
            "bot_session_messages" => self.session_messages.restore(buckets, sum),
            _ => false,
        };
        self.touch();
        restored
    }

    /// Read access for the summary.
    pub fn messages_total(&self) -> f64 {
        self.messages.iter().map(Counter::get).sum()
    }

    pub fn responses(&self, status: Status) -> f64 {
        self.responses[status.index()].get()
    }

    pub fn response_duration(&self) -> HistogramSnapshot {
        self.response_duration.snapshot()
    }

    pub fn users_new_total(&self) -> f64 {
        self.users_new.get()
    }

    pub fn sessions_total(&self) -> f64 {
        self.sessions.get()
    }

    pub fn registered_total(&self) -> f64 {
        self.registered.get()
    }

    pub fn errors_total(&self) -> f64 {
        let mut total = 0.0;
        self.errors.for_each(|_, c| total += c.get());
        total
    }

    /// Cache lookups per cache, sorted by cache name: (cache, hits, misses).
    pub fn cache_lookups(&self) -> Vec<(String, f64, f64)> {
        let mut out = Vec::new();
        self.cache.for_each(|cache, c| {
            out.push((
                cache.to_owned(),
                c[CacheResult::Hit.index()].get(),
                c[CacheResult::Miss.index()].get(),
            ));
        });
        out
    }

    /// Spend per model, all time, in micro-units (both sources).
    pub fn spend_by_model(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        self.llm.for_each(|model, c| {
            if c.has(COST_SEEN) {
                out.push((model.to_owned(), c.cost.iter().map(Micros::micros).sum()));
            }
        });
        out
    }

    /// Tokens that could not be priced, all time.
    pub fn unpriced_tokens(&self) -> f64 {
        let mut total = 0.0;
        self.llm.for_each(|_, c| total += c.unpriced.get());
        total
    }

    /// Tokens of every kind that is billed (prompt, completion, reasoning),
    /// all time.
    pub fn tokens_total(&self) -> f64 {
        let mut total = 0.0;
        self.llm.for_each(|_, c| {
            total += c.tokens[TokenKind::Prompt.index()].get()
                + c.tokens[TokenKind::Completion.index()].get()
                + c.tokens[TokenKind::Reasoning.index()].get();
        });
        total
    }

    /// Ratings, all time: (rated, positive).
    pub fn feedback_totals(&self) -> (f64, f64) {
        let rated = self.feedback.iter().map(Counter::get).sum();
        let positive = Score::ALL
            .iter()
            .filter(|s| s.is_positive())
            .map(|s| self.feedback[s.index()].get())
            .sum();
        (rated, positive)
    }

    /// Cache lookups over all caches: (hits, misses).
    pub fn cache_totals(&self) -> (f64, f64) {
        let (mut hits, mut misses) = (0.0, 0.0);
        self.cache.for_each(|_, c| {
            hits += c[CacheResult::Hit.index()].get();
            misses += c[CacheResult::Miss.index()].get();
        });
        (hits, misses)
    }
}

/// What a request adds to the counters nearly every event moves (messages
/// by role, responses by status, today's messages), summed in plain
/// integers and added once at its end: each `add` is a compare-and-swap,
/// and a batch of 1,000 made some 1,100 of them for these alone. Only
/// integer counts are tallied: a float sum added in another grouping could
/// round differently, so sums and custom values are still added per event.
/// A flush never sees half a request (it waits on the ingest gate); a
/// scrape may, and may see a request's durations before its responses, as
/// it could see one event's before another's. Added on drop, so a request
/// that panics halfway keeps what it counted, as it did event by event.
struct Tally<'b> {
    bot: &'b BotMetrics,
    messages: [u64; 2],
    responses: [u64; 4],
    /// Today's messages as runs of one local day (a batch nearly always
    /// has one).
    today_messages: DayRun,
}

#[derive(Default)]
struct DayRun(Option<(u32, u64)>);

impl DayRun {
    /// Counts one on `day`; the run this ends, if it was another day's.
    fn add(&mut self, day: u32) -> Option<(u32, u64)> {
        match &mut self.0 {
            Some((d, n)) if *d == day => {
                *n += 1;
                None
            }
            run => run.replace((day, 1)),
        }
    }
}

impl<'b> Tally<'b> {
    fn new(bot: &'b BotMetrics) -> Self {
        Tally {
            bot,
            messages: [0; 2],
            responses: [0; 4],
            today_messages: DayRun::default(),
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        let bot = self.bot;
        for (counter, n) in bot.messages.iter().zip(self.messages) {
            if n > 0 {
                counter.add(n as f64);
            }
        }
        for (counter, n) in bot.responses.iter().zip(self.responses) {
            if n > 0 {
                counter.add(n as f64);
            }
        }
        if let Some((day, n)) = self.today_messages.0.take() {
            bot.today.messages.add_on(day, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DayRun;
    use crate::metrics::today::DailyCounter;

    /// A request's tallied counts are added even when it stops halfway:
    /// what it counted before a panic stays counted, as each event's add
    /// did before the tally.
    #[test]
    fn a_request_that_panics_keeps_what_it_counted() {
        use crate::event::{BodyFormat, UserKey, parse_batch};
        let now = 1_800_000_000;
        let bots = vec![std::sync::Arc::from("b")];
        let metrics =
            crate::metrics::Metrics::new(&bots, 100, chrono_tz::UTC, 30.0, Default::default())
                .expect("metrics");
        let bot = metrics.bot("b").expect("bot");
        let body = r#"[{"type":"message","role":"user"},{"type":"message","role":"user"},
            {"type":"response","status":"success","duration_ms":5},{"type":"message","role":"user"}]"#;
        let events = parse_batch(
            body.as_bytes(),
            BodyFormat::Json,
            10,
            now,
            &UserKey::legacy(),
        )
        .expect("parsed");
        let halfway = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            bot.apply_all(events.iter().enumerate().map(|(i, e)| {
                assert!(i < 3, "stop before the fourth event");
                e
            }));
        }));
        assert!(halfway.is_err());
        assert_eq!(bot.messages[0].get(), 2.0);
        assert_eq!(bot.responses[0].get(), 1.0);
        assert_eq!(bot.today.messages.get_at(now), 2);
        bot.apply_all(events.iter());
        assert_eq!(bot.messages[0].get(), 5.0);
        assert_eq!(bot.today.messages.get_at(now), 5);
    }

    /// Today's messages added in runs end as added one by one, whatever
    /// the order of days in a batch (a later day starts over, an earlier
    /// one is no longer today).
    #[test]
    fn day_runs_count_as_single_adds() {
        let mut rng = crate::testing::Rng(0x853C_49E6_748F_EA9B);
        for _ in 0..500 {
            let one_by_one = DailyCounter::default();
            let in_runs = DailyCounter::default();
            let mut run = DayRun::default();
            for _ in 0..rng.below(40) {
                let day = 20_000 + rng.below(3) as u32;
                one_by_one.add_on(day, 1);
                if let Some((d, n)) = run.add(day) {
                    in_runs.add_on(d, n);
                }
            }
            if let Some((d, n)) = run.0 {
                in_runs.add_on(d, n);
            }
            assert_eq!(in_runs.load(), one_by_one.load());
        }
    }
}
