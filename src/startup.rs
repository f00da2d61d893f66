//! Building the application and running it until it is told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::claims::Claims;
use crate::cluster::lead::Lead;
use crate::cluster::sync::Syncer;
use crate::cluster::view::{ClusterTotals, View};
use crate::cluster::{Cluster, ClusterMetrics, Redis};
use crate::config::Config;
use crate::dedupe::Dedupe;
use crate::ingest::Ingest;
use crate::journal::Journal;
use crate::metrics::{CachedEndpoint, Metrics};
use crate::persist::local::Local;
use crate::persist::{PersistError, Persistence, Source};
use crate::render_cache::RenderCache;
use crate::serve::{ConnectionMetrics, Limits};
use crate::state::{AppState, Shared};
use crate::store::{Store, StoreError};
use crate::totals::{Memory, Totals};

/// The shortest idle limit of the store writer's session (see
/// `Store::with_writer_idle_limit`).
const WRITER_IDLE_MIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--database-url: {0}")]
    Store(#[from] StoreError),
    #[error("--data-dir: {0}")]
    Journal(#[from] crate::journal::JournalError),
    #[error("--prices: {0}")]
    Prices(#[from] crate::prices::PricesError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("--remote-write-*: {0}")]
    RemoteWrite(#[from] crate::remote_write::RemoteWriteError),
    #[error("server: {0}")]
    Serve(std::io::Error),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("the OS's random source failed, so no installation secret can be made: {0}")]
    Random(String),
}

/// A bound, ready-to-run botmetrics.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    limits: Limits,
    connections: ConnectionMetrics,
    /// Cluster mode's own tasks.
    tier: Option<Tier>,
    reload: ReloadSignal,
    remote_write: Option<Arc<crate::remote_write::RemoteWrite>>,
}

/// What cluster mode runs beside the single-node tasks: the sync to Redis
/// and the claims' settling.
struct Tier {
    syncer: Arc<Syncer>,
    claims: Arc<Claims>,
    /// The scan of Redis' books, when they are shared.
    books: Option<Arc<crate::cluster::book::BookScanner>>,
}

impl Application {
    /// Binds the listener, builds the state and restores stored totals. A
    /// store that is down does not stop the start: the flush task restores
    /// as soon as it answers, and /readyz says 503 until then.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        // First, so a SIGHUP during start-up waits for the reload task
        // instead of killing the process (its default action).
        let reload = ReloadSignal::listen();
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new(
            config.tokens.bots(),
            usize::try_from(config.max_label_values).unwrap_or(usize::MAX),
            config.timezone,
            config.metrics_cache_ttl.as_secs_f64(),
            config.book_limits(),
        )?);
        // Cluster mode: one book per bot across replicas, in Redis (see
        // `cluster::book`); each replica only sends its users' runs.
        if config.redis_url.is_some() {
            metrics.share_books();
        }
        // The store's lease must not outlive the Redis lease by more than a
        // bound (one process with a standby gets the same): twice it, and
        // never so short that a take-over's load leaves the new session
        // idle past it.
        let lease = crate::cluster::lead::lease_ttl(config.flush_interval);
        // Before anything is opened: a bad certificate is a typo to fix,
        // and should not first wait for a database.
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(crate::tls::Tls::load(cert, key)?)),
            _ => None,
        };
        let store = Store::open(&config.database_url)?
            .with_writer_idle_limit((lease * 2).max(WRITER_IDLE_MIN));
        // A fault no retry mends stops the start here, with the cause; a
        // store that is only not there yet is retried by the flush task.
        let unreachable = store.check(&config.database_url).await?;
        let store = Arc::new(store);
        let user_key = user_key(&store, data_dir(&config, &store).as_deref()).await?;
        let registry = Arc::new(crate::registry::Registry::new(
            store.clone(),
            metrics.clone(),
            config.tokens.clone(),
        )?);
        if unreachable.is_none() {
            // Before the restore, so the bots created at runtime get their
            // stored totals back like those of --tokens.
            match registry.refresh().await {
                Ok(()) => {}
                Err(e @ crate::registry::RegistryError::Disagree { .. }) => return Err(e.into()),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot read the bot registry; serving the bots of --tokens and retrying every --sync-interval"
                ),
            }
        }
        let ingest = open_ingest(&config, &store)?;
        // The seams: what the store writer writes, where handlers read
        // totals, and (cluster mode) how ingest decides ids and notes users.
        let (ingest, source, totals, tier): (_, Arc<dyn Source>, Arc<dyn Totals>, _) =
            match &config.redis_url {
                None => {
                    let ingest = Arc::new(ingest);
                    let source = Arc::new(Local::new(
                        metrics.clone(),
                        ingest.clone(),
                        config.dedupe_window,
                    ));
                    (ingest, source, Arc::new(Memory), None)
                }
                Some(urls) => {
                    let replica = ingest
                        .journal()
                        .map_or_else(crate::cluster::fresh_replica_id, |j| j.id().to_owned());
                    let cluster = Arc::new(Cluster::new(
                        Redis::new(urls.clone()),
                        replica,
                        &config,
                        ClusterMetrics::register(&metrics.registry, config.sync_interval)?,
                    ));
                    let claims = Arc::new(Claims::new(cluster.clone()));
                    let ingest = Arc::new(
                        ingest
                            .with_arbiter(claims.clone())
                            .with_notes(cluster.pending.clone()),
                    );
                    let view = Arc::new(View::new(cluster.clone(), store.clone()));
                    let syncer = Arc::new(Syncer::new(
                        cluster.clone(),
                        metrics.clone(),
                        ingest.clone(),
                        claims.clone(),
                        store.clone(),
                        usize::try_from(config.max_label_values).unwrap_or(usize::MAX),
                    )?);
                    let lead = Arc::new(Lead::new(
                        cluster.clone(),
                        view.clone(),
                        metrics.clone(),
                        config.flush_interval,
                    ));
                    let totals = Arc::new(ClusterTotals {
                        view,
                        syncer: syncer.clone(),
                        local: metrics.clone(),
                    });
                    tracing::info!(
                        redis = %cluster.redis.urls().redacted(),
                        replica = %cluster.replica,
                        redis_cluster = cluster.redis.urls().is_cluster(),
                        "cluster mode: counts sync to Redis every {:?}",
                        config.sync_interval
                    );
                    let books = if metrics.books_shared() {
                        Some(Arc::new(crate::cluster::book::BookScanner::new(
                            cluster.clone(),
                            metrics.clone(),
                            lead.clone(),
                            metrics.book_limits(),
                        )?))
                    } else {
                        None
                    };
                    (
                        ingest,
                        lead,
                        totals,
                        Some(Tier {
                            syncer,
                            claims,
                            books,
                        }),
                    )
                }
            };
        let persistence = Arc::new(Persistence::new(
            store,
            metrics.clone(),
            ingest.clone(),
            source,
            config.retention,
        ));
        if let Some(tier) = &tier {
            if let Some(why) = &unreachable {
                tracing::warn!(
                    "{why}; cluster mode goes on with Redis, and the store writer (and seeding a bot Redis lacks) retries until it answers"
                );
            }
            // Counted past what Redis holds before serving, when Redis
            // answers now; else the sync task does it as soon as it does.
            if let Err(e) = tier.syncer.sync_once().await {
                tracing::warn!(error = %e, "first sync to redis failed; serving, and retrying");
            }
        } else if let Some(why) = unreachable {
            tracing::warn!(
                "{why}; serving from memory and retrying, stored totals restore when it answers"
            );
        } else {
            match persistence.prepare().await {
                Ok(Some(report)) => tracing::info!(
                    backend = persistence.store.backend(),
                    ?report,
                    "stored totals restored"
                ),
                Ok(None) => {}
                // Logged by `prepare` itself, once: not an error, a role.
                Err(PersistError::Store(StoreError::Standby(_))) => {}
                Err(e) => tracing::error!(
                    error = %e,
                    "store unreachable at start; serving from memory, will restore when it answers"
                ),
            }
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let connections = ConnectionMetrics::register(&metrics.registry)?;
        let max_connections = match crate::serve::raise_open_files_limit() {
            Ok(open_files) => {
                let wanted = usize::try_from(config.max_connections).unwrap_or(usize::MAX);
                let fitted = crate::serve::fit_connections(wanted, open_files);
                if fitted < wanted {
                    tracing::warn!(
                        open_files,
                        "the open-files limit allows {fitted} connections: --max-connections {wanted} lowered to {fitted}; raise `ulimit -n` (LimitNOFILE= under systemd) to allow more"
                    );
                }
                fitted
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the open-files limit; --max-connections used as given");
                usize::try_from(config.max_connections).unwrap_or(usize::MAX)
            }
        };
        warn_about_access(&config, listener.local_addr().unwrap_or(config.listen));
        let remote_write = crate::remote_write::RemoteWrite::new(
            &config.remote_write,
            metrics.clone(),
            listener.local_addr().unwrap_or(config.listen),
        )?
        .map(Arc::new);
        let limits = Limits {
            max_connections,
            header_read_timeout: config.header_read_timeout,
            write_timeout: config.write_timeout,
            shutdown_timeout: config.shutdown_timeout,
        };
        let state = AppState::new(Shared {
            ingest,
            registry,
            metrics_page: RenderCache::new(CachedEndpoint::Metrics, config.metrics_cache_ttl),
            summaries: RenderCache::new(
                CachedEndpoint::Summary,
                // Cluster mode: Redis is the cache (a read costs about a
                // millisecond), and its totals are at most one sync interval
                // behind; a cached answer would add up to another. So each
                // request gets a read that started after it arrived, and
                // requests that arrive together share it.
                match &tier {
                    Some(_) => std::time::Duration::ZERO,
                    None => config.summary_cache_ttl,
                },
            ),
            charts: crate::render_cache::RecentJson::new(config.history_interval),
            totals,
            tls,
            prices: std::sync::RwLock::new(Arc::new(load_prices(&config)?)),
            readiness: Default::default(),
            metrics,
            persistence,
            config,
            started: Instant::now(),
            user_key,
        });
        Ok(Application {
            listener,
            state,
            limits,
            connections,
            tier,
            reload,
            remote_write,
        })
    }

    /// The address actually bound (the real port when `--listen` said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.state.config.listen)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Cluster mode's sync to Redis, for callers that drive it by hand
    /// (`examples/cluster_costs.rs`).
    pub fn syncer(&self) -> Option<Arc<Syncer>> {
        self.tier.as_ref().map(|t| t.syncer.clone())
    }

    /// Serves until `shutdown` completes; then stops accepting, lets
    /// in-flight requests finish (for at most `--shutdown-timeout`), and
    /// waits for the background tasks' final flush and history write.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let Application {
            listener,
            state,
            limits,
            connections,
            tier,
            reload,
            remote_write,
        } = self;
        let token = CancellationToken::new();
        // The store writer stops after the sync (cluster mode), so its
        // final flush stores the final sync's totals.
        let writer_token = CancellationToken::new();
        let config = state.config.clone();
        let flush = tokio::spawn(crate::tasks::flush_loop(
            state.persistence.clone(),
            config.flush_interval,
            writer_token.clone(),
        ));
        let history = tokio::spawn(crate::tasks::history_loop(
            state.persistence.clone(),
            config.history_interval,
            writer_token.clone(),
        ));
        let journal_sync = tokio::spawn(crate::tasks::journal_sync_loop(
            state.ingest.clone(),
            token.clone(),
        ));
        let book_scan = tier.as_ref().and_then(|t| t.books.clone()).map(|books| {
            tokio::spawn(crate::cluster::book::scan_loop(
                books,
                config.user_scan_interval,
                token.clone(),
            ))
        });
        let tier_tasks = tier.map(|tier| {
            (
                tokio::spawn(crate::cluster::sync::sync_loop(
                    tier.syncer,
                    config.sync_interval,
                    token.clone(),
                )),
                tokio::spawn(crate::cluster::claims::confirm_loop(
                    tier.claims,
                    token.clone(),
                )),
            )
        });
        let user_scan = tokio::spawn(crate::tasks::user_scan_loop(
            state.metrics.clone(),
            state.ingest.clone(),
            config.user_scan_interval,
            token.clone(),
        ));
        let reloads = tokio::spawn(reload_loop(state.clone(), reload, token.clone()));
        let registry = tokio::spawn(registry_loop(
            state.registry.clone(),
            state.persistence.store.clone(),
            config.redis_url.is_some(),
            config.sync_interval,
            token.clone(),
        ));
        // Stopped once serving has: its final push holds every event
        // acknowledged.
        let pusher =
            remote_write.map(|rw| tokio::spawn(crate::remote_write::push_loop(rw, token.clone())));
        let ingest = state.ingest.clone();
        let persistence = state.persistence.clone();
        let tls = state.tls.as_ref().map(|tls| tls.acceptor());
        tracing::info!(
            listen = %listener.local_addr().map_err(StartError::Serve)?,
            scheme = if tls.is_some() { "https" } else { "http" },
            bots = ?config.tokens.bots(),
            store = persistence.store.backend(),
            "botmetrics serving"
        );
        crate::serve::serve(
            listener,
            crate::http::router(state),
            limits,
            connections,
            tls,
            shutdown,
        )
        .await;
        token.cancel();
        if let Some((sync, confirm)) = tier_tasks {
            let _ = tokio::join!(sync, confirm);
        }
        writer_token.cancel();
        // The scan stops before the final flush, so the flush holds its
        // last effects.
        let _ = user_scan.await;
        if let Some(task) = book_scan {
            let _ = task.await;
        }
        let _ = tokio::join!(flush, history, journal_sync, reloads, registry);
        if let Some(pusher) = pusher {
            let _ = pusher.await;
        }
        crate::tasks::final_journal_sync(&ingest).await;
        persistence.store.close().await;
        Ok(())
    }
}

