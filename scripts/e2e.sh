#!/usr/bin/env bash
# End-to-end test of the monitoring stack: the botmetrics release binary, a
# real Prometheus scraping it every second with the shipped alert rules,
# about 20 s of simulated bot traffic (whose exact counts Prometheus must
# hold, with no alert pending), then every PromQL expression of every
# dashboard panel and every rule evaluated through Prometheus' HTTP API, and
# the BotHighErrorRate alert driven until it is pending (shipped rule) and
# firing (a copy with `for: 1s`). Needs python3 and Debian's `prometheus`.
#
#   BOTMETRICS_BIN=target/release/botmetrics scripts/e2e.sh
#
# botmetrics stores into a temporary SQLite file. With
# E2E_POSTGRES_URL=postgres://user@host:port/dbname it uses a fresh
# PostgreSQL database instead (created beside dbname, dropped at the end;
# the role needs CREATEDB) and also runs the dashboards' SQL history panel
# against it with psql.
#
# With E2E_REDIS_URL=redis://127.0.0.1:<port> botmetrics runs in cluster mode
# on that Redis (--sync-interval 1s) and the Redis / sync panels and the
# cluster alerts' operands must return data too; without it they are
# reported as skipped. Give it a private, empty Redis (e.g.
# `redis-server --port 6390 --save '' --appendonly no`): the run writes the
# bots' cluster totals and dedupe claims into it.
#
# Exits non-zero on any failure; everything it starts is stopped on exit.
# Takes about 30 s; each step has its own time limit, and the whole run is
# cut at $E2E_TIME_LIMIT seconds (170 by default).
set -euo pipefail

# Re-run under timeout(1): on expiry it signals this script's whole process
# group (botmetrics, Prometheus, the simulators), then the EXIT trap cleans up.
if [ -z "${E2E_UNDER_TIMEOUT:-}" ]; then
    E2E_UNDER_TIMEOUT=1 exec timeout -k 10 "${E2E_TIME_LIMIT:-170}" "$0" "$@"
fi

cd "$(dirname "$0")/.."
REPO=$PWD
BIN=${BOTMETRICS_BIN:-target/release/botmetrics}
# The bot and token of the README's quick start (README.md, dashboards/README.md).
BOT=mybot
TOKEN=change-me
# Loopback only: never send the test's requests through a proxy.
export no_proxy=127.0.0.1,localhost NO_PROXY=127.0.0.1,localhost

