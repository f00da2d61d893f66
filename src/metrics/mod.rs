//! Everything counted in memory: the `bot_*` series of every configured bot
//! and botmetrics' own `botmetrics_*` self-metrics, on one owned Registry.

pub mod active;
pub mod bot;
pub mod cells;
mod collector;
pub mod pages;
mod ring;
mod sketch;
pub mod today;
pub mod users;

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry,
};

pub use bot::{BotMetrics, FamilyDesc, Kind, Visitor};
pub use cells::HistogramSnapshot;
use today::{Calendar, Today};

/// Why a request to `POST /v1/events` was refused, as counted in
/// `botmetrics_events_rejected_total{reason}`.
pub const REJECT_REASONS: &[&str] = &[
    "malformed",
    "unauthorized",
    "too_large",
    "unsupported_media_type",
    "invalid",
    "retry_later",
    "journal_full",
    "journal_failed",
];

/// Endpoints whose rendered answers are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedEndpoint {
    Metrics,
    Summary,
}

impl CachedEndpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            CachedEndpoint::Metrics => "metrics",
            CachedEndpoint::Summary => "summary",
        }
    }
}

/// botmetrics' own health, exposed beside the bots' series.
pub struct SelfMetrics {
    pub events_accepted: IntCounterVec,
    pub events_duplicate: IntCounterVec,
    pub events_rejected: IntCounterVec,
    pub cache_hits: IntCounterVec,
    pub cache_misses: IntCounterVec,
    pub render_duration: HistogramVec,
    pub flush_duration: Histogram,
    pub flush_failures: IntCounter,
    pub history_duration: Histogram,
    pub history_failures: IntCounter,
    pub store_up: IntGauge,
    pub last_flush: Gauge,
    pub label_overflow: IntCounterVec,
    pub dedupe_ids: IntGauge,
    pub dedupe_window: Gauge,
    pub journal_backlog: IntGauge,
    pub journal_fsyncs: IntCounter,
    pub journal_max: IntGauge,
    pub store_writer: IntGauge,
    /// Set by every `/metrics` render to the `bot_*` lines it wrote.
    pub series: IntGauge,
    /// Set by every `/metrics` render: heap bytes of every bot's sketches.
    pub sketch_bytes: IntGauge,
    /// Set by every scan of the user books.
    pub book_users: prometheus::IntGaugeVec,
    pub book_fill: prometheus::GaugeVec,
    pub book_evicted: IntCounterVec,
    pub book_bytes: IntGauge,
    pub book_scan_duration: Histogram,
}

/// The page size from which the `bot_` families are written on every core
/// (`collector::write_bots`): below it a thread costs more than it saves.
const SPLIT_PAGE: usize = 256 * 1024;

const STORE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Registers `c` on `r` and hands it back, so a struct of collectors is
/// built and registered in one expression per field.
pub(crate) fn reg<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: C,
) -> prometheus::Result<C> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Opts of a self-metric family described by `desc`.
fn opts(desc: &FamilyDesc) -> Opts {
    Opts::new(desc.name, desc.help)
}

macro_rules! per_bot_family {
    ($id:ident, $name:literal, $kind:ident, [$($label:literal),*], $help:literal) => {
        static $id: FamilyDesc =
            FamilyDesc { name: $name, help: $help, kind: Kind::$kind, labels: &["bot" $(, $label)*] };
    };
}

