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

Needs wrk and redis-server (apt-get install wrk redis-server).
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

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


def with_ids(tmp, name, events):
    """A wrk script posting `events` messages per request, each with an
    event_id no other request of any thread has: wrk's threads each have a
    Lua state, told apart by the address of a table made at load."""
    path = os.path.join(tmp, name + ".lua")
    with open(path, "w") as f:
        f.write("""
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer %s"
wrk.headers["Content-Type"] = "application/json"
local state = tostring({}):sub(8)
local n = 0
request = function()
  n = n + 1
  local parts = {}
  for i = 1, %d do
    parts[i] = '{"type":"message","role":"user","user_id":' .. i .. ',"event_id":"' .. state .. '-' .. n .. '-' .. i .. '"}'
  end
  return wrk.format(nil, nil, nil, '[' .. table.concat(parts, ',') .. ']')
end
""" % (TOKEN, events))
    return path


def main():
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