/// The price table `--prices` names, or the built-in one; in the currency
/// `--currency` says, since reported costs are in it too.
pub fn load_prices(config: &Config) -> Result<crate::prices::Prices, StartError> {
    let prices = match &config.prices {
        Some(path) => crate::prices::Prices::load(path)?,
        None => crate::prices::Prices::builtin(),
    };
    if prices.currency != config.currency {
        return Err(crate::prices::PricesError::Parse(format!(
            "the price table is in {} but --currency is {}; give a table in {} (--prices FILE) or --currency {}",
            prices.currency, config.currency, config.currency, prices.currency
        ))
        .into());
    }
    tracing::info!(
        models = prices.len(),
        taken = %prices.taken,
        currency = %prices.currency,
        "price table loaded"
    );
    Ok(prices)
}

/// Says at start what is open to whom, when it is more than a reader of
/// the configuration may expect.
fn warn_about_access(config: &Config, listen: SocketAddr) {
    if config.tokens.is_empty() {
        tracing::warn!(
            "no --tokens: every POST /v1/events is refused (401); start with --tokens bot=secret to accept events"
        );
    }
    if config.metrics_token.is_none() && !listen.ip().is_loopback() {
        tracing::warn!(
            %listen,
            "listening beyond this machine with no --metrics-token: /metrics, /v1/summary and /v1/history are open to anyone who can reach {listen}; set --metrics-token"
        );
    }
}