per_bot_family!(
    ACCEPTED,
    "botmetrics_events_accepted_total",
    Counter,
    [],
    "Events accepted and counted."
);
per_bot_family!(
    DUPLICATE,
    "botmetrics_events_duplicate_total",
    Counter,
    [],
    "Events acknowledged but not counted: their event_id was seen within the dedupe window."
);
per_bot_family!(
    LABEL_OVERFLOW,
    "botmetrics_label_overflow_total",
    Counter,
    ["label"],
    "Events whose free-form label was folded into `other` because the label reached --max-label-values."
);
per_bot_family!(
    BOOK_EVICTED,
    "botmetrics_user_book_evicted_total",
    Counter,
    [],
    "Users forgotten early because the book was full; back, they count as new."
);
per_bot_family!(
    BOOK_FILL,
    "botmetrics_user_book_fill_ratio",
    Gauge,
    [],
    "Remembered users over --max-users-per-bot: at 1 the least recently seen are evicted."
);
per_bot_family!(
    BOOK_USERS,
    "botmetrics_user_book_users",
    Gauge,
    [],
    "Users the bot's user book remembers (as of its last scan)."
);

/// The self-metrics with a `bot` label, in name order, and where each
/// series lives in a bot's [`bot::SelfCounters`]. The render writes them
/// from the bots in its set (see [`collector::write_per_bot`]); their vecs
/// sit on a registry of their own that only the remote-write snapshot and
/// the tests gather. A family added here is registered in
/// [`SelfMetrics::register`], its handle added to `SelfCounters` in
/// [`Metrics::cells`], and removed in [`SelfMetrics::forget_bot`].
static PER_BOT: &[collector::PerBotFamily] = &[
    collector::PerBotFamily {
        desc: &ACCEPTED,
        series: &[(None, |c| c.accepted.get() as f64)],
    },
    collector::PerBotFamily {
        desc: &DUPLICATE,
        series: &[(None, |c| c.duplicates.get() as f64)],
    },
    collector::PerBotFamily {
        desc: &LABEL_OVERFLOW,
        // The `label` values in the order they sort.
        series: &[
            (Some("cache"), |c| c.overflow_cache.get() as f64),
            (Some("kind"), |c| c.overflow_kind.get() as f64),
            (Some("model"), |c| c.overflow_model.get() as f64),
            (Some("name"), |c| c.overflow_name.get() as f64),
        ],
    },
    collector::PerBotFamily {
        desc: &BOOK_EVICTED,
        series: &[(None, |c| c.book_evicted.get() as f64)],
    },
    collector::PerBotFamily {
        desc: &BOOK_FILL,
        series: &[(None, |c| c.book_fill.get())],
    },
    collector::PerBotFamily {
        desc: &BOOK_USERS,
        series: &[(None, |c| c.book_users.get() as f64)],
    },
];

impl SelfMetrics {
    /// Removes a wiped bot's self-series, so it leaves `/metrics` whole.
    fn forget_bot(&self, bot: &str) {
        for family in [
            &self.events_accepted,
            &self.events_duplicate,
            &self.book_evicted,
        ] {
            let _ = family.remove_label_values(&[bot]);
        }
        let _ = self.book_users.remove_label_values(&[bot]);
        let _ = self.book_fill.remove_label_values(&[bot]);
        for label in ["kind", "name", "model", "cache"] {
            let _ = self.label_overflow.remove_label_values(&[bot, label]);
        }
    }

