//! The one configuration of a botmetrics process.
//!
//! Every flag has an environment fallback `BOTMETRICS_<FLAG>` so the same
//! binary is configured the same way by a shell, systemd or a container.
//! Values are parsed into their final types here (durations, token maps, time
//! zones), so a bad value stops the process at start-up with one line that
//! names the flag, instead of failing later in a background task.

pub mod remote_write;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

/// The port botmetrics listens on when `--listen` is not given. 9464 is
/// also the default of the OpenTelemetry Prometheus exporter, so a host that
/// runs one beside botmetrics needs `--listen` on one of them; it was kept
/// because it is the port existing configurations and dashboards use.
pub const DEFAULT_PORT: u16 = 9464;

/// botmetrics: turns a chat bot's events into Prometheus metrics, a summary
/// for the bot's own /metrics command, and long-term history.
#[derive(Debug, Clone, Parser)]
#[command(name = "botmetrics", version, about, long_about = None)]
pub struct Config {
    /// Address to serve HTTP on, `host:port` (e.g. `0.0.0.0:9464` for every
    /// interface). Use port 0 to let the OS pick one.
    #[arg(long, env = "BOTMETRICS_LISTEN", value_parser = parse_listen,
        default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))]
    pub listen: SocketAddr,

    /// PEM certificate (chain) to serve HTTPS on --listen with, e.g.
    /// certbot's fullchain.pem. Needs --tls-key; both re-read on SIGHUP.
    #[arg(long, env = "BOTMETRICS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert, e.g. certbot's privkey.pem.
    #[arg(long, env = "BOTMETRICS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Where totals, history and sketches are kept: `postgres://…` or
    /// `sqlite://path` (created if missing). Also read from DATABASE_URL.
    #[arg(
        long,
        env = "BOTMETRICS_DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://botmetrics.db"
    )]
    pub database_url: String,

    /// Comma-separated `bot=token` pairs; a bare `token` means bot `default`.
    /// Ingestion is refused until at least one token is set.
    #[arg(long, env = "BOTMETRICS_TOKENS",
        hide_env_values = true, value_parser = parse_tokens, default_value = "", hide_default_value = true)]
    pub tokens: Tokens,

    /// Bearer token that reads /metrics, /v1/summary and /v1/history for
    /// every bot. When unset they are open (a bot's own token still reads
    /// only its own summary and history).
    #[arg(long, env = "BOTMETRICS_METRICS_TOKEN", hide_env_values = true, value_parser = parse_metrics_token)]
    pub metrics_token: Option<String>,

    /// Bearer token of the admin API (/v1/admin/bots: create and revoke
    /// bots and tokens at runtime). Unset: the admin API answers 404.
    #[arg(long, env = "BOTMETRICS_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub admin_token: Option<Secret>,

    /// How long a rendered /metrics page is served before being rebuilt.
    /// `0s` (the default): every scrape gets a render that started after it
    /// arrived, so it sees every event acknowledged before it; scrapes that
    /// arrive together still share one render.
    #[arg(long, env = "BOTMETRICS_METRICS_CACHE_TTL", value_parser = parse_duration, default_value = "0s")]
    pub metrics_cache_ttl: Duration,

    /// How long a built /v1/summary answer is served before being rebuilt
    /// (the bot's /metrics command); `0s` builds it for every request, as
    /// `--metrics-cache-ttl 0s` does. With --redis-url the summary is read
    /// from Redis for every request (Redis is the cache) and this is unused.
    #[arg(long, env = "BOTMETRICS_SUMMARY_CACHE_TTL", value_parser = parse_duration, default_value = "30s")]
    pub summary_cache_ttl: Duration,

    /// Redis that several replicas share (cluster mode):
    /// `redis://[user:pass@]host:port[/db]`, `rediss://` for TLS; several
    /// comma-separated URLs are the seed nodes of a Redis Cluster. Unset:
    /// one process with its own totals.
    #[arg(long, env = "BOTMETRICS_REDIS_URL", hide_env_values = true, value_parser = parse_redis_urls)]
    pub redis_url: Option<RedisUrls>,

    /// Cluster mode: how often each replica sends what it counted to Redis.
    #[arg(long, env = "BOTMETRICS_SYNC_INTERVAL", value_parser = parse_positive_duration, default_value = "10s")]
    pub sync_interval: Duration,

    /// How often changed series are written to the `real_time_metrics` table.
    #[arg(long, env = "BOTMETRICS_FLUSH_INTERVAL", value_parser = parse_positive_duration, default_value = "10s")]
    pub flush_interval: Duration,

    /// How often a point per series is appended to `metrics_history`.
    #[arg(long, env = "BOTMETRICS_HISTORY_INTERVAL", value_parser = parse_positive_duration, default_value = "5m")]
    pub history_interval: Duration,

    /// History older than this is dropped (whole partitions on PostgreSQL).
    /// At least 1d: history is kept and dropped in whole UTC days.
    #[arg(long, env = "BOTMETRICS_RETENTION", value_parser = parse_retention, default_value = "90d")]
    pub retention: Duration,

    /// How long an `event_id` is remembered, so a retried event is counted once.
    #[arg(long, env = "BOTMETRICS_DEDUPE_WINDOW", value_parser = parse_duration, default_value = "10m")]
    pub dedupe_window: Duration,

    /// Most `event_id`s remembered at once (each costs about 30 bytes).
    /// Past it the oldest are forgotten before the window ends, and
    /// `botmetrics_dedupe_window_seconds` shows the window actually kept.
    #[arg(long, env = "BOTMETRICS_DEDUPE_MAX_IDS", default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(16..))]
    pub dedupe_max_ids: u64,

    /// How long the user book remembers a user not seen since (whole days;
    /// `0` turns the book off: no new/returning users, retention or
    /// sessions). A user forgotten and back counts as new.
    #[arg(long, env = "BOTMETRICS_USER_MEMORY", value_parser = parse_user_memory, default_value = "400d")]
    pub user_memory: Duration,

    /// Most users the user book remembers per bot (about 33 bytes each);
    /// past it the least recently seen 1 % are forgotten, and
    /// `botmetrics_user_book_fill_ratio` shows how close each bot is.
    #[arg(long, env = "BOTMETRICS_MAX_USERS_PER_BOT", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(100..=100_000_000))]
    pub max_users_per_bot: u64,

    /// A gap between a user's events longer than this ends their session.
    #[arg(long, env = "BOTMETRICS_SESSION_GAP", value_parser = parse_positive_duration, default_value = "30m")]
    pub session_gap: Duration,

    /// How often the user book is scanned: sessions whose gap has passed
    /// end, users past --user-memory go, cohorts are counted again.
    #[arg(long, env = "BOTMETRICS_USER_SCAN_INTERVAL", value_parser = parse_positive_duration, default_value = "1m")]
    pub user_scan_interval: Duration,

    /// Where the journal lives (`<data-dir>/journal/`). Default: beside the
    /// SQLite file, or `./botmetrics-data` with PostgreSQL.
    #[arg(long, env = "BOTMETRICS_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,

    /// When the journal is fsynced: `everysec` (a crash of the process loses
    /// nothing, power loss at most the last second), `always` (every answer
    /// waits for the disk), or `no` (the kernel decides).
    #[arg(long, env = "BOTMETRICS_JOURNAL_FSYNC", value_enum, default_value_t = crate::journal::FsyncPolicy::Everysec)]
    pub journal_fsync: crate::journal::FsyncPolicy,

    /// Most journal bytes not yet in the store. Reached only while the store
    /// is unreachable (or this process is a standby); then new events are
    /// answered 503 until the store catches up.
    #[arg(long, env = "BOTMETRICS_JOURNAL_MAX_BYTES", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(4096..))]
    pub journal_max_bytes: u64,

    /// Run without a journal: a 202 is then durable only after the next
    /// flush (`kill -9` loses up to one flush interval). For benchmarks and
    /// throwaway runs.
    #[arg(long, env = "BOTMETRICS_NO_JOURNAL")]
    pub no_journal: bool,

    /// Request bodies larger than this many bytes are answered with 413.
    #[arg(long, env = "BOTMETRICS_MAX_BODY_BYTES", default_value_t = 1_048_576, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_body_bytes: u64,

    /// Requests with more events than this are answered with 413.
    #[arg(long, env = "BOTMETRICS_MAX_BATCH", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch: u64,

    /// Distinct values per free-form label (error kind, custom event name,
    /// model, cache name) per bot before new values fold into `other`.
    #[arg(long, env = "BOTMETRICS_MAX_LABEL_VALUES", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_label_values: u64,

    /// Price table for LLM calls that report no `cost` (TOML; the built-in
    /// table is the repository's prices.toml). Re-read on SIGHUP.
    #[arg(long, env = "BOTMETRICS_PRICES")]
    pub prices: Option<std::path::PathBuf>,

    /// The currency of reported costs, of the price table and of
    /// `bot_llm_cost_total` (an ISO 4217 code).
    #[arg(long, env = "BOTMETRICS_CURRENCY", value_parser = parse_currency, default_value = "USD")]
    pub currency: String,

    /// IANA time zone that decides when "today" starts, e.g. `Europe/Berlin`.
    #[arg(long, env = "BOTMETRICS_TIMEZONE", value_parser = parse_timezone, default_value = "UTC")]
    pub timezone: chrono_tz::Tz,

    /// Log line format.
    #[arg(long, env = "BOTMETRICS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Time allowed for one HTTP request, body included, once its head has
    /// arrived, before it is answered with 408.
    #[arg(long, env = "BOTMETRICS_REQUEST_TIMEOUT", value_parser = parse_positive_duration, default_value = "10s")]
    pub request_timeout: Duration,

    /// Time a connection has to send a complete request head, counted from
    /// when it opens and again after each answer: it closes half-sent
    /// (slowloris) and idle keep-alive connections alike.
    #[arg(long, env = "BOTMETRICS_HEADER_READ_TIMEOUT", value_parser = parse_positive_duration, default_value = "10s")]
    pub header_read_timeout: Duration,

    /// Time an answer may wait for the client to take any of it (its
    /// socket full because it does not read) before the connection is
    /// closed, so a client that never reads cannot hold a connection.
    #[arg(long, env = "BOTMETRICS_WRITE_TIMEOUT", value_parser = parse_positive_duration, default_value = "5s")]
    pub write_timeout: Duration,

    /// Open HTTP connections at most. At the bound the oldest idle one (no
    /// request in progress) is closed to admit a new one; only when every
    /// one is busy (and none finishes within 100 ms) does a new connection
    /// get a JSON 503. The open-files
    /// limit is raised to its hard limit at start, and this is lowered
    /// (with a warning) if that is still short.
    #[arg(long, env = "BOTMETRICS_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// On SIGTERM or Ctrl-C: how long requests in flight may take to finish
    /// before their connections are dropped and the final flush runs.
    #[arg(long, env = "BOTMETRICS_SHUTDOWN_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub shutdown_timeout: Duration,

    #[command(flatten)]
    pub remote_write: remote_write::RemoteWriteArgs,
}

