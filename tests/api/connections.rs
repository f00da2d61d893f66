//! Connections as a slow, idle or hostile client holds them (issues 9 and
//! 17): half-sent requests and idle keep-alive connections are closed after
//! `--header-read-timeout`; at `--max-connections` the oldest idle
//! connection is closed to admit a new one, and only when every connection
//! is busy does a new one get a JSON 503 at once instead of hanging; an
//! answer the client does not read is given up after `--write-timeout`;
//! SIGTERM finishes within `--shutdown-timeout` whatever a client holds
//! open. Real sockets only.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::{
    Binary, MACHINE, SqliteFile, TestApp, assert_series, eventually, have, sample, start_with,
};

/// Long enough for a busy machine; the assertions wait on events, never on
/// this being short.
const PATIENCE: Duration = Duration::from_secs(30);

/// A client that keeps no connection between requests, so each request
/// opens its own and sees the server's answer to a new connection.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let res = fresh_client()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .expect("request sent");
    let status = res.status().as_u16();
    let body = res.bytes().await.expect("body");
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{status} is not JSON ({e}): {body:?}"));
    (status, json)
}

/// True when /healthz answers 200; false when refused in any way.
async fn healthy(addr: SocketAddr) -> bool {
    let res = fresh_client()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await;
    res.is_ok_and(|r| r.status() == 200)
}

/// Reads until the server closes the connection; what it sent first.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {PATIENCE:?}"
    );
    String::from_utf8_lossy(&got).into_owned()
}

/// An open-connections gauge, read from the registry (a scrape would need
/// a connection of its own).
fn open_connections(app: &TestApp) -> f64 {
    let text = String::from_utf8(app.state.metrics.render()).expect("UTF-8");
    sample(&text, "botmetrics_connections_open").expect("the gauge exists")
}

/// How long the server took to close `stream`, from `since`.
async fn closed_after(mut stream: TcpStream, since: Instant) -> (Duration, String) {
    let answer = read_until_closed(&mut stream).await;
    (since.elapsed(), answer)
}

#[tokio::test]
async fn half_sent_and_idle_connections_are_closed_at_the_header_read_timeout() {
    let timeout = Duration::from_millis(500);
    let (app, _db) = start_with("a=t", |c| {
        c.header_read_timeout = timeout;
    })
    .await;
    let mut slow = Vec::new();
    for i in 0..10 {
        let opened = Instant::now();
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        if i % 2 == 0 {
            // Slowloris: a request line and one header, never the end.
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: botmetrics\r\n")
                .await
                .expect("write");
        }
        // Each one watched from now, so its close is timed when it happens.
        slow.push(tokio::spawn(closed_after(stream, opened)));
    }
    // A keep-alive connection that asked once and then went quiet: its
    // timeout starts again once its answer is out.
    let mut idle = TcpStream::connect(app.addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: botmetrics\r\n\r\n")
        .await
        .expect("write");
    let mut byte = [0u8; 1];
    let peeked = tokio::time::timeout(PATIENCE, idle.peek(&mut byte)).await;
    assert!(matches!(peeked, Ok(Ok(1))), "{peeked:?}");
    let idle = tokio::spawn(closed_after(idle, Instant::now()));

    // Meanwhile everyone else is served.
    for _ in 0..3 {
        assert_eq!(
            get(app.addr, "/healthz").await,
            (200, json!({"status": "ok"}))
        );
    }
    app.post_ok("t", &json!({"type": "limit_reached"})).await;

    // The server closes every one of them (not the client: it holds them),
    // at the configured timeout: not before it, and not at some other
    // limit (the 10 s default, say) well after it.
    let in_time = |took: Duration| took >= timeout && took < timeout + Duration::from_secs(2);
    for stream in slow {
        let (took, answer) = stream.await.expect("watcher");
        assert!(
            in_time(took),
            "closed after {took:?}, configured {timeout:?}"
        );
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }
    let (took, answer) = idle.await.expect("watcher");
    assert!(
        in_time(took),
        "closed after {took:?}, configured {timeout:?}"
    );
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with(r#"{"status":"ok"}"#),
        "one answer, then closed: {answer}"
    );
    eventually(PATIENCE, || async { open_connections(&app) == 0.0 }).await;
    app.stop().await;
}

fn counter(app: &TestApp, name: &str) -> f64 {
    let text = String::from_utf8(app.state.metrics.render()).expect("UTF-8");
    sample(&text, name).unwrap_or_else(|| panic!("{name} missing:\n{text}"))
}

/// True while the server keeps `stream` open and silent.
async fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(200), stream.peek(&mut byte))
        .await
        .is_err()
}