    /// Registers the self-metrics: those with a `bot` label on `per_bot`
    /// (rendered from each bot's handles, see [`PER_BOT`]), the rest on
    /// `registry`.
    fn register(
        registry: &Registry,
        per_bot: &Registry,
        cache_ttl_seconds: f64,
    ) -> prometheus::Result<Self> {
        let m = SelfMetrics {
            events_accepted: reg(per_bot, IntCounterVec::new(opts(&ACCEPTED), ACCEPTED.labels)?)?,
            events_duplicate: reg(
                per_bot,
                IntCounterVec::new(opts(&DUPLICATE), DUPLICATE.labels)?,
            )?,
            events_rejected: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "botmetrics_events_rejected_total",
                        "Ingest requests refused, by reason; nothing in them was counted.",
                    ),
                    &["reason"],
                )?,
            )?,
            cache_hits: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "botmetrics_exposition_cache_hits_total",
                        "Requests answered from the rendered-output cache.",
                    ),
                    &["endpoint"],
                )?,
            )?,
            cache_misses: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "botmetrics_exposition_cache_misses_total",
                        "Requests that caused a render.",
                    ),
                    &["endpoint"],
                )?,
            )?,
            render_duration: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "botmetrics_render_duration_seconds",
                        "Time to render /metrics or the summary on a cache miss.",
                    )
                    .buckets(STORE_BUCKETS.to_vec()),
                    &["endpoint"],
                )?,
            )?,
            flush_duration: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "botmetrics_flush_duration_seconds",
                        "Time to write changed series to real_time_metrics.",
                    )
                    .buckets(STORE_BUCKETS.to_vec()),
                )?,
            )?,
            flush_failures: reg(
                registry,
                IntCounter::new(
                    "botmetrics_flush_failures_total",
                    "Flushes to the store that failed (retried with backoff).",
                )?,
            )?,
            history_duration: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "botmetrics_history_write_duration_seconds",
                        "Time to append a point per series to metrics_history.",
                    )
                    .buckets(STORE_BUCKETS.to_vec()),
                )?,
            )?,
            history_failures: reg(
                registry,
                IntCounter::new(
                    "botmetrics_history_write_failures_total",
                    "History writes that failed.",
                )?,
            )?,
            store_up: reg(
                registry,
                IntGauge::new(
                    "botmetrics_store_up",
                    "1 when the last store operation succeeded, 0 when the store is unreachable.",
                )?,
            )?,
            last_flush: reg(
                registry,
                Gauge::new(
                    "botmetrics_last_flush_timestamp_seconds",
                    "Unix time of the last successful flush.",
                )?,
            )?,
            dedupe_ids: reg(
                registry,
                IntGauge::new(
                    "botmetrics_dedupe_ids",
                    "event_ids remembered for dedupe right now (bound: --dedupe-max-ids).",
                )?,
            )?,
            dedupe_window: reg(
                registry,
                Gauge::new(
                    "botmetrics_dedupe_window_seconds",
                    "How far back event_ids are remembered: --dedupe-window, or less once --dedupe-max-ids made the oldest be forgotten early.",
                )?,
            )?,
            journal_backlog: reg(
                registry,
                IntGauge::new(
                    "botmetrics_journal_backlog_bytes",
                    "Journal bytes not yet applied to the store; new events get 503 past botmetrics_journal_max_bytes.",
                )?,
            )?,
            journal_fsyncs: reg(
                registry,
                IntCounter::new(
                    "botmetrics_journal_fsyncs_total",
                    "fsyncs of the journal: one per group commit with --journal-fsync always, about one a second with everysec, none with no.",
                )?,
            )?,
            journal_max: reg(
                registry,
                IntGauge::new(
                    "botmetrics_journal_max_bytes",
                    "The journal backlog bound (--journal-max-bytes).",
                )?,
            )?,
            store_writer: reg(
                registry,
                IntGauge::new(
                    "botmetrics_store_writer",
                    "1 while this process holds the store's one-writer lease, 0 while it is a standby.",
                )?,
            )?,
            label_overflow: reg(
                per_bot,
                IntCounterVec::new(opts(&LABEL_OVERFLOW), LABEL_OVERFLOW.labels)?,
            )?,
            series: reg(
                registry,
                IntGauge::new(
                    "botmetrics_series",
                    "bot_* series currently exposed (histogram lines included).",
                )?,
            )?,
            sketch_bytes: reg(
                registry,
                IntGauge::new(
                    "botmetrics_active_user_sketch_bytes",
                    "Heap bytes held by every bot's active-user sketches; at most 884736 (54 dense sketches) per bot.",
                )?,
            )?,
            book_users: reg(
                per_bot,
                prometheus::IntGaugeVec::new(opts(&BOOK_USERS), BOOK_USERS.labels)?,
            )?,
            book_fill: reg(
                per_bot,
                prometheus::GaugeVec::new(opts(&BOOK_FILL), BOOK_FILL.labels)?,
            )?,
            book_evicted: reg(
                per_bot,
                IntCounterVec::new(opts(&BOOK_EVICTED), BOOK_EVICTED.labels)?,
            )?,
            book_bytes: reg(
                registry,
                IntGauge::new(
                    "botmetrics_user_book_bytes",
                    "Bytes held by every bot's user book tables.",
                )?,
            )?,
            book_scan_duration: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "botmetrics_user_book_scan_duration_seconds",
                        "Time of one scan of every user book (sessions ended, users expired, cohorts counted).",
                    )
                    .buckets(STORE_BUCKETS.to_vec()),
                )?,
            )?,
        };
        let ttl = reg(
            registry,
            Gauge::new(
                "botmetrics_metrics_cache_ttl_seconds",
                "How long a rendered /metrics answer is served (--metrics-cache-ttl; 0: rendered for each scrape).",
            )?,
        )?;
        ttl.set(cache_ttl_seconds);
        let build = reg(
            registry,
            IntGauge::with_opts(
                Opts::new(
                    "botmetrics_build_info",
                    "Always 1; labels carry the running version.",
                )
                .const_label("version", env!("CARGO_PKG_VERSION")),
            )?,
        )?;
        build.set(1);

        // Every series of a closed label set exists from start-up. (A
        // bot's own self-series are made with its cells, `Metrics::cells`.)
        for reason in REJECT_REASONS {
            m.events_rejected.with_label_values(&[*reason]);
        }
        for endpoint in [CachedEndpoint::Metrics, CachedEndpoint::Summary] {
            m.cache_hits.with_label_values(&[endpoint.as_str()]);
            m.cache_misses.with_label_values(&[endpoint.as_str()]);
            m.render_duration.with_label_values(&[endpoint.as_str()]);
        }
        Ok(m)
    }
}

