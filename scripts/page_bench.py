#!/usr/bin/env python3
"""The built-in page's cost (BENCHMARKS.md "The built-in page"):

  python3 scripts/page_bench.py target/release/botmetrics

1. Starts the server on a fresh SQLite file, posts events with the label
   values of a busy AI bot (3 models, 3 caches, 10 error kinds, every
   status), and lets it write one history point: the series a busy bot has.
2. Stops it and fills `metrics_history` with 30 days of that bot at the
   default 5-minute interval, shaped like 50,000 daily users (500,000
   messages a day, a day-night swing), every series of the point above.
3. Starts it again and measures, from the server's own /proc CPU time:
   a first page load (document, assets, the bot list, the bot's summary,
   its 24 h charts) and a chart refresh (summary + charts) for each range;
   and the bytes and requests of a first load, with and without gzip.
"""
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/botmetrics"
ROUNDS = int(os.environ.get("ROUNDS", "50"))
BOT, TOKEN = "alpha", "tok-alpha"
DAYS, INTERVAL = 30, 300
TICKS = os.sysconf("SC_CLK_TCK")


def start(db, *extra):
    proc = subprocess.Popen(
        [BIN, "--listen", "127.0.0.1:0", "--database-url", f"sqlite://{db}", "--tokens",
         f"{BOT}={TOKEN}", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = ""
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stdout.readline()
        log += line
        m = re.search(r"botmetrics serving listen=127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, f"http://127.0.0.1:{m.group(1)}"
    raise SystemExit("server did not start:\n" + log)


def stop(proc):
    proc.terminate()
    proc.wait(timeout=30)


def get(url, gzip=True):
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzip else {})
    with urllib.request.urlopen(req) as r:
        return r.read()


def post(base, events):
    req = urllib.request.Request(base + "/v1/events", data=json.dumps(events).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})
    urllib.request.urlopen(req).read()


def cpu_seconds(proc):
    with open(f"/proc/{proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def busy_events():
    models, caches = ["gpt-4o-mini", "gpt-4o", "claude-3-5-haiku"], ["answers", "embeddings", "users"]
    events = []
    for i in range(200):
        events.append({"type": "message", "user_id": i, "role": "user", "db_queries": i % 9})
        events.append({"type": "message", "user_id": i, "role": "assistant"})
        events.append({"type": "response", "user_id": i, "duration_ms": 50 + i * 97 % 20000,
                       "status": ["success", "error", "timeout", "rate_limited"][i % 4],
                       "model": models[i % 3], "ttft_ms": 25 + i % 25,
                       "tokens": {"prompt": 900, "completion": 200, "cached": 100}})
        events.append({"type": "cache", "user_id": i, "cache": caches[i % 3],
                       "result": "hit" if i % 2 else "miss"})
        events.append({"type": "error", "user_id": i, "kind": f"kind_{i % 10}"})
        events.append({"type": "feedback", "user_id": i, "score": 1 if i % 3 else -1})
        events.append({"type": "user_registered", "user_id": i})
        events.append({"type": "limit_reached", "user_id": i})
        events.append({"type": "consent", "user_id": i, "granted": i % 2 == 0})
        events.append({"type": "custom", "user_id": i, "name": f"custom_{i % 5}"})
    return events


def lognormal_cdf(x, median, sigma=0.9):
    if x <= 0:
        return 0.0
    return 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))


def seed(db):
    con = sqlite3.connect(db)
    templates = con.execute(
        "select metric, labels from metrics_history where bot = ? and recorded_at = "
        "(select max(recorded_at) from metrics_history where bot = ?)", (BOT, BOT)).fetchall()
    con.execute("delete from metrics_history where bot = ?", (BOT,))
    now = int(time.time())
    first = now - DAYS * 86400
    per_day = {  # what a day of 50,000 users adds to each series (split over its label sets)
        "bot_messages_total": 500_000, "bot_responses_total": 250_000,
        "bot_llm_cost_total": 125.0, "bot_llm_tokens_total": 250_000_000,
        "bot_cache_requests_total": 200_000, "bot_errors_total": 2_000,
    }
    groups = {}
    for metric, labels in templates:
        groups.setdefault(metric, []).append(labels)
    rows = []
    for tick in range(first, now - 60, INTERVAL):
        days = (tick - first) / 86400
        # The integral of a rate of 1 + 0.6 sin(2 pi t): monotonic, a day-night swing.
        cum = days - 0.6 / (2 * math.pi) * math.cos(2 * math.pi * days) + 0.6 / (2 * math.pi)
        swing = 0.8 + 0.2 * math.sin(2 * math.pi * days)
        for metric, label_sets in groups.items():
            for labels in label_sets:
                lab = json.loads(labels)
                if metric == "bot_active_users":
                    value = {"1d": 50_000 * swing, "7d": 150_000, "30d": 300_000}[lab["window"]]
                    value = round(value)
                elif metric.endswith("_bucket"):
                    count = 250_000 * cum
                    median = 1.5 if "duration" in metric or "ttft" in metric else 5
                    le = lab["le"]
                    value = round(count if le == "+Inf" else count * lognormal_cdf(float(le), median))
                elif metric.endswith("_count"):
                    value = round(250_000 * cum)
                elif metric.endswith("_sum"):
                    value = 250_000 * cum * 2.0
                else:
                    daily = per_day.get(metric, 1_000)
                    if metric == "bot_responses_total" and lab.get("status") != "success":
                        daily = 2_000
                    value = daily * cum / len(label_sets)
                    if not metric == "bot_llm_cost_total":
                        value = round(value)
                rows.append((tick, metric, BOT, labels, float(value)))
        if len(rows) > 200_000:
            con.executemany("insert into metrics_history values (?, ?, ?, ?, ?)", rows)
            rows = []
    con.executemany("insert into metrics_history values (?, ?, ?, ?, ?)", rows)
    con.commit()
    n = con.execute("select count(*) from metrics_history").fetchone()[0]
    con.close()
    return len(templates), n


