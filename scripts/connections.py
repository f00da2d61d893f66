#!/usr/bin/env python3
"""Connection figures for BENCHMARKS.md: what slow, idle and half-sent
clients cost everyone else, measured on the real binary.

    scripts/connections.py [BINARY]     (default target/release/botmetrics)

Starts the binary on loopback (its own temporary SQLite file) under the
usual soft limit of 1,024 open files (`prlimit`, hard limit unchanged) and
measures, at the default flags:

1. 1,010 idle connections: how /healthz answers meanwhile, and how long
   until the server has closed them all;
2. 1,000 slowloris connections (a request line and one header, never the
   end): the same;
3. SIGTERM while a half-sent request is held open: the exit code and how
   long the exit took.
"""

import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "botmetrics")


def start(data):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    proc = subprocess.Popen(
        ["prlimit", f"--nofile=1024:{hard}", BIN, "--listen", "127.0.0.1:0",
         "--database-url", f"sqlite://{data}/botmetrics.db", "--tokens", "a=change-me"],
        stderr=subprocess.PIPE, text=True, env={"RUST_LOG": "info", "NO_COLOR": "1"})
    for line in proc.stderr:
        found = re.search(r"botmetrics serving listen=(\S+)", line)
        if found:
            return proc, found.group(1)
    sys.exit("botmetrics did not start")


def healthz(addr, timeout=60):
    began = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://{addr}/healthz", timeout=timeout) as res:
            status = res.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        status = type(e).__name__
    return status, time.monotonic() - began


def open_connections(addr, n, payload=b""):
    host, port = addr.rsplit(":", 1)
    held = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        if payload:
            s.sendall(payload)
        held.append(s)
    return held


def until_closed(held, limit=120):
    """Seconds until the server has closed every connection, and how many it left open."""
    began = time.monotonic()
    for s in held:
        s.setblocking(False)
    left = list(held)
    while left and time.monotonic() - began < limit:
        still = []
        for s in left:
            try:
                if s.recv(4096) != b"":
                    still.append(s)  # an answer (a 408, say); the close follows
            except BlockingIOError:
                still.append(s)
            except ConnectionResetError:
                pass
        left = still
        time.sleep(0.1)
    for s in held:
        s.close()
    return time.monotonic() - began, len(left)


def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    data = tempfile.mkdtemp(prefix="botmetrics-connections-")
    proc, addr = start(data)
    try:
        idle = open_connections(addr, 1010)
        status, took = healthz(addr)
        print(f"1,010 idle connections: /healthz {status} in {took * 1000:.1f} ms")
        took, left = until_closed(idle)
        print(f"  closed by the server: {1010 - left}/1010 after {took:.1f} s")

        slow = open_connections(addr, 1000, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        status, took = healthz(addr)
        print(f"1,000 slowloris connections: /healthz {status} in {took * 1000:.1f} ms")
        took, left = until_closed(slow)
        print(f"  closed by the server: {1000 - left}/1000 after {took:.1f} s")

        half = open_connections(addr, 1, b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthor")
        time.sleep(1)  # accepted and waiting for the rest of its head
        began = time.monotonic()
        proc.terminate()
        code = proc.wait(120)
        print(f"SIGTERM with a half-sent request held open: exit {code} after {time.monotonic() - began:.1f} s")
        half[0].close()
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