/// All in-memory state that is counted: one [`BotMetrics`] per configured
/// bot, self-metrics, and the registry that exposes both.
pub struct Metrics {
    /// Every self-metric but those with a `bot` label.
    pub registry: Registry,
    /// The self-metrics with a `bot` label (see [`PER_BOT`]).
    per_bot: Registry,
    pub selfm: SelfMetrics,
    /// Replaced whole when a bot is added at runtime (the admin API), so a
    /// reader holds one consistent set for as long as it needs it.
    set: std::sync::RwLock<Arc<BotSet>>,
    calendar: Arc<Calendar>,
    max_label_values: usize,
    /// Every bot's user book's limits, a bot added later's too.
    book: users::BookLimits,
    /// Wipes: each bot's latest generation, and those whose rows the store
    /// may still hold (the next flush that writes deletes them).
    wipes: std::sync::Mutex<Wipes>,
    /// Set in cluster mode: every bot's book is shared through Redis, a bot
    /// added later's too (see `BotMetrics::share_book`).
    shared_books: std::sync::OnceLock<()>,
    /// The exposition writer's buffers, kept between renders.
    render_buffers: std::sync::Mutex<collector::Buffers>,
    /// The pages `/metrics` bodies are rendered into, reused.
    pages: pages::PagePool,
}

#[derive(Default)]
struct Wipes {
    /// The latest wipe of each bot this process applied (unix ms): in
    /// cluster mode what its sync tells Redis it has applied.
    generation: HashMap<Arc<str>, i64>,
    /// (bot, generation) not yet written to the store.
    unstored: Vec<(Arc<str>, i64)>,
}

pub use crate::store::WipeRow;

/// What a wipe took out of memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Wiped {
    /// Series (a histogram counts once per line), as the store keeps them.
    pub series: usize,
    /// Users the book remembered.
    pub users: usize,
}

/// The bots counted, in the order they were configured (then added).
#[derive(Default)]
pub struct BotSet {
    bots: Vec<Arc<BotMetrics>>,
    /// The same bots ordered by name: the exposition's order.
    sorted: Vec<Arc<BotMetrics>>,
    by_name: HashMap<Arc<str>, Arc<BotMetrics>>,
}

