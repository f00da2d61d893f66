//! A thousand bots in one process: resident memory of the real binary
//! (read from /proc) before and after a little traffic for every bot and
//! the flush that stores it, and every bot's series and summary present.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{Binary, Raw, SqliteFile, eventually, sample};

const BOTS: usize = 1000;
/// The bound README promises for 1,000 bots with a little traffic each.
const MAX_RSS: u64 = 100_000_000;

#[tokio::test]
async fn a_thousand_bots_with_a_little_traffic_stay_within_100_mb() {
    let db = SqliteFile::new();
    let pairs: Vec<String> = (0..BOTS).map(|i| format!("bot{i}=token-{i}")).collect();
    let server = Binary::serve(&db.url(), &pairs.join(","), &["--flush-interval", "1s"]).await;
    let idle = server.status_bytes("VmRSS");
    assert!(idle <= MAX_RSS, "{idle} bytes resident before any event");

    // Every bot: ten distinct users and one event of every type.
    for i in 0..BOTS {
        let mut batch: Vec<_> = (0..10)
            .map(|u| json!({"type": "message", "role": "user", "user_id": format!("{i}-{u}")}))
            .collect();
        batch.extend(
            crate::helpers::every_event_type()
                .as_array()
                .expect("a batch")
                .iter()
                .cloned(),
        );
        let n = batch.len();
        assert_eq!(
            server
                .post_events(&format!("token-{i}"), &json!(batch))
                .await,
            (202, json!({"accepted": n, "duplicates": 0}))
        );
    }
    let text = server.metrics_text().await;
    for i in [0, 499, BOTS - 1] {
        // Ten users plus the three of every_event_type (1, "u-2", 3).
        assert_eq!(
            sample(
                &text,
                &format!(r#"bot_active_users{{bot="bot{i}",window="1d"}}"#)
            ),
            Some(13.0),
            "bot{i}"
        );
    }
    // Two sparse sketches (hour and day) of 13 entries per bot: between the
    // entries themselves and twice that (a growing list's spare capacity).
    let sketch_bytes = sample(&text, "botmetrics_active_user_sketch_bytes").expect("exposed");
    let entries = (BOTS * 2 * 13 * 4) as f64;
    assert!(
        (entries..=2.0 * entries).contains(&sketch_bytes),
        "{sketch_bytes} bytes of sketches"
    );
    // The page is megabytes, so its gzip is deflated in pieces on every
    // core: read back by a decoder that stops after the first gzip member,
    // it must still be the whole page (the `bot_` lines: the self-metrics
    // move between two scrapes).
    let (status, headers, gz) = server
        .get_raw("/metrics", &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-encoding").map(|v| v.as_bytes()),
        Some(&b"gzip"[..])
    );
    assert!(gz.len() > 100_000, "{} bytes of gzip", gz.len());
    let mut unzipped = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut unzipped)
        .expect("valid gzip");
    let bot_lines = |page: &str| -> Vec<String> {
        page.lines()
            .filter(|l| l.starts_with("bot_"))
            .map(str::to_owned)
            .collect()
    };
    let plain = bot_lines(&text);
    assert!(plain.len() > 50_000, "{} bot_ lines", plain.len());
    assert_eq!(bot_lines(&unzipped), plain);
    assert!(unzipped.ends_with('\n'), "the page read back to its end");

    let (status, summary) = server.get_json("/v1/summary").await;
    assert_eq!(status, 200);
    assert_eq!(summary["bots"].as_array().map(Vec::len), Some(BOTS));

    // The flush that stores it: every bot's hourly and daily sketch is in
    // the database (the server flushes every second here).
    let raw = Raw::connect(&db.url()).await;
    eventually(Duration::from_secs(60), || async {
        raw.count("active_user_sketches").await == 2 * BOTS as i64
    })
    .await;
    raw.close().await;

    let busy = server.status_bytes("VmRSS");
    let peak = server.status_bytes("VmHWM");
    eprintln!(
        "1,000 bots: {idle} bytes resident idle, {busy} after traffic and flush, peak {peak}"
    );
    assert!(
        busy <= MAX_RSS,
        "{busy} bytes resident after traffic and flush"
    );
    assert!(peak <= MAX_RSS, "{peak} bytes resident at the peak");
}