/// Where this process keeps its files: `--data-dir`, or beside the SQLite
/// file, or `./botmetrics-data` with PostgreSQL; none for an in-memory
/// SQLite database.
fn data_dir(config: &Config, store: &Store) -> Option<PathBuf> {
    match (&config.data_dir, store.sqlite_file()) {
        (Some(dir), _) => Some(dir.clone()),
        // Beside the database file, named after it.
        (None, Some(file)) => {
            let mut dir = file.as_os_str().to_owned();
            dir.push("-data");
            Some(PathBuf::from(dir))
        }
        (None, None) if store.backend() == "postgres" => Some(PathBuf::from("botmetrics-data")),
        (None, None) => None,
    }
}

/// The file in the data directory that keeps a copy of the installation
/// secret, so a restart while the store is down hashes users as before.
const SECRET_FILE: &str = "installation.secret";

/// The installation's key for user ids: the store's secret (created from
/// the OS's random source at the first start), with a copy kept in the data
/// directory (mode 0600) for a start while the store is down. With neither,
/// a new secret is made, kept locally and offered to the store at the next
/// start; a store that meanwhile got another one keeps its own, and this
/// process says so.
async fn user_key(
    store: &Store,
    data_dir: Option<&std::path::Path>,
) -> Result<crate::event::UserKey, StartError> {
    let file = data_dir.map(|d| d.join(SECRET_FILE));
    let local: Option<[u8; 16]> = file
        .as_ref()
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|bytes| bytes.try_into().ok());
    let proposed = match local {
        Some(secret) => secret,
        None => {
            let mut fresh = [0u8; 16];
            getrandom::fill(&mut fresh).map_err(|e| StartError::Random(e.to_string()))?;
            fresh
        }
    };
    let secret = match store.secret(proposed).await {
        Ok(stored) => {
            if local.is_some_and(|l| l != stored) {
                tracing::warn!(
                    "the installation secret in the data directory differs from the store's: the store's is used (users hashed meanwhile with the other count as new)"
                );
            }
            stored
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "store unreachable: user ids are hashed with the installation secret kept in the data directory{}",
                if local.is_some() { "" } else { " (none was there: a new one, offered to the store at the next start)" }
            );
            proposed
        }
    };
    if local != Some(secret)
        && let Some(file) = &file
        && let Err(e) = write_secret(file, &secret)
    {
        tracing::warn!(error = %e, path = %file.display(), "cannot keep a copy of the installation secret");
    }
    Ok(crate::event::UserKey::new(secret))
}

