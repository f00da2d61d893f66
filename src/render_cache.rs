//! Rendered answers served for a TTL: `/metrics` and the summary.
//!
//! A miss renders once however many requests are waiting for it (moka's
//! `get_with` coalesces concurrent initialisations), and the render runs on
//! the blocking pool so a 10,000-series page never stalls request handling.
//! Gzip is done once per render, not once per request: Prometheus always
//! asks for it.

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
    /// `None` when the TTL is zero: every request renders.
    cache: Option<Cache<K, Arc<Rendered>>>,
}

impl<K: Hash + Eq + Send + Sync + Clone + 'static> RenderCache<K> {
    pub fn new(endpoint: CachedEndpoint, ttl: Duration) -> Self {
        let cache = (!ttl.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(1024)
                .time_to_live(ttl)
                .build()
        });
        RenderCache { endpoint, cache }
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
        match &self.cache {
            None => rendering.await,
            Some(cache) => {
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
