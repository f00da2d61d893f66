#!/usr/bin/env bash
# /metrics render time of one binary: 1,000 bots with a little traffic each
# (10 users and a priced response per bot), then 30 uncached gzip scrapes;
# prints the server-side milliseconds per render (botmetrics_render_duration_seconds).
# The server is pinned to core 0 (SERVER_CPUS=0,1 lets it use both, as a
# large render and its gzip do). Usage: scripts/render_ab.sh BINARY PORT
# Run two binaries in turn, pair by pair, to compare them on a noisy machine.
BIN=$1; PORT=$2
D=$(mktemp -d)
TOKENS=$(python3 -c "print(','.join(f'bot{i}=token-{i}' for i in range(1000)))")
BOTMETRICS_TOKENS="$TOKENS" taskset -c "${SERVER_CPUS:-0}" "$BIN" --listen 127.0.0.1:$PORT --database-url sqlite://$D/bm.db --metrics-cache-ttl 0s --data-dir $D 2>$D/log &
PID=$!
for _ in $(seq 100); do curl -s -o /dev/null 127.0.0.1:$PORT/healthz && break; sleep 0.1; done
python3 - $PORT <<'PY'
import json, sys, urllib.request
port=sys.argv[1]
for i in range(1000):
    body=json.dumps([{"type":"message","role":"user","user_id":u} for u in range(10)]+[{"type":"response","status":"success","duration_ms":300,"model":"gpt-4o","tokens":{"prompt":10,"completion":5}}]).encode()
    r=urllib.request.Request(f"http://127.0.0.1:{port}/v1/events",data=body,headers={"Authorization":f"Bearer token-{i}","Content-Type":"application/json"})
    urllib.request.urlopen(r).read()
PY
get() { curl -s 127.0.0.1:$PORT/metrics | grep "botmetrics_render_duration_seconds_$1{endpoint=\"metrics\"}" | awk '{print $2}'; }
for i in $(seq 5); do curl -s -o /dev/null -H 'Accept-Encoding: gzip' 127.0.0.1:$PORT/metrics; done
s0=$(get sum); c0=$(get count)
for i in $(seq 30); do curl -s -o /dev/null -H 'Accept-Encoding: gzip' 127.0.0.1:$PORT/metrics; done
s1=$(get sum); c1=$(get count)
python3 -c "print(f'{($s1-$s0)/($c1-$c0)*1000:.2f}')"
kill $PID; wait $PID 2>/dev/null; rm -rf $D
