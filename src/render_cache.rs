//! Rendered answers served for a TTL: `/metrics` and the summary.
//!
//! With a TTL of zero (the `/metrics` default) nothing is served stale: a
//! request always gets a render that began after it arrived, and requests
//! arriving during a render share the next one.
//!
//! A miss renders once however many requests are waiting for it (moka's
//! `entry().or_insert_with` coalesces concurrent initialisations), and the render runs on
//! the blocking pool so a 10,000-series page never stalls request handling.
//! Gzip is done once per render, not once per request: Prometheus always
//! asks for it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache;

use crate::metrics::{CachedEndpoint, SelfMetrics};

/// One rendered answer.
#[derive(Debug)]
pub struct Rendered {
    pub content_type: &'static str,
    pub body: Bytes,
    /// The same body, gzip-compressed, when worth it.
    pub gzip: Option<Bytes>,
}

impl Rendered {
    pub fn plain(content_type: &'static str, body: Vec<u8>) -> Self {
        Rendered {
            content_type,
            body: body.into(),
            gzip: None,
        }
    }

    pub fn with_gzip(content_type: &'static str, body: impl Into<Bytes>) -> Self {
        let body = body.into();
        // Level 1 (most of the size win of higher levels at a fraction of
        // the CPU, which matters on every cache miss), on every core.
        let gzip = crate::gzip::compress(&body, crate::cores()).map(Bytes::from);
        Rendered {
            content_type,
            body,
            gzip,
        }
    }
}

/// A TTL cache of rendered answers, keyed by whatever varies the answer.
pub struct RenderCache<K> {
    endpoint: CachedEndpoint,
    mode: Mode<K>,
    /// Requests inside [`Self::get_or_render`] right now. The seam that lets
    /// a test hold a render until N requests wait for it, and so tell a
    /// coalescing cache from a plain TTL one.
    in_flight: AtomicUsize,
}

/// Counts a request out of [`RenderCache::in_flight`] however it ends
/// (answered, or dropped by a client that went away).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The last render of one key, and when it started.
type Slot = Arc<tokio::sync::Mutex<Option<(Instant, Arc<Rendered>)>>>;

/// Keys remembered by a zero-TTL cache before it forgets them all: keys are
/// a configured bot, a format and a restore generation, so this is only
/// reached as generations pass.
const MAX_SLOTS: usize = 1024;

enum Mode<K> {
    /// A render is served for the TTL.
    Ttl(Cache<K, Arc<Rendered>>),
    /// TTL zero: every request is answered by a render that started after
    /// it arrived, so it shows every event acknowledged before it. Requests
    /// that arrive while a render runs wait for it to end and then share
    /// the next one: a burst of scrapes costs two renders, not one each.
    Aligned(std::sync::Mutex<HashMap<K, Slot>>),
}

