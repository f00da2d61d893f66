//! The test harness every suite shares: configurations and fresh databases,
//! the application in this process or as the real binary, HTTP to either,
//! raw database access, and readers of the exposition text.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Deref;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use botmetrics::config::Config;
use botmetrics::startup::Application;
use botmetrics::state::AppState;
use botmetrics::store::SeriesRow;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

// ---------------------------------------------------------------------------
// What a test needs from the machine
// ---------------------------------------------------------------------------

/// The PostgreSQL server tests use: `DATABASE_URL`, or the local default.
pub fn postgres_base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Whether a `CI` value means "in CI": any non-empty value but `false` and
/// `0` (CI systems set `true`, `1`, `yes`, `on` or their own name).
pub fn is_ci(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        let v = v.trim();
        !v.is_empty() && !v.eq_ignore_ascii_case("false") && v != "0"
    })
}

/// A test that cannot run here: it fails in CI (`CI` set, see [`is_ci`])
/// and is skipped loudly elsewhere.
pub fn cannot_run(why: &str) {
    if is_ci(std::env::var("CI").ok().as_deref()) {
        panic!("{why}: required in CI");
    }
    eprintln!("\n*** SKIPPED: {why} ***\n");
}

#[test]
fn any_truthy_ci_value_makes_a_missing_tool_fail() {
    for ci in ["true", "1", "yes", "on", "TRUE", "woodpecker"] {
        assert!(is_ci(Some(ci)), "CI={ci}");
    }
    for local in [
        None,
        Some(""),
        Some("false"),
        Some("False"),
        Some("0"),
        Some(" "),
    ] {
        assert!(!is_ci(local), "CI={local:?}");
    }
}

/// True when `tool` can be run; otherwise fails in CI or says it skips.
pub fn have(tool: &str, package: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        cannot_run(&format!(
            "{tool} is not installed (apt-get install {package})"
        ));
    }
    found
}

// ---------------------------------------------------------------------------
// Configuration and databases
// ---------------------------------------------------------------------------

/// A test configuration: port 0, no render cache, the given tokens, and
/// background loops that stay out of the way (a test calls `flush_once`
/// and `write_history_once` itself).
pub fn config(tokens: &str, database_url: &str) -> Config {
    let mut config = Config::for_tests(tokens, database_url);
    // A SQLite file keeps its journal beside it (in the test's own temp
    // dir); a PostgreSQL test database gets a journal directory named after
    // it, so restarts within a test find their journal and tests never meet.
    if database_url.starts_with("postgres") {
        config.data_dir = Some(pg_data_dir(database_url));
    }
    config.metrics_cache_ttl = Duration::ZERO;
    config.summary_cache_ttl = Duration::ZERO;
    config.flush_interval = Duration::from_secs(3600);
    config.history_interval = Duration::from_secs(3600);
    config
}

/// A fresh SQLite file in its own temporary directory (removed on drop).
pub struct SqliteFile {
    dir: PathBuf,
}

impl SqliteFile {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("botmetrics-test-{}", unique_suffix()));
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

/// A random 16-hex-digit name part, so temporary directories and databases
/// of tests running at once never meet.
pub fn unique_suffix() -> String {
    use std::hash::{BuildHasher, RandomState};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:016x}", RandomState::new().hash_one(nanos))
}

