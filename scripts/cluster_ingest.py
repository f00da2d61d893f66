#!/usr/bin/env python3
"""HTTP ingest with and without --redis-url, side by side (BENCHMARKS.md).

    scripts/cluster_ingest.py [SECONDS]

Two release servers on loopback, each with its own SQLite file and journal:
one process alone, and one replica in cluster mode on a private
redis-server. wrk (64 connections) posts single events and 1,000-event
batches, without and with an event_id on every event, to each server in
turn (A B A B A B) so drift hits both alike; the table gives the median
events/s of each and their ratio. Without ids a request never waits on
Redis, so that ratio should be 1; with ids it prices the claim round trip.

    scripts/cluster_ingest.py ab BIN_A BIN_B [SECONDS] [ROUNDS]

Two builds side by side, cluster mode only: one replica of each, each on
its own private redis-server (so each Redis' `INFO commandstats` is one
build's), 1,000-event batches without and with ids, A B A B ... so drift
hits both alike. Besides events/s it prices each id in Redis: the
commands' usec per id (`CONFIG RESETSTAT` before each id run, `INFO
commandstats` after) and the redis-server process's CPU per id (user +
system, from /proc), which bounds the ids/s one Redis core sustains; and
the CPU of the replica and of wrk per request, since all three share this
machine's cores. CONNS=<n> sets wrk's connections (64 by default): with
many, a Redis slower than `health::SLOW` per queue sends ids to the
replicas' own memory, which the "decided locally" column shows.

Needs wrk and redis-server (apt-get install wrk redis-server).
"""

import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from durability import TOKEN, Server, build, free_port, lua_file, wrk  # noqa: E402


def redis_server(tmp):
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL)
    for _ in range(200):
        done = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
        if done.stdout.strip() == "PONG":
            return proc, port
        time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args],
                          capture_output=True, text=True, check=True).stdout