impl Config {
    /// Parses flags and environment, with `DATABASE_URL` as the fallback the
    /// sqlx tools also read when `--database-url` and its own variable are
    /// both absent.
    pub fn from_env_and_args() -> Self {
        let matches = Config::command().get_matches();
        let mut config = Config::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        if matches.value_source("database_url") == Some(ValueSource::DefaultValue)
            && let Ok(url) = std::env::var("DATABASE_URL")
        {
            config.database_url = url;
        }
        config
    }

    /// A configuration for tests and benchmarks: everything at its default
    /// except the listen port (0, chosen by the OS) and the tokens given.
    pub fn for_tests(tokens: &str, database_url: &str) -> Self {
        let mut config = Config::parse_from(["botmetrics", "--listen", "127.0.0.1:0"]);
        config.tokens = parse_tokens(tokens).expect("test tokens are well formed");
        config.database_url = database_url.to_owned();
        config
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The bots this server accepts events for, keyed by bearer token.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_token: HashMap<String, Arc<str>>,
    /// Bot names in the order they were configured, without repeats: the
    /// order of series and summaries, so output is stable.
    bots: Vec<Arc<str>>,
}

impl Tokens {
    /// The bot a bearer token belongs to.
    pub fn bot_for(&self, token: &str) -> Option<&Arc<str>> {
        self.by_token.get(token)
    }

