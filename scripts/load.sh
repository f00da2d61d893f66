#!/usr/bin/env bash
# HTTP load test on loopback: botmetrics beside its peers, same load tool,
# same connections, same run, so the ratios hold on a noisy machine.
#
#   scripts/load.sh [seconds per run, default 10] [rounds, default 3]
#
# Every server runs pinned to core 0 and wrk to core 1 (`taskset`), so the
# server has one core of its own and the load tool another, whatever else
# the machine runs; nginx has one worker, as botmetrics has one core.
# Environment: LOAD_THREADS (wrk threads, default 1), LOAD_CONNECTIONS
# (default 2), BOTMETRICS_BIN (a binary to measure instead of building this
# tree's release binary), LOAD_SCENARIOS=events (only steps 1 and 2, no
# Pushgateway needed).
#
# Needs wrk, nginx, taskset and prometheus-pushgateway (Debian packages
# wrk, nginx-light, util-linux, prometheus-pushgateway); installs them with
# apt-get when missing and run as root. nginx runs as an unprivileged
# foreground process (`nobody` when started as root) with its own config
# on a free port.
# Measures, in this order:
#   1. nginx serving a small static file            (ceiling for small answers)
#   2. botmetrics POST /v1/events, one event each   (the bot's hot path)
#      1 and 2 alternate for the given rounds (A B A B ...), and the
#      ratio is taken pair by pair, so a noisy neighbour hits both
#   3. Pushgateway push, consistency check off      (its fastest setting)
#   4. Pushgateway push, default settings
#   5. nginx serving a static file the size of /metrics with 10,000 series
#   6. botmetrics GET /metrics, 10,000 series, cached
#   7. Pushgateway GET /metrics, 10,000 series
# and prints a markdown table with medians of wrk's req/s and the ratios.
set -euo pipefail

SECS=${1:-10}
ROUNDS=${2:-3}
THREADS=${LOAD_THREADS:-1}
CONNS=${LOAD_CONNECTIONS:-2}
SCENARIOS=${LOAD_SCENARIOS:-all}
SERVER_CPU=0
LOAD_CPU=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

