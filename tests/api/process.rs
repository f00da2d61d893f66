//! The real `botmetrics` binary as an operator starts it: flags and their
//! environment fallbacks, `--help`, and start-up failures. What survives
//! its end (SIGTERM, SIGINT, kill -9) is in `persistence.rs`.

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
        let (status, _, stderr) = Binary::run(&args, &env).await;
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
