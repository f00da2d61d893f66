//! The real `botmetrics` binary as an operator starts it: flags and their
//! environment fallbacks, `--help`, and start-up failures. What survives
//! its end (SIGTERM, SIGINT, kill -9) is in `persistence.rs`; SIGHUP, which
//! must never end it, is here.

use serde_json::json;

use crate::helpers::{Binary, SqliteFile, assert_series};

#[tokio::test]
async fn flags_fall_back_to_environment_variables_and_database_url() {
    let db = SqliteFile::new();
    let url = db.url();
    let server = Binary::start(
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
    server
        .post_ok("env-token", &json!({"type": "limit_reached"}))
        .await;
    assert_series(
        &server.metrics_text().await,
        &[
            (r#"bot_limit_reached_total{bot="envbot"}"#, 1.0),
            ("botmetrics_metrics_cache_ttl_seconds", 0.0),
        ],
    );
    assert!(
        db.path().exists(),
        "the SQLite file of DATABASE_URL is used"
    );
}

/// Flags, environment, and the flag the one error line must name.
type BadValue<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);

#[tokio::test]
async fn a_bad_flag_value_exits_non_zero_with_one_line_naming_the_flag() {
    let db = SqliteFile::new();
    let url = db.url();
    let mut cases: Vec<BadValue> = [
        ("--flush-interval", "banana"),
        ("--tokens", "a=,"),
        ("--tokens", "bad name=t"),
        ("--tokens", "a=same,b=same"),
        ("--listen", "nope"),
        ("--metrics-cache-ttl", "soon"),
        ("--history-interval", "0s"),
        ("--retention", "forever"),
        ("--retention", "2m"),
        ("--dedupe-window", "10 parsecs"),
        ("--max-body-bytes", "lots"),
        ("--max-batch", "0"),
        ("--max-label-values", "many"),
        ("--timezone", "Mars/Olympus_Mons"),
        ("--log-format", "xml"),
        ("--database-url", "mysql://localhost/x"),
    ]
    .into_iter()
    .map(|(flag, value)| (vec![flag, value], vec![], flag))
    .collect();
    cases.extend([
        (
            vec![],
            vec![("BOTMETRICS_FLUSH_INTERVAL", "banana")],
            "--flush-interval",
        ),
        (vec![], vec![("BOTMETRICS_LISTEN", "nope")], "--listen"),
    ]);
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
        // clap's hint to try --help, and the values it lists, are fine; the
        // complaint is one line.
        let line = Binary::refused_in_one_line(&args, &env, &["[possible values"]).await;
        assert!(
            line.contains(flag),
            "{flags:?} {env:?}: the line should name {flag}: {line}"
        );
    }
    assert!(
        !db.path().exists(),
        "no run with a bad flag went as far as opening the store"
    );
}

#[tokio::test]
async fn help_never_shows_secrets_given_through_the_environment() {
    // Secrets set the way a deployment sets them: clap prints an env
    // variable's value beside its flag unless told not to.
    let secrets = [
        ("BOTMETRICS_TOKENS", "shop=tok-s3cr3t-aaaa"),
        ("BOTMETRICS_METRICS_TOKEN", "read-s3cr3t-bbbb"),
        (
            "BOTMETRICS_DATABASE_URL",
            "postgres://bm:pw-s3cr3t-cccc@db/bm",
        ),
        ("BOTMETRICS_REDIS_URL", "redis://:pw-s3cr3t-dddd@cache:6379"),
    ];
    let (status, stdout, stderr) = Binary::run(&["--help"], &secrets).await;
    assert!(status.success(), "{stderr}");
    for (var, _) in secrets {
        assert!(stdout.contains(var), "{var} is still named:\n{stdout}");
    }
    for needle in ["s3cr3t", "tok-", "pw-"] {
        assert!(
            !stdout.contains(needle) && !stderr.contains(needle),
            "{needle} leaked:\n{stdout}{stderr}"
        );
    }
}