def measure(proc, what, urls, rounds=ROUNDS, pause=0.0):
    """Server CPU per round of `urls`; with `pause`, the rounds are that far
    apart (past the chart cache's life) and the server's idle CPU over the
    same pauses is subtracted."""
    for u in urls:  # warm: the first read opens pages of the file
        get(u)
    idle = 0.0
    if pause:
        before = cpu_seconds(proc)
        time.sleep(pause * rounds)
        idle = cpu_seconds(proc) - before
    before = cpu_seconds(proc)
    for _ in range(rounds):
        time.sleep(pause)
        for u in urls:
            get(u)
    cpu = cpu_seconds(proc) - before - idle
    print(f"| {what} | {len(urls)} | {max(cpu, 0) / rounds * 1000:.1f} ms |")


def main():
    tmp = tempfile.mkdtemp(prefix="botmetrics-page-bench-")
    db = os.path.join(tmp, "bm.db")
    proc, base = start(db, "--history-interval", "1s")
    try:
        post(base, busy_events())
        time.sleep(3)
    finally:
        stop(proc)
    series, rows = seed(db)
    print(f"seeded: {series} series of bot {BOT}, {rows} history rows "
          f"({DAYS} days every {INTERVAL} s), file {os.path.getsize(db) / 1e6:.0f} MB")
    # --history-interval 1h: the chart cache keeps answers 30 s (many
    # viewers); phase two below uses 500ms so that every refresh computes.
    proc, base = start(db, "--history-interval", "1h")
    try:
        html = get(base + "/", gzip=False).decode()
        assets = [base + a for a in re.findall(r'"(/assets/[^"]+)"', html)
                  if "LICENSE" not in a]
        page = [base + "/"] + assets
        plain = sum(len(get(u, gzip=False)) for u in page)
        zipped = 0
        for u in page:
            req = urllib.request.Request(u, headers={"Accept-Encoding": "gzip"})
            with urllib.request.urlopen(req) as r:
                zipped += len(r.read())
        api = [base + "/v1/summary", base + f"/v1/summary?bot={BOT}",
               base + f"/v1/charts?bot={BOT}&range=24h"]
        api_plain = sum(len(get(u, gzip=False)) for u in api)
        api_zipped = sum(len(get(u)) for u in api)
        print(f"first load: {len(page)} requests for the page ({plain} bytes, {zipped} gzipped), "
              f"{len(api)} API requests ({api_plain} bytes, {api_zipped} gzipped)")
        print("| what | requests | server CPU each |")
        print("| --- | ---: | ---: |")
        measure(proc, "first page load (document, assets, bot list, summary, 24 h charts)", page + api)
        for r in ["24h", "7d", "30d"]:
            measure(proc, f"chart refresh, {r} (summary + charts)",
                    [base + f"/v1/summary?bot={BOT}", base + f"/v1/charts?bot={BOT}&range={r}"])
            measure(proc, f"charts alone, {r}", [base + f"/v1/charts?bot={BOT}&range={r}"])
        measure(proc, "summary alone", [base + f"/v1/summary?bot={BOT}"])
    finally:
        stop(proc)
    print("computed every time (no cache hit: --history-interval 500ms, rounds 0.6 s apart):")
    proc, base = start(db, "--history-interval", "500ms", "--summary-cache-ttl", "0s")
    try:
        for r in ["24h", "7d", "30d"]:
            measure(proc, f"chart refresh, {r}, computed (summary + charts)",
                    [base + f"/v1/summary?bot={BOT}", base + f"/v1/charts?bot={BOT}&range={r}"],
                    rounds=min(ROUNDS, 10), pause=0.6)
    finally:
        stop(proc)
        subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
