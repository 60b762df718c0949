#!/usr/bin/env bash
# Keel's load benchmark. Usage: bench/run.sh [embedded|postgres|all]
# Measures, in one session: the bare Fastify baseline, Keel's authenticated project read and login
# in embedded (PGlite) and PostgreSQL modes, and pgbench running the read's primary-key SELECTs.
# Settings (environment): DURATION (s, default 15), CONNECTIONS (64), THREADS (2), USERS (200),
# PROJECTS (5 per user), PG_ADMIN_URL (postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-all}
DURATION=${DURATION:-15}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
USERS=${USERS:-200}
PROJECTS=${PROJECTS:-5}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
OUT=bench/out
PORT=8100
BASELINE_PORT=8101
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk"; exit 1; }

export SECRET_KEY=${SECRET_KEY:-$(head -c 32 /dev/urandom | base64 | tr -d '/+=' )}
export LOG_FORMAT=json LOG_LEVEL=info ENVIRONMENT=local
export RATE_LIMIT_LOGIN_PER_IP=1000000 RATE_LIMIT_LOGIN_PER_ACCOUNT=1000000
export FIRST_SUPERUSER_PASSWORD=bench-superuser-password

server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; server_pid=""; fi
}
bench_db=""
cleanup() {
  stop_server
  [ -n "$bench_db" ] && psql -w "$PG_ADMIN_URL" -qc "drop database if exists \"$bench_db\" with (force)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

wait_ready() {
  for _ in $(seq 1 120); do
    curl -fs "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server on port $1 did not start"; exit 1
}

# wrk NAME PORT SCRIPT DATA -> appends "| NAME | req/s | p50 | p99 | errors |" to the summary
measure() {
  local name=$1 port=$2 script=$3 data=$4
  wrk -t"$THREADS" -c"$CONNECTIONS" -d3s -s "$script" "http://127.0.0.1:$port" -- "$data" >/dev/null 2>&1 || true  # warm-up
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$script" "http://127.0.0.1:$port" -- "$data" >"$OUT/$name.txt"
  local rps p50 p99 errors
  rps=$(awk '/^Requests\/sec/ {print $2}' "$OUT/$name.txt")
  p50=$(awk '$1 == "50%" {print $2}' "$OUT/$name.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$OUT/$name.txt")
  errors=$(awk -F= '/^non2xx_or_errors/ {print $2}' "$OUT/$name.txt")
  printf '| %s | %s | %s | %s | %s |\n' "$name" "$rps" "$p50" "$p99" "$errors" | tee -a "$SUMMARY"
  eval "RPS_${name//-/_}=$rps"
}

start_keel() {  # start_keel LOGFILE COMMAND
  node --import tsx src/main.ts "$2" >"$1" 2>&1 &
  server_pid=$!
  wait_ready "$PORT"
}

{
  echo "## Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(node -v)"
  echo
  echo "wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s; $USERS users x $PROJECTS projects; random (token, project) per request"
  echo
  echo "| case | req/s | p50 | p99 | errors |"
  echo "| --- | --- | --- | --- | --- |"
} >"$SUMMARY"

# ---------------------------------------------------------------- baseline: bare Fastify
PORT=$BASELINE_PORT node --import tsx bench/baseline-server.ts &
server_pid=$!
wait_ready "$BASELINE_PORT"

if [ "$MODE" = all ] || [ "$MODE" = embedded ]; then
  rm -rf "$OUT/data-embedded"
  export DATA_DIR="$OUT/data-embedded"
  env -u DATABASE_URL node --import tsx bench/seed.ts --users "$USERS" --projects "$PROJECTS" --out "$OUT/embedded"
  measure baseline-fastify "$BASELINE_PORT" bench/wrk/get-project.lua "$OUT/embedded/requests.txt"
  stop_server
  PORT=$PORT start_keel "$OUT/server-embedded.log" start
  measure embedded-get-project "$PORT" bench/wrk/get-project.lua "$OUT/embedded/requests.txt"
  measure embedded-login "$PORT" bench/wrk/login.lua "$OUT/embedded/logins.txt"
  stop_server
  unset DATA_DIR
fi

if [ "$MODE" = all ] || [ "$MODE" = postgres ]; then
  if [ -z "$server_pid" ] && [ "$MODE" = postgres ]; then :; fi
  bench_db="keel_bench_$$"
  psql -w "$PG_ADMIN_URL" -qc "create database \"$bench_db\""
  export DATABASE_URL="${PG_ADMIN_URL%/*}/$bench_db"
  export DATA_DIR="$OUT/data-postgres"
  node --import tsx bench/seed.ts --users "$USERS" --projects "$PROJECTS" --out "$OUT/postgres"
  if [ "$MODE" = postgres ]; then
    measure baseline-fastify "$BASELINE_PORT" bench/wrk/get-project.lua "$OUT/postgres/requests.txt"
  fi
  stop_server
  PORT=$PORT start_keel "$OUT/server-postgres.log" api
  measure postgres-get-project "$PORT" bench/wrk/get-project.lua "$OUT/postgres/requests.txt"
  measure postgres-login "$PORT" bench/wrk/login.lua "$OUT/postgres/logins.txt"
  stop_server

  # The database's ceiling: the same two PK SELECTs per transaction, prepared, same client count.
  scripts=()
  for f in "$OUT"/postgres/pgbench/*.sql; do scripts+=(-f "$f"); done
  pgbench -n -M prepared -c "$CONNECTIONS" -j "$THREADS" -T 3 "${scripts[@]}" "$DATABASE_URL" >/dev/null 2>&1 || true
  pgbench -n -M prepared -c "$CONNECTIONS" -j "$THREADS" -T "$DURATION" "${scripts[@]}" "$DATABASE_URL" >"$OUT/pgbench.txt" 2>&1
  tps=$(awk '/^tps/ {print $3; exit}' "$OUT/pgbench.txt")
  lat=$(awk '/^latency average/ {print $4 $5}' "$OUT/pgbench.txt")
  printf '| pgbench (2 PK SELECTs/tx) | %s tps | avg %s | - | 0 |\n' "$tps" "$lat" | tee -a "$SUMMARY"
  {
    echo
    awk -v r="$RPS_postgres_get_project" -v t="$tps" -v b="$RPS_baseline_fastify" \
      'BEGIN { printf "PostgreSQL read: %.0f%% of pgbench, %.0f%% of the bare Fastify baseline\n", 100*r/t, 100*r/b }'
  } | tee -a "$SUMMARY"
fi

if [ -n "${RPS_embedded_get_project:-}" ]; then
  awk -v r="$RPS_embedded_get_project" -v b="$RPS_baseline_fastify" \
    'BEGIN { printf "Embedded read: %.0f%% of the bare Fastify baseline\n", 100*r/b }' | tee -a "$SUMMARY"
fi
echo "results: $SUMMARY"
