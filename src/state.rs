//! The state every handler shares: cheap to clone, handles only.

use std::sync::Arc;
use std::time::Instant;

use crate::cluster::sync::Syncer;
use crate::cluster::view::View;
use crate::cluster::writer::Writer;
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

/// Cluster mode's parts, shared by the handlers and the background tasks.
#[derive(Clone)]
pub struct ClusterParts {
    pub syncer: Arc<Syncer>,
    pub view: Arc<View>,
    pub writer: Arc<Writer>,
}

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub ingest: Arc<Ingest>,
    pub persistence: Arc<Persistence>,
    /// Set in cluster mode (`--redis-url`).
    pub cluster: Option<ClusterParts>,
    /// Keyed by the restore generation only: one page for everyone.
    pub metrics_page: Arc<RenderCache<u64>>,
    pub summaries: Arc<RenderCache<SummaryKey>>,
    /// The last state /readyz answered (`""` before the first probe), so a
    /// change is logged once instead of once per probe.
    pub readiness: Arc<std::sync::Mutex<&'static str>>,
    pub started: Instant,
}