def commandstats(port):
    """{command: (calls, usec)} from INFO commandstats."""
    stats = {}
    for line in redis_cli(port, "INFO", "commandstats").splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+),", line)
        if m:
            stats[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return stats


def cpu_seconds(pid):
    """User + system CPU of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wrk_run(port, seconds, lua):
    """(requests/s, requests completed) of one wrk run (64 connections, or
    $CONNS)."""
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", os.environ.get("CONNS", "64"), "-d", f"{seconds}s", "-s", lua, f"http://127.0.0.1:{port}/v1/events"],
        capture_output=True, text=True, check=True).stdout
    if "Non-2xx or 3xx responses" in out:
        raise SystemExit(f"wrk saw errors:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rate, int(re.search(r"(\d+) requests in", out).group(1))


def fallbacks(server):
    """Ids this replica decided in its own memory because Redis was slow
    to answer (`health::SLOW`): a run that has them measured less than
    cluster-wide dedupe."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r'^botmetrics_dedupe_fallbacks_total\{bot="bench"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def with_ids(tmp, name, events):
    """A wrk script posting `events` messages per request, each with an
    event_id no other request of any thread has: wrk's threads each have a
    Lua state, told apart by the address of a table made at load. The body
    is cut once at load where each id's request part goes, and per request
    one `table.concat` (C, a copy) joins the pieces with it: building a
    1,000-event body in Lua per request cost wrk ~0.4 ms of CPU (`gsub`
    more), on the same two cores as the server and Redis, which the
    batches without ids (a fixed body) never paid."""
    path = os.path.join(tmp, name + ".lua")
    with open(path, "w") as f:
        f.write("""
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer %s"
wrk.headers["Content-Type"] = "application/json"
local state = tostring({}):sub(8)
local n = 0
-- pieces[i] .. id prefix .. pieces[i + 1] ...: the body, each event_id
-- "<state>-<n>-<i>".
local pieces = {'[{"type":"message","role":"user","user_id":1,"event_id":"'}
for i = 1, %d - 1 do
  pieces[i + 1] = '-' .. i .. '"},{"type":"message","role":"user","user_id":' .. (i + 1) .. ',"event_id":"'
end
pieces[#pieces + 1] = '-' .. #pieces .. '"}]'
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, table.concat(pieces, state .. "-" .. n))
end
""" % (TOKEN, events))
    return path


def ab(bin_a, bin_b, seconds, rounds):
    """Cluster replicas of two builds, batches without and with ids."""
    tmp = tempfile.mkdtemp()
    redises = []
    try:
        message = '{"type":"message","role":"user","user_id":%s}'
        batch_body = "[" + ",".join(message % i for i in range(1000)) + "]"
        batch = lua_file(tmp, "batch", "application/json", "return wrk.format(nil, nil, nil, '%s')" % batch_body)
        batch_id = with_ids(tmp, "batch_id", 1000)
        builds = {}
        for name, binary in [("A", bin_a), ("B", bin_b)]:
            proc, port = redis_server(tmp)
            redises.append(proc)
            server = Server(tmp, name, "--redis-url", f"redis://127.0.0.1:{port}", bin=binary)
            builds[name] = {"server": server, "redis": proc, "port": port,
                            "plain": [], "ids": [], "stats": {}, "redis_cpu": 0.0,
                            "server_cpu": 0.0, "wrk_cpu": 0.0, "requests": 0.0,
                            "plain_server_cpu": 0.0, "plain_requests": 0.0, "fallbacks": [], "done": []}
        for _ in range(rounds):
            for b in builds.values():
                s = b["server"]
                server0, wrk0 = cpu_seconds(s.proc.pid), children_cpu()
                rate, done = wrk_run(s.port, seconds, batch)
                b["plain"].append(rate * 1000)
                b["plain_server_cpu"] += cpu_seconds(s.proc.pid) - server0
                b["plain_requests"] += done
                redis_cli(b["port"], "CONFIG", "RESETSTAT")
                redis0, server0, wrk0 = cpu_seconds(b["redis"].pid), cpu_seconds(s.proc.pid), children_cpu()
                local0 = fallbacks(s)
                rate, done = wrk_run(s.port, seconds, batch_id)
                b["fallbacks"].append(fallbacks(s) - local0)
                b["redis_cpu"] += cpu_seconds(b["redis"].pid) - redis0
                b["server_cpu"] += cpu_seconds(s.proc.pid) - server0
                b["wrk_cpu"] += children_cpu() - wrk0
                b["requests"] += done
                b["done"].append(done)
                b["ids"].append(rate * 1000)
                for cmd, (calls, usec) in commandstats(b["port"]).items():
                    was = b["stats"].get(cmd, (0, 0))
                    b["stats"][cmd] = (was[0] + calls, was[1] + usec)
        for b in builds.values():
            b["server"].stop()
        print(f"{seconds} s runs, {rounds} rounds; A = {bin_a}, B = {bin_b}\n")
        print("| round | A no ids (events/s) | A ids | A ids / no ids | A ids decided locally | "
              "B no ids | B ids | B ids / no ids | B ids decided locally |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for i in range(rounds):
            a, b = builds["A"], builds["B"]
            print(f"| {i + 1} | {a['plain'][i]:,.0f} | {a['ids'][i]:,.0f} | {a['ids'][i] / a['plain'][i]:.2f} | "
                  f"{a['fallbacks'][i] / (a['done'][i] * 1000):.0%} | "
                  f"{b['plain'][i]:,.0f} | {b['ids'][i]:,.0f} | {b['ids'][i] / b['plain'][i]:.2f} | "
                  f"{b['fallbacks'][i] / (b['done'][i] * 1000):.0%} |")
        med = {k: (statistics.median(b["plain"]), statistics.median(b["ids"]),
                   statistics.median(i / p for p, i in zip(b["plain"], b["ids"]))) for k, b in builds.items()}
        print(f"| median | {med['A'][0]:,.0f} | {med['A'][1]:,.0f} | {med['A'][2]:.2f} | | "
              f"{med['B'][0]:,.0f} | {med['B'][1]:,.0f} | {med['B'][2]:.2f} | |")
        print("\nB ids / A ids per round:", " ".join(f"{b / a:.2f}" for a, b in zip(builds["A"]["ids"], builds["B"]["ids"])))
        for name, b in builds.items():
            ids = b["requests"] * 1000 - sum(b["fallbacks"])
            print(f"\n{name}: {ids:,.0f} ids claimed in Redis in the id runs "
                  f"({sum(b['fallbacks']):,.0f} more decided locally)")
            print("| command | calls | usec/call | usec per id |")
            print("| --- | ---: | ---: | ---: |")
            for cmd, (calls, usec) in sorted(b["stats"].items(), key=lambda kv: -kv[1][1]):
                print(f"| {cmd} | {calls:,} | {usec / calls:.1f} | {usec / ids:.3f} |")
            per_id = b["redis_cpu"] / ids * 1e6
            print(f"redis-server CPU {b['redis_cpu']:.2f} s = {per_id:.3f} usec per id "
                  f"= {1e6 / per_id:,.0f} ids/s per Redis core" if per_id else "")
            print(f"per request with ids: replica {b['server_cpu'] / b['requests'] * 1e3:.3f} ms CPU, "
                  f"wrk {b['wrk_cpu'] / b['requests'] * 1e3:.3f} ms; without ids: replica "
                  f"{b['plain_server_cpu'] / b['plain_requests'] * 1e3:.3f} ms")
    finally:
        for proc in redises:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "ab":
        if len(sys.argv) < 4:
            raise SystemExit(__doc__)
        ab(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 3,
           int(sys.argv[5]) if len(sys.argv) > 5 else 3)
        return
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    build()
    tmp = tempfile.mkdtemp()
    redis, port = redis_server(tmp)
    try:
        message = '{"type":"message","role":"user","user_id":%s%s}'
        single = lua_file(tmp, "single", "application/json",
                          "return wrk.format(nil, nil, nil, '%s')" % (message % ("' .. n .. '", "")))
        single_id = with_ids(tmp, "single_id", 1)
        batch_body = "[" + ",".join(message % (i, "") for i in range(1000)) + "]"
        batch = lua_file(tmp, "batch", "application/json", "return wrk.format(nil, nil, nil, '%s')" % batch_body)
        batch_id = with_ids(tmp, "batch_id", 1000)
        servers = {
            "alone": Server(tmp, "alone"),
            "cluster": Server(tmp, "cluster", "--redis-url", f"redis://127.0.0.1:{port}"),
        }
        rows = []
        for name, lua, events in [("single event, no id", single, 1),
                                  ("single event with an id", single_id, 1),
                                  ("1,000-event batch, no ids", batch, 1000),
                                  ("1,000-event batch, an id each", batch_id, 1000)]:
            rates = {k: [] for k in servers}
            for _ in range(3):
                for k, s in servers.items():
                    rates[k].append(wrk(s.port, seconds, lua) * events)
            rows.append((name, {k: statistics.median(v) for k, v in rates.items()},
                         [c / a for a, c in zip(rates["alone"], rates["cluster"])]))
        for s in servers.values():
            s.stop()
        print("| request | one process (events/s) | cluster replica (events/s) | cluster / alone, median | per pair |")
        print("| --- | --- | --- | --- | --- |")
        for name, med, ratios in rows:
            print(f"| {name} | {med['alone']:,.0f} | {med['cluster']:,.0f} | "
                  f"{statistics.median(ratios):.2f} | {' '.join(f'{r:.2f}' for r in ratios)} |")
    finally:
        redis.kill()
        redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
