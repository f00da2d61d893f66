//! The state every handler shares. axum clones it per request, so it is one
//! `Arc`: a clone is one reference-count increment, whatever it holds.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::persist::Persistence;
use crate::prices::Prices;
use crate::render_cache::RenderCache;
use crate::totals::Totals;

/// What varies a summary answer: one bot or all, JSON or text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SummaryKey {
    pub bot: Option<String>,
    pub text: bool,
    /// The store's restore generation: see `Persistence::generation`.
    pub generation: u64,
}

pub struct Shared {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub ingest: Arc<Ingest>,
    /// Bots and their tokens (hashed), from the store and `--tokens`.
    pub registry: Arc<crate::registry::Registry>,
    /// The store's one writer, in both modes.
    pub persistence: Arc<Persistence>,
    /// Where summaries and readiness read totals (this process's memory,
    /// or the cluster's).
    pub totals: Arc<dyn Totals>,
    /// The price table events without a reported cost are priced with;
    /// replaced whole on SIGHUP (a request prices with one table).
    pub prices: std::sync::RwLock<Arc<Prices>>,
    /// Keyed by the restore generation only: one page for everyone.
    /// HTTPS's certificate, re-read on SIGHUP; `None` serves plain HTTP.
    pub tls: Option<Arc<crate::tls::Tls>>,
    pub metrics_page: RenderCache<u64>,
    pub summaries: RenderCache<SummaryKey>,
    /// The built-in page's charts, shared by viewers polling together.
    pub charts: crate::render_cache::RecentJson,
    /// The last state /readyz answered (`""` before the first probe), so a
    /// change is logged once instead of once per probe.
    pub readiness: std::sync::Mutex<&'static str>,
    pub started: Instant,
    /// The installation's key for user ids (see `event::UserKey`).
    pub user_key: crate::event::UserKey,
}

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl Shared {
    /// The table in force now.
    pub fn prices(&self) -> Arc<Prices> {
        self.prices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
