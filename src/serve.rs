//! Serving HTTP/1.1 on a TCP listener, with the limits that keep one slow,
//! idle or hostile client from costing anyone else anything.
//!
//! `axum::serve` has no header-read timeout, no bound on connections and
//! no end to a graceful shutdown, so a half-sent request could hold a
//! connection (and SIGTERM) forever. This accept loop drives each connection
//! with hyper's HTTP/1 builder directly and adds:
//!
//! * a **header-read timeout**: a connection must deliver a complete request
//!   head within `--header-read-timeout` of the moment the server starts
//!   waiting for one, which is when it opens and again after every answer.
//!   So the same limit closes slowloris connections and idle keep-alive
//!   connections; a body or a handler is bounded by `--request-timeout`.
//! * a **bound on open connections** (`--max-connections`): past it a new
//!   connection is answered at once with a JSON 503 and closed, instead of
//!   waiting in the kernel's backlog behind connections that may never
//!   finish. With the header-read timeout, no client holds a slot it does
//!   not use for longer than that timeout.
//! * a **shutdown deadline** (`--shutdown-timeout`): on shutdown the
//!   listener closes, idle connections close, in-flight requests get that
//!   long to finish, and whatever is left is dropped, so the caller's final
//!   work (flush, history write) always runs.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// File descriptors kept back from `--max-connections` for everything else
/// the process opens: the listener, database connections, SQLite and
/// journal files, connections being turned away, standard streams.
pub const RESERVED_FDS: usize = 64;

/// Connections answered "503, too many connections" at the same time; past
/// this a connection over the bound is closed without an answer, so turning
/// clients away never costs more than this many descriptors.
const REJECTING_AT_ONCE: usize = 32;

/// How long a turned-away connection may take to send its request head
/// before it gets its 503 anyway.
const REJECT_READ_WAIT: Duration = Duration::from_secs(1);

/// Each connection's read buffer, and so the largest request head, is at
/// most this: with the bound on connections it bounds their memory (hyper's
/// default, ~400 KiB, would let 1,000 half-sent heads take 400 MB).
const MAX_BUF_BYTES: usize = 64 * 1024;

/// The limits of [`serve`], from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// How close the connections are to their bound, as self-metrics.
#[derive(Clone)]
pub struct ConnectionMetrics {
    open: IntGauge,
    limit: IntGauge,
    rejected: IntCounter,
}

impl ConnectionMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let open = IntGauge::new("botmetrics_connections_open", "HTTP connections open now.")?;
        let limit = IntGauge::new(
            "botmetrics_connections_max",
            "Open HTTP connections allowed (--max-connections, lowered to fit the open-files limit).",
        )?;
        let rejected = IntCounter::new(
            "botmetrics_connections_rejected_total",
            "Connections turned away with 503 because --max-connections were open.",
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(limit.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        Ok(ConnectionMetrics {
            open,
            limit,
            rejected,
        })
    }
}

/// Raises the soft limit on open files to the hard limit, so the bound on
/// connections, not the default soft limit of 1,024, decides how many
/// clients are served. Returns the soft limit in force afterwards.
#[cfg(unix)]
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass. It may refuse
        // (macOS caps the soft limit below an unlimited hard one); then the
        // old limit stays and the caller fits the bound to it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // `rlim_t` is u64 on Linux but not on every unix.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(limit.rlim_cur))
}

#[cfg(not(unix))]
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    Ok(u64::MAX)
}

/// The bound on connections that fits in `open_files` descriptors.
pub fn fit_connections(wanted: usize, open_files: u64) -> usize {
    let available = usize::try_from(open_files)
        .unwrap_or(usize::MAX)
        .saturating_sub(RESERVED_FDS);
    wanted.min(available).max(1)
}