fn write_secret(file: &std::path::Path, secret: &[u8; 16]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret)?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)
}

/// The journal and dedupe, with what the journal on disk remembers.
fn open_ingest(config: &Config, store: &Store) -> Result<Ingest, StartError> {
    let dedupe = Dedupe::new(
        config.dedupe_window,
        usize::try_from(config.dedupe_max_ids).unwrap_or(usize::MAX),
    );
    let data_dir = if config.no_journal {
        None
    } else {
        data_dir(config, store)
    };
    let Some(data_dir) = data_dir else {
        tracing::warn!("no journal: a 202 is durable only after the next flush");
        return Ok(Ingest::new(dedupe, None));
    };
    // The journal feeds what it was written for: the store, or (cluster
    // mode) the Redis tier, so one is never replayed into the other.
    let feeds = match &config.redis_url {
        // Not the URLs: a seed list reordered, or a host renamed, is the
        // same cluster, and its journal must be continued, not stranded.
        Some(_) => "redis".to_owned(),
        None => store.identity(),
    };
    let opened = Journal::open(
        &data_dir,
        &feeds,
        config.journal_fsync,
        config.journal_max_bytes,
    )?;
    if opened.torn_bytes > 0 {
        tracing::warn!(
            bytes = opened.torn_bytes,
            "journal: a torn tail was dropped"
        );
    }
    tracing::info!(
        dir = %data_dir.display(),
        journal = opened.journal.id(),
        fsync = ?config.journal_fsync,
        records = opened.journal.recovered_lsn(),
        "journal open"
    );
    let ingest = Ingest::new(dedupe, Some(opened.journal));
    let ids = ingest.remember_journal_ids(chrono::Utc::now().timestamp_millis())?;
    if ids > 0 {
        tracing::info!(ids, "event_ids remembered from the journal");
    }
    Ok(ingest)
}

