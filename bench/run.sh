#!/usr/bin/env bash
# Keel's load benchmark. Usage: bench/run.sh [embedded|postgres|all]
# In one session, interleaved in ROUNDS so that a noisy machine affects every case alike:
#   - baseline: a bare Fastify route answering the same JSON from memory (bench/baseline-server.ts)
#   - Keel: GET /api/v1/projects/{id} with a bearer token (random user and project per request)
#     and POST /api/v1/login/access-token, in embedded (PGlite) and PostgreSQL modes
#   - pgbench: the read's primary-key SELECTs (user by id + project by id) per transaction,
#     prepared, at several client counts; the best is the database's ceiling on this machine.
# Settings (environment): ROUNDS (3), DURATION (s, 10), CONNECTIONS (64), THREADS (2), USERS (200),
# PROJECTS (5 per user), PGBENCH_CLIENTS ("8 16 64"), PG_ADMIN_URL (postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-all}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
USERS=${USERS:-200}
PROJECTS=${PROJECTS:-5}
PGBENCH_CLIENTS=${PGBENCH_CLIENTS:-8 16 64}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
OUT=bench/out
PORT=8100
BASELINE_PORT=8101
mkdir -p "$OUT"
RAW="$OUT/raw.tsv"     # case <TAB> req/s <TAB> p50 <TAB> p99 <TAB> errors, one line per measurement
SUMMARY="$OUT/summary.md"
: >"$RAW"

if ! command -v wrk >/dev/null || ! command -v pgbench >/dev/null; then
  # Both come from Debian packages; install them when we can.
  [ "$(id -u)" = 0 ] && { apt-get update -qq && apt-get install -y -qq wrk postgresql-contrib >/dev/null; }
fi
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk"; exit 1; }
command -v pgbench >/dev/null || { echo "pgbench is missing: apt-get install -y postgresql-contrib"; exit 1; }

export SECRET_KEY=${SECRET_KEY:-$(head -c 32 /dev/urandom | base64 | tr -d '/+=')}
export LOG_FORMAT=json LOG_LEVEL=info ENVIRONMENT=local
export RATE_LIMIT_LOGIN_PER_IP=1000000 RATE_LIMIT_LOGIN_PER_ACCOUNT=1000000
export FIRST_SUPERUSER_PASSWORD=bench-superuser-password

pids=()
bench_db=""
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "$bench_db" ] && psql -w "$PG_ADMIN_URL" -qc "drop database if exists \"$bench_db\" with (force)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

wait_up() {
  for _ in $(seq 1 120); do curl -fs "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "server on port $1 did not start"; exit 1
}
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  pids=()
}

# measure CASE PORT SCRIPT DATA: one wrk run (after a 3 s warm-up) appended to $RAW
measure() {
  local name=$1 port=$2 script=$3 data=$4 file="$OUT/$1.txt"
  wrk -t"$THREADS" -c"$CONNECTIONS" -d3s -s "$script" "http://127.0.0.1:$port" -- "$data" >/dev/null 2>&1 || true
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$script" "http://127.0.0.1:$port" -- "$data" >"$file"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" \
    "$(awk '/^Requests\/sec/ {print $2}' "$file")" "$(awk '$1 == "50%" {print $2}' "$file")" \
    "$(awk '$1 == "99%" {print $2}' "$file")" "$(awk -F= '/^non2xx_or_errors/ {print $2}' "$file")" | tee -a "$RAW"
}

pgbench_run() {  # pgbench_run CLIENTS
  local scripts=() file="$OUT/pgbench-c$1.txt"
  for f in "$OUT"/postgres/pgbench/*.sql; do scripts+=(-f "$f"); done
  pgbench -n -M prepared -c "$1" -j "$THREADS" -T "$DURATION" "${scripts[@]}" "$DATABASE_URL" >"$file" 2>&1
  printf 'pgbench-c%s\t%s\t%s\t-\t0\n' "$1" "$(awk '/^tps/ {print $3; exit}' "$file")" \
    "$(awk '/^latency average/ {print $4 $5}' "$file")" | tee -a "$RAW"
}

start_keel() {  # start_keel LOGFILE COMMAND
  node --import tsx src/main.ts "$2" >"$1" 2>&1 &
  pids+=($!)
  wait_up "$PORT"
}
start_baseline() {
  PORT=$BASELINE_PORT node --import tsx bench/baseline-server.ts &
  pids+=($!)
  wait_up "$BASELINE_PORT"
}

if [ "$MODE" = all ] || [ "$MODE" = embedded ]; then
  rm -rf "$OUT/data-embedded"
  export DATA_DIR="$OUT/data-embedded"
  env -u DATABASE_URL node --import tsx bench/seed.ts --users "$USERS" --projects "$PROJECTS" --out "$OUT/embedded"
  start_baseline
  PORT=$PORT start_keel "$OUT/server-embedded.log" start
  for _ in $(seq 1 "$ROUNDS"); do
    measure baseline-fastify "$BASELINE_PORT" bench/wrk/get-project.lua "$OUT/embedded/requests.txt"
    measure embedded-get-project "$PORT" bench/wrk/get-project.lua "$OUT/embedded/requests.txt"
  done
  measure embedded-login "$PORT" bench/wrk/login.lua "$OUT/embedded/logins.txt"
  stop_all
  unset DATA_DIR
fi

if [ "$MODE" = all ] || [ "$MODE" = postgres ]; then
  bench_db="keel_bench_$$"
  psql -w "$PG_ADMIN_URL" -qc "create database \"$bench_db\""
  export DATABASE_URL="${PG_ADMIN_URL%/*}/$bench_db"
  export DATA_DIR="$OUT/data-postgres"
  node --import tsx bench/seed.ts --users "$USERS" --projects "$PROJECTS" --out "$OUT/postgres"
  start_baseline
  PORT=$PORT start_keel "$OUT/server-postgres.log" api
  for _ in $(seq 1 "$ROUNDS"); do
    measure baseline-fastify "$BASELINE_PORT" bench/wrk/get-project.lua "$OUT/postgres/requests.txt"
    measure postgres-get-project "$PORT" bench/wrk/get-project.lua "$OUT/postgres/requests.txt"
    for c in $PGBENCH_CLIENTS; do pgbench_run "$c"; done
  done
  measure postgres-login "$PORT" bench/wrk/login.lua "$OUT/postgres/logins.txt"
  stop_all
fi

node bench/summarize.mjs "$RAW" >"$SUMMARY"
cat "$SUMMARY"
