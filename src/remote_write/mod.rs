//! remote_write: pushes every series `/metrics` shows to Prometheus
//! remote-write 1.0 receivers (Grafana Cloud, Mimir, VictoriaMetrics, a
//! Prometheus with its receiver on), so no Prometheus has to run beside
//! the bot.
//!
//! Every `--remote-write-interval` one snapshot ([`collect::snapshot`]) is
//! encoded once ([`proto`]) and queued for each receiver ([`queue`]); one
//! sender per receiver sends its queue oldest first, so a receiver sees
//! each series' samples in time order, as it requires. A push that fails
//! with 429, a 5xx or no answer stays at the head of the queue and is
//! retried with backoff (0.5 s doubling up to the interval); any other 4xx
//! means the receiver will never take it (bad credentials, a malformed
//! series), so it is dropped, counted as failed and logged once, not
//! retried. Counters are pushed as the totals `/metrics` shows, which the
//! store and journal keep monotonic across restarts; where a counter does
//! start again (a cluster replica, or a wiped bot), `rate()` and
//! `increase()` see the decrease as a reset, as for a scraped counter.
//!
//! In cluster mode each replica pushes its own series, as Prometheus would
//! scrape each one, told apart by `instance` (see the README).

pub mod collect;
pub mod proto;
pub mod queue;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::config::remote_write::{RemoteWriteArgs, Secret};
use queue::{Push, Queue};

use crate::metrics::{Metrics, reg};

/// How long the pushes left at shutdown may take, all receivers together.
const FINAL_PUSH_DEADLINE: Duration = Duration::from_secs(5);

/// Most bytes of a receiver's refusal quoted in the log.
const MAX_QUOTED: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum RemoteWriteError {
    #[error("--remote-write-username and --remote-write-password go together")]
    HalfBasicAuth,
    #[error("the remote-write credentials hold characters an HTTP header cannot carry")]
    BadCredentials,
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("self-metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Why one push did not go through.
#[derive(Debug, thiserror::Error)]
enum PushError {
    /// 429, 5xx, no connection, a timeout: the push is kept and retried.
    #[error("{0}")]
    Retry(String),
    /// Any other 4xx: the receiver will not take it, however often asked.
    #[error("HTTP {status}: {message}")]
    Refused { status: u16, message: String },
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<Bytes>,
>;

/// The `botmetrics_remote_write_*` self-metrics, one series per receiver.
struct RwMetrics {
    sent: IntCounterVec,
    failed: IntCounterVec,
    dropped: IntCounterVec,
    retries: IntCounterVec,
    last_success: GaugeVec,
    queue_length: IntGaugeVec,
    push_bytes: IntGaugeVec,
}

impl RwMetrics {
    fn register(r: &Registry) -> prometheus::Result<Self> {
        let url = &["url"];
        let counter = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), url);
        Ok(RwMetrics {
            sent: reg(
                r,
                counter(
                    "botmetrics_remote_write_samples_sent_total",
                    "Samples a remote-write receiver accepted.",
                )?,
            )?,
            failed: reg(
                r,
                counter(
                    "botmetrics_remote_write_samples_failed_total",
                    "Samples a receiver refused with a 4xx other than 429: not retried (see the log for its message).",
                )?,
            )?,
            dropped: reg(
                r,
                counter(
                    "botmetrics_remote_write_samples_dropped_total",
                    "Samples dropped unsent because the queue (--remote-write-queue) was full: the oldest go first.",
                )?,
            )?,
            retries: reg(
                r,
                counter(
                    "botmetrics_remote_write_retries_total",
                    "Pushes that failed with 429, a 5xx or no answer, and were kept to be retried.",
                )?,
            )?,
            last_success: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "botmetrics_remote_write_last_success_timestamp_seconds",
                        "Unix time of the last push a receiver accepted; 0 until the first.",
                    ),
                    url,
                )?,
            )?,
            queue_length: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "botmetrics_remote_write_queue_length",
                        "Pushes waiting for a receiver (bound: --remote-write-queue).",
                    ),
                    url,
                )?,
            )?,
            push_bytes: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "botmetrics_remote_write_push_bytes",
                        "Bytes on the wire (snappy-compressed protobuf) of the last push queued.",
                    ),
                    url,
                )?,
            )?,
        })
    }
}

