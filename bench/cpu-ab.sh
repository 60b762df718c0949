#!/usr/bin/env bash
# Node CPU per request of the authenticated project read, two checkouts A/B, interleaved.
#   bash bench/cpu-ab.sh <checkout A> <checkout B>     (e.g. a worktree of the base commit, and .)
# Each checkout gets its own PostgreSQL database, seeded by its own bench/seed.ts, and its own
# `keel api`. Then, ROUNDS times, A then B: wrk (after a warm-up) fires GET /api/v1/projects/{id}
# with bearer tokens while the server's user+system CPU is read from /proc before and after;
# CPU / requests is the figure. A noisy shared machine hits both alike; compare medians.
# Settings: ROUNDS (3), DURATION (s, 8), CONNECTIONS (64), THREADS (2), USERS (100), PROJECTS (5),
# PG_ADMIN_URL (postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bench/cpu-ab.sh <checkout A> <checkout B>"; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
USERS=${USERS:-100}
PROJECTS=${PROJECTS:-5}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
OUT=$HERE/out/cpu-ab
mkdir -p "$OUT"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk"; exit 1; }
export SECRET_KEY=${SECRET_KEY:-$(head -c 32 /dev/urandom | base64 | tr -d '/+=')}
export LOG_FORMAT=json LOG_LEVEL=info ENVIRONMENT=local FIRST_SUPERUSER_PASSWORD=bench-superuser-password
TICKS=$(getconf CLK_TCK)

roots=("$(cd "$1" && pwd)" "$(cd "$2" && pwd)")
names=(A B)
ports=(8110 8111)
pids=()
dbs=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for db in "${dbs[@]}"; do psql -w "$PG_ADMIN_URL" -qc "drop database if exists \"$db\" with (force)" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

for i in 0 1; do
  db="keel_cpu_ab_$$_$i"
  dbs+=("$db")
  psql -w "$PG_ADMIN_URL" -qc "create database \"$db\""
  url="${PG_ADMIN_URL%/*}/$db"
  (cd "${roots[$i]}" && DATABASE_URL=$url DATA_DIR="$OUT/data-$i" node --import tsx bench/seed.ts --users "$USERS" --projects "$PROJECTS" --out "$OUT/seed-$i" >/dev/null)
  (cd "${roots[$i]}" && exec env DATABASE_URL="$url" DATA_DIR="$OUT/data-$i" PORT="${ports[$i]}" node --import tsx src/main.ts api >"$OUT/server-$i.log" 2>&1) &
  pids+=($!)
done
for i in 0 1; do
  for _ in $(seq 1 120); do curl -fs "http://127.0.0.1:${ports[$i]}/health" >/dev/null 2>&1 && break; sleep 0.5; done
done

# The node process itself (the subshell exec'd into it).
printf 'round\tcheckout\trequests\treq_per_s\tcpu_us_per_request\n' | tee "$OUT/raw.tsv"
for round in $(seq 1 "$ROUNDS"); do
  for i in 0 1; do
    port=${ports[$i]} pid=${pids[$i]} data="$OUT/seed-$i/requests.txt"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s "$HERE/wrk/get-project.lua" "http://127.0.0.1:$port" -- "$data" >/dev/null 2>&1 || true
    before=$(cpu_ticks "$pid")
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -s "$HERE/wrk/get-project.lua" "http://127.0.0.1:$port" -- "$data" >"$OUT/wrk-$round-$i.txt"
    after=$(cpu_ticks "$pid")
    requests=$(awk '/requests in/ {print $1}' "$OUT/wrk-$round-$i.txt")
    rps=$(awk '/^Requests\/sec/ {print $2}' "$OUT/wrk-$round-$i.txt")
    errors=$(awk -F= '/^non2xx_or_errors/ {print $2}' "$OUT/wrk-$round-$i.txt")
    [ "${errors:-0}" = 0 ] || { echo "checkout ${names[$i]}: $errors failed requests"; exit 1; }
    us=$(awk -v t=$((after - before)) -v hz="$TICKS" -v n="$requests" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
    printf '%s\t%s\t%s\t%s\t%s\n' "$round" "${names[$i]}" "$requests" "$rps" "$us" | tee -a "$OUT/raw.tsv"
  done
done
awk -F'\t' 'NR > 1 {v[$2] = v[$2] " " $5; r[$2] = r[$2] " " $4}
  END {for (k in v) {n = split(v[k], a, " "); asort(a); split(r[k], b, " "); asort(b);
    printf "checkout %s: median %.1f µs of Node CPU per request (runs:%s), median %.0f req/s\n", k, a[int((n + 1) / 2)], v[k], b[int((n + 1) / 2)]}}' "$OUT/raw.tsv"
