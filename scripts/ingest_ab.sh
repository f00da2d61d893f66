#!/usr/bin/env bash
# Single-event POST /v1/events throughput of two botmetrics binaries, side
# by side on one machine: each server in turn pinned to core 0, wrk pinned
# to core 1, rounds interleaved A B A B …, so a noisy neighbour hits both.
# Prints each round's req/s, the medians and the B/A ratio of each pair.
#
#   scripts/ingest_ab.sh BIN_A BIN_B [rounds, default 5] [seconds, default 10]
#
# INGEST_BATCH=1000 posts 1,000-event batches instead of single events (the
# realistic mix of benches/ingest.rs: messages, LLM responses, cache
# lookups, errors; every event with a user), and the table is in events/s.
#
# Both run the embedded default (SQLite file, journal on). Needs wrk and
# taskset (Debian: wrk, util-linux); installs wrk when missing and root.
set -euo pipefail

A=${1:?binary A}
B=${2:?binary B}
ROUNDS=${3:-5}
SECS=${4:-10}
CONNS=${LOAD_CONNECTIONS:-2}
TMP=$(mktemp -d)
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

command -v wrk >/dev/null || {
    [ "$(id -u)" = 0 ] || { echo "missing wrk: apt-get install wrk" >&2; exit 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

BATCH=${INGEST_BATCH:-1}
if [ "$BATCH" = 1 ]; then
cat > "$TMP/event.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"type":"message","role":"user","user_id":123456789,"db_queries":6}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer secret"
EOF
else
python3 - "$BATCH" "$TMP/batch.json" <<'EOF'
import sys, time
n, out = int(sys.argv[1]), sys.argv[2]
now = int(time.time())
events = []
for i in range(n):
    user = 100_000 + (i * 7919) % 50_000
    k = i % 20
    if k <= 7:
        body = '"type":"message","role":"%s","db_queries":%d' % (["user", "assistant"][i % 2], i % 9)
    elif k <= 13:
        body = ('"type":"response","status":"%s","duration_ms":%d,"model":"gpt-4o-mini",'
                '"tokens":{"prompt":%d,"completion":%d}') % (
            ["success", "success", "success", "error", "timeout", "rate_limited"][i % 6],
            200 + (i * 37) % 9000, 300 + i % 500, 50 + i % 200)
    elif k <= 16:
        body = '"type":"cache","result":"%s","cache":"answers"' % ["hit", "miss"][i % 2]
    elif k == 17:
        body = '"type":"error","kind":"llm_timeout"'
    elif k == 18:
        body = '"type":"limit_reached"'
    else:
        body = '"type":"custom","name":"voice_note","value":1'
    events.append('{%s,"user_id":%d,"ts":%d}' % (body, user, now - i % 600))
open(out, "w").write("[" + ",".join(events) + "]")
EOF
cat > "$TMP/event.lua" <<EOF
local f = io.open("$TMP/batch.json")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer secret"
EOF
fi

# One round of `bin`: a fresh data dir, 2 s of warm-up, then the measure.
round() {
    local bin=$1 port dir
    port=$(free_port)
    dir=$(mktemp -d -p "$TMP")
    taskset -c 0 "$bin" --listen 127.0.0.1:"$port" --tokens bench=secret \
        --database-url "sqlite://$dir/bm.db" 2>"$dir/log" &
    PID=$!
    wait_port "$port"
    taskset -c 1 wrk -t1 -c"$CONNS" -d2s -s "$TMP/event.lua" "http://127.0.0.1:$port/v1/events" >/dev/null
    taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" -s "$TMP/event.lua" \
        "http://127.0.0.1:$port/v1/events" > "$dir/wrk"
    grep -q "Non-2xx" "$dir/wrk" && { echo "non-2xx answers:" >&2; cat "$dir/wrk" >&2; exit 1; }
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    awk -v n="$BATCH" '/Requests\/sec/ {print $2 * n}' "$dir/wrk"
}

echo "wrk -t1 -c$CONNS -d${SECS}s, $BATCH event(s) per request, server on core 0, wrk on core 1, $ROUNDS rounds" >&2
for i in $(seq "$ROUNDS"); do
    a=$(round "$A"); b=$(round "$B")
    echo "$a $b" | tee -a "$TMP/pairs" >&2
done
python3 - "$TMP/pairs" "$A" "$B" <<'EOF'
import statistics, sys
pairs = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
a = [p[0] for p in pairs]; b = [p[1] for p in pairs]
ratios = [y / x for x, y in pairs]
print("| round | A events/s | B events/s | B/A |")
print("| ---: | ---: | ---: | ---: |")
for i, (x, y) in enumerate(pairs, 1):
    print(f"| {i} | {x:,.0f} | {y:,.0f} | {y / x:.2f} |")
print(f"| median | {statistics.median(a):,.0f} | {statistics.median(b):,.0f} | {statistics.median(ratios):.2f} |")
print(f"\nA = {sys.argv[2]}\nB = {sys.argv[3]}")
EOF
