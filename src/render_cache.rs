//! Rendered answers served for a TTL: `/metrics` and the summary.
//!
//! With a TTL of zero (the `/metrics` default) nothing is served stale: a
//! request always gets a render that began after it arrived, and requests
//! arriving during a render share the next one.
//!
//! A miss renders once however many requests are waiting for it (moka's
//! `get_with` coalesces concurrent initialisations), and the render runs on
//! the blocking pool so a 10,000-series page never stalls request handling.
//! Gzip is done once per render, not once per request: Prometheus always
//! asks for it.

use std::collections::HashMap;
use std::hash::Hash;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
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

    pub fn with_gzip(content_type: &'static str, body: Vec<u8>) -> Self {
        // Level 1: most of the size win of higher levels at a fraction of
        // the CPU, which matters on every cache miss.
        let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::fast());
        let gzip = encoder
            .write_all(&body)
            .and_then(|()| encoder.finish())
            .ok()
            .map(Bytes::from);
        Rendered {
            content_type,
            body: body.into(),
            gzip,
        }
    }
}

/// A TTL cache of rendered answers, keyed by whatever varies the answer.
pub struct RenderCache<K> {
    endpoint: CachedEndpoint,
    mode: Mode<K>,
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
        RenderCache { endpoint, mode }
    }

    /// The cached answer for `key`, or a fresh render shared by every
    /// request that arrives while it runs.
    pub async fn get_or_render<F>(&self, key: K, selfm: &SelfMetrics, render: F) -> Arc<Rendered>
    where
        F: FnOnce() -> Rendered + Send + 'static,
    {
        let endpoint = self.endpoint.as_str();
        let rendering = async {
            let started = Instant::now();
            let rendered = match tokio::task::spawn_blocking(render).await {
                Ok(rendered) => rendered,
                // A panic in a render is a bug; answer with an empty page
                // rather than take the server down, and say so.
                Err(e) => {
                    tracing::error!(error = %e, endpoint, "render failed");
                    Rendered::plain("text/plain; charset=utf-8", Vec::new())
                }
            };
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::metrics::Metrics;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn without_a_ttl_every_answer_is_newer_than_its_request_and_bursts_share() {
        let metrics = Metrics::new(&[], 10, chrono_tz::UTC, 0.0).unwrap();
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
