//! HTTPS (`--tls-cert`/`--tls-key`, issue 21 item 2): certificates made by
//! the `openssl` CLI per test (a CA and two server certificates it signed),
//! a rustls client that verifies them against that CA only, and raw
//! HTTP/1.1 over it, so a test knows which connection each request used.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use crate::helpers::{Binary, SqliteFile, eventually, have};

/// A CA and the server certificates it signed, in a temporary directory.
struct Certs {
    dir: tempfile_dir::Dir,
}

/// A minimal temporary directory (removed on drop), so the tests need no
/// new dev-dependency.
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    /// A CA and server certificates `names` (for localhost and 127.0.0.1),
    /// `<name>.pem` and `<name>.key`; `None` without openssl outside CI.
    fn new(names: &[&str]) -> Option<Certs> {
        if !have("openssl", "openssl") {
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "botmetrics-tls-{}",
            crate::helpers::unique_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = vec![
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=botmetrics test CA",
        ];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&dir, &ca);
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write leaf.ext");
        for name in names {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let mut req = vec![
                "req",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                &key,
                "-out",
                &csr,
            ];
            req.extend(ec);
            openssl(&dir, &req);
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    "leaf.ext",
                    "-out",
                    &pem,
                ],
            );
        }
        Some(Certs {
            dir: tempfile_dir::Dir(dir),
        })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.0.join(file)
    }

    fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    /// The DER of a certificate file (its first certificate).
    fn der(&self, file: &str) -> Vec<u8> {
        CertificateDer::from_pem_file(self.path(file))
            .expect("a PEM certificate")
            .to_vec()
    }

    /// A client that trusts this CA and nothing else, offering HTTP/1.1.
    fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(self.path("ca.pem")).expect("CA"))
            .expect("CA as a root");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(config))
    }

    /// Puts `name`'s certificate and key where the server reads them, each
    /// by a rename, as certbot's renewals replace a file.
    fn install(&self, name: &str) {
        for (from, to) in [
            (format!("{name}.pem"), "live.pem"),
            (format!("{name}.key"), "live.key"),
        ] {
            let staged = self.path(&format!("{to}.new"));
            std::fs::copy(self.path(&from), &staged).expect("stage");
            std::fs::rename(&staged, self.path(to)).expect("rename");
        }
    }
}

/// One kept-alive HTTPS connection.
struct Conn {
    tls: TlsStream<TcpStream>,
}

impl Conn {
    async fn open(certs: &Certs, addr: std::net::SocketAddr) -> Conn {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let tls = certs
            .connector()
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("a handshake the client verifies");
        Conn { tls }
    }

    /// The certificate the server presented on this connection.
    fn peer(&self) -> Vec<u8> {
        self.tls
            .get_ref()
            .1
            .peer_certificates()
            .expect("a certificate")[0]
            .to_vec()
    }

    fn alpn(&self) -> Option<Vec<u8>> {
        self.tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
    }

    /// One request on this connection (kept alive) and its JSON answer.
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let body = body.map(Value::to_string).unwrap_or_default();
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        self.tls
            .write_all(head.as_bytes())
            .await
            .expect("write head");
        self.tls
            .write_all(body.as_bytes())
            .await
            .expect("write body");
        self.tls.flush().await.expect("flush");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let (head_len, status, length) = loop {
            let n = tokio::time::timeout(Duration::from_secs(10), self.tls.read(&mut buf))
                .await
                .expect("an answer in time")
                .expect("read");
            assert!(
                n > 0,
                "connection closed before an answer: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .expect("status")
                    .parse()
                    .expect("status");
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .expect("a content-length (the answers here are not chunked)")
                    .trim()
                    .parse()
                    .expect("length");
                break (end + 4, status, length);
            }
        };
        while got.len() < head_len + length {
            let n = self.tls.read(&mut buf).await.expect("read body");
            assert!(n > 0, "closed mid-body");
            got.extend_from_slice(&buf[..n]);
        }
        let json =
            serde_json::from_slice(&got[head_len..head_len + length]).expect("a JSON answer");
        (status, json)
    }
}