/// One receiver: its queue and its series of the self-metrics.
struct Target {
    url: http::Uri,
    shown: String,
    queue: Queue,
    wake: Notify,
    sent: prometheus::IntCounter,
    failed: prometheus::IntCounter,
    dropped: prometheus::IntCounter,
    retries: prometheus::IntCounter,
    last_success: prometheus::Gauge,
    queue_length: prometheus::IntGauge,
    push_bytes: prometheus::IntGauge,
}

/// The pusher: built once at start when `--remote-write-url` is set.
pub struct RemoteWrite {
    args: RemoteWriteArgs,
    /// The `Authorization` header value, built once.
    auth: Option<http::HeaderValue>,
    client: Client,
    targets: Vec<Arc<Target>>,
    /// `job`, `instance` and `--remote-write-label`, added to every series.
    labels: Vec<(String, String)>,
    metrics: Arc<Metrics>,
    seq: AtomicU64,
}

impl RemoteWrite {
    /// `None` without `--remote-write-url`. `listen` is the address
    /// actually bound: its port goes into the default `instance` label.
    pub fn new(
        args: &RemoteWriteArgs,
        metrics: Arc<Metrics>,
        listen: std::net::SocketAddr,
    ) -> Result<Option<Self>, RemoteWriteError> {
        if args.urls.is_empty() {
            return Ok(None);
        }
        use base64::Engine as _;
        let auth = match (&args.username, &args.password, &args.bearer_token) {
            (_, _, Some(token)) => Some(format!("Bearer {}", token.0)),
            (Some(user), Some(password), None) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", password.0))
            )),
            (None, None, None) => None,
            _ => return Err(RemoteWriteError::HalfBasicAuth),
        };
        let auth = match auth.map(http::HeaderValue::try_from) {
            Some(Ok(mut value)) => {
                value.set_sensitive(true);
                Some(value)
            }
            Some(Err(_)) => return Err(RemoteWriteError::BadCredentials),
            None => None,
        };
        let m = RwMetrics::register(&metrics.registry)?;
        let queue_bound = usize::try_from(args.queue).unwrap_or(usize::MAX);
        let targets = args
            .urls
            .iter()
            .map(|url| {
                let shown = crate::config::remote_write::redacted(url);
                let l = &[shown.as_str()];
                Arc::new(Target {
                    url: url.clone(),
                    queue: Queue::new(queue_bound),
                    wake: Notify::new(),
                    sent: m.sent.with_label_values(l),
                    failed: m.failed.with_label_values(l),
                    dropped: m.dropped.with_label_values(l),
                    retries: m.retries.with_label_values(l),
                    last_success: m.last_success.with_label_values(l),
                    queue_length: m.queue_length.with_label_values(l),
                    push_bytes: m.push_bytes.with_label_values(l),
                    shown,
                })
            })
            .collect();
        let mut labels = args.labels.clone();
        if !labels.iter().any(|(n, _)| n == "job") {
            labels.push(("job".into(), "botmetrics".into()));
        }
        if !labels.iter().any(|(n, _)| n == "instance") {
            labels.push((
                "instance".into(),
                format!("{}:{}", hostname(), listen.port()),
            ));
        }
        Ok(Some(RemoteWrite {
            auth,
            client: client()?,
            args: args.clone(),
            targets,
            labels,
            metrics,
            seq: AtomicU64::new(0),
        }))
    }

    /// The labels added to every series (for the start-up log and tests).
    pub fn labels(&self) -> &[(String, String)] {
        &self.labels
    }

    /// One snapshot of every series, encoded; what a push sends.
    pub fn snapshot_body(&self) -> (Vec<u8>, u64) {
        let request = collect::snapshot(&self.metrics, &self.labels, now_ms());
        let samples = request.samples() as u64;
        match request.to_body() {
            Ok(body) => (body, samples),
            // snappy refuses only inputs over 4 GiB: far past any snapshot.
            Err(e) => {
                tracing::error!(error = %e, "remote_write: cannot compress a snapshot");
                (Vec::new(), 0)
            }
        }
    }

    /// Takes a snapshot and queues it for every receiver (the step the
    /// loop runs each interval).
    pub fn collect_once(&self) {
        let (body, samples) = self.snapshot_body();
        if samples == 0 {
            return;
        }
        let body = Bytes::from(body);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        for target in &self.targets {
            target
                .push_bytes
                .set(i64::try_from(body.len()).unwrap_or(i64::MAX));
            let dropped = target.queue.add(Push {
                seq,
                body: body.clone(),
                samples,
            });
            if !dropped.is_empty() {
                let n: u64 = dropped.iter().map(|p| p.samples).sum();
                target.dropped.inc_by(n);
                tracing::warn!(
                    url = %target.shown,
                    samples = n,
                    "remote_write: queue full (--remote-write-queue); oldest push dropped"
                );
            }
            target.queue_length.set(target.queue.len() as i64);
            target.wake.notify_one();
        }
    }

    /// Sends one push to `target`.
    async fn send(&self, target: &Target, push: &Push) -> Result<(), PushError> {
        let mut request = http::Request::post(target.url.clone())
            .header("Content-Encoding", "snappy")
            .header("Content-Type", "application/x-protobuf")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .header(
                "User-Agent",
                concat!("botmetrics/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = &self.auth {
            request = request.header(http::header::AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(http_body_util::Full::new(push.body.clone()))
            .map_err(|e| PushError::Retry(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| PushError::Retry(describe(&e)))?;
            let status = response.status();
            // The receiver's reason, bounded: a body that never ends cannot
            // hold the sender (the whole exchange has a deadline too).
            let body = http_body_util::Limited::new(response.into_body(), 64 * 1024);
            let message = http_body_util::BodyExt::collect(body)
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            Ok::<_, PushError>((status, message))
        };
        let (status, mut message) = tokio::time::timeout(self.args.timeout, exchange)
            .await
            .map_err(|_| {
                PushError::Retry(format!(
                    "no answer within {:?} (--remote-write-timeout)",
                    self.args.timeout
                ))
            })??;
        if status.is_success() {
            return Ok(());
        }
        if message.len() > MAX_QUOTED {
            let mut cut = MAX_QUOTED;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let message = message.trim().to_owned();
        if status.as_u16() == 429 || status.is_server_error() || !status.is_client_error() {
            Err(PushError::Retry(format!(
                "HTTP {}: {message}",
                status.as_u16()
            )))
        } else {
            Err(PushError::Refused {
                status: status.as_u16(),
                message,
            })
        }
    }

    /// Sends `target`'s queue, oldest first, until it is empty or `stop`;
    /// retries with backoff. On `stop` returns at once; [`Self::drain`]
    /// makes the last attempt.
    async fn send_loop(self: Arc<Self>, target: Arc<Target>, stop: CancellationToken) {
        let mut failures: u32 = 0;
        // The status last refused with: a refusal is logged when it starts
        // (or changes), not once per push.
        let mut refused: Option<u16> = None;
        loop {
            let Some(push) = target.queue.oldest() else {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = target.wake.notified() => continue,
                }
            };
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                outcome = self.send(&target, &push) => outcome,
            };
            match outcome {
                Ok(()) => {
                    self.sent(&target, &push);
                    if failures > 0 || refused.is_some() {
                        tracing::info!(url = %target.shown, failures, "remote_write: receiver takes pushes again");
                    }
                    failures = 0;
                    refused = None;
                }
                Err(PushError::Refused { status, message }) => {
                    target.queue.done(push.seq);
                    target.failed.inc_by(push.samples);
                    target.queue_length.set(target.queue.len() as i64);
                    if refused != Some(status) {
                        tracing::error!(
                            url = %target.shown,
                            status,
                            receiver_says = %message,
                            samples = push.samples,
                            "remote_write: the receiver refused the push (not retried: a 4xx other than 429 will not change; check the URL and credentials); logged once until a push succeeds"
                        );
                        refused = Some(status);
                    }
                }
                Err(PushError::Retry(why)) => {
                    target.retries.inc();
                    if failures == 0 {
                        tracing::warn!(
                            url = %target.shown,
                            error = %why,
                            "remote_write: push failed; kept in the queue and retried with backoff"
                        );
                    }
                    failures = failures.saturating_add(1);
                    let wait = crate::tasks::flush_wait(failures, self.args.interval);
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    fn sent(&self, target: &Target, push: &Push) {
        target.queue.done(push.seq);
        target.sent.inc_by(push.samples);
        target.last_success.set(now_ms() as f64 / 1000.0);
        target.queue_length.set(target.queue.len() as i64);
    }

    /// One snapshot, then each receiver's queue sent once, oldest first,
    /// stopping at a receiver's first failure (counted as the loop counts
    /// it). The step [`Self::drain`] runs at shutdown; benchmarks and
    /// tools call it directly.
    pub async fn push_once(&self) {
        self.collect_once();
        let each = self.targets.iter().map(|target| async move {
            while let Some(push) = target.queue.oldest() {
                match self.send(target, &push).await {
                    Ok(()) => self.sent(target, &push),
                    Err(PushError::Refused { status, message }) => {
                        target.queue.done(push.seq);
                        target.failed.inc_by(push.samples);
                        target.queue_length.set(target.queue.len() as i64);
                        tracing::error!(url = %target.shown, status, receiver_says = %message, "remote_write: push not accepted (a 4xx: not retried)");
                    }
                    Err(PushError::Retry(why)) => {
                        target.retries.inc();
                        tracing::warn!(url = %target.shown, error = %why, pending = target.queue.len(), "remote_write: push failed; still queued");
                        return;
                    }
                }
            }
        });
        for f in each {
            f.await;
        }
    }

    /// At shutdown: [`Self::push_once`] (everything acknowledged), within
    /// [`FINAL_PUSH_DEADLINE`]. What is still queued after it is lost with
    /// the process, but not the totals: the next start pushes them.
    pub async fn drain(&self) {
        if tokio::time::timeout(FINAL_PUSH_DEADLINE, self.push_once())
            .await
            .is_err()
        {
            tracing::warn!("remote_write: final pushes did not finish in {FINAL_PUSH_DEADLINE:?}");
        }
    }
}

/// Runs the pusher until `shutdown`: a snapshot every interval and a
/// sender per receiver, then the final push.
pub async fn push_loop(rw: Arc<RemoteWrite>, shutdown: CancellationToken) {
    tracing::info!(
        urls = ?rw.targets.iter().map(|t| t.shown.as_str()).collect::<Vec<_>>(),
        labels = ?rw.labels,
        interval = ?rw.args.interval,
        "remote_write: pushing every series"
    );
    let stop = CancellationToken::new();
    let senders: Vec<_> = rw
        .targets
        .iter()
        .map(|t| tokio::spawn(rw.clone().send_loop(t.clone(), stop.clone())))
        .collect();
    let mut ticks = tokio::time::interval(rw.args.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: a push at start gives every series its
    // first sample (the restored totals) at once.
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => rw.collect_once(),
        }
    }
    stop.cancel();
    for sender in senders {
        let _ = sender.await;
    }
    rw.drain().await;
}

/// The HTTP client: hyper's, over rustls with the `ring` provider (already
/// built for sqlx and redis: no second crypto library, no C build step) and
/// the Mozilla roots of `webpki-roots`, so HTTPS to a hosted receiver works
/// in a container without a CA bundle. Plain `http://` is allowed too, for
/// a receiver on the same host or network.
fn client() -> Result<Client, RemoteWriteError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

/// A client error with its causes (hyper's own message is only "client
/// error (Connect)").
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// This machine's name, for the default `instance` label.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
