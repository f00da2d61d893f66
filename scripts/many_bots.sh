#!/usr/bin/env bash
# Many bots in one process: the release binary started with N bots
# (`--tokens` with N pairs), its resident memory (VmRSS from /proc) before
# any event and after a little traffic for every bot, the server-side
# render time of an uncached /metrics and /v1/summary, and the flush of
# every bot's changes to the embedded SQLite store.
#
#   scripts/many_bots.sh [bots, default 1000] [users per bot, default 10]
#
# Prints a markdown table. Needs python3 (for the HTTP client). NO_BUILD=1
# uses the release binary as it is, without `cargo build --release` first.
set -euo pipefail

BOTS=${1:-1000}
USERS=${2:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/botmetrics"

TOKENS=$(python3 -c "print(','.join(f'bot{i}=token-{i}' for i in range($BOTS)))")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# No render cache: every request renders. The first flush comes 15 s after
# the start, after all the traffic below: one flush writes every bot's changes.
BOTMETRICS_TOKENS="$TOKENS" "$BIN" --listen 127.0.0.1:"$PORT" \
    --database-url "sqlite://$TMP/bm.db" --metrics-cache-ttl 0s \
    --flush-interval 15s 2>"$TMP/bm.log" &
PID=$!
for _ in $(seq 300); do
    (echo >/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break
    sleep 0.1
done

python3 - "$PORT" "$PID" "$BOTS" "$USERS" <<'EOF'
import http.client, json, os, re, sys, time

port, pid, bots, users = (int(a) for a in sys.argv[1:])

def status(field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise SystemExit(f"no {field}")

conn = http.client.HTTPConnection("127.0.0.1", port)

def request(method, path, body=None, headers={}):
    conn.request(method, path, body=body, headers=headers)
    res = conn.getresponse()
    data = res.read()
    if res.status >= 300:
        raise SystemExit(f"{method} {path}: {res.status} {data[:200]!r}")
    return data

def self_metric(text, name, endpoint=None):
    label = f'{{endpoint="{endpoint}"}}' if endpoint else ""
    m = re.search(rf"^{name}{re.escape(label)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0

time.sleep(1)
idle = status("VmRSS")
start = time.time()
for i in range(bots):
    batch = [{"type": "message", "role": "user", "user_id": f"{i}-{u}"} for u in range(users)]
    batch += [
        {"type": "response", "status": "success", "duration_ms": 900, "model": "gpt-4o-mini",
         "tokens": {"prompt": 100, "completion": 20}},
        {"type": "cache", "result": "hit"},
        {"type": "error", "kind": "llm_timeout"},
    ]
    request("POST", "/v1/events", json.dumps(batch),
            {"Authorization": f"Bearer token-{i}", "Content-Type": "application/json"})
sent = time.time() - start
busy = status("VmRSS")

def cpu_seconds():
    # utime + stime of the whole server process, in clock ticks.
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def render_ms(endpoint, path, n=20):
    """Server-side render time per request (the render-duration histogram's
    sum over count), uncached: --metrics-cache-ttl 0s renders every time."""
    text = request("GET", "/metrics").decode()
    before = (self_metric(text, "botmetrics_render_duration_seconds_sum", endpoint),
              self_metric(text, "botmetrics_render_duration_seconds_count", endpoint))
    walls = []
    cpu = cpu_seconds()
    for _ in range(n):
        t = time.time()
        request("GET", path, headers={"Accept-Encoding": "gzip"})
        walls.append(time.time() - t)
    cpu = (cpu_seconds() - cpu) / n * 1000
    text = request("GET", "/metrics").decode()
    after = (self_metric(text, "botmetrics_render_duration_seconds_sum", endpoint),
             self_metric(text, "botmetrics_render_duration_seconds_count", endpoint))
    server = (after[0] - before[0]) / (after[1] - before[1]) * 1000
    return server, sorted(walls)[len(walls) // 2] * 1000, cpu

metrics_server, metrics_wall, metrics_cpu = render_ms("metrics", "/metrics")
summary_server, summary_wall, summary_cpu = render_ms("summary", "/v1/summary")
page = request("GET", "/metrics").decode()
lines = sum(1 for l in page.splitlines() if l.startswith("bot_"))

# Wait for the first flush, which writes the traffic of every bot.
flush = None
for _ in range(150):
    text = request("GET", "/metrics").decode()
    count = self_metric(text, "botmetrics_flush_duration_seconds_count")
    if count >= 1:
        flush = self_metric(text, "botmetrics_flush_duration_seconds_sum") / count * 1000
        break
    time.sleep(0.2)
peak = status("VmHWM")
after_flush = status("VmRSS")

mb = lambda b: f"{b / 1e6:.1f} MB"
print(f"| {bots} bots, {users} users and 3 more events each | |")
print("| --- | ---: |")
print(f"| RSS before the first event | {mb(idle)} |")
print(f"| RSS after every bot's batch ({bots} requests in {sent:.1f} s) | {mb(busy)} |")
print(f"| RSS after the flush | {mb(after_flush)} |")
print(f"| peak RSS (VmHWM) | {mb(peak)} |")
print(f"| /metrics: {lines} bot_ lines, render (server side, uncached) | {metrics_server:.1f} ms |")
print(f"| /metrics with gzip, request wall time (median of 20) | {metrics_wall:.1f} ms |")
print(f"| /metrics with gzip, server CPU time per request | {metrics_cpu:.1f} ms |")
print(f"| /v1/summary, all bots, render (server side, uncached) | {summary_server:.1f} ms |")
print(f"| /v1/summary, request wall time (median of 20) | {summary_wall:.1f} ms |")
print(f"| /v1/summary, server CPU time per request | {summary_cpu:.1f} ms |")
if flush is not None:
    print(f"| first flush: every bot's series and sketches, SQLite | {flush:.1f} ms |")
EOF
