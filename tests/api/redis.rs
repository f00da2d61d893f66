//! Private Redis servers for the cluster tests: one `redis-server` per test
//! on a free loopback port (no persistence, its own temporary directory),
//! or a 3-node Redis Cluster formed on loopback. Each process is killed
//! when its fixture is dropped, so a failed assertion leaves none behind.
//! Commands go through `redis-cli`, which the machine has beside
//! `redis-server`; no client crate is needed in the tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::{have, unique_suffix};

/// Start-up of a fresh `redis-server` takes milliseconds; the machine may be
/// busy compiling.
const PATIENCE: Duration = Duration::from_secs(20);

/// True when `redis-server` and `redis-cli` can be run; otherwise the test
/// fails in CI and is skipped loudly elsewhere (as without PostgreSQL).
fn redis_tools() -> bool {
    have("redis-server", "redis-server") && have("redis-cli", "redis-tools")
}

/// A loopback port nobody listens on right now.
/// A free loopback port below the kernel's ephemeral range (32768 and up),
/// with its Redis Cluster bus port (+10000) free too. Outside that range no
/// process binding port 0 (every other test's server) can take it, so a
/// server stopped and restarted on it (`restart_empty`) gets it back.
fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    for attempt in 0u32.. {
        let port = 10_000 + (RandomState::new().hash_one(attempt) % 12_000) as u16;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    unreachable!("some port in 10000..22000 is free")
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("botmetrics-{what}-{}", unique_suffix()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `redis-cli -h 127.0.0.1 -p <port> [-c] <args>`: its trimmed output.
fn redis_cli(port: u16, follow_redirects: bool, args: &[&str]) -> String {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if follow_redirects {
        cmd.arg("-c");
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli");
    assert!(
        out.status.success(),
        "redis-cli -p {port} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One private `redis-server` on a free loopback port.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    /// Arguments beyond the common ones (cluster mode).
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A fresh server (no persistence) answering PING. Where `redis-server`
    /// or `redis-cli` is missing the test is skipped loudly on a laptop and
    /// fails in CI (`CI=true`).
    pub async fn start() -> Option<RedisServer> {
        if !redis_tools() {
            return None;
        }
        Some(RedisServer::launch("redis", |_| Vec::new()).await)
    }

    /// Starts a server with `extra(dir)` added to the common arguments, on
    /// a new free port for each attempt (another process may take a port
    /// between our probe and the server's bind).
    async fn launch(what: &str, extra: impl Fn(&Path) -> Vec<String>) -> RedisServer {
        let mut why = String::new();
        for _ in 0..5 {
            let dir = temp_dir(what);
            let mut server = RedisServer {
                port: free_port(),
                extra: extra(&dir),
                dir,
                child: None,
            };
            match server.spawn().await {
                Ok(()) => return server,
                Err(e) => why = e,
            }
        }
        panic!("redis-server did not start: {why}");
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.display().to_string(),
            "--logfile",
            &self.dir.join("redis.log").display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Runs `redis-server` on `self.port` and waits until PING answers.
    async fn spawn(&mut self) -> Result<(), String> {
        let mut child = Command::new("redis-server")
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("wait for redis-server") {
                return Err(format!(
                    "redis-server on port {} exited ({status}):\n{}",
                    self.port,
                    self.log()
                ));
            }
            if self.ping() {
                self.child = Some(child);
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {PATIENCE:?}:\n{}",
                    self.port,
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn ping(&self) -> bool {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "PING"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
    }

    /// The server's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// `redis://127.0.0.1:<port>`, as `--redis-url` takes it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One command through `redis-cli`; its output, trimmed (an integer
    /// reply is its digits, a nil reply the empty string).
    pub fn cmd(&self, args: &[&str]) -> String {
        redis_cli(self.port, false, args)
    }

    pub fn flushall(&self) {
        assert_eq!(self.cmd(&["FLUSHALL"]), "OK");
    }

    /// Kills the server (`kill -9`): every connection drops, the port is
    /// closed, and the data (never persisted) is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server: `STOP` hangs it as a
    /// paused VM does, its sockets open and nothing answered.
    fn send(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server runs");
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} redis-server failed");
    }

    /// Hangs the server (SIGSTOP) until [`RedisServer::resume`]; a server
    /// dropped while hung is killed all the same (SIGKILL needs no CONT).
    pub fn pause(&self) {
        self.send("STOP");
    }

    pub fn resume(&self) {
        self.send("CONT");
    }

    /// Starts a fresh, empty server on the same port (stopping the running
    /// one first, if any): what clients see when Redis restarts without
    /// persistence.
    pub async fn restart_empty(&mut self) {
        let run_id = |server: &RedisServer| {
            server
                .cmd(&["INFO", "server"])
                .lines()
                .find_map(|l| l.strip_prefix("run_id:").map(|id| id.trim().to_owned()))
        };
        // The server may be stopped already (a test stops it first).
        let before = self.child.is_some().then(|| run_id(self)).flatten();
        self.stop();
        let _ = std::fs::remove_file(self.dir.join("nodes.conf"));
        self.spawn()
            .await
            .unwrap_or_else(|e| panic!("redis-server did not restart: {e}"));
        // A new process with nothing on disk (`--save ""`, no AOF) started
        // empty. Not checked by DBSIZE: the replicas reconnect within
        // milliseconds and write again, which is what the tests are about.
        let after = run_id(self);
        assert!(
            after.is_some() && after != before,
            "a new server process: run_id {before:?} → {after:?}"
        );
        assert_eq!(
            self.cmd(&["CONFIG", "GET", "save"])
                .lines()
                .nth(1)
                .unwrap_or_default(),
            "",
            "and one that keeps nothing on disk"
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            eprintln!(
                "--- redis-server on port {} (last 20 lines of its log) ---\n{tail}",
                self.port
            );
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters (no replicas) on loopback, every slot
/// covered and every node agreeing.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> Option<RedisCluster> {
        if !redis_tools() {
            return None;
        }
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(
                RedisServer::launch("redis-cluster", |dir| {
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &dir.join("nodes.conf").display().to_string(),
                        // The bus on a free port of its own: port + 10000,
                        // the default, may be taken or beyond 65535.
                        "--cluster-port",
                        &free_port().to_string(),
                        "--cluster-node-timeout",
                        "5000",
                    ]
                    .map(str::to_owned)
                    .to_vec()
                })
                .await,
            );
        }
        let mut create = tokio::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = tokio::time::timeout(
            PATIENCE,
            create
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .expect("redis-cli --cluster create finishes")
        .expect("run redis-cli --cluster create");
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && said.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed:\n{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !cluster.nodes.iter().all(|n| {
            n.cmd(&["CLUSTER", "INFO"])
                .lines()
                .any(|l| l.trim() == "cluster_state:ok")
        }) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(cluster)
    }

    /// The seed nodes as `--redis-url` takes them: comma-separated URLs.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One command on whichever node owns its key (`redis-cli -c` follows
    /// the MOVED redirect).
    pub fn cmd(&self, args: &[&str]) -> String {
        redis_cli(self.nodes[0].port, true, args)
    }

    /// The index of the node that owns `key`'s slot: the one that answers
    /// for it instead of redirecting (`MOVED`).
    pub fn node_of(&self, key: &str) -> usize {
        let owners: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].cmd(&["EXISTS", key]).starts_with("MOVED"))
            .collect();
        assert_eq!(owners.len(), 1, "one node owns {key}");
        owners[0]
    }
}

/// The fixtures themselves: a private server that empties on restart, and
/// a cluster whose keys of one hash tag share a node.
#[tokio::test]
async fn private_redis_servers_and_a_loopback_cluster_work() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    assert_eq!(server.cmd(&["SET", "k", "v"]), "OK");
    assert_eq!(server.cmd(&["GET", "k"]), "v");
    server.stop();
    assert!(!server.ping(), "a stopped server does not answer");
    server.restart_empty().await;
    assert_eq!(server.cmd(&["GET", "k"]), "", "nothing survives a restart");
    server.cmd(&["SET", "k", "v"]);
    server.flushall();
    assert_eq!(server.cmd(&["DBSIZE"]), "0");

    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    assert_eq!(cluster.urls().split(',').count(), 3);
    assert_eq!(cluster.cmd(&["SET", "bm:{a}:x", "1"]), "OK");
    assert_eq!(cluster.cmd(&["GET", "bm:{a}:x"]), "1");
    assert_eq!(cluster.node_of("bm:{a}:x"), cluster.node_of("bm:{a}:y"));
    assert_ne!(cluster.node_of("bm:{a}:x"), cluster.node_of("bm:{b}:x"));
}