[ -x "$BIN" ] || { echo "e2e: no executable botmetrics at $BIN: build it (cargo build --release) or set BOTMETRICS_BIN" >&2; exit 1; }
for tool in prometheus promtool python3; do
    command -v "$tool" >/dev/null || { echo "e2e: $tool is required (apt-get install prometheus python3)" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/botmetrics-e2e.XXXXXX")
PIDS=()
PG_DB=
cleanup() {
    local status=$?
    trap - EXIT
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "$PG_DB" ]; then
        psql "$E2E_POSTGRES_URL" -Xqc "drop database if exists $PG_DB with (force)" || true
    fi
    if [ "$status" -ne 0 ]; then
        echo "--- e2e failed (exit $status); last lines of the logs:"
        for log in botmetrics prometheus; do
            echo "--- $log.log"
            tail -n 25 "$WORK/$log.log" 2>/dev/null || true
        done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n== %s\n' "$*"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

BM_PORT=$(free_port)
PROM_PORT=$(free_port)
BM=http://127.0.0.1:$BM_PORT
PROM=http://127.0.0.1:$PROM_PORT
CHECK=(python3 "$REPO/scripts/e2e_check.py")

DATABASE=sqlite://$WORK/botmetrics.db
PSQL_ARGS=()
if [ -n "${E2E_POSTGRES_URL:-}" ]; then
    command -v psql >/dev/null || { echo "e2e: E2E_POSTGRES_URL needs psql" >&2; exit 1; }
    PG_DB=botmetrics_e2e_$$
    psql "$E2E_POSTGRES_URL" -Xqc "create database $PG_DB"
    DATABASE=${E2E_POSTGRES_URL%/*}/$PG_DB
    PSQL_ARGS=(--psql-url "$DATABASE")
fi

REDIS_ARGS=()
CLUSTER_ARGS=()
if [ -n "${E2E_REDIS_URL:-}" ]; then
    REDIS_ARGS=(--redis-url "$E2E_REDIS_URL" --sync-interval 1s)
    CLUSTER_ARGS=(--cluster)
fi

step "botmetrics on $BM ($BIN, ${DATABASE%%:*}${E2E_REDIS_URL:+, cluster mode on $E2E_REDIS_URL})"
# Short intervals so that flushes, history writes and cache expiry all
# happen within the run; the TTL matches the 1 s scrape interval, as the
# shipped config matches 30 s with 30 s.
"$BIN" --listen "127.0.0.1:$BM_PORT" --tokens "$BOT=$TOKEN,otherbot=secret2" \
    --database-url "$DATABASE" --metrics-cache-ttl 1s \
    --flush-interval 1s --history-interval 2s "${REDIS_ARGS[@]}" >"$WORK/botmetrics.log" 2>&1 &
PIDS+=("$!")
"${CHECK[@]}" wait-http "$BM/readyz" 20

step "Prometheus on $PROM, scraping every 1 s, with prometheus/rules.yml"
promtool check rules prometheus/rules.yml >/dev/null
# A copy of BotHighErrorRate with `for: 1s`, so the test also sees it fire.
"${CHECK[@]}" short-for-rules prometheus/rules.yml BotHighErrorRate "$WORK/rules-e2e.yml"
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $REPO/prometheus/rules.yml
  - $WORK/rules-e2e.yml
scrape_configs:
  - job_name: botmetrics
    static_configs:
      - targets: ["127.0.0.1:$BM_PORT"]
EOF
promtool check config "$WORK/prometheus.yml" >/dev/null
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PIDS+=("$!")
"${CHECK[@]}" wait-http "$PROM/-/ready" 30

step "20 s of simulated traffic (two bots), and one request of each rejected kind"
# --speed 1440: the 20 s play about 8 hours of a bot's day. Each simulator
# writes what it sent (--counts), which Prometheus must then hold exactly.
timeout 60 python3 clients/python/simulate.py --url "$BM" --token "$TOKEN" \
    --users 300 --speed 1440 --duration 20 --seed 1 --counts "$WORK/counts-$BOT.json" &
SIM1=$!
PIDS+=("$SIM1")
timeout 60 python3 clients/python/simulate.py --url "$BM" --token secret2 \
    --users 80 --speed 1440 --duration 20 --seed 2 --quiet --counts "$WORK/counts-otherbot.json" &
SIM2=$!
PIDS+=("$SIM2")
sleep 2
timeout 30 "${CHECK[@]}" reject --url "$BM" --token "$TOKEN"
wait "$SIM1"
wait "$SIM2"

step "Prometheus holds exactly what the simulators sent, and no alert fires on their ordinary traffic"
timeout 30 "${CHECK[@]}" counts --prom "$PROM" --bot "$BOT" --counts "$WORK/counts-$BOT.json"
timeout 30 "${CHECK[@]}" counts --prom "$PROM" --bot otherbot --counts "$WORK/counts-otherbot.json"
sleep 2  # a rule evaluation on the last scrape
timeout 30 "${CHECK[@]}" no-alerts --prom "$PROM"

step "Failing LLM calls until BotHighErrorRate is pending (and the for: 1s copy firing)"
timeout 90 python3 clients/python/simulate.py --url "$BM" --token "$TOKEN" \
    --users 300 --speed 1440 --duration 60 --seed 3 --failure-rate 0.9 --quiet &
STORM=$!
PIDS+=("$STORM")
timeout 70 "${CHECK[@]}" wait-alert --prom "$PROM" --alert BotHighErrorRate --bot "$BOT" \
    --rules-file "$REPO/prometheus/rules.yml" --timeout 45
kill "$STORM" 2>/dev/null || true

step "Every dashboard and rule expression through $PROM/api/v1/query"
sleep 2  # one more scrape and rule evaluation
timeout 90 "${CHECK[@]}" check --prom "$PROM" --bot "$BOT" --rules-file "$REPO/prometheus/rules.yml" \
    "${PSQL_ARGS[@]}" "${CLUSTER_ARGS[@]}" dashboards/bot-overview.json dashboards/botmetrics-internals.json

step "dashboards/README.md's Prometheus command: the shipped prometheus.yml, temporary storage"
README_PROM_PORT=$(free_port)
# As written in the README, plus a free port instead of the default 9090.
prometheus --config.file=prometheus.yml --storage.tsdb.path="$(mktemp -d "$WORK/readme-prom.XXXXXX")" \
    --web.listen-address="127.0.0.1:$README_PROM_PORT" --log.level=warn >"$WORK/readme-prometheus.log" 2>&1 &
PIDS+=("$!")
"${CHECK[@]}" wait-http "http://127.0.0.1:$README_PROM_PORT/-/ready" 30
python3 - "http://127.0.0.1:$README_PROM_PORT/api/v1/rules" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    groups = {g["name"] for g in json.load(r)["data"]["groups"]}
want = {"botmetrics.recording", "botmetrics.bot.alerts", "botmetrics.self.alerts"}
assert want <= groups, f"shipped prometheus.yml loaded {groups}, want {want}"
print("PASS  shipped prometheus.yml loads", ", ".join(sorted(want)))
PY