    pub fn bots(&self) -> &[Arc<str>] {
        &self.bots
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }

    /// Every `(token, bot)` pair, for seeding the registry.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_token.iter().map(|(t, b)| (t.as_str(), &**b))
    }
}

/// A secret flag value whose `Debug` shows nothing of it, so a logged
/// configuration never carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(\"<hidden>\")")
    }
}

/// Parses `bot=token,other=token2,bare-token`.
///
/// ```
/// let tokens = botmetrics::config::parse_tokens("support=s3cret,sales=t0ken").unwrap();
/// assert_eq!(tokens.bot_for("t0ken").map(|b| &**b), Some("sales"));
/// ```
pub fn parse_tokens(raw: &str) -> Result<Tokens, String> {
    let mut tokens = Tokens::default();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (bot, token) = match pair.split_once('=') {
            Some((bot, token)) => (bot.trim(), token.trim()),
            None => ("default", pair),
        };
        if token.is_empty() {
            return Err(format!("`{pair}` has an empty token"));
        }
        if !crate::event::is_short_name(bot) {
            return Err(format!(
                "bot name `{bot}` must be 1-64 characters of [A-Za-z0-9_.:-]"
            ));
        }
        let bot: Arc<str> = match tokens.bots.iter().find(|b| &***b == bot) {
            Some(existing) => existing.clone(),
            None => {
                let bot: Arc<str> = Arc::from(bot);
                tokens.bots.push(bot.clone());
                bot
            }
        };
        if let Some(previous) = tokens.by_token.insert(token.to_owned(), bot.clone())
            && previous != bot
        {
            return Err(format!(
                "one token is given to two bots (`{previous}` and `{bot}`)"
            ));
        }
    }
    Ok(tokens)
}