#[tokio::test]
async fn at_the_bound_the_oldest_idle_connection_is_closed_to_admit_a_new_one() {
    let (app, _db) = start_with("a=t", |c| {
        c.max_connections = 4;
        // Only the bound can close an idle connection in this test.
        c.header_read_timeout = Duration::from_secs(3600);
    })
    .await;
    // Four idle connections take every slot, admitted in this order.
    let mut held = Vec::new();
    for n in 1..=4 {
        held.push(TcpStream::connect(app.addr).await.expect("connect"));
        eventually(PATIENCE, || async {
            open_connections(&app) == f64::from(n)
        })
        .await;
    }
    // A fifth is served, and the oldest of the idle ones made room for it.
    assert_eq!(
        get(app.addr, "/healthz").await,
        (200, json!({"status": "ok"}))
    );
    let mut oldest = held.remove(0);
    assert_eq!(read_until_closed(&mut oldest).await, "");
    for stream in &held {
        assert!(still_open(stream).await, "only the oldest is closed");
    }
    assert_eq!(counter(&app, "botmetrics_connections_evicted_total"), 1.0);
    assert_eq!(counter(&app, "botmetrics_connections_rejected_total"), 0.0);
    app.stop().await;
}

#[tokio::test]
async fn past_the_bound_with_every_connection_busy_a_new_one_gets_a_json_503_at_once() {
    let (app, _db) = start_with("a=t", |c| {
        c.max_connections = 4;
        c.request_timeout = Duration::from_secs(2);
    })
    .await;
    // Four requests in progress (a head, then a body that stops half-way)
    // take every slot; none of them is idle, so none makes room.
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        stream
            .write_all(
                b"POST /v1/events HTTP/1.1\r\nHost: botmetrics\r\nAuthorization: Bearer t\r\n\
                  Content-Type: application/json\r\nContent-Length: 100\r\n\
                  Expect: 100-continue\r\n\r\n",
            )
            .await
            .expect("write");
        // The interim answer comes once the handler reads the body: the
        // request is in progress.
        let mut interim = [0u8; 25];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut interim))
            .await
            .expect("100 Continue in time")
            .expect("read");
        assert!(interim.starts_with(b"HTTP/1.1 100 Continue"), "{interim:?}");
        stream.write_all(b"{\"type\":").await.expect("write");
        busy.push(stream);
    }

    // A fifth is answered at once (not left waiting in the backlog), with
    // the project's error shape.
    let (status, body) = get(app.addr, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "unavailable");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-connections")),
        "{body}"
    );
    assert_eq!(counter(&app, "botmetrics_connections_evicted_total"), 0.0);

    // The requests time out and free their slots: health answers again.
    eventually(PATIENCE, || async { healthy(app.addr).await }).await;
    for mut stream in busy {
        assert!(
            read_until_closed(&mut stream)
                .await
                .contains("HTTP/1.1 408")
        );
    }
    let text = String::from_utf8(app.state.metrics.render()).unwrap();
    assert!(
        sample(&text, "botmetrics_connections_rejected_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "botmetrics_connections_max"), Some(4.0));
    app.stop().await;
}

#[tokio::test]
async fn an_answer_the_client_does_not_read_is_given_up_after_the_write_timeout() {
    let timeout = Duration::from_millis(300);
    let (app, _db) = start_with("a=t", |c| {
        c.write_timeout = timeout;
        // Only the write timeout can close the connection in this test.
        c.header_read_timeout = Duration::from_secs(3600);
        c.request_timeout = Duration::from_secs(3600);
    })
    .await;
    // A client with a small receive buffer that asks again and again and
    // never reads: the server's answers soon fill both sockets.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(app.addr).await.expect("connect");
    let (_unread, mut write) = stream.into_split();
    let began = Instant::now();
    let asking = tokio::spawn(async move {
        let ask = b"GET /metrics HTTP/1.1\r\nHost: botmetrics\r\n\r\n".repeat(100);
        // Stops when the server closes the connection.
        for _ in 0..1000 {
            if write.write_all(&ask).await.is_err() {
                break;
            }
        }
    });
    eventually(PATIENCE, || async {
        counter(&app, "botmetrics_connections_write_timeouts_total") == 1.0
    })
    .await;
    assert!(began.elapsed() >= timeout, "{:?}", began.elapsed());
    eventually(PATIENCE, || async { open_connections(&app) == 0.0 }).await;
    asking.abort();
    // Everyone else is served as before.
    assert_eq!(
        get(app.addr, "/healthz").await,
        (200, json!({"status": "ok"}))
    );
    app.stop().await;
}

/// Descriptors the process `pid` holds open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .count()
}