impl BotSet {
    pub fn get(&self, name: &str) -> Option<&Arc<BotMetrics>> {
        self.by_name.get(name)
    }

    fn with(&self, bot: Arc<BotMetrics>) -> BotSet {
        let mut bots = self.bots.clone();
        bots.push(bot);
        BotSet::of(bots)
    }

    fn without(&self, name: &str) -> BotSet {
        BotSet::of(
            self.bots
                .iter()
                .filter(|b| &*b.bot != name)
                .cloned()
                .collect(),
        )
    }

    fn of(bots: Vec<Arc<BotMetrics>>) -> BotSet {
        let by_name = bots.iter().map(|b| (b.bot.clone(), b.clone())).collect();
        let mut sorted = bots.clone();
        sorted.sort_by(|a, b| a.bot.cmp(&b.bot));
        BotSet {
            bots,
            sorted,
            by_name,
        }
    }
}

impl std::ops::Deref for BotSet {
    type Target = [Arc<BotMetrics>];

    fn deref(&self) -> &[Arc<BotMetrics>] {
        &self.bots
    }
}

impl Metrics {
    pub fn new(
        bots: &[Arc<str>],
        max_label_values: usize,
        tz: chrono_tz::Tz,
        cache_ttl_seconds: f64,
        book: users::BookLimits,
    ) -> prometheus::Result<Self> {
        let (registry, per_bot) = (Registry::new(), Registry::new());
        let selfm = SelfMetrics::register(&registry, &per_bot, cache_ttl_seconds)?;
        let calendar = Arc::new(Calendar::new(tz));
        let metrics = Metrics {
            registry,
            per_bot,
            selfm,
            set: Default::default(),
            calendar,
            max_label_values,
            book,
            wipes: Default::default(),
            shared_books: std::sync::OnceLock::new(),
            render_buffers: Default::default(),
            pages: Default::default(),
        };
        let bots = bots.iter().map(|bot| metrics.cells(bot)).collect();
        *metrics.set.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(BotSet::of(bots));
        Ok(metrics)
    }

    /// Cluster mode: every bot's book, and every bot's added later, is
    /// shared through Redis from now on.
    pub fn share_books(&self) {
        if self.book.memory_days == 0 || self.book.max_users == 0 {
            return; // no book (`--user-memory 0`): nothing to share
        }
        let _ = self.shared_books.set(());
        for bot in self.bots().iter() {
            bot.share_book(self.book.session_gap, self.book.max_users);
        }
    }

    /// Whether the books are shared (cluster mode, the book on).
    pub fn books_shared(&self) -> bool {
        self.shared_books.get().is_some() && self.book.memory_days > 0 && self.book.max_users > 0
    }

    /// The books' limits.
    pub fn book_limits(&self) -> users::BookLimits {
        self.book
    }

    /// A bot's cells, its self-counters registered: each of its
    /// self-series exists from now on (at 0), a bot added later's too.
    fn cells(&self, bot: &Arc<str>) -> Arc<BotMetrics> {
        let selfm = &self.selfm;
        let overflow = |label: &str| selfm.label_overflow.with_label_values(&[&**bot, label]);
        let counters = bot::SelfCounters {
            accepted: selfm.events_accepted.with_label_values(&[&**bot]),
            duplicates: selfm.events_duplicate.with_label_values(&[&**bot]),
            overflow_kind: overflow("kind"),
            overflow_name: overflow("name"),
            overflow_model: overflow("model"),
            overflow_cache: overflow("cache"),
            book_users: selfm.book_users.with_label_values(&[&**bot]),
            book_fill: selfm.book_fill.with_label_values(&[&**bot]),
            book_evicted: selfm.book_evicted.with_label_values(&[&**bot]),
        };
        let cells = Arc::new(BotMetrics::new(
            bot.clone(),
            self.max_label_values,
            counters,
            Today::new(self.calendar.clone()),
            self.book,
        ));
        if self.shared_books.get().is_some() {
            cells.share_book(self.book.session_gap, self.book.max_users);
        }
        cells
    }

