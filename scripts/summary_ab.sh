#!/usr/bin/env bash
# Uncached /v1/summary of one binary: 1,000 bots filled as scripts/render_ab.sh
# fills them, --summary-cache-ttl 0s, 30 requests; prints the server-side ms
# per render (botmetrics_render_duration_seconds{endpoint="summary"}) and the
# median request wall time in ms. Server pinned to core 0.
# Usage: scripts/summary_ab.sh BINARY PORT (run two binaries in turn, pair by pair).
BIN=$1; PORT=$2; D=$(mktemp -d)
TOKENS=$(python3 -c "print(','.join(f'bot{i}=token-{i}' for i in range(1000)))")
BOTMETRICS_TOKENS="$TOKENS" taskset -c 0 "$BIN" --listen 127.0.0.1:$PORT --database-url sqlite://$D/bm.db --metrics-cache-ttl 0s --summary-cache-ttl 0s --data-dir $D 2>$D/log &
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
for i in $(seq 3); do curl -s -o /dev/null 127.0.0.1:$PORT/metrics; done
get() { curl -s 127.0.0.1:$PORT/metrics | grep "botmetrics_render_duration_seconds_$1{endpoint=\"summary\"}" | awk '{print $2}'; }
s0=$(get sum); c0=$(get count)
w=$(for i in $(seq 30); do curl -s -o /dev/null -w '%{time_total}\n' 127.0.0.1:$PORT/v1/summary; done | sort -n | sed -n 15p)
s1=$(get sum); c1=$(get count)
python3 -c "print(f'{($s1-$s0)/($c1-$c0)*1000:.2f} {$w*1000:.2f}')"
kill $PID; wait $PID 2>/dev/null; rm -rf $D
