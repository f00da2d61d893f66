//! The `--remote-write-*` flags, flattened into [`crate::config::Config`]
//! (here, beside the other flags, so `remote_write` depends on the
//! configuration and never the other way round).

use std::time::Duration;

/// A secret from a flag or the environment: never shown by `Debug`, so
/// neither a log line nor a panic message can carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Secret(s.to_owned()))
    }
}

#[derive(Clone, clap::Args)]
pub struct RemoteWriteArgs {
    /// Push every series to this Prometheus remote-write 1.0 endpoint
    /// (Grafana Cloud, Mimir, VictoriaMetrics `/api/v1/write`, or a
    /// Prometheus with `--web.enable-remote-write-receiver` at
    /// `/api/v1/write`). Repeat the flag or separate with commas for
    /// several receivers; each gets its own queue. Unset: nothing is pushed.
    #[arg(long = "remote-write-url", env = "BOTMETRICS_REMOTE_WRITE_URL",
        value_delimiter = ',', value_parser = parse_url, hide_env_values = true)]
    pub urls: Vec<http::Uri>,

    /// Basic-auth user for the receivers (Grafana Cloud: the instance id).
    #[arg(
        long = "remote-write-username",
        env = "BOTMETRICS_REMOTE_WRITE_USERNAME"
    )]
    pub username: Option<String>,

    /// Basic-auth password (Grafana Cloud: an access-policy token with
    /// `metrics:write`). Never logged.
    #[arg(
        long = "remote-write-password",
        env = "BOTMETRICS_REMOTE_WRITE_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<Secret>,

    /// Bearer token for the receivers, instead of basic auth. Never logged.
    #[arg(long = "remote-write-bearer-token", env = "BOTMETRICS_REMOTE_WRITE_BEARER_TOKEN",
        hide_env_values = true, conflicts_with_all = ["username", "password"])]
    pub bearer_token: Option<Secret>,

    /// How often a snapshot of every series is pushed.
    #[arg(long = "remote-write-interval", env = "BOTMETRICS_REMOTE_WRITE_INTERVAL",
        value_parser = parse_positive, default_value = "30s")]
    pub interval: Duration,

    /// A label added to every pushed series, `name=value`; repeat or
    /// separate with commas. `job` defaults to `botmetrics` and `instance`
    /// to `<hostname>:<port>`, as a scrape would set them.
    #[arg(long = "remote-write-label", env = "BOTMETRICS_REMOTE_WRITE_LABEL",
        value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Pushes kept per receiver while it is unreachable (each is one
    /// snapshot of every series); past it the oldest is dropped.
    #[arg(long = "remote-write-queue", env = "BOTMETRICS_REMOTE_WRITE_QUEUE",
        default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub queue: u64,

    /// Time allowed for one push request.
    #[arg(long = "remote-write-timeout", env = "BOTMETRICS_REMOTE_WRITE_TIMEOUT",
        value_parser = parse_positive, default_value = "10s")]
    pub timeout: Duration,
}

/// By hand, so that neither the password, the token nor a password inside
/// a URL ever reaches a log through `Config`'s `Debug`.
impl std::fmt::Debug for RemoteWriteArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteWriteArgs")
            .field("urls", &self.urls.iter().map(redacted).collect::<Vec<_>>())
            .field("username", &self.username)
            .field("password", &self.password)
            .field("bearer_token", &self.bearer_token)
            .field("interval", &self.interval)
            .field("labels", &self.labels)
            .field("queue", &self.queue)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A receiver's URL for logs and the `url` label: scheme, host, port and
/// path; no user, password or query (which may hold a key).
pub fn redacted(url: &http::Uri) -> String {
    let mut shown = format!(
        "{}://{}",
        url.scheme_str().unwrap_or(""),
        url.host().unwrap_or("")
    );
    if let Some(port) = url.port_u16() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

fn parse_url(raw: &str) -> Result<http::Uri, String> {
    let url: http::Uri = raw.trim().parse().map_err(|e| format!("not a URL: {e}"))?;
    if url.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(
            "give the user and password with --remote-write-username and --remote-write-password, not in the URL".into(),
        );
    }
    match url.scheme_str() {
        Some("http" | "https") if url.host().is_some() => Ok(url),
        _ => Err(format!(
            "`{}` is not an http:// or https:// URL",
            redacted(&url)
        )),
    }
}

fn parse_positive(raw: &str) -> Result<Duration, String> {
    let d = super::parse_duration(raw)?;
    if d.is_zero() {
        return Err("must be more than 0s".into());
    }
    Ok(d)
}

/// `name=value`, name a Prometheus label name that the exposition's own
/// labels do not use for meaning (`bot`, `le`) and not reserved (`__*`).
pub fn parse_label(raw: &str) -> Result<(String, String), String> {
    let (name, value) = raw
        .split_once('=')
        .ok_or_else(|| format!("`{raw}` is not name=value"))?;
    let (name, value) = (name.trim(), value.trim());
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "label name `{name}` must match [a-zA-Z_][a-zA-Z0-9_]*"
        ));
    }
    if name.starts_with("__") || name == "bot" || name == "le" {
        return Err(format!(
            "label name `{name}` is reserved (`__*`) or the series' own (`bot`, `le`)"
        ));
    }
    if value.is_empty() {
        return Err(format!("label `{name}` has an empty value"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        assert_eq!(
            parse_label("instance=vps-1:9464"),
            Ok(("instance".into(), "vps-1:9464".into()))
        );
        for bad in [
            "noequals",
            "1x=a",
            "a-b=c",
            "__name__=x",
            "bot=x",
            "le=1",
            "x=",
        ] {
            assert!(parse_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_lose_their_secrets_when_shown() {
        let url = parse_url("https://prom.example:8443/api/prom/push?key=k").unwrap();
        assert_eq!(redacted(&url), "https://prom.example:8443/api/prom/push");
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("https://u:p@x/push").is_err());
        let args = RemoteWriteArgs {
            urls: vec![url],
            username: Some("123".into()),
            password: Some(Secret("hunter2".into())),
            bearer_token: Some(Secret("tok3n".into())),
            interval: Duration::from_secs(30),
            labels: vec![],
            queue: 1,
            timeout: Duration::from_secs(1),
        };
        let shown = format!("{args:?}");
        for secret in ["hunter2", "tok3n", "key=k"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }
}
