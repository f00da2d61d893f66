//! The test harness: spawn the application, talk to it, read its metrics,
//! and hand out fresh databases.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use botmetrics::config::Config;
use botmetrics::startup::Application;
use botmetrics::state::AppState;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The PostgreSQL server tests use: `DATABASE_URL`, or the local default.
pub fn postgres_base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A configuration for tests: port 0, no render cache, the given tokens.
pub fn config(tokens: &str, database_url: &str) -> Config {
    let mut config = Config::for_tests(tokens, database_url);
    config.metrics_cache_ttl = Duration::ZERO;
    config
}

/// A fresh SQLite file in its own temporary directory (removed on drop).
pub struct SqliteFile {
    dir: PathBuf,
}

impl SqliteFile {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("botmetrics-test-{}", uuid_like()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        SqliteFile { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("botmetrics.db")
    }

    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path().display())
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn uuid_like() -> String {
    use std::hash::{BuildHasher, RandomState};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:016x}", RandomState::new().hash_one(nanos))
}

/// A database of its own on the test PostgreSQL server, dropped at the end.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl PgDatabase {
    /// Creates a fresh database. Where PostgreSQL is unreachable the test is
    /// skipped loudly on a laptop, and fails in CI (`CI=true`).
    pub async fn create() -> Option<PgDatabase> {
        let admin_url = postgres_base_url();
        let admin = match sqlx::PgPool::connect(&admin_url).await {
            Ok(pool) => pool,
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                    panic!("PostgreSQL at {admin_url} is unreachable in CI: {e}");
                }
                eprintln!(
                    "\n*** SKIPPED: PostgreSQL at {admin_url} is unreachable ({e}); set DATABASE_URL ***\n"
                );
                return None;
            }
        };
        let name = format!("botmetrics_test_{}", uuid_like());
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let (base, _) = admin_url.rsplit_once('/').expect("database URL has a path");
        Some(PgDatabase {
            url: format!("{base}/{name}"),
            name,
            admin_url,
        })
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.url)
            .await
            .expect("connect to test database")
    }

    /// Makes the database refuse connections and ends the open ones: an
    /// outage as the application sees it.
    pub async fn set_outage(&self, down: bool) {
        let admin = sqlx::PgPool::connect(&self.admin_url)
            .await
            .expect("admin connection");
        let allow = if down { "false" } else { "true" };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "alter database {} allow_connections {allow}",
            self.name
        )))
        .execute(&admin)
        .await
        .expect("alter database");
        if down {
            sqlx::query(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = $1",
            )
            .bind(&self.name)
            .execute(&admin)
            .await
            .expect("terminate backends");
        }
        admin.close().await;
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Drop runs outside async; a short-lived runtime on its own thread
        // does the cleanup so a failed test does not leak databases.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let admin = sqlx::PgPool::connect(&admin_url).await.ok()?;
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "drop database if exists {name} with (force)"
                )))
                .execute(&admin)
                .await;
                Some(())
            })
        })
        .join();
    }
}

/// The application running in this process on port 0.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

pub async fn spawn_app(config: Config) -> TestApp {
    let app = Application::build(config)
        .await
        .expect("application builds");
    let addr = app.local_addr();
    let state = app.state().clone();
    let (stop, stopped) = oneshot::channel();
    let handle = tokio::spawn(async move {
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
        .expect("server runs");
    });
    TestApp {
        addr,
        client: reqwest::Client::new(),
        state,
        stop: Some(stop),
        handle: Some(handle),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Posts a raw body with a token and content type.
    pub async fn post_raw(
        &self,
        token: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut req = self.client.post(self.url("/v1/events")).body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req.send().await.expect("request sent")
    }

    /// Posts JSON events; returns the status and the JSON answer.
    pub async fn post_events(&self, token: &str, events: &Value) -> (u16, Value) {
        let res = self
            .post_raw(Some(token), Some("application/json"), events.to_string())
            .await;
        let status = res.status().as_u16();
        (status, res.json().await.expect("JSON answer"))
    }

    pub async fn metrics_text(&self) -> String {
        let res = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("scrape");
        assert_eq!(res.status(), 200);
        res.text().await.expect("text")
    }

    /// The value of one exposed series, e.g. `bot_messages_total{bot="a",role="user"}`.
    pub async fn sample(&self, series: &str) -> Option<f64> {
        sample(&self.metrics_text().await, series)
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let res = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent");
        let status = res.status().as_u16();
        (status, res.json().await.expect("JSON answer"))
    }

    /// Stops the server the way SIGTERM does: drain, final flush, exit.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task ends cleanly");
        }
    }
}

/// Finds one series in an exposition text by its exact name and labels.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// Polls `check` until it holds, up to `timeout`; for conditions that a
/// background task makes true, instead of a fixed sleep.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
