//! One Redis connection, or one Redis Cluster connection, made on first
//! use and reused: both multiplex every caller's commands over their
//! sockets and reconnect by themselves once made. Until Redis answers
//! the first time, each use tries again (the process starts without it).

use std::sync::Mutex;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::RedisUrls;

use super::COMMAND_TIMEOUT;

#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub struct Redis {
    urls: RedisUrls,
    /// Set by the first use that reaches Redis; until then each use tries.
    conn: tokio::sync::OnceCell<Conn>,
    /// The last state logged: `None` before the first operation.
    logged: Mutex<Option<bool>>,
}

impl Redis {
    pub fn new(urls: RedisUrls) -> Self {
        Redis {
            urls,
            conn: tokio::sync::OnceCell::new(),
            logged: Mutex::new(None),
        }
    }

    pub fn urls(&self) -> &RedisUrls {
        &self.urls
    }

    /// The connection, made now if it never was. Once made it is shared
    /// without a lock: the hot path's claims only clone it.
    pub async fn conn(&self) -> redis::RedisResult<Conn> {
        self.conn.get_or_try_init(|| self.connect()).await.cloned()
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        if self.urls.is_cluster() {
            return self.cluster(self.urls.0.clone()).await;
        }
        let client = redis::Client::open(self.urls.0[0].as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1);
        let mut single = ConnectionManager::new_with_config(client, config).await?;
        // One URL may be a Redis Cluster's node or configuration endpoint
        // (managed clusters give one): ask, rather than answer every bot
        // on another node with MOVED.
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut single)
            .await?;
        if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
            tracing::info!(
                "{} is a Redis Cluster node: using cluster mode",
                self.urls.redacted()
            );
            return self.cluster(self.urls.0.clone()).await;
        }
        Ok(Conn::Single(single))
    }

    async fn cluster(&self, seeds: Vec<String>) -> redis::RedisResult<Conn> {
        let client = redis::cluster::ClusterClientBuilder::new(seeds)
            .connection_timeout(COMMAND_TIMEOUT)
            .response_timeout(COMMAND_TIMEOUT)
            .retries(2)
            .build()?;
        Ok(Conn::Cluster(client.get_async_connection().await?))
    }

    /// Sets `up` and logs a change of state once (not once per operation).
    pub fn observe(&self, ok: bool, up: &prometheus::IntGauge, why: impl FnOnce() -> String) {
        up.set(i64::from(ok));
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if *logged == Some(ok) {
            return;
        }
        let first = logged.is_none();
        *logged = Some(ok);
        let urls = self.urls.redacted();
        match (ok, first) {
            (true, true) => tracing::info!(redis = %urls, "redis reachable"),
            (true, false) => tracing::info!(redis = %urls, "redis reachable again"),
            (false, _) => tracing::warn!(
                redis = %urls,
                error = %why(),
                "redis unreachable: counting continues here, syncs retry, dedupe is local until it answers"
            ),
        }
    }
}