/// SIGHUP, the signal `systemctl reload`, supervisors and log rotation
/// send, listened for from the start: its default action ends the process
/// at once, with no final flush. Here it asks to re-read what can be
/// re-read while serving, and never stops the server.
struct ReloadSignal {
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl ReloadSignal {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let hangup = signal(SignalKind::hangup())
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP: a SIGHUP will stop the server");
                })
                .ok();
            ReloadSignal { hangup }
        }
        #[cfg(not(unix))]
        ReloadSignal {}
    }

    /// Completes on the next SIGHUP; never, where there is none to hear.
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(hangup) = &mut self.hangup
            && hangup.recv().await.is_some()
        {
            return;
        }
        std::future::pending::<()>().await;
    }
}

/// One re-read: what it re-read (for the log), and what changed or why the
/// old value stays.
type Reloaded = (&'static str, Result<String, String>);

/// What a SIGHUP re-reads, one line each. A reload that fails keeps what
/// it had, so a bad file never stops the serving.
async fn reload(state: &AppState) -> Vec<Reloaded> {
    let mut done = vec![("prices", reload_prices(state))];
    if let Some(tls) = &state.tls {
        // New handshakes get the new certificate; open connections keep
        // the session they have.
        done.push(("tls", tls.reload().map_err(|e| e.to_string())));
    }
    done
}

/// The price table again, from `--prices`: events priced from now on use
/// it; what was counted keeps its price (the journal holds it).
fn reload_prices(state: &AppState) -> Result<String, String> {
    let Some(path) = &state.config.prices else {
        return Ok("the built-in price table, unchanged".to_owned());
    };
    let prices = load_prices(&state.config).map_err(|e| e.to_string())?;
    let models = prices.len();
    *state.prices.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(prices);
    Ok(format!("{models} models from {}", path.display()))
}

/// Runs [`reload`] on every SIGHUP until shutdown, and logs what it did.
async fn reload_loop(state: AppState, mut signal: ReloadSignal, token: CancellationToken) {
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = signal.recv() => {}
        }
        let done = reload(&state).await;
        if done.is_empty() {
            tracing::info!("reload requested (SIGHUP): nothing to re-read yet");
        }
        for (what, outcome) in done {
            match outcome {
                Ok(changed) => tracing::info!(what, "reload requested (SIGHUP): {changed}"),
                Err(e) => tracing::warn!(
                    what,
                    error = %e,
                    "reload requested (SIGHUP): failed, keeping what was loaded"
                ),
            }
        }
    }
}

/// Reads the bot registry again every `--sync-interval`, so a bot or token
/// revoked (or added) on another replica on the same store is seen here
/// within one interval. A failed read keeps what was read last.
///
/// Only where another process can change it: in cluster mode, and on a
/// standby (whose writer takes the admin calls). One process that holds
/// the store makes every change itself, so it reads nothing while idle
/// ("no statement when nothing changed").
async fn registry_loop(
    registry: Arc<crate::registry::Registry>,
    store: Arc<Store>,
    cluster: bool,
    every: Duration,
    token: CancellationToken,
) {
    let mut failures = crate::serve::RateLimited::new(Duration::from_secs(60));
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if !cluster && store.is_writer().await {
            continue;
        }
        if let Err(e) = registry.refresh().await
            && let Some(suppressed) = failures.allow()
        {
            tracing::warn!(error = %e, suppressed, "cannot read the bot registry; keeping the tokens read last");
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
