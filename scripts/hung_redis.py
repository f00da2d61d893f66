#!/usr/bin/env python3
"""A hung Redis under load (issue 17, item 2; BENCHMARKS.md, "Faults").

    scripts/hung_redis.py [HANG_SECONDS] [CLIENTS]

Two release replicas in cluster mode on one private redis-server. CLIENTS
threads (default 8) post 10-event batches, every event with an id of its
own, round robin over the replicas, one request at a time each; another
thread reads /v1/summary on both every 100 ms. After 3 s Redis is SIGSTOPped
for HANG_SECONDS (default 8): it keeps every socket open and answers
nothing, as a paused VM does. Then SIGCONT and 3 s more. Printed: the
latency of the requests with ids before and during the hang (every request
that was waiting at some point of it), how many waited over 400 ms, and
the summary's latency during the hang.

BOTMETRICS_BIN runs another binary (an older build, for the "before").
Needs redis-server (apt-get install redis-server).
"""

import http.client
import json
import os
import signal
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import durability  # noqa: E402
from cluster_ingest import redis_server  # noqa: E402
from durability import TOKEN, Server, build  # noqa: E402

SLOW_MS = 400


def pct(values, q):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, round((len(values) - 1) * q))]


def row(name, took):
    ms = [t * 1000 for t in took]
    over = sum(1 for t in ms if t > SLOW_MS)
    return (f"| {name} | {len(ms):,} | {pct(ms, 0.5):.1f} | {pct(ms, 0.9):.1f} | "
            f"{pct(ms, 0.99):.1f} | {max(ms, default=0):.1f} | {over:,} |")


def main():
    hang = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    if "BOTMETRICS_BIN" in os.environ:
        durability.BIN = os.environ["BOTMETRICS_BIN"]
    else:
        build()
    tmp = tempfile.mkdtemp()
    redis, port = redis_server(tmp)
    url = f"redis://127.0.0.1:{port}"
    try:
        reps = [Server(tmp, f"replica-{i}", "--redis-url", url,
                       "--data-dir", os.path.join(tmp, f"data-{i}")) for i in range(2)]
        stop = threading.Event()
        log = []  # (start, took, status)
        lock = threading.Lock()

        def client(c):
            conns = [http.client.HTTPConnection("127.0.0.1", r.port, timeout=30) for r in reps]
            b = 0
            while not stop.is_set():
                body = json.dumps([{"type": "message", "role": "user",
                                    "event_id": f"c{c}-{b}-{i}"} for i in range(10)])
                conn = conns[(c + b) % 2]
                start = time.monotonic()
                conn.request("POST", "/v1/events", body,
                             {"Authorization": f"Bearer {TOKEN}",
                              "Content-Type": "application/json"})
                res = conn.getresponse()
                res.read()
                with lock:
                    log.append((start, time.monotonic() - start, res.status))
                b += 1

        summaries = []  # (start, took, status)

        def reader():
            conns = [http.client.HTTPConnection("127.0.0.1", r.port, timeout=30) for r in reps]
            while not stop.is_set():
                for conn in conns:
                    start = time.monotonic()
                    conn.request("GET", "/v1/summary?bot=bench",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
                    res = conn.getresponse()
                    res.read()
                    summaries.append((start, time.monotonic() - start, res.status))
                time.sleep(0.1)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        threads.append(threading.Thread(target=reader))
        for t in threads:
            t.start()
        time.sleep(3)
        redis.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        time.sleep(hang)
        redis.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
        for r in reps:
            r.stop()

        bad = [s for _, _, s in log if s != 202]
        before = [took for start, took, _ in log if start + took <= paused]
        during = [took for start, took, _ in log if start < resumed and start + took > paused]
        summary = [took for start, took, _ in summaries if start < resumed and start + took > paused]
        bad += [s for _, _, s in summaries if s != 200]
        print(f"{os.path.basename(durability.BIN)}: Redis SIGSTOPped {hang:g} s, "
              f"{clients} clients, 2 replicas; answers other than 202 (events) or 200 (summary): {len(bad)}")
        print(f"| requests with ids | n | p50 ms | p90 ms | p99 ms | max ms | over {SLOW_MS} ms |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print(row("before the hang", before))
        print(row("during the hang", during))
        print(row("summary, during the hang", summary))
        print(f"requests/s during the hang: {len(during) / hang:,.0f}; "
              f"before: {len(before) / max(paused - log[0][0], 1e-9):,.0f}; "
              f"summary p50 {statistics.median(summary) * 1000 if summary else 0:.1f} ms")
    finally:
        if redis.poll() is None:
            redis.send_signal(signal.SIGCONT)
        redis.kill()
        redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