async fn serve_tls(
    db: &SqliteFile,
    certs: &Certs,
    cert: &str,
    key: &str,
    extra: &[&str],
) -> Binary {
    let url = db.url();
    let (cert, key) = (certs.arg(cert), certs.arg(key));
    let mut flags = vec!["--tls-cert", &cert, "--tls-key", &key];
    flags.extend_from_slice(extra);
    Binary::serve(&url, "tlsbot=secret", &flags).await
}

#[tokio::test]
async fn https_serves_events_and_reads_with_a_certificate_the_client_verifies() {
    let Some(certs) = Certs::new(&["a"]) else {
        return;
    };
    let db = SqliteFile::new();
    let bin = serve_tls(
        &db,
        &certs,
        "a.pem",
        "a.key",
        &["--metrics-token", "reader"],
    )
    .await;
    let mut conn = Conn::open(&certs, bin.addr).await;
    assert_eq!(conn.peer(), certs.der("a.pem"));
    // The client offered h2 first: the server chose the protocol it speaks.
    assert_eq!(conn.alpn().as_deref(), Some(&b"http/1.1"[..]));
    let events = json!([
        {"type": "message", "role": "user", "user_id": 1},
        {"type": "message", "role": "user", "user_id": 2},
    ]);
    let (status, answer) = conn
        .request("POST", "/v1/events", Some("secret"), Some(&events))
        .await;
    assert_eq!(
        (status, answer),
        (202, json!({"accepted": 2, "duplicates": 0}))
    );
    // Read access unchanged: no token is refused, the bot's own token and
    // --metrics-token read, over the same kept-alive connection.
    let (status, answer) = conn.request("GET", "/v1/summary", None, None).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthorized")),
        "{answer}"
    );
    let (status, own) = conn
        .request("GET", "/v1/summary", Some("secret"), None)
        .await;
    assert_eq!(status, 200, "{own}");
    assert_eq!(own["messages"]["total"], 2, "{own}");
    let (status, all) = conn
        .request("GET", "/v1/summary?bot=tlsbot", Some("reader"), None)
        .await;
    assert_eq!(
        (status, &all["messages"]["total"]),
        (200, &json!(2)),
        "{all}"
    );
    let (status, _) = conn.request("GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    assert!(bin.log().contains(r#"scheme="https""#), "{}", bin.log());
}

#[tokio::test]
async fn sighup_serves_a_renewed_certificate_to_new_connections_and_keeps_open_ones() {
    let Some(certs) = Certs::new(&["a", "b"]) else {
        return;
    };
    certs.install("a");
    let db = SqliteFile::new();
    // The environment fallbacks, as a systemd unit would set them.
    let url = db.url();
    let mut bin = Binary::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--tokens",
            "tlsbot=secret",
        ],
        &[
            ("BOTMETRICS_TLS_CERT", &certs.arg("live.pem")),
            ("BOTMETRICS_TLS_KEY", &certs.arg("live.key")),
        ],
    )
    .await;
    let event = json!({"type": "message", "role": "user", "user_id": 7});
    let mut old = Conn::open(&certs, bin.addr).await;
    assert_eq!(old.peer(), certs.der("a.pem"));
    assert_eq!(
        old.request("POST", "/v1/events", Some("secret"), Some(&event))
            .await
            .0,
        202
    );

    certs.install("b");
    bin.send_signal("HUP").await;
    let renewed = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains("what=\"tls\"") && l.contains("reload requested (SIGHUP): certificate")
            })
            .count()
    };
    eventually(Duration::from_secs(30), || {
        let log = bin.log();
        async move { renewed(&log) == 1 }
    })
    .await;
    let mut new = Conn::open(&certs, bin.addr).await;
    assert_eq!(
        new.peer(),
        certs.der("b.pem"),
        "a new connection gets the renewed certificate"
    );
    assert_eq!(
        new.request("POST", "/v1/events", Some("secret"), Some(&event))
            .await
            .0,
        202
    );
    // The connection opened before the reload is the same one, still served.
    assert_eq!(old.peer(), certs.der("a.pem"));
    assert_eq!(
        old.request("POST", "/v1/events", Some("secret"), Some(&event))
            .await
            .0,
        202
    );

    // A bad renewal (a truncated certificate) keeps the certificate served
    // and says so in one line naming the flag.
    std::fs::write(
        certs.path("live.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n",
    )
    .expect("write");
    bin.send_signal("HUP").await;
    let failed = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains("reload requested (SIGHUP): failed, keeping what was loaded")
                    && l.contains("--tls-cert")
            })
            .count()
    };
    eventually(Duration::from_secs(30), || {
        let log = bin.log();
        async move { failed(&log) == 1 }
    })
    .await;
    let mut after = Conn::open(&certs, bin.addr).await;
    assert_eq!(after.peer(), certs.der("b.pem"));
    let (status, summary) = after
        .request("GET", "/v1/summary", Some("secret"), None)
        .await;
    assert_eq!(
        (status, &summary["messages"]["total"]),
        (200, &json!(3)),
        "{summary}"
    );
    assert_eq!(old.request("GET", "/healthz", None, None).await.0, 200);
    let status = bin.signal("TERM").await;
    assert_eq!(status.code(), Some(0), "{}", bin.log());
    assert_eq!(renewed(&bin.log()), 1, "{}", bin.log());
}

