//! botmetrics turns a chat bot's events into Prometheus metrics, a summary
//! for the bot's own `/metrics` command, and long-term history.
//!
//! # Layout
//!
//! In the order an event travels, then a flush:
//!
//! * [`config`]: the one `Config` (flags with env fallbacks) and its
//!   parsers, the remote-write flags among them.
//! * [`serve`]: the accept loop: header-read timeout, a bound on
//!   connections, and a deadline on shutdown.
//! * [`tls`]: HTTPS (`--tls-cert`/`--tls-key`), a certificate swapped on
//!   SIGHUP.
//! * [`http`]: the API, one file per resource, merged under shared
//!   middleware, and its error type ([`http::error`]); handlers get
//!   [`state`], one `Arc` per request.
//! * [`event`]: raw JSON events become checked domain types; whole batches
//!   are validated before anything is applied (errors: `event::ParseError`).
//! * [`prices`]: the price table; a batch's unreported LLM costs are priced
//!   once, before ingest journals them.
//! * [`ingest`]: dedupes retries by `event_id` ([`dedupe`]), counts a batch
//!   into [`metrics`] and journals it ([`journal`], records encoded by
//!   [`record`]) before the answer; replays journals at start. Its seams,
//!   `Arbiter` and `UserNotes`, are where cluster mode joins.
//! * [`metrics`]: the in-memory cells of every `bot_*` series (counters,
//!   histograms, capped free-form families, active-user sketches, "today"
//!   counters), each bot's user book (`metrics::users`: new and returning
//!   users, cohorts, sessions), self-metrics, and the `Registry` that
//!   exposes them.
//! * [`registry`]: bots and their tokens (hashed), kept in the store,
//!   seeded from `--tokens`, changed through the admin API.
//! * [`render_cache`]: `/metrics` and summaries rendered once per TTL, and
//!   the page's charts shared by the viewers polling together.
//! * [`totals`]: where handlers read totals (this process's memory, or the
//!   cluster's); [`summary`]: the bot's `/metrics` answer from them.
//! * [`tasks`]: the one loop helper every periodic task runs on.
//! * [`persist`]: the store's one writer: a flush takes a cut from its
//!   `Source` (memory at a journal LSN, or the cluster totals), diffs it
//!   against what the store holds and writes it in one transaction; the
//!   translation between memory and rows.
//! * [`store`]: the only module with SQL (PostgreSQL and SQLite) and the
//!   one-writer lease.
//! * [`cluster`]: cluster mode (`--redis-url`), plugged into the seams
//!   above: claims ids across replicas, syncs counts to Redis, reads the
//!   cluster totals, and leads the store writer from Redis.
//! * [`remote_write`]: pushes the same series to Prometheus remote-write
//!   receivers (`--remote-write-url`), from a bounded queue with backoff.
//! * [`startup`]: builds the application (choosing each seam's side) and
//!   runs it until stopped; [`telemetry`]: logging.

pub mod cluster;
pub mod config;
pub mod dedupe;
pub mod event;
pub mod gzip;
pub mod http;
pub mod ingest;
pub mod journal;
pub mod memory;
pub mod metrics;
pub mod persist;
pub mod prices;
pub mod record;
pub mod registry;
pub mod remote_write;
pub mod render_cache;
pub mod serve;
pub mod share;
pub mod startup;
pub mod state;
pub mod store;
pub mod summary;
pub mod tasks;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod totals;

/// A boxed future, the return type of the seams' methods (`ingest::Arbiter`,
/// `persist::Source`, `totals::Totals`) so that each can be a trait object:
/// single-node code holds `Arc<dyn …>` and never names cluster types.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The cores this process may run on (its CPU affinity and quota), read
/// once: how many threads a render and its gzip split into.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
