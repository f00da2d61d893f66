#!/usr/bin/env python3
"""Durability figures for BENCHMARKS.md, measured on the real release binary.

    scripts/durability.py ingest [SECONDS]   HTTP ingest: journal off / everysec / always, side by side
    scripts/durability.py ids [N]            RSS per remembered event_id (N distinct ids, default 2,000,000)
    scripts/durability.py replay [N]         restart time with N events in the journal (default 1,000,000)
    scripts/durability.py soak [SECONDS]     RSS over a soak with an event_id on every event (default 600)

Needs wrk (apt-get install wrk) for `ingest` and `soak`. Every server runs on
loopback with its own temporary SQLite file and journal; nothing is left behind.
"""

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# BOTMETRICS_BIN measures another build (a baseline) instead of this tree's.
BIN = os.environ.get("BOTMETRICS_BIN") or os.path.join(ROOT, "target", "release", "botmetrics")
TOKEN = "change-me"


def build():
    if os.environ.get("BOTMETRICS_BIN"):
        return
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp, name, *flags, bin=None):
        # `bin`: another build than BIN, for runs that compare two.
        self.bin = bin or BIN
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.flags = list(flags)
        self.start()

    def start(self):
        self.log = open(os.path.join(self.dir, "log"), "ab")
        self.proc = subprocess.Popen(
            [self.bin, "--listen", f"127.0.0.1:{self.port}", "--tokens", f"bench={TOKEN}",
             "--database-url", f"sqlite://{self.dir}/bm.db", *self.flags],
            stdout=subprocess.DEVNULL, stderr=self.log)
        self.wait_ready()

    def wait_ready(self, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise SystemExit(f"{self.dir}: not ready")

    def post(self, body, ndjson=False):
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/events", data=body.encode(), method="POST",
            headers={"Authorization": f"Bearer {TOKEN}",
                     "Content-Type": "application/x-ndjson" if ndjson else "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=120)
        self.log.close()


def wrk(port, seconds, lua, conns=64, threads=2):
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "-s", lua,
         f"http://127.0.0.1:{port}/v1/events"],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw errors:\n{out}")
    return float(m.group(1))


LUA = """
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer %s"
wrk.headers["Content-Type"] = "%s"
local n = 0
local prefix = tostring(math.random(1, 1e9))
request = function()
  n = n + 1
  %s
end
"""


def lua_file(tmp, name, content_type, body_expr):
    path = os.path.join(tmp, name + ".lua")
    with open(path, "w") as f:
        f.write(LUA % (TOKEN, content_type, body_expr))
    return path


def ingest(seconds):
    """Single events and 1,000-event batches, journal off / everysec / always, interleaved."""
    tmp = tempfile.mkdtemp()
    try:
        single = lua_file(tmp, "single", "application/json",
                          'return wrk.format(nil, nil, nil, \'{"type":"message","role":"user","user_id":\' .. n .. \'}\')')
        batch_body = "[" + ",".join('{"type":"message","role":"user","user_id":%d}' % i for i in range(1000)) + "]"
        batch = lua_file(tmp, "batch", "application/json", "return wrk.format(nil, nil, nil, '%s')" % batch_body)
        servers = {
            "off": Server(tmp, "off", "--no-journal", "--dedupe-window", "0s"),
            "everysec": Server(tmp, "everysec", "--dedupe-window", "0s"),
            "always": Server(tmp, "always", "--journal-fsync", "always", "--dedupe-window", "0s"),
        }
        rows = []
        for name, lua, events in [("single event", single, 1), ("1,000-event batch", batch, 1000)]:
            rates = {k: [] for k in servers}
            for _ in range(3):  # A B C A B C A B C: drift hits all alike
                for k, s in servers.items():
                    rates[k].append(wrk(s.port, seconds, lua) * events)
            med = {k: statistics.median(v) for k, v in rates.items()}
            rows.append((name, med))
        for s in servers.values():
            s.stop()
        print("| request | journal off (events/s) | everysec | always | everysec / off | always / off |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, med in rows:
            print(f"| {name} | {med['off']:,.0f} | {med['everysec']:,.0f} | {med['always']:,.0f} | "
                  f"{med['everysec'] / med['off']:.2f} | {med['always'] / med['off']:.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ids(n):
    """RSS per remembered id: n distinct ids within one window."""
    tmp = tempfile.mkdtemp()
    try:
        s = Server(tmp, "ids", "--dedupe-window", "1h", "--dedupe-max-ids", str(n * 2),
                   "--no-journal")
        s.post('{"type":"message","role":"user","event_id":"warm"}')
        time.sleep(0.5)
        before = s.rss_mb()
        per = 10_000
        for b in range(n // per):
            body = "\n".join('{"type":"message","role":"user","event_id":"id-%d-%d"}' % (b, i) for i in range(per))
            s.post(body, ndjson=True)
        time.sleep(0.5)
        after = s.rss_mb()
        s.stop()
        print(f"{n:,} ids: RSS {before:.1f} MB -> {after:.1f} MB, "
              f"{(after - before) * 1024 * 1024 / n:.1f} bytes per remembered id")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replay(n):
    """Restart time with n events in the journal and none in the store."""
    tmp = tempfile.mkdtemp()
    try:
        s = Server(tmp, "replay", "--flush-interval", "1h")
        per = 10_000
        for b in range(n // per):
            body = "\n".join('{"type":"message","role":"user","user_id":%d,"event_id":"r-%d-%d"}' % (i, b, i)
                             for i in range(per))
            s.post(body, ndjson=True)
        s.stop(signal.SIGKILL)
        journal = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(s.dir, "bm.db-data"))
                      for f in fs)
        t0 = time.time()
        s.start()
        took = time.time() - t0
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics") as r:
            text = r.read().decode()
        got = float(re.search(r'^bot_messages_total\{bot="bench",role="user"\} (\S+)', text, re.M).group(1))
        s.stop()
        assert got == n, f"replayed {got}, expected {n}"
        print(f"{n:,} events ({journal / 1e6:.1f} MB of journal) replayed: ready in {took:.2f} s, "
              f"bot_messages_total = {got:,.0f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def soak(seconds):
    """RSS every 30 s while wrk sends single events, each with a new event_id."""
    tmp = tempfile.mkdtemp()
    try:
        s = Server(tmp, "soak")
        lua = lua_file(tmp, "ids", "application/json",
                       'return wrk.format(nil, nil, nil, \'{"type":"message","role":"user","user_id":\' .. n .. \',"event_id":"\' .. prefix .. "-" .. n .. \'"}\')')
        full = wrk(s.port, 10, lua)
        print(f"maximum: {full:,.0f} events/s with 64 connections; soak with 4 connections:")
        proc = subprocess.Popen(
            ["wrk", "-t", "1", "-c", "4", "-d", f"{seconds}s", "-s", lua, f"http://127.0.0.1:{s.port}/v1/events"],
            stdout=subprocess.PIPE, text=True)
        t0 = time.time()
        print("| t (s) | RSS (MB) | ids remembered | journal backlog (MB) |")
        print("| --- | --- | --- | --- |")
        while proc.poll() is None:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics") as r:
                text = r.read().decode()
            ids_now = re.search(r"^botmetrics_dedupe_ids (\S+)", text, re.M)
            backlog = re.search(r"^botmetrics_journal_backlog_bytes (\S+)", text, re.M)
            print(f"| {time.time() - t0:.0f} | {s.rss_mb():.1f} | {float(ids_now.group(1)) if ids_now else 0:,.0f} | "
                  f"{float(backlog.group(1)) / 1e6 if backlog else 0:.1f} |", flush=True)
            time.sleep(30)
        out = proc.stdout.read()
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        t0 = time.time()
        s.stop()
        print(f"soak rate {rate:,.0f} events/s ({rate / full:.2f} of maximum); SIGTERM took {time.time() - t0:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("ingest", "ids", "replay", "soak"):
        print(__doc__)
        sys.exit(2)
    build()
    arg = int(sys.argv[2]) if len(sys.argv) > 2 else None
    {"ingest": lambda: ingest(arg or 5), "ids": lambda: ids(arg or 2_000_000),
     "replay": lambda: replay(arg or 1_000_000), "soak": lambda: soak(arg or 600)}[sys.argv[1]]()
