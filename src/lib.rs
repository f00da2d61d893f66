//! botmetrics turns a chat bot's events into Prometheus metrics, a summary
//! for the bot's own `/metrics` command, and long-term history.
//!
//! # Layout
//!
//! In the order an event travels:
//!
//! * [`config`]: the one `Config` (flags with env fallbacks) and its parsers.
//! * [`http`]: the API, one file per resource, merged under shared middleware.
//! * [`event`]: raw JSON events become checked domain types; whole batches
//!   are validated before anything is applied.
//! * [`ingest`]: dedupes retries by `event_id`, applies a batch and journals
//!   it before the answer; replays journals at start.
//! * [`dedupe`]: remembered `event_id`s, bounded, a few bytes each.
//! * [`journal`]: the write-ahead log (group commit, fsync policy, torn-tail
//!   recovery, trim); [`record`]: a batch's compact encoding in it.
//! * [`metrics`]: the in-memory cells of every `bot_*` series (counters,
//!   histograms, capped free-form families, active-user sketches, "today"
//!   counters), self-metrics, and the `Registry` that exposes them.
//! * [`render_cache`]: `/metrics` and summaries rendered once per TTL.
//! * [`summary`]: the bot's `/metrics` answer, as JSON or chat text.
//! * [`persist`]: snapshot, diff and restore between memory and the store.
//! * [`store`]: the only module with SQL (PostgreSQL and SQLite).
//! * [`cluster`]: cluster mode (`--redis-url`): syncs to Redis, dedupe
//!   across replicas, the cluster totals for summaries and the store.
//! * [`tasks`]: the flush and history loops around `persist`'s one-step
//!   functions.
//! * [`serve`]: the accept loop: header-read timeout, a bound on
//!   connections, and a deadline on shutdown.
//! * [`startup`]: builds the application and runs it until stopped.
//! * [`error`]: the API's error type and its JSON shape.

pub mod cluster;
pub mod config;
pub mod dedupe;
pub mod event;
pub mod http;
pub mod ingest;
pub mod journal;
pub mod metrics;
pub mod persist;
pub mod record;
pub mod render_cache;
pub mod serve;
pub mod startup;
pub mod state;
pub mod store;
pub mod summary;
pub mod tasks;
pub mod telemetry;
pub mod totals;

/// A boxed future, the return type of the seams' methods (`ingest::Arbiter`,
/// `persist::Source`, `totals::Totals`) so that each can be a trait object:
/// single-node code holds `Arc<dyn …>` and never names cluster types.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
