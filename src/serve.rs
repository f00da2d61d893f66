//! Serving HTTP/1.1 on a TCP listener, with the limits that keep one slow,
//! idle or hostile client from costing anyone else anything.
//!
//! One concern in one file (about 800 lines before its tests): admission
//! at the bound, eviction of idle connections, the header-read and write
//! timeouts and the shutdown deadline all act on the same table of
//! connections and their states, and they are checked against each other.
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
//! * a **bound on open connections** (`--max-connections`). At the bound,
//!   as nginx does with its "reusable" connections, the connection that
//!   has been idle longest (no request in progress: fresh, half-way through
//!   a head, or keep-alive between requests) is closed to admit the new
//!   one, so clients that send nothing never lock out one that does. Only
//!   when every connection is serving a request, and none finishes within
//!   100 ms, is a new one answered with a JSON 503 and closed, instead of
//!   waiting in the kernel's backlog behind connections that may never
//!   finish.
//! * a **write timeout** (`--write-timeout`): an answer that makes no
//!   progress for that long (the client does not read, its socket is full)
//!   closes the connection, so a client that never reads cannot hold one.
//! * a **shutdown deadline** (`--shutdown-timeout`): on shutdown the
//!   listener closes, idle connections close, in-flight requests get that
//!   long to finish, and whatever is left is dropped, so the caller's final
//!   work (flush, history write) always runs.
//!
//! With `--tls-cert` ([`crate::tls`]) each admitted connection first does
//! its TLS handshake, within the header-read timeout, and is then served
//! exactly as a plain one: the same slot, timeouts and shutdown. A plain
//! HTTP request to the TLS port gets a JSON 400 that says so, not a hang.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

/// File descriptors kept back from `--max-connections` for everything else
/// the process opens: the listener, database connections, SQLite and
/// journal files, connections being turned away, standard streams.
pub const RESERVED_FDS: usize = 64;

/// Connections over the bound held at the same time, waiting briefly for a
/// slot or being answered "503, too many connections"; past this a
/// connection over the bound is closed without an answer, so they never
/// cost more than this many descriptors.
const REJECTING_AT_ONCE: usize = 32;

/// Connections closed to admit a new one whose descriptors are not freed
/// yet; past this a new connection is turned away instead, so evicting
/// never costs more than this many descriptors beyond the bound. A victim
/// closes within microseconds, so this is reached only by a burst.
const EVICTING_AT_ONCE: usize = 16;

/// How long a new connection waits for a slot when every connection is
/// busy, before it is turned away with 503.
const ADMIT_WAIT: Duration = Duration::from_millis(100);

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
    pub write_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// How close the connections are to their bound, as self-metrics.