impl<K: Hash + Eq + Send + Sync + Clone + 'static> RenderCache<K> {
    pub fn new(endpoint: CachedEndpoint, ttl: Duration) -> Self {
        let mode = if ttl.is_zero() {
            Mode::Aligned(std::sync::Mutex::new(HashMap::new()))
        } else {
            Mode::Ttl(
                Cache::builder()
                    .max_capacity(1024)
                    .time_to_live(ttl)
                    .build(),
            )
        };
        RenderCache {
            endpoint,
            mode,
            in_flight: AtomicUsize::new(0),
        }
    }

    /// How many requests are waiting for an answer from this cache now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cached answer for `key`, or a fresh render (CPU work, run on
    /// the blocking pool) shared by every request that arrives while it runs.
    pub async fn get_or_render<F>(&self, key: K, selfm: &SelfMetrics, render: F) -> Arc<Rendered>
    where
        F: FnOnce() -> Rendered + Send + 'static,
    {
        let endpoint = self.endpoint.as_str();
        self.get_or_render_async(key, selfm, async move {
            match tokio::task::spawn_blocking(render).await {
                Ok(rendered) => rendered,
                // A panic in a render is a bug; answer with an empty page
                // rather than take the server down, and say so.
                Err(e) => {
                    tracing::error!(error = %e, endpoint, "render failed");
                    Rendered::plain("text/plain; charset=utf-8", Vec::new())
                }
            }
        })
        .await
    }

    /// The same for a render that waits on I/O (cluster totals from Redis).
    pub async fn get_or_render_async<F>(
        &self,
        key: K,
        selfm: &SelfMetrics,
        render: F,
    ) -> Arc<Rendered>
    where
        F: Future<Output = Rendered> + Send + 'static,
    {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _in_flight = InFlight(&self.in_flight);
        let endpoint = self.endpoint.as_str();
        let rendering = async {
            let started = Instant::now();
            let rendered = render.await;
            selfm
                .render_duration
                .with_label_values(&[endpoint])
                .observe(started.elapsed().as_secs_f64());
            selfm.cache_misses.with_label_values(&[endpoint]).inc();
            Arc::new(rendered)
        };
        match &self.mode {
            Mode::Aligned(slots) => {
                let arrived = Instant::now();
                let slot = {
                    // Held for a map lookup only, never across an await.
                    let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
                    if slots.len() >= MAX_SLOTS && !slots.contains_key(&key) {
                        slots.clear();
                    }
                    slots.entry(key).or_default().clone()
                };
                let mut last = slot.lock().await;
                if let Some((started, rendered)) = &*last
                    && *started >= arrived
                {
                    selfm.cache_hits.with_label_values(&[endpoint]).inc();
                    return rendered.clone();
                }
                let started = Instant::now();
                let rendered = rendering.await;
                *last = Some((started, rendered.clone()));
                rendered
            }
            Mode::Ttl(cache) => {
                let entry = cache.entry(key).or_insert_with(rendering).await;
                if entry.is_fresh() {
                    // Counted as a miss by the render itself.
                } else {
                    selfm.cache_hits.with_label_values(&[endpoint]).inc();
                }
                entry.into_value()
            }
        }
    }
}