/// The journal directory of a PostgreSQL test database.
pub fn pg_data_dir(database_url: &str) -> PathBuf {
    let name = database_url.rsplit('/').next().unwrap_or("db");
    std::env::temp_dir().join(format!("botmetrics-pgdata-{name}"))
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
        let admin = match PgPool::connect(&admin_url).await {
            Ok(pool) => pool,
            Err(e) => {
                cannot_run(&format!(
                    "PostgreSQL at {admin_url} is unreachable ({e}); set DATABASE_URL"
                ));
                return None;
            }
        };
        let name = format!("botmetrics_test_{}", unique_suffix());
        sqlx::query(AssertSqlSafe(format!("create database {name}")))
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

    /// Makes the database refuse connections and ends the open ones: an
    /// outage as the application sees it.
    pub async fn set_outage(&self, down: bool) {
        let admin = PgPool::connect(&self.admin_url)
            .await
            .expect("admin connection");
        let allow = if down { "false" } else { "true" };
        sqlx::query(AssertSqlSafe(format!(
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
        let _ = std::fs::remove_dir_all(pg_data_dir(&self.url));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let admin = PgPool::connect(&admin_url).await.ok()?;
                let _ = sqlx::query(AssertSqlSafe(format!(
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

/// One test per backend for a scenario `async fn name(url: &str)`: a module
/// `name` holding `sqlite` (a fresh file) and `postgres` (a fresh database,
/// through [`PgDatabase::create`]).
macro_rules! on_both_backends {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test]
            async fn sqlite() {
                let db = $crate::helpers::SqliteFile::new();
                super::$scenario(&db.url()).await;
            }

            #[tokio::test]
            async fn postgres() {
                let Some(db) = $crate::helpers::PgDatabase::create().await else {
                    return;
                };
                super::$scenario(&db.url).await;
            }
        }
    };
}
pub(crate) use on_both_backends;

/// Labels as the store keys them: a JSON object with sorted keys.
fn labels(pairs: &[(&str, &str)]) -> String {
    let map: BTreeMap<&str, &str> = pairs.iter().copied().collect();
    serde_json::to_string(&map).expect("labels serialise")
}

/// Bot x's `bot_messages_total{role="user"}` at `value`, as the store
/// writes it.
pub fn user_messages_row(value: f64) -> SeriesRow {
    SeriesRow {
        metric: "bot_messages_total".into(),
        bot: "x".into(),
        labels: labels(&[("role", "user")]),
        value,
    }
}

/// Direct access to the database a test app uses, beside the app's own pool.
pub enum Raw {
    Pg(PgPool),
    Sqlite(SqlitePool),
}

impl Raw {
    pub async fn connect(url: &str) -> Raw {
        if url.starts_with("sqlite:") {
            Raw::Sqlite(SqlitePool::connect(url).await.expect("open SQLite file"))
        } else {
            Raw::Pg(PgPool::connect(url).await.expect("connect to PostgreSQL"))
        }
    }

    pub fn is_pg(&self) -> bool {
        matches!(self, Raw::Pg(_))
    }

    /// One integer from a query written by the test (never from input).
    pub async fn int(&self, sql: &str) -> i64 {
        let sql = sql.to_owned();
        match self {
            Raw::Pg(p) => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(p).await,
            Raw::Sqlite(p) => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(p).await,
        }
        .unwrap_or_else(|e| panic!("query failed: {e}"))
    }

    /// Text rows from a query written by the test.
    pub async fn texts(&self, sql: &str) -> Vec<String> {
        let sql = sql.to_owned();
        match self {
            Raw::Pg(p) => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(p).await,
            Raw::Sqlite(p) => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(p).await,
        }
        .unwrap_or_else(|e| panic!("query failed: {e}"))
    }

    /// Records every value written to `bot`'s `bot_messages_total{role="user"}`
    /// row, with the time, in a table `written (at, value)`: a trigger, so a
    /// test sees every write (a stale one included), not only the last.
    pub async fn note_user_message_writes(&self, bot: &str) {
        self.execute(
            "create table written (at timestamptz not null default clock_timestamp(), value double precision not null)",
        )
        .await;
        self.execute(&format!(
            r#"create function note_written() returns trigger language plpgsql as $$
               begin
                 if new.metric = 'bot_messages_total' and new.bot = '{bot}'
                    and new.labels::jsonb = '{{"role":"user"}}'::jsonb then
                   insert into written (value) values (new.value);
                 end if;
                 return new;
               end $$"#
        ))
        .await;
        self.execute(
            "create trigger note_written after insert or update on real_time_metrics
             for each row execute function note_written()",
        )
        .await;
    }

    pub async fn execute(&self, sql: &str) {
        let sql = sql.to_owned();
        match self {
            Raw::Pg(p) => sqlx::query(AssertSqlSafe(sql)).execute(p).await.map(drop),
            Raw::Sqlite(p) => sqlx::query(AssertSqlSafe(sql)).execute(p).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("statement failed: {e}"))
    }

    pub async fn count(&self, table: &str) -> i64 {
        self.int(&format!("select count(*) from {table}")).await
    }

    /// The stored value of one series of `real_time_metrics`.
    pub async fn stored(&self, metric: &str, bot: &str, pairs: &[(&str, &str)]) -> Option<f64> {
        let labels = labels(pairs);
        match self {
            Raw::Pg(p) => sqlx::query_scalar(
                // A cast on both sides: right whether the column is jsonb or text.
                "select value from real_time_metrics where metric = $1 and bot = $2 and labels::jsonb = $3::jsonb",
            )
            .bind(metric)
            .bind(bot)
            .bind(labels)
            .fetch_optional(p)
            .await,
            Raw::Sqlite(p) => sqlx::query_scalar(
                "select value from real_time_metrics where metric = ? and bot = ? and labels = ?",
            )
            .bind(metric)
            .bind(bot)
            .bind(labels)
            .fetch_optional(p)
            .await,
        }
        .expect("read real_time_metrics")
    }

    /// Sizes in bytes of every stored sketch.
    pub async fn sketch_sizes(&self) -> Vec<i64> {
        self.texts("select cast(length(registers) as text) from active_user_sketches")
            .await
            .iter()
            .map(|s| s.parse().expect("a length"))
            .collect()
    }

    pub async fn close(self) {
        match self {
            Raw::Pg(p) => p.close().await,
            Raw::Sqlite(p) => p.close().await,
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP to a running server
// ---------------------------------------------------------------------------

/// HTTP to a running server, in this process ([`TestApp`]) or the binary
/// ([`Binary`]); both dereference to it.
pub struct Api {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
}

/// The status and the JSON body of an answer, whatever the status.
async fn json_answer(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let bytes = res.bytes().await.expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "answer {status} is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, json)
}

impl Api {
    fn new(addr: SocketAddr) -> Api {
        Api {
            addr,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Posts a raw body to `/v1/events`, with a token and a content type
    /// where given; the JSON answer, whatever the status.
    pub async fn post(
        &self,
        token: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let mut req = self.client.post(self.url("/v1/events")).body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        json_answer(req.send().await.expect("request sent")).await
    }

    /// Posts JSON events; the status and the JSON answer.
    pub async fn post_events(&self, token: &str, events: &Value) -> (u16, Value) {
        self.post(Some(token), Some("application/json"), events.to_string())
            .await
    }

    /// Posts JSON events that must all be accepted, none a duplicate.
    pub async fn post_ok(&self, token: &str, events: &Value) {
        let n = events.as_array().map_or(1, Vec::len);
        assert_eq!(
            self.post_events(token, events).await,
            (202, json!({"accepted": n, "duplicates": 0})),
            "{events}"
        );
    }

    /// Posts events as NDJSON, one request (up to `--max-batch` lines);
    /// all must be accepted, none a duplicate.
    pub async fn post_ndjson(&self, token: &str, events: impl IntoIterator<Item = Value>) {
        let lines: Vec<String> = events.into_iter().map(|e| format!("{e}\n")).collect();
        let n = lines.len();
        let got = self
            .post(Some(token), Some("application/x-ndjson"), lines.concat())
            .await;
        assert_eq!(got, (202, json!({"accepted": n, "duplicates": 0})));
    }

    /// Any method on any path; the status and the JSON answer.
    pub async fn request_json(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let res = self.client.request(method, self.url(path)).send().await;
        json_answer(res.expect("request sent")).await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        self.request_json(reqwest::Method::GET, path).await
    }

    /// A GET with these request headers: status, headers and raw body
    /// (not decoded: a gzip answer stays gzip).
    pub async fn get_raw(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        let mut req = self.client.get(self.url(path));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let res = req.send().await.expect("request sent");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        (status, headers, res.bytes().await.expect("body").to_vec())
    }

    /// A GET answered in text: status, content type and body.
    pub async fn get_text(&self, path: &str) -> (u16, String, String) {
        let res = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent");
        let status = res.status().as_u16();
        let content_type = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().expect("ASCII header").to_owned())
            .unwrap_or_default();
        (status, content_type, res.text().await.expect("a body"))
    }

    /// `n` concurrent GETs of one path, every one answered 200; their bodies.
    pub async fn concurrent_gets(&self, path: &str, n: usize) -> Vec<String> {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (client, url) = (self.client.clone(), self.url(path));
            tasks.spawn(async move {
                let res = client.get(url).send().await.expect("request sent");
                assert_eq!(res.status(), 200);
                res.text().await.expect("body")
            });
        }
        tasks.join_all().await
    }

    /// The exposition of `/metrics`, which must answer 200.
    pub async fn metrics_text(&self) -> String {
        let (status, _, text) = self.get_text("/metrics").await;
        assert_eq!(status, 200, "{text}");
        text
    }

    /// The value of one exposed series, e.g. `bot_messages_total{bot="a",role="user"}`.
    pub async fn sample(&self, series: &str) -> Option<f64> {
        sample(&self.metrics_text().await, series)
    }
}

// ---------------------------------------------------------------------------
// The application in this process
// ---------------------------------------------------------------------------

/// The application running in this process on port 0.
pub struct TestApp {
    api: Api,
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
        api: Api::new(addr),
        state,
        stop: Some(stop),
        handle: Some(handle),
    }
}

/// Starts the application on a fresh SQLite file; keep the file alive as
/// long as the app (`let (app, _db) = …`).
pub async fn start(tokens: &str) -> (TestApp, SqliteFile) {
    start_with(tokens, |_| {}).await
}

/// Like [`start`], with a chance to change the configuration first.
pub async fn start_with(tokens: &str, tweak: impl FnOnce(&mut Config)) -> (TestApp, SqliteFile) {
    let db = SqliteFile::new();
    let mut config = config(tokens, &db.url());
    tweak(&mut config);
    (spawn_app(config).await, db)
}

impl Deref for TestApp {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl TestApp {
    /// Renders of `endpoint` (`metrics` or `summary`) the cache missed.
    pub fn cache_misses(&self, endpoint: &str) -> u64 {
        let selfm = &self.state.metrics.selfm;
        selfm.cache_misses.with_label_values(&[endpoint]).get()
    }

    /// Answers of `endpoint` served from the cache.
    pub fn cache_hits(&self, endpoint: &str) -> u64 {
        let selfm = &self.state.metrics.selfm;
        selfm.cache_hits.with_label_values(&[endpoint]).get()
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

// ---------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------

/// Generous: start-up and shutdown take milliseconds, but the machine may
/// be busy compiling.
const PATIENCE: Duration = Duration::from_secs(30);

/// The real `botmetrics` binary, started as an operator would. Dropping it
/// kills the process (`kill_on_drop`), so a failed assertion never leaves
/// one behind.
pub struct Binary {
    api: Api,
    child: Child,
    log: Arc<Mutex<String>>,
    reader: JoinHandle<()>,
}

/// The binary with a clean environment: no `BOTMETRICS_*` or `DATABASE_URL`
/// from the developer's shell, logs at info, without colour (the logger
/// colours a pipe too unless `NO_COLOR` is set).
fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_botmetrics"));
    cmd.env_clear()
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// The address of a `botmetrics serving listen=…` log line, in the text
/// format or as a JSON object (`--log-format json`).
fn serving_address(line: &str) -> Option<SocketAddr> {
    if !line.contains("botmetrics serving") {
        return None;
    }
    if line.starts_with('{') {
        let object: Value = serde_json::from_str(line).ok()?;
        return object["listen"].as_str()?.parse().ok();
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))?
        .parse()
        .ok()
}

impl Binary {
    /// Starts the binary with exactly these flags and environment variables
    /// and learns its address from the `botmetrics serving listen=…` line.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Binary {
        Binary::start_under(&[], args, env).await
    }

    /// Like [`Binary::start`], run through `wrapper` (a program and its
    /// arguments, e.g. `prlimit --nofile=256:256`) when it is not empty.
    pub async fn start_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = command();
                let std = cmd.as_std_mut();
                *std = std::process::Command::new(program);
                std.args(wrapper_args).arg(env!("CARGO_BIN_EXE_botmetrics"));
                std.env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default())
                    .env("RUST_LOG", "info")
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null());
                cmd.kill_on_drop(true);
                cmd
            }
            None => command(),
        };
        let mut child = cmd
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the botmetrics binary");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let (serving, served) = oneshot::channel();
        let reader = tokio::spawn({
            let log = log.clone();
            async move {
                let mut serving = Some(serving);
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(addr) = serving_address(&line)
                        && let Some(serving) = serving.take()
                    {
                        let _ = serving.send(addr);
                    }
                    log.lock().unwrap().push_str(&format!("{line}\n"));
                }
            }
        });
        let addr = match tokio::time::timeout(PATIENCE, served).await {
            Ok(Ok(addr)) => addr,
            _ => panic!(
                "botmetrics did not log `botmetrics serving listen=…`:\n{}",
                log.lock().unwrap()
            ),
        };
        Binary {
            api: Api::new(addr),
            child,
            log,
            reader,
        }
    }

    /// The binary on port 0 against `database_url` with these bots, no
    /// render cache and hourly history writes; `flags` add to or change that.
    pub async fn serve(database_url: &str, tokens: &str, flags: &[&str]) -> Binary {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
            "--tokens",
            tokens,
            "--history-interval",
            "1h",
            "--metrics-cache-ttl",
            "0s",
            "--summary-cache-ttl",
            "0s",
        ];
        let data_dir = pg_data_dir(database_url).display().to_string();
        if database_url.starts_with("postgres") && !flags.contains(&"--data-dir") {
            args.extend(["--data-dir", &data_dir]);
        }
        args.extend_from_slice(flags);
        Binary::start(&args, &[]).await
    }

    /// Runs the binary to completion (it must not start serving): its exit
    /// status, stdout and stderr.
    pub async fn run(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
        let mut cmd = command();
        cmd.args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = tokio::time::timeout(PATIENCE, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("botmetrics {args:?} did not exit"))
            .expect("botmetrics runs");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs the binary with a configuration it must refuse, and returns the
    /// one line it complains in. Every test of a bad start holds it to the
    /// same promise to the operator, so it is checked here once: it exits
    /// non-zero by itself (not killed by a signal), without a panic, and says
    /// what is wrong in exactly one line of stderr. Not counted as that line:
    /// blank lines, clap's `For more information` hint, and lines starting
    /// with one of `hints` (clap's `[possible values: …]` under a flag whose
    /// values it lists).
    pub async fn refused_in_one_line(
        args: &[&str],
        env: &[(&str, &str)],
        hints: &[&str],
    ) -> String {
        let (status, _, stderr) = Binary::run(args, env).await;
        assert!(
            !status.success(),
            "{args:?} {env:?} was accepted:\n{stderr}"
        );
        assert!(
            status.code().is_some(),
            "{args:?} {env:?}: killed by a signal:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "{args:?} {env:?} panicked:\n{stderr}"
        );
        let lines: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
            .filter(|l| !hints.iter().any(|hint| l.starts_with(hint)))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?} {env:?}: one line expected:\n{stderr}"
        );
        lines[0].to_owned()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("botmetrics still runs")
    }

    /// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, …) in bytes.
    pub fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"));
        kib * 1024
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`) with the `kill` command and
    /// waits for the exit and for the last line of the log.
    pub async fn signal(&mut self, signal: &str) -> ExitStatus {
        self.send_signal(signal).await;
        self.exited(signal).await
    }

    /// `kill -9`: sends SIGKILL, waits for the exit, and checks the process
    /// died of that signal; had it exited by itself first, a crash test
    /// would not have tested a crash.
    pub async fn kill_9(&mut self) {
        let status = self.signal("KILL").await;
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    }

    /// Sends a signal and returns at once.
    pub async fn send_signal(&self, signal: &str) {
        let pid = self.child.id().expect("botmetrics still runs").to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .await
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} {pid} failed");
    }

    /// Waits for the exit (after `signal` was sent) and the log's last line.
    pub async fn exited(&mut self, signal: &str) -> ExitStatus {
        let status = match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(status) => status.expect("exit status"),
            Err(_) => panic!("botmetrics ignored SIG{signal}; log:\n{}", self.log()),
        };
        tokio::time::timeout(PATIENCE, &mut self.reader)
            .await
            .expect("stderr closes once botmetrics exits")
            .expect("the log reader ends cleanly");
        status
    }
}

impl Deref for Binary {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

// ---------------------------------------------------------------------------
// Load to kill a server under
// ---------------------------------------------------------------------------

/// Batches of a load, each named `(client, batch)`.
pub type Batches = BTreeSet<(usize, usize)>;

/// Clients posting batches back to back until the server stops answering,
/// keeping which batches they sent and which were acknowledged (202): the
/// load a `kill -9` test kills a server under, then holds it to its promise
/// (every acknowledged event counted, none twice; a batch in flight at the
/// kill may or may not have counted). The single-process and the cluster
/// kill -9 tests share it, so both keep the same books.
pub struct AckedLoad {
    acked: Arc<Mutex<Batches>>,
    attempted: Arc<Mutex<Batches>>,
    clients: JoinSet<()>,
}

impl AckedLoad {
    /// `clients` concurrent clients, client `c` posting `batch(c, 0)`,
    /// `batch(c, 1)`, … to the `/v1/events` of `api` with `token`, over a
    /// client of their own (each request may take 10 s). A client stops at
    /// its first failed request or answer other than 202: the server is
    /// gone, and that batch's fate is unknown (attempted, not acknowledged).
    pub fn start(
        api: &Api,
        token: &str,
        clients: usize,
        batch: fn(usize, usize) -> Value,
    ) -> AckedLoad {
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let attempted = Arc::new(Mutex::new(BTreeSet::new()));
        let client = reqwest::Client::new();
        let target = api.url("/v1/events");
        let mut tasks = JoinSet::new();
        for c in 0..clients {
            let (client, target, token) = (client.clone(), target.clone(), token.to_owned());
            let (acked, attempted) = (acked.clone(), attempted.clone());
            tasks.spawn(async move {
                for b in 0.. {
                    attempted.lock().unwrap().insert((c, b));
                    let sent = client
                        .post(&target)
                        .bearer_auth(&token)
                        .json(&batch(c, b))
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    match sent {
                        Ok(res) if res.status() == 202 => {
                            acked.lock().unwrap().insert((c, b));
                        }
                        // The server is gone: this batch is unknown.
                        _ => return,
                    }
                }
            });
        }
        AckedLoad {
            acked,
            attempted,
            clients: tasks,
        }
    }

    /// How many batches have been acknowledged so far.
    pub fn acknowledged(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until every client has stopped (after the server went away)
    /// and returns the batches acknowledged and those attempted.
    pub async fn stopped(self) -> (Batches, Batches) {
        self.clients.join_all().await;
        let acked = self.acked.lock().unwrap().clone();
        let attempted = self.attempted.lock().unwrap().clone();
        (acked, attempted)
    }
}

// ---------------------------------------------------------------------------
// Events and answers
// ---------------------------------------------------------------------------

/// One event of every type, every optional field used once: what a busy
/// bot sends. Moves series of every `bot_*` family.
pub fn every_event_type() -> Value {
    json!([
        {"type": "message", "role": "user", "user_id": 1, "chat_type": "private", "db_queries": 4},
        {"type": "message", "role": "assistant", "user_id": "u-2"},
        {"type": "response", "status": "success", "duration_ms": 1200, "model": "gpt-4o",
         "tokens": {"prompt": 120, "completion": 40}},
        {"type": "response", "status": "timeout", "duration_ms": 60000, "tokens": {"prompt": 3}},
        {"type": "cache", "result": "hit"},
        {"type": "cache", "result": "miss", "cache": "embeddings"},
        {"type": "user_registered", "user_id": 3},
        {"type": "consent", "granted": true},
        {"type": "consent", "granted": false},
        {"type": "limit_reached", "user_id": 1},
        {"type": "error", "kind": "db_timeout"},
        {"type": "custom", "name": "voice_note", "value": 2.5},
    ])
}

/// Checks an error answer: its status, `{"error": code, "message": text}`
/// with a non-empty message, and `"index"` exactly when a batch is at
/// fault. Returns the message.
#[track_caller]
pub fn assert_error<'a>(
    got: &'a (u16, Value),
    status: u16,
    code: &str,
    index: Option<u64>,
) -> &'a str {
    let (got_status, body) = got;
    assert_eq!(*got_status, status, "status of {body}");
    let object = body
        .as_object()
        .unwrap_or_else(|| panic!("error body is not an object: {body}"));
    assert_eq!(
        object.get("error"),
        Some(&json!(code)),
        "error code of {body}"
    );
    let message = object
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no message string in {body}"));
    assert!(!message.trim().is_empty(), "empty message in {body}");
    assert_eq!(
        object
            .get("index")
            .map(|i| i.as_u64().expect("index is an integer")),
        index,
        "index of {body}"
    );
    let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    let mut allowed = BTreeSet::from(["error", "message"]);
    if index.is_some() {
        allowed.insert("index");
    }
    assert_eq!(keys, allowed, "keys of {body}");
    message
}

// ---------------------------------------------------------------------------
// Reading an exposition
// ---------------------------------------------------------------------------

/// Finds one series in an exposition text by its exact name and labels.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// The value of a series that must exist.
#[track_caller]
pub fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("series {series} is missing from:\n{text}"))
}

/// Checks many series at once and reports every mismatch together.
#[track_caller]
pub fn assert_series(text: &str, expected: &[(&str, f64)]) {
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(series, want)| {
            let got = sample(text, series);
            (got != Some(*want)).then(|| format!("  {series}: want {want}, got {got:?}"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "series differ:\n{}\n--- exposition ---\n{text}",
        wrong.join("\n")
    );
}

/// The `bot_*` part of an exposition (samples, HELP and TYPE): everything
/// an event can move, and nothing a scrape itself moves.
pub fn bot_part(text: &str) -> String {
    text.lines()
        .filter(|l| {
            l.starts_with("bot_") || l.starts_with("# HELP bot_") || l.starts_with("# TYPE bot_")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The names-with-labels of every `bot_*` sample in an exposition.
pub fn bot_series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with("bot_"))
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

/// The active-user gauges of an exposition: estimates from sketches.
pub fn active_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("bot_active_users{"))
        .map(str::to_owned)
        .collect()
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

/// Held by the tests that measure how a process behaves at its limits
/// (a connection flood under a 256-descriptor cap, answers within 100 ms)
/// and by the few tests that load the whole machine (a browser, npm and
/// tsc, virtualenvs), so the first never run while the second do: on two
/// cores a measuring test beside them measures them instead. Every other
/// test runs in parallel as before.
pub static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
