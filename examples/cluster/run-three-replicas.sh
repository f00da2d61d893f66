#!/usr/bin/env bash
# Three botmetrics replicas in cluster mode on one machine: one Redis, one
# PostgreSQL, each replica on its own port with its own --data-dir (its
# journal). Put examples/cluster/nginx.conf in front of them (bots use
# http://127.0.0.1:8080) and scrape them with examples/cluster/prometheus.yml.
#
#   examples/cluster/run-three-replicas.sh        # Ctrl-C stops all three
#
# Needs botmetrics on PATH (or BOTMETRICS_BIN=target/release/botmetrics), a
# Redis at 127.0.0.1:6379 and a PostgreSQL at 127.0.0.1:5432 with a
# database "botmetrics" (createdb -h 127.0.0.1 -U postgres botmetrics; not
# "test", the test suite's own). Other servers:
#
#   REDIS_URL=redis://10.0.0.5:6379 DATABASE_URL=postgres://bm:secret@10.0.0.6/botmetrics examples/cluster/run-three-replicas.sh
#
# A Redis Cluster is given by several comma-separated seed URLs:
#   REDIS_URL=redis://10.0.0.1:7000,redis://10.0.0.2:7000,redis://10.0.0.3:7000
#
# On separate machines run one replica per machine with the same flags:
# each needs its own --data-dir only because they share a disk here.
set -euo pipefail

BIN=${BOTMETRICS_BIN:-botmetrics}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/botmetrics}
DATA_ROOT=${DATA_ROOT:-./botmetrics-cluster}   # replica N keeps its journal in $DATA_ROOT/replica-N
# Ingest tokens, bot=token pairs (the README's quick-start bot). Every
# replica needs the same ones. Beyond a demo, pass tokens and URLs with
# passwords as BOTMETRICS_TOKENS, BOTMETRICS_DATABASE_URL and
# BOTMETRICS_REDIS_URL in the environment instead: `ps` shows flags.
TOKENS=${TOKENS:-mybot=change-me}

command -v "$BIN" >/dev/null || { echo "no botmetrics at '$BIN': cargo install --path . or set BOTMETRICS_BIN" >&2; exit 1; }

PIDS=()
stop() {
    trap - INT TERM EXIT
    # SIGTERM: each replica finishes its requests, sends a last sync to
    # Redis, and the lease holder writes the cluster totals to PostgreSQL.
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait
}
trap stop INT TERM EXIT

for n in 1 2 3; do
    port=$((9463 + n))                      # 9464, 9465, 9466
    dir="$DATA_ROOT/replica-$n"
    mkdir -p "$dir"
    cmd=("$BIN"
        --listen "127.0.0.1:$port"
        --data-dir "$dir"
        --redis-url "$REDIS_URL"
        --database-url "$DATABASE_URL"
        --tokens "$TOKENS")
    "${cmd[@]}" >>"$dir/botmetrics.log" 2>&1 &
    PIDS+=("$!")
    echo "replica $n: http://127.0.0.1:$port  pid $!  log $dir/botmetrics.log"
    # To restart this replica by hand (after a kill -9, say), reuse the same
    # --data-dir: it replays its journal past what Redis confirmed.
    echo "  restart: ${cmd[*]}"
done

# Wait until every replica serves; a replica that exits at start (a bad
# --redis-url or --database-url) says why in one line of its log.
for n in 1 2 3; do
    port=$((9463 + n))
    for _ in $(seq 100); do
        curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && break
        if ! kill -0 "${PIDS[$((n - 1))]}" 2>/dev/null; then
            echo "replica $n exited:" >&2
            tail -n 5 "$DATA_ROOT/replica-$n/botmetrics.log" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "replica $n /readyz: $(curl -s "http://127.0.0.1:$port/readyz" || echo 'no answer')"
done

echo "three replicas up; Ctrl-C stops them (SIGTERM, final sync)"
wait