/// JSON answers computed in the last few seconds, per (bot, what): the
/// built-in page's charts. History changes only once per
/// `--history-interval`, so page viewers polling together share one
/// computation (moka runs one per key at a time), and the cost of a refresh
/// does not grow with the number of open pages.
pub struct RecentJson(pub moka::future::Cache<(String, &'static str), bytes::Bytes>);

impl RecentJson {
    /// Answers live for the history interval, at most 30 s: never more
    /// than 30 s behind what history holds.
    pub fn new(history_interval: std::time::Duration) -> Self {
        let ttl = history_interval.clamp(
            std::time::Duration::from_millis(500),
            std::time::Duration::from_secs(30),
        );
        RecentJson(
            moka::future::Cache::builder()
                .max_capacity(3_000)
                .time_to_live(ttl)
                .build(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::metrics::Metrics;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn without_a_ttl_every_answer_is_newer_than_its_request_and_bursts_share() {
        let metrics = Metrics::new(&[], 10, chrono_tz::UTC, 0.0, Default::default()).unwrap();
        let selfm = &metrics.selfm;
        let cache = Arc::new(RenderCache::<u8>::new(
            CachedEndpoint::Metrics,
            Duration::ZERO,
        ));
        // "Events": a counter the render reads; each request bumps it
        // before asking, so its answer must show at least its own bump.
        let events = Arc::new(AtomicU64::new(0));
        let ask = || {
            let events = events.clone();
            let cache = cache.clone();
            let seen = events.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let rendered = cache_get(&cache, selfm, events).await;
                let shown: u64 = std::str::from_utf8(&rendered.body)
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(
                    shown >= seen,
                    "answer shows {shown}, request came after {seen}"
                );
            }
        };
        // Sequential requests: each renders afresh.
        for _ in 0..3 {
            ask().await;
        }
        let misses = || selfm.cache_misses.with_label_values(&["metrics"]).get();
        assert_eq!(misses(), 3);
        // Ten at once while renders are slow: the first renders, the rest
        // arrived during it and share one more.
        let burst: Vec<_> = (0..10).map(|_| ask()).collect();
        futures_join_all(burst).await;
        assert!(
            misses() - 3 <= 2,
            "{} renders for a burst of ten",
            misses() - 3
        );
        assert_eq!(
            selfm.cache_hits.with_label_values(&["metrics"]).get() + misses() - 3,
            10
        );
    }

    async fn cache_get(
        cache: &RenderCache<u8>,
        selfm: &SelfMetrics,
        events: Arc<AtomicU64>,
    ) -> Arc<Rendered> {
        cache
            .get_or_render(0, selfm, move || {
                let value = events.load(Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
                Rendered::plain("text/plain", value.to_string().into_bytes())
            })
            .await
    }

    async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: Vec<F>) {
        let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
        std::future::poll_fn(|cx| {
            pinned.retain_mut(|f| f.as_mut().poll(cx).is_pending());
            if pinned.is_empty() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
    }
}

#[cfg(test)]
mod single_flight {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::atomic::Ordering;
    use std::sync::{Condvar, Mutex};

    /// A gate renders wait at until the test opens it.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        opened: Condvar,
    }

    impl Gate {
        fn wait(&self) {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }

        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    /// N requests for the same key while a render is held: exactly one
    /// render runs, the other N-1 get its answer. The render is held until
    /// all N are inside the cache, so a plain TTL cache (look up, render on
    /// a miss, insert) would run N renders here.
    async fn one_render_for_concurrent_requests(endpoint: CachedEndpoint) {
        let answers = held_render(endpoint, Duration::from_secs(60)).await;
        assert_eq!(answers, vec!["render 1"; N]);
    }

    const N: usize = 8;

    /// Holds the first render until all N requests are inside the cache,
    /// then lets it finish; checks the count of renders against the self
    /// metrics and returns each request's answer, in order.
    async fn held_render(endpoint: CachedEndpoint, ttl: Duration) -> Vec<String> {
        let metrics = Arc::new(
            Metrics::new(&["b".into()], 10, chrono_tz::UTC, 60.0, Default::default()).unwrap(),
        );
        let cache = Arc::new(RenderCache::<u64>::new(endpoint, ttl));
        let gate = Arc::new(Gate::default());
        let renders = Arc::new(AtomicUsize::new(0));
        let request = |_| {
            let (cache, metrics, gate, renders) = (
                cache.clone(),
                metrics.clone(),
                gate.clone(),
                renders.clone(),
            );
            tokio::spawn(async move {
                cache
                    .get_or_render(7, &metrics.selfm, move || {
                        let n = renders.fetch_add(1, Ordering::SeqCst) + 1;
                        gate.wait();
                        Rendered::plain("text/plain", format!("render {n}").into_bytes())
                    })
                    .await
            })
        };
        // The first request's render starts before the others arrive, so
        // every other request arrived during it (one that arrived before it
        // started could rightly share it).
        let mut requests = vec![request(0)];
        while renders.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        requests.extend((1..N).map(request));
        // Every request is inside.
        while cache.in_flight() < N {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Give any request that would start a render of its own the chance.
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.open();
        let mut answers = Vec::new();
        for request in requests {
            let answer = request.await.unwrap();
            answers.push(std::str::from_utf8(&answer.body).unwrap().to_owned());
        }
        assert_eq!(cache.in_flight(), 0);
        let renders = renders.load(Ordering::SeqCst) as u64;
        let label = [endpoint.as_str()];
        let selfm = &metrics.selfm;
        assert_eq!(selfm.cache_misses.with_label_values(&label).get(), renders);
        assert_eq!(
            selfm.cache_hits.with_label_values(&label).get(),
            N as u64 - renders
        );
        answers
    }

    /// TTL zero: the requests that arrived during the held render do not
    /// take its (older) answer; they share exactly one more render.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn without_a_ttl_requests_during_a_render_share_exactly_one_more() {
        let mut answers = held_render(CachedEndpoint::Metrics, Duration::ZERO).await;
        answers.sort();
        let mut expected = vec!["render 2"; N];
        expected[0] = "render 1";
        assert_eq!(answers, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn metrics_render_once_for_concurrent_scrapes() {
        one_render_for_concurrent_requests(CachedEndpoint::Metrics).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_summary_renders_once_for_concurrent_requests() {
        one_render_for_concurrent_requests(CachedEndpoint::Summary).await;
    }
}