/// Serves `router` on `listener` until `shutdown` completes, then closes
/// the listener and winds the connections down within the shutdown timeout.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUF_BYTES);
    metrics
        .limit
        .set(i64::try_from(limits.max_connections).unwrap_or(i64::MAX));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let rejecting = Arc::new(Semaphore::new(REJECTING_AT_ONCE));
    let stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut accept_errors = RateLimited::new(Duration::from_secs(10));
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Reaps finished connections, so the set holds open ones only.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of descriptors (EMFILE) or a connection reset before
                // it was accepted: neither is a reason to stop serving. A
                // short pause lets closing connections free descriptors.
                if let Some(suppressed) = accept_errors.allow() {
                    tracing::warn!(error = %e, suppressed, "cannot accept a connection");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small answers go out at once rather than after Nagle's delay.
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.rejected.inc();
            if let Ok(turn) = rejecting.clone().try_acquire_owned() {
                connections.spawn(async move {
                    turn_away(stream).await;
                    drop(turn);
                });
            }
            continue;
        };
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let stop = stop.clone();
        let open = metrics.open.clone();
        open.inc();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                // Errors here are the client's: a reset, a timeout reading
                // its head, a malformed request (hyper has answered it).
                result = connection.as_mut() => log_connection_end(result),
                () = stop.cancelled() => {
                    // Closes the connection if it is idle; otherwise lets the
                    // request in flight finish and answers it with
                    // `Connection: close`.
                    connection.as_mut().graceful_shutdown();
                    log_connection_end(connection.await);
                }
            }
            open.dec();
            drop(slot);
        });
    }

    drop(listener);
    stop.cancel();
    let open = connections.len();
    tracing::info!(
        connections = open,
        timeout = ?limits.shutdown_timeout,
        "shutting down: listener closed, finishing in-flight requests"
    );
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            timeout = ?limits.shutdown_timeout,
            "shutdown timeout: closing connections that did not finish"
        );
        // Aborting drops each connection (and any request it was serving).
        connections.shutdown().await;
        metrics.open.set(0);
    }
}

fn log_connection_end(result: hyper::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended");
    }
}

/// The answer to a connection over the bound: the project's JSON error, so
/// a client that reads it learns why, then the connection is closed.
const TOO_MANY: &str = concat!(
    "HTTP/1.1 503 Service Unavailable\r\n",
    "content-type: application/json\r\n",
    "connection: close\r\n",
    "retry-after: 1\r\n",
    "content-length: 96\r\n",
    "\r\n",
    r#"{"error":"unavailable","message":"too many open connections (--max-connections); retry shortly"}"#,
);

async fn turn_away(mut stream: TcpStream) {
    // Read the request head first (briefly): closing a socket with unread
    // data makes the kernel send a reset, which can destroy the answer
    // before the client reads it.
    let _ = tokio::time::timeout(REJECT_READ_WAIT, async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(REJECT_READ_WAIT, async {
        let _ = stream.write_all(TOO_MANY.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Lets one log line through per period and counts what it held back, so a
/// flood of identical failures is visible without flooding the log.
#[derive(Debug)]
pub struct RateLimited {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub const fn new(period: Duration) -> Self {
        RateLimited {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines held back since the last one)` when a line may be
    /// written now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.period => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canned_answer_declares_its_length() {
        let (head, body) = TOO_MANY.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "unavailable");
    }

    #[test]
    fn the_bound_fits_the_open_files_limit() {
        assert_eq!(fit_connections(1024, 1024), 1024 - RESERVED_FDS);
        assert_eq!(fit_connections(1024, 1_048_576), 1024);
        assert_eq!(fit_connections(1024, 10), 1);
    }

    #[test]
    fn rate_limited_lines_count_what_they_held_back() {
        let mut limit = RateLimited::new(Duration::from_secs(3600));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        let mut now = RateLimited::new(Duration::ZERO);
        assert_eq!(now.allow(), Some(0));
        assert_eq!(now.allow(), Some(0));
    }

    #[cfg(unix)]
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let soft = raise_open_files_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        #[allow(clippy::useless_conversion)]
        let current = u64::from(limit.rlim_cur);
        assert_eq!(soft, current);
        assert!(soft > 0);
    }
}
