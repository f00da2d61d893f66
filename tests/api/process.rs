//! The real `botmetrics` binary as an operator runs it: flags and their
//! environment fallbacks, `--help`, start-up failures, and SIGTERM/SIGINT
//! (clean exit 0, a final flush, every count back after a restart).

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::events::{bot_part, every_event_type, value};
use crate::helpers::SqliteFile;

const BIN: &str = env!("CARGO_BIN_EXE_botmetrics");
/// Generous: start-up and shutdown take milliseconds, but the machine may
/// be busy compiling.
const PATIENCE: Duration = Duration::from_secs(20);

/// The binary with a clean environment: no `BOTMETRICS_*` or `DATABASE_URL`
/// from the developer's shell, logs at info, no colours.
fn command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Removes ANSI colour sequences, in case the logger adds them anyway.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters… final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running botmetrics process. Dropping it kills the process, so a
/// failed assertion never leaves one behind.
struct Server {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
}

impl Server {
    /// Starts the binary on port 0 and learns the port from its log line
    /// `botmetrics serving listen=127.0.0.1:PORT`.
    async fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = command();
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("botmetrics starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = oneshot::channel();
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let seen = stderr.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                let line = strip_ansi(&line);
                if line.contains("botmetrics serving")
                    && let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("listen="))
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
                seen.lock().unwrap().push(line);
            }
        });
        let addr = match tokio::time::timeout(PATIENCE, rx).await {
            Ok(Ok(addr)) => addr,
            _ => panic!(
                "botmetrics did not log its address; stderr:\n{}",
                stderr.lock().unwrap().join("\n")
            ),
        };
        Server {
            child,
            addr,
            stderr,
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn post(&self, token: &str, events: &serde_json::Value) -> (u16, serde_json::Value) {
        let res = self
            .client
            .post(self.url("/v1/events"))
            .bearer_auth(token)
            .json(events)
            .send()
            .await
            .expect("post");
        (res.status().as_u16(), res.json().await.expect("JSON"))
    }

    async fn metrics(&self) -> String {
        let res = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("scrape");
        assert_eq!(res.status(), 200);
        res.text().await.expect("text")
    }

    /// Sends a signal with the `kill` command and waits for the exit.
    async fn signal(&mut self, signal: &str) -> ExitStatus {
        let pid = self.child.id().expect("still running").to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} {pid} failed");
        match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(status) => status.expect("exit status"),
            Err(_) => panic!(
                "botmetrics ignored SIG{signal}; stderr:\n{}",
                self.stderr_text()
            ),
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Still running means the test failed half-way: do not leak it.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.start_kill();
        }
    }
}