#[tokio::test]
async fn help_lists_every_flag_of_the_design_with_its_environment_variable() {
    let (status, stdout, _) = Binary::run(&["--help"], &[]).await;
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
        "summary-cache-ttl",
        "header-read-timeout",
        "write-timeout",
        "max-connections",
        "shutdown-timeout",
        "prices",
        "currency",
    ] {
        assert!(
            stdout.contains(&format!("--{flag} <")),
            "--{flag} missing:\n{stdout}"
        );
        let env = format!("BOTMETRICS_{}", flag.to_uppercase().replace('-', "_"));
        assert!(stdout.contains(&env), "{env} missing:\n{stdout}");
    }
    // The sqlx tools' variable is named as a fallback too: beyond the value
    // name and `BOTMETRICS_DATABASE_URL`, which hold it as well.
    let elsewhere = stdout
        .replace("BOTMETRICS_DATABASE_URL", "")
        .replace("<DATABASE_URL>", "");
    assert!(elsewhere.contains("DATABASE_URL"), "{stdout}");
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
    let (status, _, stderr) = Binary::run(&["--listen", &addr, "--database-url", &url], &[]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("cannot listen on") && stderr.contains(&addr),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------
// Messages a person can act on (issue 9)
// ---------------------------------------------------------------------------

/// Runs the binary to its failed start (no environment) and returns its
/// one complaint.
async fn the_one_line(args: &[&str]) -> String {
    Binary::refused_in_one_line(args, &[], &[]).await
}

#[tokio::test]
async fn flag_errors_show_an_example_of_the_accepted_form() {
    let db = SqliteFile::new();
    let url = db.url();
    let base = ["--database-url", url.as_str()];
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--listen", "9465"],
            &["--listen", "127.0.0.1:9465", "0.0.0.0:9465"],
        ),
        (
            &["--listen", "localhost:9465"],
            &["--listen", "e.g. 127.0.0.1:9464"],
        ),
        (&["--timezone", "Berlin"], &["--timezone", "Europe/Berlin"]),
        (
            &["--timezone", "Mars"],
            &["--timezone", "e.g. Europe/Berlin"],
        ),
        (
            &["--flush-interval", "ten seconds"],
            &["--flush-interval", "e.g. 500ms, 10s, 5m, 90d"],
        ),
    ];
    for (flags, wanted) in cases {
        let mut args = flags.to_vec();
        args.extend(base);
        if flags[0] != "--listen" {
            args.extend(["--listen", "127.0.0.1:0"]);
        }
        let line = the_one_line(&args).await;
        for needle in wanted {
            assert!(
                line.contains(needle),
                "{flags:?}: `{needle}` missing from: {line}"
            );
        }
    }
}

#[tokio::test]
async fn an_unusable_sqlite_path_stops_the_start_naming_the_flag_and_the_path() {
    let db = SqliteFile::new();
    let missing = db.path().with_file_name("no-such-dir").join("x.db");
    let url = format!("sqlite://{}", missing.display());
    let line = the_one_line(&["--listen", "127.0.0.1:0", "--database-url", &url]).await;
    let dir = missing.parent().unwrap().display().to_string();
    for needle in ["--database-url", &url, &dir, "does not exist"] {
        assert!(line.contains(needle), "`{needle}` missing from: {line}");
    }
    assert!(!missing.exists());
}

#[tokio::test]
async fn an_unsupported_scheme_is_echoed_with_its_scheme_and_without_the_password() {
    let line = the_one_line(&[
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        "mysql://root:hunter2@db.example/metrics",
    ])
    .await;
    assert!(line.contains("--database-url"), "{line}");
    assert!(line.contains("`mysql`"), "{line}");
    assert!(
        line.contains("mysql://root:***@db.example/metrics"),
        "{line}"
    );
    assert!(!line.contains("hunter2"), "{line}");
}

#[tokio::test]
async fn postgres_refusing_credentials_or_database_stops_the_start_with_the_cause() {
    let base = crate::helpers::postgres_base_url();
    // Only run where the test server answers at all.
    if sqlx::PgPool::connect(&base).await.is_err() {
        crate::helpers::cannot_run(&format!("PostgreSQL at {base} is unreachable"));
        return;
    }
    let (server, _) = base.rsplit_once('/').expect("a database path");
    let no_db = format!("{server}/botmetrics_no_such_database");
    let line = the_one_line(&["--listen", "127.0.0.1:0", "--database-url", &no_db]).await;
    for needle in [
        "--database-url",
        "botmetrics_no_such_database",
        "does not exist",
    ] {
        assert!(line.contains(needle), "`{needle}` missing from: {line}");
    }
    // A role the server does not know: an authentication failure.
    let (scheme_user, host) = server.split_once('@').expect("a user in the test URL");
    let (scheme, _) = scheme_user.split_once("://").expect("a scheme");
    let no_role = format!("{scheme}://botmetrics_no_such_role:pw@{host}/test");
    let line = the_one_line(&["--listen", "127.0.0.1:0", "--database-url", &no_role]).await;
    for needle in ["--database-url", "botmetrics_no_such_role", "PostgreSQL at"] {
        assert!(line.contains(needle), "`{needle}` missing from: {line}");
    }
    assert!(!line.contains(":pw@"), "the password is hidden: {line}");
}