    /// Counts a bot created at runtime (the admin API) from now on, with
    /// every series of its closed label sets at 0; a bot already counted
    /// is left as it is.
    pub fn add_bot(&self, name: &str) -> Arc<BotMetrics> {
        let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
        if let Some(bot) = set.get(name) {
            return bot.clone();
        }
        let bot = self.cells(&Arc::from(name));
        *set = Arc::new(set.with(bot.clone()));
        bot
    }

    /// Takes everything `name` counted out of memory: the bot leaves the
    /// set (its series and self-series leave `/metrics`, the summary and
    /// every scan), its cells are retired so that a request that found them
    /// before the wipe counts nothing (see `Ingest::apply`), and its rows
    /// are queued for deletion at the next flush. `generation` names the
    /// wipe (unix ms; one wipe of a bot is applied once). With `recount`, a
    /// bot that was counted starts again from nothing (a replay, where the
    /// bot is configured still). Run under the ingest gate, held
    /// exclusively.
    pub fn wipe(&self, name: &str, generation: i64, recount: bool) -> Option<Wiped> {
        let old = {
            let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
            let old = set.get(name).cloned();
            if old.is_some() {
                *set = Arc::new(set.without(name));
            }
            old
        };
        {
            let mut wipes = self.wipes.lock().unwrap_or_else(|e| e.into_inner());
            let bot: Arc<str> = Arc::from(name);
            let latest = wipes.generation.entry(bot.clone()).or_default();
            *latest = (*latest).max(generation);
            wipes.unstored.push((bot, generation));
        }
        let old = old?;
        old.retire();
        self.selfm.forget_bot(name);
        let report = Wiped {
            series: old.series_rows(),
            users: old.book.len(),
        };
        if recount {
            self.add_bot(name);
        }
        Some(report)
    }

    /// The latest wipe of `bot` applied here (0: none).
    pub fn wipe_generation(&self, bot: &str) -> i64 {
        self.wipes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generation
            .get(bot)
            .copied()
            .unwrap_or(0)
    }

    /// The wipes not yet in the store, taken: the flush that takes them
    /// deletes the bots' rows, or gives them back ([`Metrics::wipes_not_stored`]).
    pub fn take_wipes(&self) -> Vec<WipeRow> {
        std::mem::take(
            &mut self
                .wipes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unstored,
        )
        .into_iter()
        .map(|(bot, generation)| (bot.to_string(), generation))
        .collect()
    }

    pub fn wipes_not_stored(&self, rows: &[WipeRow]) {
        let mut wipes = self.wipes.lock().unwrap_or_else(|e| e.into_inner());
        for (bot, generation) in rows {
            wipes.unstored.push((Arc::from(bot.as_str()), *generation));
        }
    }

    /// Whether a wipe of `name` still waits for a flush to reach the store.
    pub fn wipe_pending(&self, name: &str) -> bool {
        self.wipes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unstored
            .iter()
            .any(|(w, _)| &**w == name)
    }

    /// A fresh copy of `name`'s cells, registered nowhere (the same
    /// self-counters and calendar, no label cap): for totals read from
    /// elsewhere, such as the cluster's, then summarised as this process's
    /// own are. Cheap: no registry, no collector.
    pub fn scratch(&self, name: &str) -> Option<BotMetrics> {
        let own = self.bot(name)?;
        Some(BotMetrics::new(
            own.bot.clone(),
            usize::MAX,
            own.counters.clone(),
            Today::new(self.calendar.clone()),
            users::BookLimits::OFF,
        ))
    }

    pub fn bot(&self, name: &str) -> Option<Arc<BotMetrics>> {
        self.bots().get(name).cloned()
    }