/// The Redis URLs of `--redis-url`: one server, or a Redis Cluster's seeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrls(pub Vec<String>);

impl RedisUrls {
    /// Several URLs name the seed nodes of a Redis Cluster (one URL may be
    /// one too: the connection asks the server).
    pub fn is_cluster(&self) -> bool {
        self.0.len() > 1
    }

    /// The URLs without passwords, for logs and the journal's store name.
    pub fn redacted(&self) -> String {
        self.0
            .iter()
            .map(|u| crate::store::redacted(u))
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub fn parse_redis_urls(raw: &str) -> Result<RedisUrls, String> {
    let urls: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err(
            "give redis://host:port (several, comma-separated, for a Redis Cluster)".into(),
        );
    }
    for url in &urls {
        let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
        if !scheme_ok {
            return Err(format!(
                "`{}` is not a redis:// or rediss:// URL",
                crate::store::redacted(url)
            ));
        }
        redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| format!("`{}`: {e}", crate::store::redacted(url)))?;
    }
    if urls.len() > 1
        && let Some(url) = urls.iter().find(|u| {
            u.split_once("://")
                .and_then(|(_, rest)| rest.split_once('/'))
                .is_some_and(|(_, db)| !db.is_empty() && db != "0")
        })
    {
        return Err(format!(
            "`{}`: a Redis Cluster has only database 0; give no /db",
            crate::store::redacted(url)
        ));
    }
    Ok(RedisUrls(urls))
}

fn parse_secret(raw: &str) -> Result<Secret, String> {
    match raw.trim() {
        "" => Err("must not be empty".into()),
        s => Ok(Secret(s.to_owned())),
    }
}

/// Parses a human-readable duration such as `500ms`, `10s`, `5m` or `90d`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim())
        .map_err(|e| format!("`{raw}` is not a duration ({e}); use e.g. 500ms, 10s, 5m, 90d"))
}

/// Parses `--listen`: an IP address and a port. A bare port or a host name
/// gets an example of the accepted form.
pub fn parse_listen(raw: &str) -> Result<SocketAddr, String> {
    let raw = raw.trim();
    raw.parse().map_err(|_| {
        let example = match raw.trim_start_matches(':').parse::<u16>() {
            Ok(port) => {
                format!("127.0.0.1:{port} (this machine) or 0.0.0.0:{port} (every interface)")
            }
            Err(_) => {
                format!("127.0.0.1:{DEFAULT_PORT}, 0.0.0.0:{DEFAULT_PORT} or [::1]:{DEFAULT_PORT}")
            }
        };
        format!("`{raw}` is not an IP address and port; use e.g. {example}")
    })
}

/// Parses `--timezone`: an IANA name. A city alone gets the full name it
/// most likely means.
pub fn parse_timezone(raw: &str) -> Result<chrono_tz::Tz, String> {
    let raw = raw.trim();
    if let Ok(tz) = raw.parse::<chrono_tz::Tz>() {
        return Ok(tz);
    }
    let wanted = format!("/{}", raw.replace(' ', "_")).to_ascii_lowercase();
    let guess = chrono_tz::TZ_VARIANTS
        .iter()
        .map(|tz| tz.name())
        .find(|name| name.to_ascii_lowercase().ends_with(&wanted));
    Err(match guess {
        Some(name) => format!("`{raw}` is not an IANA time zone name; did you mean {name}?"),
        None => format!(
            "`{raw}` is not an IANA time zone name; use e.g. Europe/Berlin, America/New_York or UTC"
        ),
    })
}

fn parse_positive_duration(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d.is_zero() => Err(format!("`{raw}` must be longer than zero")),
        d => Ok(d),
    }
}

/// Three capital letters, as ISO 4217 writes currencies.
fn parse_currency(raw: &str) -> Result<String, String> {
    if raw.len() == 3 && raw.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "`{raw}` is not a currency code; use three capital letters such as USD or EUR"
        ))
    }
}

