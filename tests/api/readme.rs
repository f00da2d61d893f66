//! The README's examples, run (issue 9: docs true to what runs). Every
//! ```sh block of README.md that calls curl is cut into its commands; each
//! runs with `sh -e` against the real binary started as the README starts
//! it (`--tokens mybot=change-me`, and `--admin-token change-me-admin` for
//! "Managing bots"), and where the README shows an answer
//! (`# {...}` after a command, or at the end of its line) the real answer
//! must be exactly that JSON.

use serde_json::Value;

use crate::helpers::{Binary, SqliteFile, have};

/// One command of a README block and the JSON answer the README shows.
#[derive(Debug)]
struct Example {
    command: String,
    shown: Option<Value>,
}

/// The first JSON value of a comment such as `{"status":"ok"}, or 503`.
fn shown_json(comment: &str) -> Option<Value> {
    let text = comment.trim_start_matches('#').trim();
    if !text.starts_with('{') {
        return None;
    }
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .next()?
        .ok()
}

/// True while a command continues on the next line: a trailing backslash,
/// an open single quote, or a pipe.
fn continues(command: &str) -> bool {
    let trimmed = command.trim_end();
    trimmed.ends_with('\\') || trimmed.ends_with('|') || command.matches('\'').count() % 2 == 1
}

fn examples(readme: &str) -> Vec<Example> {
    let mut examples = Vec::new();
    let mut in_sh = false;
    let mut block: Vec<&str> = Vec::new();
    for line in readme.lines() {
        match (in_sh, line.trim_start().starts_with("```")) {
            (false, true) if line.trim() == "```sh" => in_sh = true,
            (true, true) => {
                if block.iter().any(|l| l.contains("curl ")) {
                    examples.extend(cut(&block));
                }
                block.clear();
                in_sh = false;
            }
            (true, false) => block.push(line),
            _ => {}
        }
    }
    examples
}

/// Cuts one block into commands, each with the answer shown after it.
fn cut(block: &[&str]) -> Vec<Example> {
    let mut out: Vec<Example> = Vec::new();
    let mut current: Option<String> = None;
    for line in block {
        let trimmed = line.trim();
        if let Some(command) = current.as_mut()
            && continues(command)
        {
            command.push('\n');
            command.push_str(line);
            continue;
        }
        if let Some(command) = current.take() {
            out.push(Example {
                command,
                shown: None,
            });
        }
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.starts_with('#') {
            // An answer shown under the command before it, or a caption.
            if let (Some(json), Some(last)) = (shown_json(trimmed), out.last_mut())
                && last.shown.is_none()
            {
                last.shown = Some(json);
            }
            continue;
        }
        // An answer shown at the end of the command's own line.
        let shown = line
            .find("  #")
            .and_then(|at| shown_json(line[at..].trim()));
        if shown.is_some() {
            out.push(Example {
                command: (*line).to_owned(),
                shown,
            });
        } else {
            current = Some((*line).to_owned());
        }
    }
    if let Some(command) = current {
        out.push(Example {
            command,
            shown: None,
        });
    }
    out
}

#[tokio::test]
async fn every_curl_example_of_the_readme_runs_and_answers_as_shown() {
    if !have("curl", "curl") {
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let examples = examples(&readme);
    let shown = examples.iter().filter(|e| e.shown.is_some()).count();
    assert!(
        examples.len() >= 13 && shown >= 4,
        "the README's examples were not found: {examples:#?}"
    );

    let db = SqliteFile::new();
    let url = db.url();
    let bin = Binary::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--tokens",
            "mybot=change-me",
            "--admin-token",
            "change-me-admin",
        ],
        &[],
    )
    .await;
    let here = bin.addr.to_string();
    for example in &examples {
        let command = example.command.replace("localhost:9464", &here);
        let out = tokio::process::Command::new("sh")
            .args(["-ec", &command])
            .output()
            .await
            .expect("sh runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "README example failed ({}):\n{}\nstdout: {stdout}\nstderr: {}",
            out.status,
            example.command,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!stdout.trim().is_empty(), "no output:\n{}", example.command);
        let answer: Option<Value> = serde_json::from_str(stdout.trim()).ok();
        match (&example.shown, &answer) {
            (Some(shown), _) => assert_eq!(
                answer.as_ref(),
                Some(shown),
                "the README shows another answer for:\n{}\ngot: {stdout}",
                example.command
            ),
            // No answer shown: at least it must not be an error.
            (None, Some(json)) => assert!(
                json.get("error").is_none(),
                "README example answered an error:\n{}\n{stdout}",
                example.command
            ),
            (None, None) => {}
        }
    }
}

#[test]
fn the_readme_parser_cuts_commands_and_their_answers() {
    let block = [
        "# one event",
        "curl -s -X POST localhost:9464/v1/events \\",
        "  -d '{\"type\":\"message\",",
        "       \"role\":\"user\"}'",
        "# {\"accepted\":1,\"duplicates\":0}",
        "",
        "printf '%s\\n' 'a' |",
        "  curl -s localhost:9464/x --data-binary @-",
        "curl -s localhost:9464/healthz   # {\"status\":\"ok\"}",
    ];
    let cut = cut(&block);
    assert_eq!(cut.len(), 3, "{cut:#?}");
    assert_eq!(cut[0].command.lines().count(), 3);
    assert_eq!(
        cut[0].shown,
        Some(serde_json::json!({"accepted": 1, "duplicates": 0}))
    );
    assert_eq!(cut[1].command.lines().count(), 2);
    assert_eq!(cut[1].shown, None);
    assert_eq!(cut[2].shown, Some(serde_json::json!({"status": "ok"})));
}