#[tokio::test]
async fn a_refused_postgres_connection_names_host_and_port_is_retried_and_readyz_logs_once() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/x");
    let mut bin = Binary::serve(&url, "a=t", &[]).await;
    let log = bin.log();
    assert!(
        log.contains(&format!(
            "PostgreSQL at 127.0.0.1:{port} refused the connection"
        )) && log.contains("retrying"),
        "{log}"
    );
    // Events still count, from memory.
    bin.post_ok("t", &json!({"type": "limit_reached"})).await;
    for _ in 0..5 {
        let (status, body) = bin.get_json("/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "unavailable");
    }
    assert!(bin.signal("TERM").await.success());
    let log = bin.log();
    let not_ready = log.lines().filter(|l| l.contains("not ready")).count();
    assert_eq!(not_ready, 1, "one line for five 503 probes:\n{log}");
    assert!(
        !log.lines().any(|l| l.contains("request failed")),
        "no line per probe:\n{log}"
    );
}

#[tokio::test]
async fn refused_requests_are_logged_at_debug_with_bot_and_reason_and_rate_limited_at_warn() {
    let db = SqliteFile::new();
    let url = db.url();
    let mut bin = Binary::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--tokens",
            "alpha=ta",
        ],
        &[("RUST_LOG", "info,botmetrics::http=debug")],
    )
    .await;
    let bad = json!({"type": "message", "role": "robot"});
    for _ in 0..5 {
        assert_eq!(bin.post_events("ta", &bad).await.0, 422);
    }
    assert_eq!(bin.post_events("wrong", &bad).await.0, 401);
    assert!(bin.signal("TERM").await.success());
    let log = bin.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request refused"))
        .collect();
    let debug = refused.iter().filter(|l| l.contains("DEBUG")).count();
    let warn = refused.iter().filter(|l| l.contains("WARN")).count();
    assert_eq!(debug, 6, "every refusal at debug:\n{log}");
    assert_eq!(warn, 1, "one warning within ten seconds:\n{log}");
    let invalid = refused
        .iter()
        .find(|l| l.contains("DEBUG") && l.contains("reason=\"invalid\""))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        invalid.contains("alpha") && invalid.contains("422"),
        "{invalid}"
    );
    assert!(
        refused
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains("401") && !l.contains("alpha")),
        "{log}"
    );
}

// ---------------------------------------------------------------------------
// SIGHUP (issue 17, item 6)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn sighup_reloads_and_logs_it_and_never_stops_the_server() {
    let db = SqliteFile::new();
    let url = db.url();
    // Flushing hourly: only the final flush on SIGTERM can store the totals,
    // so a SIGHUP that ended the process early would lose them.
    let flags = ["--flush-interval", "1h"];
    let mut bin = Binary::serve(&url, "a=t", &flags).await;
    let reloads = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains("reload requested (SIGHUP): the built-in price table, unchanged")
            })
            .count()
    };
    for round in 1..=2 {
        bin.send_signal("HUP").await;
        crate::helpers::eventually(std::time::Duration::from_secs(30), || {
            let log = bin.log();
            async move { reloads(&log) == round }
        })
        .await;
        // Still serving: the event after the reload is counted.
        bin.post_ok("t", &json!({"type": "limit_reached"})).await;
    }
    assert_series(
        &bin.metrics_text().await,
        &[(r#"bot_limit_reached_total{bot="a"}"#, 2.0)],
    );
    let status = bin.signal("TERM").await;
    let log = bin.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(reloads(&log), 2, "one line per SIGHUP:\n{log}");
    assert!(log.contains("final flush done"), "{log}");

    // The final flush stored the exact totals.
    let bin = Binary::serve(&url, "a=t", &flags).await;
    assert_series(
        &bin.metrics_text().await,
        &[(r#"bot_limit_reached_total{bot="a"}"#, 2.0)],
    );
}
