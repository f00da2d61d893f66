#!/usr/bin/env python3
"""Redis' cost per event_id claim, alone (BENCHMARKS.md, cluster mode ids).

    scripts/claims_redis.py [REV ...]

For each git revision (default: the work tree), a private redis-server
runs that revision's `claim.lua` and `settle.lua` as a replica does for a
1,000-id request: claim 1,000 fresh ids, then settle them (confirm), 300
times, one connection, nothing else on that Redis. Printed per revision:
`INFO commandstats` (usec per call and per id) and redis-server's own CPU
(`INFO cpu`, user + system) per id, which is what bounds the ids/s one
Redis core sustains. No replica, no HTTP, no wrk: the machine's other load
moves wall times, not much CPU per id.

Understands both layouts: a key per id (`bm:{bot}:id:<hex>`, before claim
buckets) and the claim buckets (`bm:{bot}:ids:<bucket>`).
"""

import os
import re
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_ingest import redis_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS, IDS = 300, 1000


def source(rev, name):
    path = f"src/cluster/lua/{name}"
    if rev is None:
        with open(os.path.join(ROOT, path)) as f:
            return f.read()
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def line(self):
        while b"\r\n" not in self.buf:
            self.buf += self.sock.recv(1 << 16)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            raise SystemExit(line.decode())
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(1 << 16)
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        return rest

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self.reply()


def measure(rev, tmp):
    claim, settle = source(rev, "claim.lua"), source(rev, "settle.lua")
    buckets = "'ids:'" in claim
    proc, port = redis_server(tmp)
    try:
        r = Conn(port)
        sha, settle_sha = r.call("SCRIPT", "LOAD", claim), r.call("SCRIPT", "LOAD", settle)
        pre, me = "bm:{bench}:", "replica-1"
        r.call("CONFIG", "RESETSTAT")
        cpu0 = cpu(r)
        start = time.time()
        for _ in range(ROUNDS):
            if buckets:
                ids = [os.urandom(8) for _ in range(IDS)]
                codes = r.call("EVALSHA", sha, 2, pre + "pending:" + me, pre + "alive:" + me, me,
                               600000, pre, 9000, 30 * 86400000, *ids)
                assert codes == b"0" * IDS, codes[:40]
                r.call("EVALSHA", settle_sha, 1, pre + "pending:" + me, me, 600000, pre, IDS, *ids)
            else:
                keys = [pre + "id:" + os.urandom(8).hex() for _ in range(IDS)]
                codes = r.call("EVALSHA", sha, 1 + IDS, pre + "pending:" + me, *keys, me, 600000,
                               pre + "pending:", 9000, pre + "alive:", pre + "released:",
                               30 * 86400000)
                assert codes == [b"0"] * IDS, codes[:5]
                r.call("EVALSHA", settle_sha, 1 + IDS, pre + "pending:" + me, *keys, me, IDS)
        wall = time.time() - start
        used = cpu(r) - cpu0
        stats = r.call("INFO", "commandstats").decode()
        memory = int(re.search(r"used_memory:(\d+)", r.call("INFO", "memory").decode()).group(1))
    finally:
        proc.kill()
        proc.wait()
    n = ROUNDS * IDS
    print(f"\n{rev or 'work tree'} ({'claim buckets' if buckets else 'a key per id'}): "
          f"{ROUNDS} x (claim + confirm {IDS:,} ids), {wall:.2f} s wall")
    print("| command | calls | usec/call | usec per id |")
    print("| --- | ---: | ---: | ---: |")
    rows = []
    for m in re.finditer(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+),", stats):
        if m.group(1) in ("config|resetstat", "script|load", "info"):
            continue
        rows.append((int(m.group(3)), m.group(1), int(m.group(2))))
    for usec, name, calls in sorted(rows, reverse=True):
        print(f"| {name} | {calls:,} | {usec / calls:.1f} | {usec / n:.3f} |")
    print(f"redis-server CPU: {used:.3f} s = {used / n * 1e6:.2f} usec per id "
          f"= {n / used:,.0f} ids/s per Redis core; memory {memory / n:.0f} bytes per id held")


def cpu(r):
    info = r.call("INFO", "cpu").decode()
    return sum(float(re.search(rf"{k}:([\d.]+)", info).group(1)) for k in ("used_cpu_user", "used_cpu_sys"))


def main():
    revs = sys.argv[1:] or [None]
    tmp = tempfile.mkdtemp()
    for rev in revs:
        measure(rev, tmp)


if __name__ == "__main__":
    main()
