#!/usr/bin/env bash
# Benchmarks, all in one run so that every figure has its baseline from the same moment:
# accepted commands/s and latency at 1, 16 and 64 clients on PostgreSQL and SQLite, replay
# speed over at least 100 000 events, and pgbench single-row inserts at 64 clients on the same
# PostgreSQL database. Prints a Markdown table; copy it into BENCHMARKS.md.
#
#   scripts/bench.sh                 # defaults
#   DURATION=20 scripts/bench.sh     # seconds per concurrency level
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
REPLAY_EVENTS=${REPLAY_EVENTS:-100000}
PORT=${PORT:-18181}
PG=${ESSAYFLOW_BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
# Both essayflow and the pgbench baseline talk to PostgreSQL over loopback without TLS.
PG_OPTS="sslmode=disable"
DB=essayflow_bench
SECRET=benchmark-secret-benchmark-secret-benchmark
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

cargo build --release -q -p api -p bench
BIN=target/release/essayflow
LOAD=target/release/essayflow-bench
OUT="$WORK/results.md"

psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null

field() { python3 -c "import json,sys; print(round(json.loads(sys.argv[1])[sys.argv[2]], 2))" "$1" "$2"; }

run_engine() {
  local engine=$1 url=$2
  export ESSAYFLOW_DATABASE_URL=$url ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
  export ESSAYFLOW_BIND=127.0.0.1:$PORT ESSAYFLOW_DATA_DIR=$WORK/data-$engine
  echo "benchpassword" | "$BIN" users add --username bench --role teacher --password-stdin >/dev/null
  local token
  token=$("$BIN" token --username bench)
  "$BIN" serve & local server=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
  # Warm-up.
  "$LOAD" --url "http://127.0.0.1:$PORT" --token "$token" --clients 16 --duration 2 >/dev/null
  for clients in 1 16 64; do
    local r
    r=$("$LOAD" --url "http://127.0.0.1:$PORT" --token "$token" --clients "$clients" --duration "$DURATION")
    echo "$engine $clients $r" >&2
    printf '| %s | %s | %s | %s | %s | %s |\n' "$engine" "$clients" "$(field "$r" commands_per_second)" \
      "$(field "$r" p50_ms)" "$(field "$r" p99_ms)" "$(field "$r" errors)" >> "$OUT.load"
  done
  # Top the log up to the replay size.
  "$LOAD" --url "http://127.0.0.1:$PORT" --token "$token" --clients 64 --duration 600 \
    --until-events "$REPLAY_EVENTS" >/dev/null
  kill "$server"; wait "$server" || true
  for projection in batch_state dashboard; do
    local line
    line=$("$BIN" replay --projection "$projection" 2>/dev/null | tail -n 1)
    echo "$engine $line" >&2
    printf '| %s | %s | %s |\n' "$engine" "$projection" "$line" >> "$OUT.replay"
  done
}

run_engine postgres "$PG/$DB?$PG_OPTS"
run_engine sqlite "sqlite:$WORK/bench.db"

# Baseline: pgbench single-row inserts at 64 clients on the same database, same run.
psql "$PG/$DB" -qc "CREATE TABLE IF NOT EXISTS pgbench_single_insert (id bigserial PRIMARY KEY, payload text)"
echo "INSERT INTO pgbench_single_insert (payload) VALUES ('x');" > "$WORK/insert.sql"
PGB=$(pgbench -n -c 64 -j 2 -T "$DURATION" -f "$WORK/insert.sql" "$PG/$DB?$PG_OPTS" 2>/dev/null | grep -E '^tps' | head -n 1)

{
  echo "Run on $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, ${DURATION}s per level."
  echo
  echo "| engine | clients | accepted commands/s | p50 ms | p99 ms | errors |"
  echo "|---|---|---|---|---|---|"
  cat "$OUT.load"
  echo
  echo "| engine | projection | replay |"
  echo "|---|---|---|"
  cat "$OUT.replay"
  echo
  echo "Baseline (same run, same database): pgbench single-row INSERT, 64 clients: $PGB"
} | tee "$OUT"