#[tokio::test]
async fn plain_http_to_the_tls_port_is_refused_cleanly_and_the_timeouts_still_hold() {
    let Some(certs) = Certs::new(&["a"]) else {
        return;
    };
    let db = SqliteFile::new();
    let bin = serve_tls(
        &db,
        &certs,
        "a.pem",
        "a.key",
        &["--header-read-timeout", "1s"],
    )
    .await;
    // An http:// URL: a JSON 400 that says what to do, not a hang or reset.
    let res = reqwest::get(format!("http://{}/healthz", bin.addr))
        .await
        .expect("an answer");
    assert_eq!(res.status().as_u16(), 400);
    let body: Value = res.json().await.expect("JSON");
    assert_eq!(body["error"], "tls_required", "{body}");
    // Nothing at all after connecting: closed at the header-read timeout,
    // as a plain connection is (the handshake counts as the head).
    let mut idle = TcpStream::connect(bin.addr).await.expect("connect");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("closed by the server within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // Still serving HTTPS.
    let mut conn = Conn::open(&certs, bin.addr).await;
    assert_eq!(conn.request("GET", "/healthz", None, None).await.0, 200);
}

#[tokio::test]
async fn a_bad_certificate_or_key_stops_the_start_in_one_line_naming_the_flag() {
    let Some(certs) = Certs::new(&["a", "b"]) else {
        return;
    };
    std::fs::write(certs.path("empty.pem"), "").expect("write");
    let cases: [(String, String, &str, &str); 5] = [
        (
            certs.arg("missing.pem"),
            certs.arg("a.key"),
            "--tls-cert",
            "cannot read",
        ),
        (
            certs.arg("a.pem"),
            certs.arg("missing.key"),
            "--tls-key",
            "cannot read",
        ),
        (
            certs.arg("empty.pem"),
            certs.arg("a.key"),
            "--tls-cert",
            "no `BEGIN CERTIFICATE`",
        ),
        // A certificate where the key should be, and another's key.
        (
            certs.arg("a.pem"),
            certs.arg("b.pem"),
            "--tls-key",
            "no PEM private key",
        ),
        (
            certs.arg("a.pem"),
            certs.arg("b.key"),
            "--tls-key",
            "is not the key of the certificate",
        ),
    ];
    for (cert, key, flag, why) in &cases {
        let line = Binary::refused_in_one_line(
            &[
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                "sqlite::memory:",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ],
            &[],
            &[],
        )
        .await;
        assert!(
            line.contains(flag) && line.contains(why),
            "{flag} {why}: {line}"
        );
    }
    // One without the other is clap's usage error naming the missing flag.
    let (status, _, stderr) = Binary::run(
        &["--listen", "127.0.0.1:0", "--tls-cert", &certs.arg("a.pem")],
        &[],
    )
    .await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("required arguments were not provided") && stderr.contains("--tls-key"),
        "{stderr}"
    );
}
