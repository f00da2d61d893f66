//! The state every handler shares: cheap to clone, handles only.

use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::persist::Persistence;
use crate::render_cache::RenderCache;

/// What varies a summary answer: one bot or all, JSON or text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SummaryKey {
    pub bot: Option<String>,
    pub text: bool,
    /// The store's restore generation: see `Persistence::generation`.
    pub generation: u64,
}

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub ingest: Arc<Ingest>,
    pub persistence: Arc<Persistence>,
    /// Keyed by the restore generation only: one page for everyone.
    pub metrics_page: Arc<RenderCache<u64>>,
    pub summaries: Arc<RenderCache<SummaryKey>>,
    /// The last state /readyz answered (`""` before the first probe), so a
    /// change is logged once instead of once per probe.
    pub readiness: Arc<std::sync::Mutex<&'static str>>,
    pub started: Instant,
}