    /// The bots counted now (a bot added later is not in this set).
    pub fn bots(&self) -> Arc<BotSet> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// Walks every bot's series.
    pub fn visit(&self, v: &mut impl Visitor) {
        for bot in self.bots().iter() {
            bot.visit(v);
        }
    }

    /// Renders every bot's series and the self-metrics in the Prometheus
    /// text format 0.0.4. The `bot_*` families are written directly (see
    /// `collector`); they sort before every `botmetrics_*` family, so the
    /// page is ordered by family name as `Registry::gather` orders it.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.render_into(&mut out);
        out
    }

    /// [`Metrics::render`] into a page of the pool (see `PagePool`): the
    /// body `/metrics` serves.
    pub fn render_body(&self) -> bytes::Bytes {
        let mut page = self.pages.take();
        self.render_into(&mut page);
        self.pages.body(page)
    }

    fn render_into(&self, out: &mut Vec<u8>) {
        let set = self.bots();
        out.clear();
        out.reserve(64 * 1024 + 64 * 1024 * set.len() / 16);
        let out = &mut *out;
        // A render beside another (rare: the cache shares one) uses its
        // own buffers rather than wait. A large page is written on every
        // core; the size of the last one tells.
        let series = match self.render_buffers.try_lock() {
            Ok(mut kept) => {
                let threads = match kept.last_page() >= SPLIT_PAGE {
                    true => crate::cores(),
                    false => 1,
                };
                collector::write_bots(&set.sorted, out, &mut kept, threads)
            }
            Err(_) => collector::write_bots(&set.sorted, out, &mut Default::default(), 1),
        };
        self.selfm.series.set(series as i64);
        let sketch_bytes: usize = set.iter().map(|b| b.active.heap_bytes()).sum();
        self.selfm.sketch_bytes.set(sketch_bytes as i64);
        // The self-metrics by name, as one `gather` of every one would
        // order them: the few dozen without a bot label from the registry,
        // the per-bot families written in between from the bots' handles.
        let mut per_bot = PER_BOT.iter().peekable();
        let encoder = prometheus::TextEncoder::new();
        for family in self.registry.gather() {
            while let Some(p) = per_bot.next_if(|p| p.desc.name < family.name()) {
                collector::write_per_bot(out, p, &set.sorted);
            }
            // Encoding into a Vec cannot fail; an error here would be a bug
            // in a self-metric (for instance an invalid name), so say so loudly.
            if let Err(e) = encoder.encode(std::slice::from_ref(&family), out) {
                tracing::error!(error = %e, "encoding /metrics failed");
            }
        }
        for p in per_bot {
            collector::write_per_bot(out, p, &set.sorted);
        }
    }

    /// Every self-metric family, by name, as `Registry::gather` of one
    /// registry holding them all returns them (the per-bot families hold
    /// what their vecs hold, which is what the render writes for the bots
    /// in the set).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.registry.gather();
        families.extend(self.per_bot.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{BodyFormat, parse_batch};

    /// The render writes the per-bot self-series itself (`PER_BOT`); the
    /// self-metrics part of its page must be the bytes the prometheus
    /// crate's `gather` and `TextEncoder` write for the same collectors:
    /// families interleaved by name, bots sorted, a bot added at runtime
    /// present and a wiped one gone, no empty family without bots.
    #[test]
    fn self_series_are_the_bytes_the_prometheus_crate_writes() {
        let self_part = |metrics: &Metrics| {
            let page = String::from_utf8(metrics.render()).unwrap();
            let start = page.find("# HELP botmetrics_").unwrap();
            let mut theirs = Vec::new();
            prometheus::TextEncoder::new()
                .encode(&metrics.gather(), &mut theirs)
                .unwrap();
            (page[start..].to_owned(), String::from_utf8(theirs).unwrap())
        };
        let none = Metrics::new(&[], 3, chrono_tz::UTC, 0.0, Default::default()).unwrap();
        let (ours, theirs) = self_part(&none);
        assert_eq!(ours, theirs);
        assert!(!ours.contains("botmetrics_events_accepted_total"));

        let names: Vec<Arc<str>> = ["zeta", "alpha", "Beta", "a.b", "a-b", "a\\b"]
            .into_iter()
            .map(Arc::from)
            .collect();
        let metrics = Metrics::new(&names, 3, chrono_tz::UTC, 30.0, Default::default()).unwrap();
        metrics.add_bot("mid");
        assert!(metrics.wipe("alpha", 1, false).is_some());
        let (zeta, mid) = (metrics.bot("zeta").unwrap(), metrics.bot("mid").unwrap());
        zeta.counters.accepted.inc_by(1_000_000_000_000);
        zeta.counters.overflow_model.inc();
        zeta.counters.book_fill.set(0.125);
        mid.counters.duplicates.inc_by(2);
        mid.counters.book_users.set(7);
        mid.counters.book_evicted.inc_by(3);
        metrics
            .selfm
            .events_rejected
            .with_label_values(&["invalid"])
            .inc();
        let (ours, theirs) = self_part(&metrics);
        assert_eq!(ours, theirs);
        for line in [
            r#"botmetrics_events_accepted_total{bot="zeta"} 1000000000000"#,
            r#"botmetrics_label_overflow_total{bot="zeta",label="model"} 1"#,
            r#"botmetrics_user_book_fill_ratio{bot="zeta"} 0.125"#,
            r#"botmetrics_user_book_users{bot="mid"} 7"#,
            r#"botmetrics_user_book_evicted_total{bot="mid"} 3"#,
            r#"botmetrics_events_accepted_total{bot="a\\b"} 0"#,
        ] {
            assert!(ours.contains(line), "{line}");
        }
        assert!(
            !ours.contains(r#"bot="alpha""#),
            "a wiped bot's self-series leave"
        );
    }

    /// While Redis is away a shared book's runs wait in memory: at most
    /// `--max-users-per-bot` users, the rest counted as dropped, and a user
    /// already waiting keeps adding runs.
    #[test]
    fn a_shared_books_waiting_runs_are_bounded_by_the_book() {
        let limits = users::BookLimits {
            max_users: 100,
            ..users::BookLimits::DEFAULT
        };
        let metrics = Metrics::new(&[Arc::from("b")], 10, chrono_tz::UTC, 0.0, limits).unwrap();
        metrics.share_books();
        let bot = metrics.bot("b").unwrap();
        let now = chrono::Utc::now().timestamp();
        let body: String = format!(
            "[{}]",
            (0..150)
                .map(|u| format!(r#"{{"type":"message","role":"user","user_id":{u}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let key = crate::event::UserKey::legacy();
        for event in parse_batch(body.as_bytes(), BodyFormat::Json, 1000, now, &key).unwrap() {
            bot.apply(&event);
        }
        // User 0 again, an hour later: a second run of a user kept.
        let again = format!(
            r#"[{{"type":"message","role":"user","user_id":0,"ts":{}}}]"#,
            now - 3600
        );
        for event in parse_batch(again.as_bytes(), BodyFormat::Json, 10, now, &key).unwrap() {
            bot.apply(&event);
        }
        assert_eq!(bot.take_book_dropped(), 50);
        assert_eq!(bot.take_book_dropped(), 0, "taken once");
        let delta = bot.take_book_delta();
        assert_eq!(delta.users(), 100);
        let runs: usize = delta.runs.values().map(Vec::len).sum();
        // An hour apart: a gap past --session-gap, so a run of its own.
        assert_eq!(runs, 101);
        // Taken by the sync: there is room again.
        let one = r#"[{"type":"message","role":"user","user_id":149}]"#;
        for event in parse_batch(one.as_bytes(), BodyFormat::Json, 10, now, &key).unwrap() {
            bot.apply(&event);
        }
        assert_eq!(bot.take_book_dropped(), 0);
        assert_eq!(bot.take_book_delta().users(), 1);
    }
}
