"""The real botmetrics server for the client's tests, and stand-ins for a
server that is down or never answers.

BOTMETRICS_BIN names the server binary (default target/release/botmetrics).
Where it or an optional package (aiogram) is missing the tests are skipped,
except in CI (CI set to anything but "", "0" or "false"), where they fail.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.request
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(os.path.dirname(CLIENT_DIR))
BIN = os.environ.get("BOTMETRICS_BIN") or os.path.join(REPO, "target", "release", "botmetrics")
BOT, TOKEN = "testbot", "change-me"

# Loopback only: never route the tests' requests through a proxy.
os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def cannot_run(case: unittest.TestCase, why: str) -> None:
    """Fails in CI, skips (loudly) elsewhere."""
    if in_ci():
        case.fail(f"{why}: required in CI")
    case.skipTest(why)


def require_binary(case: unittest.TestCase) -> None:
    if not os.access(BIN, os.X_OK):
        cannot_run(case, f"no executable botmetrics at {BIN}: build it or set BOTMETRICS_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """The botmetrics binary on a fixed port and database, restartable;
    ``args`` are further command-line flags."""

    def __init__(self, port: int, db: str, log: str, args: Sequence[str] = ()):
        self.port, self.db, self.log = port, db, log
        self.args = list(args)
        self.url = f"http://127.0.0.1:{port}"
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @classmethod
    def for_test(cls, case: unittest.TestCase, *args: str) -> "Server":
        """A started server in a temporary directory, stopped after the test,
        with the further flags ``args``."""
        require_binary(case)
        tmp = tempfile.TemporaryDirectory(prefix="botmetrics-client-test-")
        case.addCleanup(tmp.cleanup)
        server = cls(free_port(), os.path.join(tmp.name, "bm.db"), os.path.join(tmp.name, "server.log"), args)
        case.addCleanup(server.stop)
        server.start()
        return server

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [BIN, "--listen", f"127.0.0.1:{self.port}", "--tokens", f"{BOT}={TOKEN}",
                 "--database-url", f"sqlite://{self.db}", "--metrics-cache-ttl", "0s",
                 "--flush-interval", "1s", *self.args],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"botmetrics exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"botmetrics not ready after 20 s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM: a clean stop, which flushes the counters first."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("botmetrics did not stop within 15 s of SIGTERM")

    def tail(self) -> str:
        with open(self.log, "rb") as f:
            return f.read()[-3000:].decode("utf-8", "replace")

    def get(self, path: str) -> str:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            body: bytes = r.read()
            return body.decode()

    def metrics(self) -> Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]:
        """/metrics as {(name, frozenset(labels)): value}."""
        out = {}
        for line in self.get("/metrics").splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)', line)
            if m:
                labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
                out[(m.group(1), labels)] = float(m.group(3))
        return out

    def value(self, metric: str, /, **labels: str) -> float:
        """One series' value; 0 when it does not exist (yet)."""
        return self.metrics().get((metric, frozenset(labels.items())), 0.0)


class HangingServer:
    """Accepts connections and never answers: what a wedged server or a
    black-holed proxy looks like to the client. Records when each
    connection arrived. With ``hang=False`` it closes each connection at
    once instead (a server that dies mid-request)."""

    def __init__(self, hang: bool = True):
        self.hang = hang
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: List[float] = []
        self.connected = threading.Event()
        self._held: List[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            self.connected.set()
            if self.hang:
                self._held.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        self._stop = True
        for c in self._held:
            c.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the thread
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)

    def __enter__(self) -> "HangingServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