/// A secret flag set to nothing (`BOTMETRICS_METRICS_TOKEN=` in an env
/// file) would be a token no client can send: refused, naming the fix.
fn parse_metrics_token(raw: &str) -> Result<String, String> {
    if raw.trim().is_empty() {
        Err("empty; leave it unset to keep reads open, or set a token".into())
    } else {
        Ok(raw.to_owned())
    }
}

/// The user book forgets in whole local days: `0` (off) or at least a day.
fn parse_user_memory(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d.is_zero() || d >= Duration::from_secs(86_400) => Ok(d),
        _ => Err(format!(
            "`{raw}` is shorter than a day; users are remembered in whole days, so use 0 (off) or 1d or more"
        )),
    }
}

impl Config {
    /// The user book's limits from the flags.
    pub fn book_limits(&self) -> crate::metrics::users::BookLimits {
        crate::metrics::users::BookLimits {
            session_gap: u32::try_from(self.session_gap.as_secs()).unwrap_or(u32::MAX),
            memory_days: u32::try_from(self.user_memory.as_secs() / 86_400).unwrap_or(u32::MAX),
            max_users: usize::try_from(self.max_users_per_bot).unwrap_or(usize::MAX),
        }
    }
}

/// History is partitioned by UTC day on PostgreSQL and a partition goes
/// only once all of it is past retention, so anything under a day would be
/// silently kept for a day or two: refused instead of promised.
fn parse_retention(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d < Duration::from_secs(86_400) => Err(format!(
            "`{raw}` is shorter than a day; history is kept and dropped in whole days (PostgreSQL drops daily partitions), so use 1d or more"
        )),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_at_least_a_day() {
        assert!(parse_retention("2m").is_err());
        assert!(parse_retention("23h").is_err());
        assert_eq!(parse_retention("1d"), Ok(Duration::from_secs(86_400)));
    }

    #[test]
    fn tokens_map_to_bots() {
        let t = parse_tokens("alpha=s1, beta=s2,bare").unwrap();
        assert_eq!(&**t.bot_for("s1").unwrap(), "alpha");
        assert_eq!(&**t.bot_for("s2").unwrap(), "beta");
        assert_eq!(&**t.bot_for("bare").unwrap(), "default");
        assert!(t.bot_for("nope").is_none());
        let names: Vec<&str> = t.bots().iter().map(|b| &**b).collect();
        assert_eq!(names, ["alpha", "beta", "default"]);
    }

    #[test]
    fn two_tokens_may_share_a_bot_but_not_the_reverse() {
        let t = parse_tokens("a=one,a=two").unwrap();
        assert_eq!(t.bots().len(), 1);
        assert!(parse_tokens("a=one,b=one").is_err());
    }

    #[test]
    fn bad_token_lists_are_rejected() {
        assert!(parse_tokens("a=").is_err());
        assert!(parse_tokens("bad name=tok").is_err());
        assert!(parse_tokens("").unwrap().is_empty());
    }

    #[test]
    fn durations_are_human_readable() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86400)
        );
        assert!(parse_duration("ten seconds").is_err());
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::parse_from(["botmetrics"]);
        assert_eq!(c.listen.port(), DEFAULT_PORT);
        assert_eq!(c.flush_interval, Duration::from_secs(10));
        assert_eq!(c.history_interval, Duration::from_secs(300));
        assert_eq!(c.max_batch, 10_000);
        assert_eq!(c.timezone, chrono_tz::UTC);
        assert_eq!(c.summary_cache_ttl, Duration::from_secs(30));
        assert_eq!(c.metrics_cache_ttl, Duration::ZERO);
    }

    #[test]
    fn listen_and_timezone_errors_show_the_accepted_form() {
        assert_eq!(parse_listen("0.0.0.0:80").unwrap().port(), 80);
        let bare = parse_listen("9465").unwrap_err();
        assert!(bare.contains("127.0.0.1:9465"), "{bare}");
        assert!(parse_listen("localhost:9465").unwrap_err().contains("e.g."));
        assert_eq!(
            parse_timezone("Europe/Berlin").unwrap(),
            chrono_tz::Europe::Berlin
        );
        let city = parse_timezone("Berlin").unwrap_err();
        assert!(city.contains("Europe/Berlin"), "{city}");
        assert!(
            parse_timezone("new york")
                .unwrap_err()
                .contains("America/New_York")
        );
        assert!(
            parse_timezone("Mars/Olympus_Mons")
                .unwrap_err()
                .contains("e.g.")
        );
    }
}
