#!/usr/bin/env python3
"""Issue 17, item 5: a flood of idle or non-reading connections, and a bot
that posts on a new connection per request meanwhile. For BENCHMARKS.md
("Faults").

    scripts/connection_floods.py [BINARY]     (default target/release/botmetrics)

Starts the binary on loopback (its own temporary SQLite file) under a limit
of 1,024 open files, soft and hard (`prlimit --nofile=1024:1024`, so the
bound on connections is lowered to 960), at the default flags, and for each
flood:

1. 1,100 idle connections (connected, nothing sent);
2. 2,000 connections that each send `GET /metrics` and never read;

holds the flood for 15 s while a bot posts one event per request, each on a
new connection, and prints: /healthz on a new connection right after the
flood, the bot's answers by status, how long it was refused, its latency
(p50, p99, max), the events counted against the 202s it got, and the
server's open descriptors before, during and after the flood.
"""

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "botmetrics")
HOLD = 15.0


def start(data):
    proc = subprocess.Popen(
        ["prlimit", "--nofile=1024:1024", BIN, "--listen", "127.0.0.1:0",
         "--database-url", f"sqlite://{data}/botmetrics.db", "--tokens", "a=change-me",
         "--metrics-cache-ttl", "0s"],
        stderr=subprocess.PIPE, text=True, env={"RUST_LOG": "info", "NO_COLOR": "1"})
    for line in proc.stderr:
        found = re.search(r"botmetrics serving listen=(\S+)", line)
        if found:
            # Drained from now on, so a full pipe never stalls the server.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, found.group(1)
    sys.exit("botmetrics did not start")


def request(addr, method, path, body=None, timeout=5):
    """Status (or the exception's name) and seconds, on a new connection."""
    began = time.monotonic()
    req = urllib.request.Request(f"http://{addr}{path}", method=method, data=body)
    if body is not None:
        req.add_header("Authorization", "Bearer change-me")
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            res.read()
            status = res.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        status = type(e).__name__
    return status, time.monotonic() - began


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_pid(proc):
    # prlimit execs the binary, so the child is botmetrics itself.
    return proc.pid


def counted(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as res:
        text = res.read().decode()
    found = re.search(r'^bot_limit_reached_total\{bot="a"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def flood(addr, pid, name, n, payload):
    host, port = addr.rsplit(":", 1)
    before = fds(pid)
    held = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        if payload:
            s.sendall(payload)
        held.append(s)
    health, took = request(addr, "GET", "/healthz")
    print(f"{name}: /healthz on a new connection: {health} in {took * 1000:.1f} ms")
    event = json.dumps({"type": "limit_reached"}).encode()
    began = time.monotonic()
    answers = []
    peak = 0
    while time.monotonic() - began < HOLD:
        status, took = request(addr, "POST", "/v1/events", event)
        answers.append((time.monotonic() - began, status, took))
        peak = max(peak, fds(pid))
    statuses = {}
    for _, status, _ in answers:
        statuses[status] = statuses.get(status, 0) + 1
    refused = [t for t, status, _ in answers if status != 202]
    lat = sorted(took for _, _, took in answers)
    p = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1000
    print(f"  bot, {len(answers)} posts in {HOLD:.0f} s: {statuses}")
    if refused:
        print(f"  refused from {refused[0]:.1f} s to {refused[-1]:.1f} s after the flood was held")
    print(f"  latency p50 {p(0.50):.1f} ms, p99 {p(0.99):.1f} ms, max {lat[-1] * 1000:.1f} ms")
    for s in held:
        s.close()
    deadline = time.monotonic() + 30
    while fds(pid) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"  server descriptors: {before} before, at most {peak} while held, {fds(pid)} after")
    return sum(1 for _, status, _ in answers if status == 202)


def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    data = tempfile.mkdtemp(prefix="botmetrics-floods-")
    proc, addr = start(data)
    pid = server_pid(proc)
    try:
        accepted = flood(addr, pid, "1,100 idle connections", 1100, b"")
        accepted += flood(addr, pid, "2,000 connections that never read", 2000,
                          b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        print(f"events counted: {counted(addr):.0f}, 202s received: {accepted}")
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