need() {
    command -v "$1" >/dev/null 2>&1 && return
    [ "$(id -u)" = 0 ] || { echo "missing $1: apt-get install $2" >&2; exit 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
need wrk wrk
need nginx nginx-light
need taskset util-linux
[ "$SCENARIOS" = events ] || need prometheus-pushgateway prometheus-pushgateway
# Servers on one core, the load tool on another. `exec`: started with `&`,
# the server is then the background pid itself, so the cleanup stops it.
on_server() { exec taskset -c "$SERVER_CPU" "$@"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

if [ -n "${BOTMETRICS_BIN:-}" ]; then
    BIN=$BOTMETRICS_BIN
else
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
    BIN="$ROOT/target/release/botmetrics"
fi

# --- botmetrics
BM=$(free_port)
on_server "$BIN" --listen 127.0.0.1:"$BM" --tokens bench=secret --database-url "sqlite://$TMP/bm.db" \
    --max-label-values 20000 --dedupe-window 0s 2>"$TMP/bm.log" &
PIDS+=($!)
wait_port "$BM"

# --- pushgateways
if [ "$SCENARIOS" != events ]; then
PG_FAST=$(free_port); PG_DEF=$(free_port)
on_server prometheus-pushgateway --web.listen-address=127.0.0.1:"$PG_FAST" --push.disable-consistency-check 2>"$TMP/pgf.log" &
PIDS+=($!)
on_server prometheus-pushgateway --web.listen-address=127.0.0.1:"$PG_DEF" 2>"$TMP/pgd.log" &
PIDS+=($!)
wait_port "$PG_FAST"; wait_port "$PG_DEF"
fi

# --- fill botmetrics and a pushgateway to 10,000 series
python3 - "$BM" "${PG_FAST:-}" "$TMP" <<'EOF'
import sys, urllib.request
bm, pg, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
def post(url, body, headers, method="POST"):
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    urllib.request.urlopen(req).read()
# Every series a single event adds; the rest are error kinds.
metrics = urllib.request.urlopen(f"http://127.0.0.1:{bm}/metrics").read().decode()
fixed = sum(1 for l in metrics.splitlines() if l.startswith("bot_"))
kinds = 10000 - fixed
body = "\n".join('{"type":"error","kind":"kind_%d"}' % k for k in range(kinds)).encode()
post(f"http://127.0.0.1:{bm}/v1/events", body,
     {"Authorization": "Bearer secret", "Content-Type": "application/x-ndjson"})
lines = ["# TYPE bench_errors_total counter"] + ['bench_errors_total{kind="kind_%d"} 1' % k for k in range(10000)]
if pg:
    post(f"http://127.0.0.1:{pg}/metrics/job/bench", ("\n".join(lines) + "\n").encode(), {}, "PUT")
EOF
# The page rendered before the fill stays cached for up to the TTL (30 s).
for _ in $(seq 40); do
    [ "$(curl -s "http://127.0.0.1:$BM/metrics" | grep -c '^bot_')" -ge 9990 ] && break
    sleep 1
done
curl -s -H 'Accept-Encoding: gzip' "http://127.0.0.1:$BM/metrics" -o "$TMP/bm_metrics.gz"
curl -s "http://127.0.0.1:$BM/metrics" -o "$TMP/metrics10k.txt"
SERIES=$(grep -c '^bot_' "$TMP/metrics10k.txt")

# --- nginx with the same two kinds of answers
NG=$(free_port)
mkdir -p "$TMP/www" "$TMP/ngx"
printf '{"accepted":1,"duplicates":0}' > "$TMP/www/small.json"
cp "$TMP/metrics10k.txt" "$TMP/www/metrics10k.txt"
# The same bytes botmetrics serves, pre-compressed, as gzip_static serves
# them: botmetrics also compresses once per render, not per request.
cp "$TMP/bm_metrics.gz" "$TMP/www/metrics10k.txt.gz"
cat > "$TMP/ngx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
error_log $TMP/ngx/error.log;
pid $TMP/ngx/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    gzip_static on;
    client_body_temp_path $TMP/ngx; proxy_temp_path $TMP/ngx; fastcgi_temp_path $TMP/ngx;
    uwsgi_temp_path $TMP/ngx; scgi_temp_path $TMP/ngx;
    server { listen 127.0.0.1:$NG; root $TMP/www; }
}
EOF
# Never as root: as root it would switch its worker's user, and it needs
# none of root's rights. `nobody` reads the files and writes its temp dir.
chmod 755 "$TMP"; chmod -R a+rX "$TMP/www"
NGINX=(nginx -e "$TMP/ngx/error.log" -c "$TMP/ngx/nginx.conf" -p "$TMP/ngx")
if [ "$(id -u)" = 0 ]; then
    chown -R nobody "$TMP/ngx"
    NGINX=(setpriv --reuid=nobody --regid=nogroup --clear-groups "${NGINX[@]}")
fi
on_server "${NGINX[@]}" &
PIDS+=($!)
wait_port "$NG"

# --- wrk scripts
cat > "$TMP/event.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"type":"message","role":"user","user_id":123456789,"db_queries":6}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer secret"
EOF
cat > "$TMP/push.lua" <<'EOF'
wrk.method = "POST"
wrk.body = "# TYPE bot_messages_total counter\nbot_messages_total{role=\"user\"} 1\n"
EOF
cat > "$TMP/gzip.lua" <<'EOF'
wrk.headers["Accept-Encoding"] = "gzip"
EOF

# One wrk run; prints req/s and checks that errors stayed at zero.
run() {
    local name=$1 url=$2 script=${3:-}
    local args=(-t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency)
    [ -n "$script" ] && args+=(-s "$script")
    taskset -c "$LOAD_CPU" wrk "${args[@]}" "$url" > "$TMP/$name.out"
    local rps p50 bad
    rps=$(awk '/Requests\/sec/ {print $2}' "$TMP/$name.out")
    p50=$(awk '$1=="50%" {print $2}' "$TMP/$name.out")
    bad=$(awk '/Non-2xx/ {print $5}' "$TMP/$name.out")
    [ -z "$bad" ] || { echo "$name: $bad non-2xx answers" >&2; cat "$TMP/$name.out" >&2; exit 1; }
    printf '%s %s %s\n' "$name" "$rps" "$p50" >> "$TMP/results"
}

echo "wrk -t$THREADS -c$CONNS -d${SECS}s on core $LOAD_CPU, servers on core $SERVER_CPU, $SERIES bot_ series in /metrics, $ROUNDS rounds of nginx / event POST, $(nproc) cores" >&2
# Warm-up, not counted.
SECS_RUN=$SECS; SECS=2
run warmup_nginx "http://127.0.0.1:$NG/small.json"
run warmup_event "http://127.0.0.1:$BM/v1/events" "$TMP/event.lua"
SECS=$SECS_RUN
: > "$TMP/results"
for i in $(seq "$ROUNDS"); do
    run nginx_small "http://127.0.0.1:$NG/small.json"
    run botmetrics_event "http://127.0.0.1:$BM/v1/events" "$TMP/event.lua"
done
[ "$SCENARIOS" = events ] || {
run pushgw_fast_push "http://127.0.0.1:$PG_FAST/metrics/job/load" "$TMP/push.lua"
run pushgw_default_push "http://127.0.0.1:$PG_DEF/metrics/job/load" "$TMP/push.lua"
run nginx_10k_gzip "http://127.0.0.1:$NG/metrics10k.txt" "$TMP/gzip.lua"
run botmetrics_metrics_10k_gzip "http://127.0.0.1:$BM/metrics" "$TMP/gzip.lua"
run pushgw_metrics_10k_gzip "http://127.0.0.1:$PG_FAST/metrics" "$TMP/gzip.lua"
run nginx_10k_plain "http://127.0.0.1:$NG/metrics10k.txt"
run botmetrics_metrics_10k_plain "http://127.0.0.1:$BM/metrics"
}

# Sanity: every POST was counted (wrk's count vs the counter).
accepted=$(curl -s "http://127.0.0.1:$BM/metrics" | awk '/^botmetrics_events_accepted_total/ {print $2}')
echo "botmetrics accepted $accepted events in total" >&2

python3 - "$TMP/results" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, rps, p50 = line.split()
    runs.setdefault(name, []).append((float(rps), p50))
# Each name's median run (by req/s).
rows = {name: sorted(r)[len(r) // 2] for name, r in runs.items()}
def ratio(a, b):
    return f"{rows[a][0] / rows[b][0]:.2f}×"
print("| run | req/s (median of runs) | p50 latency |")
print("| --- | ---: | ---: |")
for name, (rps, p50) in rows.items():
    print(f"| {name} | {rps:,.0f} | {p50} |")
print()
pairs = list(zip(runs["nginx_small"], runs["botmetrics_event"]))
print("| round | nginx small file req/s | event POST req/s | event / nginx |")
print("| ---: | ---: | ---: | ---: |")
for i, ((n, _), (e, _)) in enumerate(pairs, 1):
    print(f"| {i} | {n:,.0f} | {e:,.0f} | {e / n:.2f} |")
print(f"| median | {statistics.median(n for (n, _), _ in pairs):,.0f} | {statistics.median(e for _, (e, _) in pairs):,.0f} | {statistics.median(e / n for (n, _), (e, _) in pairs):.2f} |")
print()
if "pushgw_fast_push" not in rows:
    sys.exit()
print(f"- event POST vs Pushgateway push (check off): {ratio('botmetrics_event', 'pushgw_fast_push')}")
print(f"- event POST vs Pushgateway push (default): {ratio('botmetrics_event', 'pushgw_default_push')}")
print(f"- event POST vs nginx small static file: {ratio('botmetrics_event', 'nginx_small')}")
print(f"- cached /metrics (10k series, gzip) vs nginx same-size file (gzip): {ratio('botmetrics_metrics_10k_gzip', 'nginx_10k_gzip')}")
print(f"- cached /metrics (10k series, plain) vs nginx same file (plain): {ratio('botmetrics_metrics_10k_plain', 'nginx_10k_plain')}")
print(f"- cached /metrics vs Pushgateway /metrics (10k series): {ratio('botmetrics_metrics_10k_gzip', 'pushgw_metrics_10k_gzip')}")
EOF
