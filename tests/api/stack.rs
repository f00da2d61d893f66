//! The monitoring stack shipped beside the server, checked with the real
//! tools: promtool on the Prometheus config and alert rules, the dashboards'
//! lint, the Python and Node clients' tests against this build's binary,
//! and the end-to-end run (this binary + a real Prometheus + traffic; every
//! panel and rule expression evaluated).
//!
//! A missing tool fails the run in CI (`CI=true`) and is skipped loudly
//! elsewhere, like the PostgreSQL tests.

use std::path::Path;
use std::process::Command;

use crate::helpers::{MACHINE, cannot_run, have, postgres_base_url};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command from the repository root and fails with its output.
fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) {
    let output = Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    if !have("promtool", "prometheus") {
        return;
    }
    run("promtool", &["check", "config", "prometheus.yml"], &[]);
    run(
        "promtool",
        &["test", "rules", "prometheus/rules_test.yml"],
        &[],
    );
}

/// Three days of the traffic simulator's ordinary traffic through the shipped
/// rules: no alert ever pending; then the same days with five faults on the
/// third: exactly their five alerts fire, each during its fault.
#[test]
fn alerts_stay_quiet_on_the_simulators_days_and_fire_on_faults() {
    if !have("promtool", "prometheus") || !have("python3", "python3") {
        return;
    }
    let out = std::env::temp_dir().join(format!(
        "botmetrics-simulated-days-{}.yml",
        std::process::id()
    ));
    let path = out.to_str().expect("UTF-8 temp path");
    run(
        "python3",
        &["scripts/simulated_days.py", "--out", path],
        &[],
    );
    run("promtool", &["test", "rules", path], &[]);
    // About 1 MB; left behind only when the test failed, to look at.
    let _ = std::fs::remove_file(&out);
}

#[test]
fn dashboards_are_valid_and_lint_clean() {
    if !have("python3", "python3") {
        return;
    }
    for name in [
        "dashboards/bot-overview.json",
        "dashboards/botmetrics-internals.json",
    ] {
        run("python3", &["-m", "json.tool", name], &[]);
    }
    run(
        "python3",
        &[
            "scripts/e2e_check.py",
            "lint",
            "dashboards/bot-overview.json",
            "dashboards/botmetrics-internals.json",
        ],
        &[],
    );
}

/// clients/python/ci.sh: the package installed from this tree into a
/// virtualenv under the target directory with pinned aiogram, mypy and
/// prometheus-client from PyPI (unreachable PyPI fails the test), a fresh
/// virtualenv with only `pip install ./clients/python`, `mypy --strict`, then
/// the client's tests against this build's binary.
#[test]
fn python_client_against_the_real_server() {
    if !have("python3", "python3") {
        return;
    }
    let _heavy = MACHINE.blocking_lock();
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-venv");
    run(
        "bash",
        &["clients/python/ci.sh"],
        &[
            ("BOTMETRICS_BIN", env!("CARGO_BIN_EXE_botmetrics")),
            (
                "BOTMETRICS_PY_VENV",
                venv.to_str().expect("a UTF-8 target path"),
            ),
        ],
    );
}

/// clients/node/ci.sh: `npm ci` of the pinned devDependencies (typescript,
/// grammy, telegraf, @types/node) from the npm registry (unreachable fails
/// the test), tsc over the package, its tests and the examples, `npm pack`
/// installed into fresh projects (imports with no other package, a
/// TypeScript consumer type-checks), then the client's tests against this
/// build's binary: real grammY and Telegraf bots fed through their own
/// `handleUpdate`, and the README's examples run as written.
#[test]
fn node_client_against_the_real_server() {
    if !have("node", "nodejs") || !have("npm", "npm") {
        return;
    }
    let _heavy = MACHINE.blocking_lock();
    run(
        "bash",
        &["clients/node/ci.sh"],
        &[("BOTMETRICS_BIN", env!("CARGO_BIN_EXE_botmetrics"))],
    );
}

#[test]
fn end_to_end_with_a_real_prometheus() {
    if !have("prometheus", "prometheus") || !have("python3", "python3") {
        return;
    }
    let mut envs = vec![("BOTMETRICS_BIN", env!("CARGO_BIN_EXE_botmetrics"))];
    // With PostgreSQL at hand the run also checks the dashboards' SQL panel
    // against the server's real history table.
    let pg = postgres_base_url();
    let pg_up = Command::new("pg_isready")
        .args(["-q", "-d", &pg])
        .status()
        .is_ok_and(|s| s.success());
    if pg_up {
        envs.push(("E2E_POSTGRES_URL", &pg));
    } else {
        cannot_run(&format!(
            "the end-to-end SQL panel check: PostgreSQL at {pg} is unreachable"
        ));
    }
    run("bash", &["scripts/e2e.sh"], &envs);
}

/// The same end-to-end run in cluster mode, on a private Redis: every
/// cluster panel and rule operand of the dashboards is evaluated against
/// real series (without this they print SKIP and pass).
#[tokio::test]
async fn end_to_end_in_cluster_mode_with_a_real_prometheus() {
    if !have("prometheus", "prometheus") || !have("python3", "python3") {
        return;
    }
    let Some(redis) = crate::redis::RedisServer::start().await else {
        return;
    };
    let url = redis.url();
    let status = tokio::task::spawn_blocking(move || {
        let envs = [
            ("BOTMETRICS_BIN", env!("CARGO_BIN_EXE_botmetrics")),
            ("E2E_REDIS_URL", url.as_str()),
        ];
        run("bash", &["scripts/e2e.sh"], &envs)
    })
    .await;
    drop(redis);
    status.expect("the end-to-end run");
}