/// One POST of a bot that opens a new connection for each request; how
/// long it took to get its 202.
async fn post_on_a_new_connection(client: &reqwest::Client, addr: SocketAddr) -> Duration {
    let began = Instant::now();
    let res = tokio::time::timeout(
        PATIENCE,
        client
            .post(format!("http://{addr}/v1/events"))
            .bearer_auth("t")
            .json(&json!({"type": "limit_reached"}))
            .send(),
    )
    .await
    .expect("answered in time")
    .expect("answered, not refused");
    let status = res.status().as_u16();
    let body = res.text().await.expect("body");
    assert_eq!(status, 202, "{body}");
    began.elapsed()
}

async fn scrape(addr: SocketAddr) -> String {
    let res = fresh_client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("scrape");
    res.text().await.expect("body")
}

/// The issue's floods: far more connections than the bound, each sending
/// `payload` (nothing, or a request whose answer it never reads), held open
/// while a bot posts on a new connection per request. The bot is never
/// locked out, its answers stay fast, every event counts, and once the
/// flood lets go the server's descriptors are back where they were.
async fn a_bot_is_never_locked_out_by(payload: &'static [u8]) {
    if !have("prlimit", "util-linux") {
        return;
    }
    let _quiet = MACHINE.lock().await;
    // The issue's soft limit of 1,024 files, scaled down: a hard limit of
    // 256 lowers the bound to 192, and the flood is twice that.
    const BOUND: usize = 192;
    const FLOOD: usize = 2 * BOUND;
    let db = SqliteFile::new();
    let url = db.url();
    let bin = Binary::start_under(
        &["prlimit", "--nofile=256:256"],
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--tokens",
            "a=t",
            "--metrics-cache-ttl",
            "0s",
            // So long that only the bound can close an idle connection:
            // with the old 503s this would lock the bot out for an hour.
            "--header-read-timeout",
            "1h",
        ],
        &[],
    )
    .await;
    let log = bin.log();
    assert!(
        log.contains(&format!("--max-connections 1024 lowered to {BOUND}")),
        "{log}"
    );
    let bot = fresh_client();
    let mut took = vec![post_on_a_new_connection(&bot, bin.addr).await];
    let baseline = open_fds(bin.pid());

    let addr = bin.addr;
    let flood = tokio::spawn(async move {
        let mut held = Vec::with_capacity(FLOOD);
        for _ in 0..FLOOD {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            if !payload.is_empty() {
                stream.write_all(payload).await.expect("write");
            }
            held.push(stream);
        }
        held
    });
    // The bot posts while the flood arrives, and on while it is held.
    while !flood.is_finished() {
        took.push(post_on_a_new_connection(&bot, bin.addr).await);
    }
    let held = flood.await.expect("flood");
    for _ in 0..200 {
        took.push(post_on_a_new_connection(&bot, bin.addr).await);
    }
    let text = scrape(bin.addr).await;
    assert_series(
        &text,
        &[(r#"bot_limit_reached_total{bot="a"}"#, took.len() as f64)],
    );
    let evicted = sample(&text, "botmetrics_connections_evicted_total").unwrap_or(0.0);
    assert!(
        evicted >= (FLOOD - BOUND) as f64,
        "the flood made room for itself and the bot: {evicted} evicted"
    );
    let posts = took.len();
    took.sort();
    let p99 = took[(posts * 99).div_ceil(100) - 1];
    eprintln!(
        "{posts} posts: p50 {:?}, p99 {p99:?}, max {:?}; {evicted} evicted",
        took[posts / 2],
        took[posts - 1]
    );
    assert!(
        p99 <= Duration::from_millis(100),
        "p99 {p99:?} over {posts} posts (max {:?})",
        took[posts - 1]
    );

    drop(held);
    let pid = bin.pid();
    eventually(PATIENCE, || async { open_fds(pid) <= baseline }).await;
}

#[tokio::test]
async fn idle_connections_past_the_bound_never_lock_a_bot_out() {
    a_bot_is_never_locked_out_by(b"").await;
}

#[tokio::test]
async fn connections_that_never_read_their_answers_never_lock_a_bot_out() {
    a_bot_is_never_locked_out_by(b"GET /metrics HTTP/1.1\r\nHost: botmetrics\r\n\r\n").await;
}

#[tokio::test]
async fn sigterm_finishes_within_the_shutdown_timeout_whatever_a_client_holds_open() {
    let db = SqliteFile::new();
    // A header-read timeout longer than the test's patience: only the
    // shutdown timeout can end the half-sent request below.
    let mut bin = Binary::serve(
        &db.url(),
        "a=t",
        &["--shutdown-timeout", "1s", "--header-read-timeout", "1h"],
    )
    .await;
    bin.post_ok("t", &json!({"type": "limit_reached"})).await;
    let mut half = TcpStream::connect(bin.addr).await.expect("connect");
    half.write_all(b"POST /v1/events HTTP/1.1\r\nHost: botmetrics\r\nAuthor")
        .await
        .expect("write");
    // An idle keep-alive connection is closed at once on shutdown.
    let mut idle = TcpStream::connect(bin.addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: botmetrics\r\n\r\n")
        .await
        .expect("write");
    // The answer has arrived once a byte of it can be peeked.
    let mut byte = [0u8; 1];
    let peeked = tokio::time::timeout(PATIENCE, idle.peek(&mut byte)).await;
    assert!(matches!(peeked, Ok(Ok(1))), "{peeked:?}");

    // Binary::signal waits for the exit at most 30 s; without the shutdown
    // timeout the half-sent request would hold it for an hour.
    let status = bin.signal("TERM").await;
    let log = bin.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("shutdown timeout: closing connections that did not finish"),
        "{log}"
    );
    assert!(log.contains("final flush done"), "{log}");
    assert!(read_until_closed(&mut half).await.is_empty());
    assert!(
        read_until_closed(&mut idle)
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn a_body_slower_than_the_request_timeout_gets_a_json_408() {
    let (app, _db) = start_with("a=t", |c| {
        c.request_timeout = Duration::from_millis(300);
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    // The head in full, a tenth of the promised body, then nothing.
    stream
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: botmetrics\r\nAuthorization: Bearer t\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"type\":",
        )
        .await
        .expect("write");
    let answer = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let body = answer.split_once("\r\n\r\n").expect("a body").1;
    let json: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(json["error"], "timeout");
    assert!(
        json["message"]
            .as_str()
            .is_some_and(|m| m.contains("--request-timeout"))
    );
    app.stop().await;
}