fn sqlite_args(db: &SqliteFile) -> Vec<String> {
    let url = db.url();
    ["--listen", "127.0.0.1:0", "--database-url", &url]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

#[tokio::test]
async fn sigterm_exits_0_after_a_final_flush_and_a_restart_has_every_count_back() {
    let db = SqliteFile::new();
    let mut args = sqlite_args(&db);
    // Flushing hourly: only the flush on the way out can have saved them.
    args.extend(["--tokens", "a=ta,b=tb", "--flush-interval", "1h"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let mut first = Server::start(&args, &[]).await;
    assert_eq!(
        first.post("ta", &every_event_type()).await,
        (202, json!({"accepted": 12, "duplicates": 0}))
    );
    assert_eq!(
        first
            .post(
                "tb",
                &json!({"type": "message", "role": "user", "user_id": 77})
            )
            .await
            .0,
        202
    );
    let before = first.metrics().await;
    let status = first.signal("TERM").await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", first.stderr_text());
    assert!(
        first.stderr_text().contains("final flush done"),
        "stderr:\n{}",
        first.stderr_text()
    );

    // Same file, new process: totals, histograms and active-user sketches
    // are exactly what was counted.
    let mut second = Server::start(&args, &[]).await;
    let restored = second.metrics().await;
    assert_eq!(bot_part(&restored), bot_part(&before));
    assert_eq!(
        value(&restored, r#"bot_active_users{bot="a",window="1d"}"#),
        3.0
    );

    // Counting goes on from there; SIGINT stops as cleanly as SIGTERM.
    assert_eq!(
        second
            .post("ta", &json!({"type": "message", "role": "user"}))
            .await
            .0,
        202
    );
    let status = second.signal("INT").await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", second.stderr_text());

    let third = Server::start(&args, &[]).await;
    let text = third.metrics().await;
    assert_eq!(
        value(&text, r#"bot_messages_total{bot="a",role="user"}"#),
        2.0
    );
    assert_eq!(
        value(&text, r#"bot_messages_total{bot="b",role="user"}"#),
        1.0
    );
}

#[tokio::test]
async fn flags_fall_back_to_environment_variables_and_database_url() {
    let db = SqliteFile::new();
    let url = db.url();
    let server = Server::start(
        &[],
        &[
            ("BOTMETRICS_LISTEN", "127.0.0.1:0"),
            ("BOTMETRICS_TOKENS", "envbot=env-token"),
            ("BOTMETRICS_METRICS_CACHE_TTL", "0s"),
            // No --database-url and no BOTMETRICS_DATABASE_URL: the sqlx
            // tools' variable is read.
            ("DATABASE_URL", &url),
        ],
    )
    .await;
    assert_eq!(
        server
            .post("env-token", &json!({"type": "limit_reached"}))
            .await,
        (202, json!({"accepted": 1, "duplicates": 0}))
    );
    let text = server.metrics().await;
    assert_eq!(
        value(&text, r#"bot_limit_reached_total{bot="envbot"}"#),
        1.0
    );
    assert_eq!(value(&text, "botmetrics_metrics_cache_ttl_seconds"), 0.0);
    assert!(
        db.path().exists(),
        "the SQLite file of DATABASE_URL is used"
    );
}

/// Runs the binary to completion (it must not start serving).
async fn run(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut cmd = command();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
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

/// Flags, environment, and the flag the one error line must name.
type BadValue<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);

#[tokio::test]
async fn a_bad_flag_value_exits_non_zero_with_one_line_naming_the_flag() {
    let db = SqliteFile::new();
    let url = db.url();
    let cases: Vec<BadValue> = vec![
        (
            vec!["--flush-interval", "banana"],
            vec![],
            "--flush-interval",
        ),
        (vec!["--tokens", "a=,"], vec![], "--tokens"),
        (vec!["--tokens", "bad name=t"], vec![], "--tokens"),
        (vec!["--tokens", "a=same,b=same"], vec![], "--tokens"),
        (vec!["--listen", "nope"], vec![], "--listen"),
        (
            vec!["--metrics-cache-ttl", "soon"],
            vec![],
            "--metrics-cache-ttl",
        ),
        (
            vec!["--history-interval", "0s"],
            vec![],
            "--history-interval",
        ),
        (vec!["--retention", "forever"], vec![], "--retention"),
        (
            vec!["--dedupe-window", "10 parsecs"],
            vec![],
            "--dedupe-window",
        ),
        (vec!["--max-body-bytes", "lots"], vec![], "--max-body-bytes"),
        (vec!["--max-batch", "0"], vec![], "--max-batch"),
        (
            vec!["--max-label-values", "many"],
            vec![],
            "--max-label-values",
        ),
        (
            vec!["--timezone", "Mars/Olympus_Mons"],
            vec![],
            "--timezone",
        ),
        (vec!["--log-format", "xml"], vec![], "--log-format"),
        (
            vec![],
            vec![("BOTMETRICS_FLUSH_INTERVAL", "banana")],
            "--flush-interval",
        ),
        (vec![], vec![("BOTMETRICS_LISTEN", "nope")], "--listen"),
        (
            vec!["--database-url", "mysql://localhost/x"],
            vec![],
            "--database-url",
        ),
    ];
    for (flags, env, flag) in cases {
        let mut args = flags.clone();
        // Everything else valid, so the flag under test is the only fault
        // (and a wrongly accepted value would not serve on a fixed port).
        if !flags.contains(&"--listen") && !env.iter().any(|(k, _)| *k == "BOTMETRICS_LISTEN") {
            args.extend(["--listen", "127.0.0.1:0"]);
        }
        if !flags.contains(&"--database-url") {
            args.extend(["--database-url", &url]);
        }
        let (status, _, stderr) = run(&args, &env).await;
        assert!(!status.success(), "{flags:?} {env:?} was accepted");
        assert!(status.code().is_some(), "{flags:?}: killed by a signal");
        assert!(
            !stderr.contains("panicked"),
            "{flags:?} panicked:\n{stderr}"
        );
        // clap's hint to try --help is fine; the complaint is one line.
        let lines: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
            .filter(|l| !l.starts_with("[possible values"))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{flags:?} {env:?}: one line expected:\n{stderr}"
        );
        assert!(
            lines[0].contains(flag),
            "{flags:?} {env:?}: the line should name {flag}: {}",
            lines[0]
        );
    }
    assert!(
        !db.path().exists(),
        "no run with a bad flag went as far as opening the store"
    );
}

#[tokio::test]
async fn help_lists_every_flag_of_the_design_with_its_environment_variable() {
    let (status, stdout, _) = run(&["--help"], &[]).await;
    assert!(status.success());
    for flag in [
        "listen",
        "database-url",
        "tokens",
        "metrics-token",
        "metrics-cache-ttl",
        "flush-interval",
        "history-interval",
        "retention",
        "dedupe-window",
        "max-body-bytes",
        "max-batch",
        "max-label-values",
        "timezone",
        "log-format",
    ] {
        assert!(
            stdout.contains(&format!("--{flag} <")),
            "--{flag} missing:\n{stdout}"
        );
        let env = format!("BOTMETRICS_{}", flag.to_uppercase().replace('-', "_"));
        assert!(stdout.contains(&env), "{env} missing:\n{stdout}");
    }
    assert!(stdout.contains("DATABASE_URL"));
    for default in [
        "30s", "10s", "5m", "90d", "10m", "1048576", "10000", "1000", "UTC", "text",
    ] {
        assert!(
            stdout.contains(&format!("[default: {default}]")),
            "default {default} missing"
        );
    }
}

#[tokio::test]
async fn a_port_already_in_use_exits_non_zero_saying_so() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().unwrap().to_string();
    let db = SqliteFile::new();
    let url = db.url();
    let (status, _, stderr) = run(&["--listen", &addr, "--database-url", &url], &[]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("cannot listen on") && stderr.contains(&addr),
        "{stderr}"
    );
}
