#!/usr/bin/env bash
# Issue 17, item 6: what SIGHUP (systemctl reload, supervisors, log
# rotation) does to a running botmetrics. For BENCHMARKS.md ("Faults").
#
#   scripts/sighup.sh [BINARY]     (default target/release/botmetrics)
#
# Starts the binary on loopback with its own temporary SQLite file and an
# hourly flush (so only the final flush can store the counts), posts one
# event, sends SIGHUP, posts another if it still serves, then SIGTERM; prints
# whether it survived, its exit status, its log lines about the reload and
# the final flush, and the total a restart restores.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/botmetrics}
TMP=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null; rm -rf "$TMP"' EXIT
DB="sqlite://$TMP/botmetrics.db"

start() {
    RUST_LOG=info NO_COLOR=1 "$BIN" --listen 127.0.0.1:0 --database-url "$DB" \
        --tokens a=change-me --flush-interval 1h --metrics-cache-ttl 0s 2>"$TMP/log$1" &
    PID=$!
    for _ in $(seq 100); do
        ADDR=$(grep -o 'botmetrics serving listen=[^ ]*' "$TMP/log$1" | cut -d= -f2)
        [ -n "$ADDR" ] && return 0
        sleep 0.1
    done
    echo "botmetrics did not start"; exit 1
}
post() {
    curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer change-me' \
        -H 'Content-Type: application/json' -d '{"type":"limit_reached"}' "http://$ADDR/v1/events"
}
total() {
    curl -s "http://$ADDR/metrics" | awk '/^bot_limit_reached_total\{bot="a"\}/ {print $2}'
}

start 1
echo "POST before SIGHUP: $(post)"
kill -HUP "$PID"
sleep 1
if kill -0 "$PID" 2>/dev/null; then
    echo "after SIGHUP: still running; POST: $(post)"
    kill -TERM "$PID"
else
    echo "after SIGHUP: gone"
fi
wait "$PID"
echo "exit status: $?"
grep -E 'reload|final flush' "$TMP/log1" | sed 's/^/  log: /' ||
    echo "  log: no line about a reload or a final flush"
start 2
echo "total after a restart: $(total)"
kill -TERM "$PID"; wait "$PID"
