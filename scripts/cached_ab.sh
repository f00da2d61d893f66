#!/usr/bin/env bash
# Cached /metrics of one binary: 1,000 configured bots, --metrics-cache-ttl
# 60s, wrk -t1 -c4 -d4s on core 1 against the server on core 0; prints
# requests/s with gzip, then plain.
# Usage: scripts/cached_ab.sh BINARY PORT (run two binaries in turn, pair by pair).
BIN=$1; PORT=$2; D=$(mktemp -d)
TOKENS=$(python3 -c "print(','.join(f'bot{i}=token-{i}' for i in range(1000)))")
BOTMETRICS_TOKENS="$TOKENS" taskset -c 0 "$BIN" --listen 127.0.0.1:$PORT --database-url sqlite://$D/bm.db --metrics-cache-ttl 60s --data-dir $D 2>$D/log &
PID=$!
for _ in $(seq 100); do curl -s -o /dev/null 127.0.0.1:$PORT/healthz && break; sleep 0.1; done
curl -s -o /dev/null 127.0.0.1:$PORT/metrics
g=$(taskset -c 1 wrk -t1 -c4 -d4s -H 'Accept-Encoding: gzip' http://127.0.0.1:$PORT/metrics | awk '/Requests\/sec/ {print $2}')
p=$(taskset -c 1 wrk -t1 -c4 -d4s http://127.0.0.1:$PORT/metrics | awk '/Requests\/sec/ {print $2}')
echo "$g $p"
kill $PID; wait $PID 2>/dev/null; rm -rf $D