#[derive(Clone)]
pub struct ConnectionMetrics {
    open: IntGauge,
    limit: IntGauge,
    rejected: IntCounter,
    evicted: IntCounter,
    write_timeouts: IntCounter,
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
            "Connections turned away with 503 because --max-connections were open and busy.",
        )?;
        let evicted = IntCounter::new(
            "botmetrics_connections_evicted_total",
            "Idle connections closed to admit a new one at --max-connections.",
        )?;
        let write_timeouts = IntCounter::new(
            "botmetrics_connections_write_timeouts_total",
            "Connections closed because an answer made no progress for --write-timeout.",
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(limit.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(evicted.clone()))?;
        registry.register(Box::new(write_timeouts.clone()))?;
        Ok(ConnectionMetrics {
            open,
            limit,
            rejected,
            evicted,
            write_timeouts,
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
    tls: Option<tokio_rustls::TlsAcceptor>,
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
    let slots = Arc::new(Slots::new(limits.max_connections));
    let rejecting = Arc::new(Semaphore::new(REJECTING_AT_ONCE));
    let stop = CancellationToken::new();
    let serving = Arc::new(Serving {
        builder,
        router,
        write_timeout: limits.write_timeout,
        handshake_timeout: limits.header_read_timeout,
        tls,
        metrics: metrics.clone(),
        stop: stop.clone(),
    });
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
        match slots.admit() {
            Admit::Slot(slot, evicted) => {
                connections.spawn(serving.clone().connection(stream, slot, evicted));
            }
            Admit::Full | Admit::Closing => {
                // Every connection is serving a request (or a burst has too
                // many victims still closing): a slot usually frees within
                // milliseconds, so the connection waits for one briefly,
                // beside the accept loop, before it is turned away.
                let Ok(turn) = rejecting.clone().try_acquire_owned() else {
                    metrics.rejected.inc();
                    continue;
                };
                let (slots, serving) = (slots.clone(), serving.clone());
                connections.spawn(async move {
                    match slots.admit_within(ADMIT_WAIT).await {
                        Some((slot, evicted)) => {
                            drop(turn);
                            serving.connection(stream, slot, evicted).await;
                        }
                        None => {
                            serving.metrics.rejected.inc();
                            turn_away(stream).await;
                            drop(turn);
                        }
                    }
                });
            }
        }
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

/// The slots of `--max-connections`, and which connections holding one are
/// idle, oldest first, so the bound admits a new connection by closing one
/// that is not serving anyone.
struct Slots {
    max: usize,
    state: Mutex<SlotState>,
    /// Signalled when a connection becomes idle or gives its slot back:
    /// what a connection waiting for a slot waits for.
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct SlotState {
    next_id: u64,
    /// Connections holding a slot (not those evicted and still closing).
    open: usize,
    /// Connections evicted whose descriptor is not closed yet.
    closing: usize,
    conns: HashMap<u64, Entry>,
    /// Idle connections by the moment they became idle, oldest first. The
    /// moment is a tick of `idle_ticks`, not a clock: only the order
    /// matters, and a request's end then costs no clock read.
    idle: BTreeSet<(u64, u64)>,
    idle_ticks: u64,
}

impl SlotState {
    /// The next moment of the idle order.
    fn tick(&mut self) -> u64 {
        self.idle_ticks += 1;
        self.idle_ticks
    }
}

struct Entry {
    /// Requests being served (HTTP/1 serves one at a time; a count keeps
    /// the bookkeeping right whatever hyper does between two of them).
    busy: usize,
    /// Its key in `SlotState::idle` while `busy` is 0.
    idle_since: Option<u64>,
    evict: CancellationToken,
}

impl Slots {
    fn new(max: usize) -> Self {
        Slots {
            max,
            state: Mutex::default(),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // The state is consistent between statements, so a panic elsewhere
        // while it was held leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection, closing the oldest idle one to make room
    /// at the bound.
    fn admit(self: &Arc<Self>) -> Admit {
        let mut state = self.lock();
        let evicted = if state.open < self.max {
            state.open += 1;
            false
        } else {
            if state.idle.is_empty() {
                return Admit::Full;
            }
            if state.closing >= EVICTING_AT_ONCE {
                return Admit::Closing;
            }
            let Some((_, victim)) = state.idle.pop_first() else {
                return Admit::Full;
            };
            let Some(entry) = state.conns.get_mut(&victim) else {
                return Admit::Full;
            };
            entry.idle_since = None;
            entry.evict.cancel();
            // Its slot passes to the new connection; its descriptor counts
            // as closing until its task drops it.
            state.closing += 1;
            true
        };
        let id = state.next_id;
        state.next_id += 1;
        let now = state.tick();
        let evict = CancellationToken::new();
        state.conns.insert(
            id,
            Entry {
                busy: 0,
                idle_since: Some(now),
                evict: evict.clone(),
            },
        );
        state.idle.insert((now, id));
        let slot = Slot {
            slots: self.clone(),
            id,
            evict,
        };
        Admit::Slot(slot, evicted)
    }

    /// Admits a new connection, waiting up to `wait` for a slot: for a
    /// request to finish (its connection then idle, so it can make room) or
    /// for victims of a burst to close.
    async fn admit_within(self: &Arc<Self>, wait: Duration) -> Option<(Slot, bool)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a change in between is not missed.
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if let Admit::Slot(slot, evicted) = self.admit() {
                return Some((slot, evicted));
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }
}

enum Admit {
    /// A slot, and whether an idle connection was closed to make room.
    Slot(Slot, bool),
    /// Every connection is serving a request.
    Full,
    /// Idle connections could make room, but too many evicted ones are
    /// still closing.
    Closing,
}

/// A connection's slot, given back when the connection ends.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    /// Cancelled when the connection is chosen to make room.
    evict: CancellationToken,
}

impl Slot {
    /// Marks a request in progress until the returned guard drops (with
    /// the answer's body, so the connection is busy until hyper has taken
    /// all of it); `None` once the connection was chosen to make room.
    /// The last bytes of an answer may still wait in hyper's buffer when
    /// the body is dropped; were the connection evicted right then they
    /// would be lost, but eviction takes the longest-idle first, so only a
    /// client that stopped reading long ago can be the one.
    fn begin(&self) -> Option<Busy> {
        let mut state = self.slots.lock();
        let state = &mut *state;
        let entry = state.conns.get_mut(&self.id)?;
        if entry.evict.is_cancelled() {
            return None;
        }
        if let Some(since) = entry.idle_since.take() {
            state.idle.remove(&(since, self.id));
        }
        entry.busy += 1;
        Some(Busy {
            slots: self.slots.clone(),
            id: self.id,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        if let Some(entry) = state.conns.remove(&self.id) {
            if let Some(since) = entry.idle_since {
                state.idle.remove(&(since, self.id));
            }
            if entry.evict.is_cancelled() {
                state.closing = state.closing.saturating_sub(1);
            } else {
                state.open = state.open.saturating_sub(1);
            }
            drop(state);
            self.slots.changed.notify_waiters();
        }
    }
}

/// A request in progress on a connection.
struct Busy {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        let state = &mut *state;
        let now = state.tick();
        let Some(entry) = state.conns.get_mut(&self.id) else {
            return;
        };
        entry.busy = entry.busy.saturating_sub(1);
        if entry.busy == 0 && !entry.evict.is_cancelled() {
            entry.idle_since = Some(now);
            state.idle.insert((now, self.id));
            self.slots.changed.notify_waiters();
        }
    }
}

/// The router behind a connection's [`Slot`]: each request marks the
/// connection busy until its answer's body is done.
struct Tracked {
    inner: TowerToHyperService<Router>,
    slot: Arc<Slot>,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

impl Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, request: Request<Incoming>) -> Answer {
        let Some(busy) = self.slot.begin() else {
            // Chosen to make room a moment ago: the connection is being
            // dropped, so no handler may start (its effect would have no
            // answer). Should the answer get out anyway, it says why.
            let mut answer = Response::new(TrackedBody {
                body: axum::body::Body::from(EVICTED),
                _busy: None,
            });
            *answer.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
            let headers = answer.headers_mut();
            headers.insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            headers.insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            return Box::pin(std::future::ready(Ok(answer)));
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await?;
            Ok(answer.map(|body| TrackedBody {
                body,
                _busy: Some(busy),
            }))
        })
    }
}

const EVICTED: &str = r#"{"error":"unavailable","message":"connection closed to admit another (--max-connections); retry"}"#;

/// An answer's body that keeps its connection busy until it is dropped.
struct TrackedBody {
    body: axum::body::Body,
    _busy: Option<Busy>,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket that fails a write (and so ends the connection)
/// once it has made no progress for the write timeout: the client does not
/// read and its socket is full. Counted from the first write that had to
/// wait, reset by any progress, like nginx's `send_timeout`.
struct WriteTimeout {
    stream: TcpStream,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    timeouts: IntCounter,
}

impl WriteTimeout {
    fn new(stream: TcpStream, timeout: Duration, timeouts: IntCounter) -> Self {
        WriteTimeout {
            stream,
            timeout,
            stalled: None,
            timeouts,
        }
    }

    /// What a write that returned `polled` means under the timeout.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        // Registers the waker, so the timeout fires even if the socket
        // never becomes writable.
        if stalled.as_mut().poll(cx).is_ready() {
            self.timeouts.inc();
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timeout: the client took none of the answer",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.check(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.check(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.check(cx, polled)
    }
}

/// What every connection is served with.
struct Serving {
    builder: http1::Builder,
    router: Router,
    write_timeout: Duration,
    /// A TLS handshake must finish within this (the header-read timeout:
    /// the handshake is what comes before the first head).
    handshake_timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: ConnectionMetrics,
    stop: CancellationToken,
}

impl Serving {
    /// Serves one admitted connection until it ends, is chosen to make
    /// room, or shutdown winds it down.
    async fn connection(self: Arc<Self>, stream: TcpStream, slot: Slot, evicted: bool) {
        if evicted {
            self.metrics.evicted.inc();
        }
        let _open = OpenGauge::inc(&self.metrics.open);
        let slot = Arc::new(slot);
        let Some(acceptor) = &self.tls else {
            let io = WriteTimeout::new(
                stream,
                self.write_timeout,
                self.metrics.write_timeouts.clone(),
            );
            return self.drive(io, slot).await;
        };
        // Fresh and idle until the handshake is done: eviction and
        // shutdown may close it, and the handshake has the header-read
        // timeout, so a client that opens and sends nothing holds nothing.
        let handshake = async {
            if plain_http(&stream).await {
                refuse_plain_http(stream).await;
                return None;
            }
            let io = WriteTimeout::new(
                stream,
                self.write_timeout,
                self.metrics.write_timeouts.clone(),
            );
            match acceptor.accept(io).await {
                Ok(tls) => Some(tls),
                Err(e) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    None
                }
            }
        };
        let tls = tokio::select! {
            biased;
            () = slot.evict.cancelled() => return,
            () = self.stop.cancelled() => return,
            done = tokio::time::timeout(self.handshake_timeout, handshake) => match done {
                Ok(Some(tls)) => tls,
                Ok(None) => return,
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            },
        };
        self.drive(tls, slot).await;
    }

    /// Serves HTTP/1.1 on an open connection (plain, or past its handshake).
    async fn drive<I>(&self, io: I, slot: Arc<Slot>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let connection = self.builder.serve_connection(
            TokioIo::new(io),
            Tracked {
                inner: TowerToHyperService::new(self.router.clone()),
                slot: slot.clone(),
            },
        );
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            // First: a connection chosen to make room is idle by
            // construction (no request started, and none can start:
            // `Slot::begin` refuses), so dropping it cuts no request.
            biased;
            () = slot.evict.cancelled() => {}
            // Errors here are the client's: a reset, a timeout reading its
            // head or writing an answer, a malformed request (hyper has
            // answered it).
            result = connection.as_mut() => log_connection_end(result),
            () = self.stop.cancelled() => {
                // Closes the connection if it is idle; otherwise lets the
                // request in flight finish and answers it with
                // `Connection: close`.
                connection.as_mut().graceful_shutdown();
                log_connection_end(connection.await);
            }
        }
        // The slot is given back once the connection (which holds the other
        // reference) is dropped, so its descriptor is closed first.
        drop(slot);
    }
}

/// `botmetrics_connections_open` for as long as it is held.
struct OpenGauge<'a>(&'a IntGauge);

impl<'a> OpenGauge<'a> {
    fn inc(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        OpenGauge(gauge)
    }
}

impl Drop for OpenGauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// True when a connection to the TLS port starts like a plain HTTP request
/// (a method's capital letter) rather than a TLS record (0x16).
async fn plain_http(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase())
}

/// The answer to plain HTTP on the TLS port, as nginx gives one: the
/// client learns what is wrong instead of seeing a reset.
const PLAIN_TO_TLS: &str = concat!(
    "HTTP/1.1 400 Bad Request\r\n",
    "content-type: application/json\r\n",
    "connection: close\r\n",
    "content-length: 98\r\n",
    "\r\n",
    r#"{"error":"tls_required","message":"this port serves HTTPS (--tls-cert): use https:// to reach it"}"#,
);

async fn refuse_plain_http(stream: TcpStream) {
    answer_and_close(stream, PLAIN_TO_TLS).await;
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

async fn turn_away(stream: TcpStream) {
    answer_and_close(stream, TOO_MANY).await;
}

/// Reads a request head (briefly), writes a canned answer and closes.
async fn answer_and_close(mut stream: TcpStream, answer: &str) {
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
        let _ = stream.write_all(answer.as_bytes()).await;
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
    fn the_canned_answers_declare_their_length() {
        for (answer, code) in [(TOO_MANY, "unavailable"), (PLAIN_TO_TLS, "tls_required")] {
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            assert!(head.contains(&format!("content-length: {}", body.len())));
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(json["error"], code);
        }
    }

    fn admitted(slots: &Arc<Slots>) -> (Slot, bool) {
        match slots.admit() {
            Admit::Slot(slot, evicted) => (slot, evicted),
            Admit::Full => panic!("full"),
            Admit::Closing => panic!("closing"),
        }
    }

    #[test]
    fn at_the_bound_the_oldest_idle_connection_makes_room_and_a_busy_one_never_does() {
        let slots = Arc::new(Slots::new(2));
        let (a, evicted) = admitted(&slots);
        assert!(!evicted);
        let (b, _) = admitted(&slots);
        // `a` is older, but serving a request: `b` is the one to close.
        let serving = a.begin().expect("a request may start");
        let (c, evicted) = admitted(&slots);
        assert!(evicted);
        assert!(b.evict.is_cancelled() && !a.evict.is_cancelled());
        assert!(b.begin().is_none(), "no request starts on a victim");
        // An answer finished makes `a` idle again, newer than `c`.
        std::thread::sleep(Duration::from_millis(1));
        drop(serving);
        let (d, _) = admitted(&slots);
        assert!(c.evict.is_cancelled() && !a.evict.is_cancelled());
        let _a = a.begin().expect("a request may start");
        let _d = d.begin().expect("a request may start");
        assert!(matches!(slots.admit(), Admit::Full), "every one is busy");
        // Victims free their slot only once their connection is dropped.
        assert_eq!(slots.lock().closing, 2);
        drop((b, c));
        let state = slots.lock();
        assert_eq!((state.open, state.closing, state.conns.len()), (2, 0, 2));
    }

    #[test]
    fn evicting_stops_while_too_many_victims_are_still_closing() {
        let slots = Arc::new(Slots::new(1));
        let mut held = vec![admitted(&slots).0];
        for _ in 0..EVICTING_AT_ONCE {
            let (slot, evicted) = admitted(&slots);
            assert!(evicted);
            held.push(slot);
        }
        assert!(matches!(slots.admit(), Admit::Closing));
        drop(held.remove(0));
        assert!(matches!(slots.admit(), Admit::Slot(_, true)));
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
