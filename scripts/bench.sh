#!/usr/bin/env bash
# Benchmarks, all in one run so that every figure has its baseline from the same moment:
# accepted commands/s and latency at 1, 16 and 64 clients on PostgreSQL and SQLite, replay
# speed over at least 100 000 events, and pgbench single-row inserts at 64 clients on the same
# PostgreSQL database; then a pipeline run through Kafka (tansu, started here) with the
# development processor at zero latency, the relay's throughput re-publishing that log, and a
# raw rdkafka producer on the same broker as its baseline. Prints Markdown tables; copy them
# into BENCHMARKS.md. Then the WebSocket figures (essayflow-ws-bench): idle connections held
# by one node and the server's memory per connection, change latency under a command load
# with the HTTP 202 latency as its baseline, and fan-out to the subscribers of one batch; a
# bare tokio-tungstenite server (essayflow-ws-bench baseline-server) is the baseline for
# memory and fan-out.
#
#   scripts/bench.sh                 # defaults
#   DURATION=20 scripts/bench.sh     # seconds per concurrency level
#   ONLY=pipeline scripts/bench.sh   # only the pipeline and relay figures
#   ONLY=ws scripts/bench.sh         # only the WebSocket figures
#   ONLY=ws WS_CONNECTIONS=5000 WS_SUBSCRIBERS=1000 scripts/bench.sh   # a smaller WebSocket run
#   ONLY=latency scripts/bench.sh    # only the change latency, alone and beside a 1 000-essay class
#   ONLY=class scripts/bench.sh      # one class of 1 000 essays through ai_feedback, both engines
#   ONLY=class BASELINE_REV=e9627d3 scripts/bench.sh   # ... beside an earlier revision, same run
#   ONLY=growth scripts/bench.sh     # commands/s and replay at ~200 000 and ~1 000 000 events
#   ONLY=engines scripts/bench.sh    # only commands/s per engine and replay/rebuild beside load
#   ONLY=login scripts/bench.sh      # logins/s at the configured hashing cost; GET p99 beside a login flood
#   ONLY=mix scripts/bench.sh        # a realistic mix of teachers at 64 and 1 000 clients (PostgreSQL)
#   ONLY=mix BASELINE_REV=e4515ae scripts/bench.sh   # ... and the edge layers' overhead (below)
#   ONLY=edge BASELINE_REV=e4515ae scripts/bench.sh  # only the edge layers' overhead
#   ONLY=tracing scripts/bench.sh    # commands/s with trace export on (to a local OTLP sink) and off
#   ONLY=scrape scripts/bench.sh     # the cost of a /metrics scrape with 0 and 10 000 WebSockets open
#   ONLY=page scripts/bench.sh       # the web page in Chromium: change latency to its DOM, and its weight
#   ONLY=page PAGE_CHANGES=300 scripts/bench.sh   # ... over more rounds
#
# The page (ONLY=page, web/bench/page.ts, SQLite, HTTPS and WSS with a test CA; needs Node,
# web/node_modules (npm ci, run here if missing) and /usr/bin/chromium): a teacher signs in
# through the page and opens a batch; PAGE_CHANGES (100) times, the page POSTs one essay and
# times, after the 202, the change's arrival on a raw WebSocket of the same page (the baseline)
# and the moment the page's DOM shows the new version (it renders at most once per animation
# frame): p50 / p99 / max. Then the bytes of a first load of / with an empty cache, of signing
# in to the live dashboard and of a reload, per resource, on the wire and decoded.
# The mix (ONLY=mix, essayflow-mix-bench, PostgreSQL): MIX_CLIENTS (64, then 1 000) concurrent
# clients, each its own teacher (created with `essayflow users add`, a token each from
# `essayflow token`) on its own keep-alive connection, closed loop without think time
# (MIX_THINK_MS) for MIX_DURATION seconds (default DURATION): 90 % reads of their own batches
# (with ETags), the dashboard, the batch list and a batch's status, 10 % commands (one essay of
# ~2 000 words added to their open batch, or a new batch). Set-up (each teacher: a class batch
# of 3 such essays and an open batch, 32 teachers at a time) is timed apart. Reports
# requests/s, p50/p95/p99/max latency (all, reads, commands), answers by class, 429s, errors
# (anything but 2xx, 304 and 429, and transport errors) and the connections established;
# targets: p95 at most 100 ms, no errors. The generator shares the cores with the server.
# The edge layers' overhead (ONLY=edge, or within ONLY=mix when BASELINE_REV is set):
# commands/s at 64 clients (essayflow-bench, as in the engines' table) on this build and on
# BASELINE_REV (the revision before the edge layers), alternately, EDGE_ROUNDS (2) times each,
# each on a fresh PostgreSQL database; target: this build at most 10 % lower. essayflow-bench
# sends every command as one user, far over the default per-user budget (1 200 commands a
# minute): this build's server gets EDGE_SERVER_ENV (VAR=VALUE ...; default: a configuration
# file whose `standard` tier allows 4 294 967 295 reads and commands a second, so that the
# limiter still runs on every request but never refuses; ESSAYFLOW_RATE_LIMIT_ENABLED=false
# would take it out of the path).
# Trace export's cost (ONLY=tracing, PostgreSQL): commands/s at 64 clients (essayflow-bench)
# with every span exported over OTLP/HTTP (protobuf, batch processor) to a local receiver
# (essayflow-otlp-sink, which decodes and counts them) and with export off, alternately,
# TRACING_ROUNDS (2) times each, each on a fresh database; also the spans the sink received.
# Target: export on at most 10 % lower.
# The scrape run (ONLY=scrape, PostgreSQL, essayflow-ws-bench scrape): SCRAPES (200) sequential
# scrapes of /metrics on the operations listener with no WebSocket open (the baseline), then
# the same with SCRAPE_CONNECTIONS (10 000) WebSockets held, each subscribed to `dashboard`
# (the clients are a separate process); time to the whole answer and its bytes, p50 / p99 / max.
# The class run (ONLY=class): a batch of 1 000 essays of about 500 words, ai_feedback with the
# development processor at 0 ms: seconds from the request to `completed`, the database's growth
# over the run, and the bytes the live feed stored; a class of 100 as the same run's scaling
# baseline; with BASELINE_REV, the same on that revision (built once into target/baseline).
# The rebuild figures (in the engine runs): `essayflow replay` while 16 clients keep sending
# commands, beside the same replay with the server stopped. The growth run (ONLY=growth,
# PostgreSQL): commands/s at 64 clients and replay events/s with the log topped up to about
# 200 000, then about 1 000 000 events.
set -euo pipefail
cd "$(dirname "$0")/.."

# The load generators send far more than one teacher would (essayflow-bench sends every command
# as one user, the WebSocket run opens 19 000 connections as one user, the login run floods
# logins from one address): outside the mix and edge runs, which measure the limits themselves,
# users get the built-in `enterprise` tier (unlimited) and one user may hold every WebSocket.
# Earlier revisions (BASELINE_REV) ignore these variables.
export ESSAYFLOW_RATE_LIMIT_DEFAULT_TIER=${ESSAYFLOW_RATE_LIMIT_DEFAULT_TIER:-enterprise}
export ESSAYFLOW_WS_MAX_CONNECTIONS_PER_USER=${ESSAYFLOW_WS_MAX_CONNECTIONS_PER_USER:-100000}

DURATION=${DURATION:-10}
REPLAY_EVENTS=${REPLAY_EVENTS:-100000}
PORT=${PORT:-18181}
# Every server started here also serves /metrics and the detailed /readyz, without
# authentication, on this operations port (on the main port they need an admin).
OPS_PORT=${OPS_PORT:-18182}
export ESSAYFLOW_OPS_BIND=127.0.0.1:$OPS_PORT ESSAYFLOW_BENCH_METRICS_URL=http://127.0.0.1:$OPS_PORT
PG=${ESSAYFLOW_BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
# Both essayflow and the pgbench baseline talk to PostgreSQL over loopback without TLS.
PG_OPTS="sslmode=disable"
DB=essayflow_bench
SECRET=benchmark-secret-benchmark-secret-benchmark
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

ONLY=${ONLY:-all}
# SKIP_BUILD=1 uses the binaries already in target/release (built by an earlier run).
if [ -z "${SKIP_BUILD:-}" ]; then
  if [ "$ONLY" = page ]; then cargo build --release -q --bin essayflow; else cargo build --release -q -p api -p bench; fi
fi
BIN=target/release/essayflow
LOAD=target/release/essayflow-bench
LOGIN=target/release/essayflow-login-bench
PIPE=target/release/essayflow-pipeline-bench
WS=target/release/essayflow-ws-bench
MIX=target/release/essayflow-mix-bench
SINK=target/release/essayflow-otlp-sink
OUT="$WORK/results.md"

# The page run needs neither PostgreSQL nor the load generators.
[ "$ONLY" = page ] || psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null

field() { python3 -c "import json,sys; print(round(json.loads(sys.argv[1])[sys.argv[2]], 2))" "$1" "$2"; }

run_engine() {
  local engine=$1 url=$2
  export ESSAYFLOW_DATABASE_URL=$url ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
  export ESSAYFLOW_BIND=127.0.0.1:$PORT ESSAYFLOW_DATA_DIR=$WORK/data-$engine
  echo "benchpassword" | "$BIN" users add --username bench --role teacher --password-stdin >/dev/null
  local token
  token=$("$BIN" token --username bench --ttl-secs 86400)
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
  # A rebuild beside the live model, while 16 clients keep sending commands.
  for projection in batch_state dashboard; do
    "$LOAD" --url "http://127.0.0.1:$PORT" --token "$token" --clients 16 --duration 600 >"$WORK/load.json" & local load=$!
    local line
    line=$("$BIN" replay --projection "$projection" 2>/dev/null | tail -n 1)
    kill -INT "$load" 2>/dev/null; kill "$load" 2>/dev/null; wait "$load" 2>/dev/null || true
    echo "$engine beside load: $line" >&2
    printf '| %s | %s | beside 16 clients sending commands | %s |\n' "$engine" "$projection" "$line" >> "$OUT.replay"
  done
  kill "$server"; wait "$server" || true
  for projection in batch_state dashboard; do
    local line
    line=$("$BIN" replay --projection "$projection" 2>/dev/null | tail -n 1)
    echo "$engine $line" >&2
    printf '| %s | %s | server stopped (baseline) | %s |\n' "$engine" "$projection" "$line" >> "$OUT.replay"
  done
}

# ---- One class at real size (ONLY=class) ----
# class_run ENGINE URL BIN ESSAYS LABEL: one class through ai_feedback on a fresh database;
# appends a row to $OUT.class.
class_run() {
  local engine=$1 url=$2 bin=$3 essays=$4 label=$5 data="$WORK/class-$RANDOM"
  mkdir -p "$data"
  export ESSAYFLOW_DATABASE_URL=$url ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
  export ESSAYFLOW_BIND=127.0.0.1:$PORT ESSAYFLOW_DATA_DIR=$data
  export ESSAYFLOW_SIMULATE_PROCESSORS=true ESSAYFLOW_SIMULATOR_LATENCY_MS=0
  echo "benchpassword" | "$bin" users add --username bench --role teacher --password-stdin >/dev/null
  local token
  # Access tokens last 15 minutes by default now: a long one for the run (earlier revisions
  # have no --ttl-secs, and an hour by default).
  if [ "$bin" = "$BIN" ]; then
    token=$("$bin" token --username bench --ttl-secs 86400)
  else
    token=$("$bin" token --username bench)
  fi
  "$bin" serve & local server=$!
  wait_healthy
  local setup batch before r after
  setup=$("$PIPE" class-setup --url "http://127.0.0.1:$PORT" --token "$token" --essays "$essays")
  batch=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['batch_id'])" "$setup")
  before=$(db_size "$engine" "$url")
  r=$("$PIPE" class-run --url "http://127.0.0.1:$PORT" --token "$token" --batch "$batch")
  kill "$server"; wait "$server" 2>/dev/null || true
  after=$(db_size "$engine" "$url")
  local feed
  feed=$(feed_bytes "$engine" "$url")
  echo "class $engine $label $essays: $r growth $((after - before)) feed $feed" >&2
  printf '| %s | %s | %s | %s | %s | %s | %s ms (%s KB) / %s ms |\n' "$engine" "$label" "$essays" "$(field "$r" seconds)" \
    "$(python3 -c "print(round(($after - $before) / 1048576, 1))")" "$feed" \
    "$(field "$r" get_ms)" "$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['get_bytes'] // 1024)" "$r")" \
    "$(field "$r" get_304_ms)" >> "$OUT.class"
  unset ESSAYFLOW_SIMULATE_PROCESSORS ESSAYFLOW_SIMULATOR_LATENCY_MS
}

# db_size ENGINE URL: bytes of the database (SQLite: the file and its WAL).
db_size() {
  if [ "$1" = postgres ]; then
    psql "${2%%\?*}" -Atqc "SELECT pg_database_size(current_database())"
  else
    # Pages in use once the WAL is checkpointed into the file (the WAL file itself is
    # recycled, so its size says little).
    python3 -c "
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=30)
c.execute('PRAGMA wal_checkpoint(FULL)').fetchone()
pages, free, size = (c.execute(f'PRAGMA {p}').fetchone()[0] for p in ('page_count', 'freelist_count', 'page_size'))
print((pages - free) * size)" "${2#sqlite:}"
  fi
}

# feed_bytes ENGINE URL: "<changes> changes, <MB> MB" stored by the live feed (any revision's column).
feed_bytes() {
  local sql="SELECT coalesce(sum(last_version - version + 1), 0), coalesce(sum(length(patches)), 0) FROM live_changes"
  local old="SELECT count(*), coalesce(sum(length(data)), 0) FROM live_changes"
  if [ "$1" = postgres ]; then
    local out
    out=$(psql "${2%%\?*}" -Atqc "$sql" 2>/dev/null || psql "${2%%\?*}" -Atqc "$old")
    python3 -c "import sys; n, b = sys.argv[1].split('|'); print(f'{n} changes, {int(b) / 1048576:.1f} MB')" "$out"
  else
    python3 -c "
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
try: n, b = c.execute(sys.argv[2]).fetchone()
except sqlite3.OperationalError: n, b = c.execute(sys.argv[3]).fetchone()
print(f'{n} changes, {b / 1048576:.1f} MB')" "${2#sqlite:}" "$sql" "$old"
  fi
}

# The binary of BASELINE_REV (an earlier revision), built once into target/baseline.
baseline_bin() {
  local rev dir
  rev=$(git rev-parse --short "$BASELINE_REV")
  dir=target/baseline/$rev
  if [ ! -x "$dir/essayflow" ]; then
    rm -rf "$dir/src"; mkdir -p "$dir"
    git worktree add -f --detach "$dir/src" "$rev" >/dev/null 2>&1
    (cd "$dir/src" && CARGO_TARGET_DIR="$PWD/../../../baseline-target" cargo build --release -q -p api) >&2
    cp "target/baseline-target/release/essayflow" "$dir/essayflow"
    git worktree remove --force "$dir/src" >/dev/null 2>&1 || true
  fi
  echo "$dir/essayflow"
}

run_class() {
  local db=${DB}_class
  for engine in sqlite postgres; do
    local bins=("$BIN") labels=(this)
    if [ -n "${BASELINE_REV:-}" ]; then bins+=("$(baseline_bin)"); labels+=("$BASELINE_REV (baseline)"); fi
    for i in "${!bins[@]}"; do
      for essays in 100 1000; do
        local url
        if [ "$engine" = postgres ]; then
          psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
          url="$PG/$db?$PG_OPTS"
        else
          url="sqlite:$WORK/class-$RANDOM.db"
        fi
        class_run "$engine" "$url" "${bins[$i]}" "$essays" "${labels[$i]}"
      done
    done
  done
}

# ---- Logins (ONLY=login): logins/s at the configured argon2id cost, and GET p99 beside them ----
run_login() {
  for engine in postgres sqlite; do
    local url
    if [ "$engine" = postgres ]; then
      psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS ${DB}_login" -c "CREATE DATABASE ${DB}_login" >/dev/null
      url="$PG/${DB}_login?$PG_OPTS"
    else
      url="sqlite:$WORK/login.db"
    fi
    export ESSAYFLOW_DATABASE_URL=$url ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
    export ESSAYFLOW_BIND=127.0.0.1:$PORT ESSAYFLOW_DATA_DIR=$WORK/data-login-$engine
    echo "benchpassword" | "$BIN" users add --username bench --role teacher --password-stdin >/dev/null
    for i in $(seq 0 15); do
      echo "benchpassword" | "$BIN" users add --username "login$i" --role teacher --password-stdin >/dev/null
    done
    local token
    token=$("$BIN" token --username bench --ttl-secs 86400)
    # The flood comes from one address: the HTTP rate limits (a separate defence) would refuse
    # most of it before it reaches the hashing pool this run measures.
    ESSAYFLOW_RATE_LIMIT_ENABLED=false "$BIN" serve & local server=$!
    wait_healthy
    local r
    r=$("$LOGIN" --url "http://127.0.0.1:$PORT" --token "$token" --username-prefix login \
      --password benchpassword --readers 4 --loginers 16 --duration "$DURATION")
    kill "$server"; wait "$server" 2>/dev/null || true
    echo "login $engine: $r" >&2
    printf '| %s | %s | %s / %s | %s | %s / %s | %s / %s |\n' "$engine" "$(field "$r" logins_per_second)" \
      "$(field "$r" login_p50_ms)" "$(field "$r" login_p99_ms)" "$(field "$r" logins_refused)" \
      "$(field "$r" get_alone_p50_ms)" "$(field "$r" get_alone_p99_ms)" \
      "$(field "$r" get_beside_p50_ms)" "$(field "$r" get_beside_p99_ms)" >> "$OUT.login"
  done
}

# ---- Cost as the log grows (ONLY=growth, PostgreSQL) ----
run_growth() {
  local db=${DB}_growth
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
  export ESSAYFLOW_DATABASE_URL="$PG/$db?$PG_OPTS" ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
  export ESSAYFLOW_BIND=127.0.0.1:$PORT
  echo "benchpassword" | "$BIN" users add --username bench --role teacher --password-stdin >/dev/null
  local token
  token=$("$BIN" token --username bench --ttl-secs 86400)
  for size in ${GROWTH_SIZES:-200000 1000000}; do
    "$BIN" serve & local server=$!
    wait_healthy
    "$LOAD" --url "http://127.0.0.1:$PORT" --token "$token" --clients 64 --duration 3600 \
      --until-events "$size" >/dev/null
    local events r
    events=$(psql "$PG/$db" -Atqc "SELECT count(*) FROM events")
    r=$("$LOAD" --url "http://127.0.0.1:$PORT" --token "$token" --clients 64 --duration "$DURATION")
    kill "$server"; wait "$server" 2>/dev/null || true
    local replays=()
    for projection in batch_state dashboard; do
      local line
      line=$("$BIN" replay --projection "$projection" 2>/dev/null | tail -n 1)
      replays+=("$(python3 -c "import re,sys; m = re.search(r'\(([0-9]+) events/s\)', sys.argv[1]); print(m.group(1) if m else 'n/a')" "$line")")
    done
    echo "growth $events: $r replay ${replays[*]}" >&2
    printf '| %s | %s | %s | %s | %s |\n' "$events" "$(field "$r" commands_per_second)" "$(field "$r" p99_ms)" \
      "${replays[0]}" "${replays[1]}" >> "$OUT.growth"
  done
}

metric() { curl -s "http://127.0.0.1:$OPS_PORT/metrics" | awk -v name="$1" '$1 == name { print $2 }'; }

wait_healthy() {
  for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && return; sleep 0.05; done
  echo "essayflow did not start" >&2; exit 1
}

run_pipeline() {
  # shellcheck source=scripts/kafka.sh
  . scripts/kafka.sh
  ensure_tansu
  start_tansu
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS ${DB}_pipeline" -c "CREATE DATABASE ${DB}_pipeline" >/dev/null
  export ESSAYFLOW_DATABASE_URL="$PG/${DB}_pipeline?$PG_OPTS" ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
  export ESSAYFLOW_BIND=127.0.0.1:$PORT ESSAYFLOW_KAFKA_BROKERS=$ESSAYFLOW_TEST_KAFKA ESSAYFLOW_TOPIC_PREFIX=bench
  echo "benchpassword" | "$BIN" users add --username bench --role teacher --password-stdin >/dev/null
  local token
  token=$("$BIN" token --username bench --ttl-secs 86400)
  "$BIN" serve & local server=$!
  "$BIN" simulate-processors --latency-ms 0 >/dev/null 2>&1 & local processors=$!
  wait_healthy
  local r
  r=$("$PIPE" run --url "http://127.0.0.1:$PORT" --token "$token" --batches 100 --essays 30)
  echo "pipeline $r" >&2
  PIPELINE_ROW=$(printf '| 100 x 30, ai_feedback (3 phases) | %s | %s | %s | %s | %s |' "$(field "$r" essay_phases)" \
    "$(field "$r" seconds)" "$(field "$r" essay_phases_per_second)" "$(field "$r" p50_ms)" "$(field "$r" p99_ms)")
  kill "$processors" "$server"; wait "$processors" "$server" 2>/dev/null || true

  # Relay throughput: the same log published again from its start (no processor running).
  psql "$PG/${DB}_pipeline" -qc "UPDATE projection_checkpoints SET tx = 0, position = 0 WHERE name = 'relay'"
  export ESSAYFLOW_TOPIC_PREFIX=benchrelay
  # The lag is polled every 20 ms to time the relay: read it afresh on every scrape.
  ESSAYFLOW_OPS_CACHE_MS=0 "$BIN" serve & server=$!
  wait_healthy
  local started lag ended
  started=$(date +%s.%N)
  for _ in $(seq 1 6000); do
    lag=$(metric essayflow_relay_lag_events)
    [ "$lag" = "0" ] && break
    sleep 0.02
  done
  ended=$(date +%s.%N)
  local events messages bytes
  events=$(psql "$PG/${DB}_pipeline" -Atqc "SELECT count(*) FROM events")
  messages=$(metric essayflow_relay_published_total)
  bytes=$(metric essayflow_relay_published_bytes_total)
  kill "$server"; wait "$server" 2>/dev/null || true
  RELAY_ROW=$(python3 -c "
import sys; e, m, b, s = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[5]) - float(sys.argv[4])
print(f'| relay (log re-published) | {e} events, {m} messages, {b // m} B avg | {s:.2f} | {e / s:.0f} events/s, {m / s:.0f} messages/s |')
" "$events" "$messages" "$bytes" "$started" "$ended")
  echo "relay $RELAY_ROW" >&2
  r=$("$PIPE" raw-producer --brokers "$ESSAYFLOW_TEST_KAFKA" --topic "bench-raw-$RANDOM" --messages "$messages" --size $((bytes / messages)))
  echo "raw $r" >&2
  RAW_ROW=$(printf '| raw rdkafka producer (baseline) | %s messages, %s B | %s | %s messages/s |' "$messages" "$((bytes / messages))" \
    "$(field "$r" seconds)" "$(field "$r" messages_per_second)")
  unset ESSAYFLOW_KAFKA_BROKERS ESSAYFLOW_TOPIC_PREFIX
}

# ---- WebSocket (ONLY=ws) ----
WS_CONNECTIONS=${WS_CONNECTIONS:-50000}          # idle connections held
WS_LATENCY_CONNECTIONS=${WS_LATENCY_CONNECTIONS:-200}
WS_RATE=${WS_RATE:-1000}                         # commands/s in the latency run
WS_DURATION=${WS_DURATION:-20}                   # seconds of the latency run
WS_SUBSCRIBERS=${WS_SUBSCRIBERS:-10000}          # fan-out subscribers of one batch
WS_ROUNDS=${WS_ROUNDS:-5}
WS_PORT=${WS_PORT:-18182}                        # the baseline server
WS_TIMEOUT=${WS_TIMEOUT:-900}                    # seconds, per scenario

# wsfield JSON KEY: a figure, or n/a.
wsfield() {
  python3 -c "
import json, sys
try:
    v = json.loads(sys.argv[1]).get(sys.argv[2])
except Exception:
    v = None
print('n/a' if v is None else round(v, 2) if isinstance(v, float) else v)" "$1" "$2"
}

# ws_bench SCENARIO ARGS...: runs one scenario, bounded; its figures go to stderr, its JSON line
# to stdout. A failed check is reported, not fatal.
ws_bench() {
  local out status=0
  out=$(timeout "$WS_TIMEOUT" "$WS" "$@") || status=$?
  printf '%s\n' "$out" | sed '$d' >&2
  [ "$status" = 0 ] || echo "essayflow-ws-bench $1: exit $status (a check failed or it timed out; see above)" >&2
  printf '%s\n' "$out" | tail -n 1
}

run_ws() {
  # Every connection is a file descriptor on both sides (the server and the generator each get
  # this limit).
  ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  local limit
  limit=$(ulimit -n)
  if [ "$limit" != unlimited ]; then
    for var in WS_CONNECTIONS WS_SUBSCRIBERS; do
      if [ $((${!var} + 1000)) -gt "$limit" ]; then
        echo "ulimit -n is $limit (hard $(ulimit -Hn)): $var lowered from ${!var} to $((limit - 1000))" >&2
        printf -v "$var" '%s' $((limit - 1000))
      fi
    done
  fi
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS ${DB}_ws" -c "CREATE DATABASE ${DB}_ws" >/dev/null
  export ESSAYFLOW_DATABASE_URL="$PG/${DB}_ws?$PG_OPTS" ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
  export ESSAYFLOW_BIND=127.0.0.1:$PORT
  echo "benchpassword" | "$BIN" users add --username bench --role teacher --password-stdin >/dev/null
  ESSAYFLOW_BENCH_TOKEN=$("$BIN" token --username bench --ttl-secs 86400)
  export ESSAYFLOW_BENCH_TOKEN
  # The development processor runs for the class beside the latency load.
  ESSAYFLOW_SIMULATE_PROCESSORS=true ESSAYFLOW_SIMULATOR_LATENCY_MS=0 "$BIN" serve & local server=$!
  "$WS" baseline-server --port "$WS_PORT" & local baseline=$!
  wait_healthy
  local ef=(--url "http://127.0.0.1:$PORT") bl=(--url "http://127.0.0.1:$WS_PORT" --target baseline)
  # Each scenario binds its client sockets to its own source addresses (a new one every 20 000
  # connections), so that none waits for ports another one left in TIME_WAIT.
  local c_ef='' c_bl='' lat f_ef='' f_bl=''
  if [ "$ONLY" != latency ]; then
    c_ef=$(ws_bench connections "${ef[@]}" --connections "$WS_CONNECTIONS" --server-pid "$server" --source-address 127.0.0.1)
    c_bl=$(ws_bench connections "${bl[@]}" --connections "$WS_CONNECTIONS" --server-pid "$baseline" --source-address 127.0.1.1)
  fi
  lat=$(ws_bench latency "${ef[@]}" --connections "$WS_LATENCY_CONNECTIONS" --rate "$WS_RATE" --duration "$WS_DURATION" \
    --source-address 127.0.2.1)
  local lat_class
  lat_class=$(ws_bench latency "${ef[@]}" --connections "$WS_LATENCY_CONNECTIONS" --rate "$WS_RATE" --duration "$WS_DURATION" \
    --source-address 127.0.5.1 --beside-class 1000)
  if [ "$ONLY" != latency ]; then
    f_ef=$(ws_bench fanout "${ef[@]}" --subscribers "$WS_SUBSCRIBERS" --rounds "$WS_ROUNDS" --source-address 127.0.3.1)
    f_bl=$(ws_bench fanout "${bl[@]}" --subscribers "$WS_SUBSCRIBERS" --rounds "$WS_ROUNDS" --source-address 127.0.4.1)
  fi
  kill "$baseline" "$server"; wait "$baseline" "$server" 2>/dev/null || true
  {
    if [ "$ONLY" != latency ]; then
    echo "| WebSocket, one node, loopback | essayflow | bare tokio-tungstenite (baseline) |"
    echo "|---|---|---|"
    printf '| idle connections held (of %s) | %s | %s |\n' "$WS_CONNECTIONS" "$(wsfield "$c_ef" held)" "$(wsfield "$c_bl" held)"
    printf '| server memory per idle connection, KiB | %s | %s |\n' \
      "$(wsfield "$c_ef" kib_per_connection)" "$(wsfield "$c_bl" kib_per_connection)"
    printf '| connections failed to open / dropped while held | %s / %s | %s / %s |\n' \
      "$(wsfield "$c_ef" failed)" "$(wsfield "$c_ef" dropped)" "$(wsfield "$c_bl" failed)" "$(wsfield "$c_bl" dropped)"
    printf '| connections opened per second | %s | %s |\n' \
      "$(wsfield "$c_ef" connections_per_second)" "$(wsfield "$c_bl" connections_per_second)"
    printf '| fan-out to %s subscribers of one batch, median round: first / p50 / p99 / last ms | %s / %s / %s / %s | %s / %s / %s / %s |\n' \
      "$WS_SUBSCRIBERS" \
      "$(wsfield "$f_ef" median_first_ms)" "$(wsfield "$f_ef" median_p50_ms)" "$(wsfield "$f_ef" median_p99_ms)" "$(wsfield "$f_ef" median_last_ms)" \
      "$(wsfield "$f_bl" median_first_ms)" "$(wsfield "$f_bl" median_p50_ms)" "$(wsfield "$f_bl" median_p99_ms)" "$(wsfield "$f_bl" median_last_ms)"
    printf '| fan-out, worst of %s rounds: last subscriber ms | %s | %s |\n' "$WS_ROUNDS" \
      "$(wsfield "$f_ef" worst_last_ms)" "$(wsfield "$f_bl" worst_last_ms)"
    echo
    echo "Fan-out is timed from the command's 202 (essayflow) or from sending the trigger (baseline)."
    echo
    fi
    echo "| change latency, $WS_LATENCY_CONNECTIONS connections each on its own batch | commands/s (target $WS_RATE) | change after its 202 p50 / p99 / max ms | changes before the 202 | baseline: HTTP request to 202 p50 / p99 ms | missing changes |"
    echo "|---|---|---|---|---|---|"
    printf '| %s s of one-essay commands | %s | %s / %s / %s | %s | %s / %s | %s |\n' "$WS_DURATION" \
      "$(wsfield "$lat" commands_per_second)" "$(wsfield "$lat" change_p50_ms)" "$(wsfield "$lat" change_p99_ms)" \
      "$(wsfield "$lat" change_max_ms)" "$(wsfield "$lat" change_before_202)" "$(wsfield "$lat" http_p50_ms)" \
      "$(wsfield "$lat" http_p99_ms)" "$(wsfield "$lat" missing)"
    printf '| the same, beside a class of 1 000 essays running ai_feedback (%s s) | %s | %s / %s / %s | %s | %s / %s | %s |\n' \
      "$(wsfield "$lat_class" beside_class_seconds)" \
      "$(wsfield "$lat_class" commands_per_second)" "$(wsfield "$lat_class" change_p50_ms)" "$(wsfield "$lat_class" change_p99_ms)" \
      "$(wsfield "$lat_class" change_max_ms)" "$(wsfield "$lat_class" change_before_202)" "$(wsfield "$lat_class" http_p50_ms)" \
      "$(wsfield "$lat_class" http_p99_ms)" "$(wsfield "$lat_class" missing)"
  } > "$OUT.ws"
}

# ---- The cost of a scrape (ONLY=scrape, PostgreSQL) ----
SCRAPES=${SCRAPES:-200}
SCRAPE_CONNECTIONS=${SCRAPE_CONNECTIONS:-10000}

run_scrape() {
  ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS ${DB}_scrape" -c "CREATE DATABASE ${DB}_scrape" >/dev/null
  export ESSAYFLOW_DATABASE_URL="$PG/${DB}_scrape?$PG_OPTS" ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
  export ESSAYFLOW_BIND=127.0.0.1:$PORT
  echo "benchpassword" | "$BIN" users add --username bench --role teacher --password-stdin >/dev/null
  ESSAYFLOW_BENCH_TOKEN=$("$BIN" token --username bench --ttl-secs 86400)
  export ESSAYFLOW_BENCH_TOKEN
  "$BIN" serve & local server=$!
  wait_healthy
  local r
  r=$(ws_bench scrape --url "http://127.0.0.1:$PORT" --scrapes "$SCRAPES" --connections "$SCRAPE_CONNECTIONS" \
    --source-address 127.0.6.1)
  kill "$server"; wait "$server" 2>/dev/null || true
  python3 -c "
import json, sys
r = json.loads(sys.argv[1])
print('| /metrics scrape (operations listener, %d sequential scrapes) | p50 ms | p99 ms | max ms | bytes |' % r['scrapes'])
print('|---|---|---|---|---|')
for name, key in (('no WebSocket open (baseline)', 'idle'), ('%d WebSockets open' % r['connections'], 'busy')):
    f = r[key]
    print('| %s | %s | %s | %s | %d |' % (name, f['p50_ms'], f['p99_ms'], f['max_ms'], f['p50_bytes']))
" "$r" > "$OUT.scrape"
}

# ---- The web page in Chromium (ONLY=page) ----
# web/bench/page.ts starts its own server (the harness of clients/typescript/test: SQLite, TLS
# with a test CA, free ports) from this release binary; its last line of output is JSON, the
# lines before it are the Markdown tables.
run_page() {
  [ -d web/node_modules ] || (cd web && npm ci --no-audit --no-fund) >&2
  local r bin=$PWD/$BIN
  r=$(cd web && ESSAYFLOW_BIN=$bin node --import tsx bench/page.ts)
  echo "page: $(tail -n 1 <<<"$r")" >&2
  sed '$d' <<<"$r" > "$OUT.page"
}

# ---- A realistic mix of teachers (ONLY=mix, PostgreSQL) ----
MIX_CLIENTS=${MIX_CLIENTS:-64 1000}       # one run per count, in this order, on one server
MIX_DURATION=${MIX_DURATION:-$DURATION}   # seconds of load per run
MIX_THINK_MS=${MIX_THINK_MS:-0}           # think time between a client's answer and its next request
MIX_TIMEOUT=${MIX_TIMEOUT:-900}           # seconds per run, set-up included
MIX_ARGS=${MIX_ARGS:-}                    # more essayflow-mix-bench options, e.g. "--essays 1 --essay-words 500"

# mix_tokens N FILE: teachers mix1..mixN, created with the CLI (4 at a time, with a cheap
# password hash: nobody logs in with the password, the tokens come from `essayflow token`), and
# one access token each (valid a day: the default is 900 s), one per line, into FILE.
mix_tokens() {
  local n=$1 file=$2
  export ESSAYFLOW_AUTH_HASH_MEMORY_KIB=1024 ESSAYFLOW_AUTH_HASH_ITERATIONS=1
  # The first alone: it migrates the fresh database.
  echo benchpassword | "$BIN" users add --username mix1 --role teacher --password-stdin >/dev/null
  seq 2 "$n" | xargs -P 4 -I{} sh -c \
    'echo benchpassword | "$0" users add --username "mix$1" --role teacher --password-stdin >/dev/null' "$BIN" {}
  unset ESSAYFLOW_AUTH_HASH_MEMORY_KIB ESSAYFLOW_AUTH_HASH_ITERATIONS
  # Each token is one line, written at once into the pipe: lines do not interleave.
  seq 1 "$n" | xargs -P 4 -I{} "$BIN" token --username "mix{}" --ttl-secs 86400 | cat > "$file"
  if [ "$(wc -l < "$file")" != "$n" ]; then
    echo "mix: $(wc -l < "$file") tokens for $n teachers" >&2; exit 1
  fi
}

# mix_row JSON: a row of the mix's table.
mix_row() {
  python3 -c "
import json, sys
r = json.loads(sys.argv[1])
f = lambda k: 'n/a' if r.get(k) is None else (f'{r[k]:.2f}' if isinstance(r[k], float) else str(r[k]))
lat = lambda p: ' / '.join(f(p + k) for k in ('p50_ms', 'p95_ms', 'p99_ms'))
met = 'met' if r['p95_ms'] <= 100 and r['errors'] == 0 else 'not met'
print(f\"| {r['clients']} | {r['throughput_rps']:.0f} | {lat('')} / {f('max_ms')} | {lat('read_')} | {lat('command_')} \"
      f\"| {f('status_2xx')} / {f('status_304')} / {f('status_4xx')} / {f('status_5xx')} | {f('status_429')} \"
      f\"| {r['errors']} ({100 * r['error_rate']:.3f} %) | {met} | {f('connections_established')} | {r['setup_seconds']:.1f} s |\")
" "$1"
}

run_mix() {
  # Every client holds a connection: a file descriptor on both sides (the generator and the
  # server each get this limit).
  ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  local most=0 c
  for c in $MIX_CLIENTS; do [ "$c" -gt "$most" ] && most=$c; done
  local limit
  limit=$(ulimit -n)
  if [ "$limit" != unlimited ] && [ $((most + 1000)) -gt "$limit" ]; then
    echo "mix: ulimit -n is $limit (hard $(ulimit -Hn)), too few for $most clients" >&2
  fi
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS ${DB}_mix" -c "CREATE DATABASE ${DB}_mix" >/dev/null
  export ESSAYFLOW_DATABASE_URL="$PG/${DB}_mix?$PG_OPTS" ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
  export ESSAYFLOW_BIND=127.0.0.1:$PORT
  local started
  started=$(date +%s.%N)
  mix_tokens "$most" "$WORK/mix-tokens"
  echo "mix: $most teachers and their tokens created in $(python3 -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$started") s" >&2
  # The mix is what the limits are for: the default tier, as shipped.
  ESSAYFLOW_RATE_LIMIT_DEFAULT_TIER=standard "$BIN" serve & local server=$!
  wait_healthy
  for c in $MIX_CLIENTS; do
    local r status=0
    # shellcheck disable=SC2086
    r=$(timeout "$MIX_TIMEOUT" "$MIX" --url "http://127.0.0.1:$PORT" --tokens-file "$WORK/mix-tokens" \
      --clients "$c" --duration "$MIX_DURATION" --think-ms "$MIX_THINK_MS" $MIX_ARGS) || status=$?
    if [ "$status" != 0 ]; then
      echo "essayflow-mix-bench --clients $c: exit $status (the set-up failed or it timed out; see above)" >&2
      printf '| %s | failed (exit %s) |||||||||\n' "$c" "$status" >> "$OUT.mix"
      continue
    fi
    echo "mix $c: $r" >&2
    mix_row "$r" >> "$OUT.mix"
  done
  kill "$server"; wait "$server" 2>/dev/null || true
  if [ -n "${BASELINE_REV:-}" ]; then run_edge; fi
}

# ---- The edge layers' overhead (ONLY=edge; within ONLY=mix when BASELINE_REV is set) ----
run_edge() {
  if [ -z "${BASELINE_REV:-}" ]; then
    echo "ONLY=edge needs BASELINE_REV (the revision before the edge layers)" >&2; exit 1
  fi
  local base
  base=$(baseline_bin)
  local round label bin
  local this=() baseline=()
  # The per-user budgets raised out of reach (docs/rate-limits.md): see the header.
  printf '[rate_limit.tiers.standard]\nread = "4294967295/second"\ncommand = "4294967295/second"\n' \
    > "$WORK/edge-limits.toml"
  local server_env=${EDGE_SERVER_ENV-ESSAYFLOW_CONFIG=$WORK/edge-limits.toml ESSAYFLOW_RATE_LIMIT_DEFAULT_TIER=standard}
  for round in $(seq 1 "${EDGE_ROUNDS:-2}"); do
    for label in this "$BASELINE_REV"; do
      bin=$base
      [ "$label" = this ] && bin=$BIN
      psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS ${DB}_edge" -c "CREATE DATABASE ${DB}_edge" >/dev/null
      export ESSAYFLOW_DATABASE_URL="$PG/${DB}_edge?$PG_OPTS" ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
      export ESSAYFLOW_BIND=127.0.0.1:$PORT
      echo "benchpassword" | "$bin" users add --username bench --role teacher --password-stdin >/dev/null
      local token server
      # (Earlier revisions may have no --ttl-secs: their default then.)
      token=$("$bin" token --username bench --ttl-secs 86400 2>/dev/null || "$bin" token --username bench)
      if [ "$label" = this ]; then
        # shellcheck disable=SC2086
        env $server_env "$bin" serve & server=$!
      else
        "$bin" serve & server=$!
      fi
      wait_healthy
      "$LOAD" --url "http://127.0.0.1:$PORT" --token "$token" --clients 16 --duration 2 >/dev/null
      local r
      r=$("$LOAD" --url "http://127.0.0.1:$PORT" --token "$token" --clients 64 --duration "$DURATION")
      kill "$server"; wait "$server" 2>/dev/null || true
      echo "edge round $round $label: $r" >&2
      printf '| %s | %s | %s | %s | %s | %s |\n' "$round" "$label" "$(field "$r" commands_per_second)" \
        "$(field "$r" p50_ms)" "$(field "$r" p99_ms)" "$(field "$r" errors)" >> "$OUT.edge"
      if [ "$label" = this ]; then this+=("$(field "$r" commands_per_second)"); else baseline+=("$(field "$r" commands_per_second)"); fi
    done
  done
  python3 -c "
import sys
this, base = [float(x) for x in sys.argv[1].split()], [float(x) for x in sys.argv[2].split()]
t, b = sum(this) / len(this), sum(base) / len(base)
print(f'This build: {t:.0f} commands/s at 64 clients, {sys.argv[3]}: {b:.0f} (mean of {len(this)} round(s) each): '
      f'{100 * (t - b) / b:+.1f} % (target: at least -10 %).')
" "${this[*]}" "${baseline[*]}" "$BASELINE_REV" > "$OUT.edge-summary"
}

# ---- Trace export's cost (ONLY=tracing, PostgreSQL) ----
run_tracing() {
  local sink_port=${OTLP_SINK_PORT:-18190}
  "$SINK" --bind "127.0.0.1:$sink_port" & local sink=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$sink_port/count" >/dev/null && break; sleep 0.05; done
  local round label on=() off=()
  for round in $(seq 1 "${TRACING_ROUNDS:-2}"); do
    for label in off on; do
      psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS ${DB}_tracing" -c "CREATE DATABASE ${DB}_tracing" >/dev/null
      export ESSAYFLOW_DATABASE_URL="$PG/${DB}_tracing?$PG_OPTS" ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=warn
      export ESSAYFLOW_BIND=127.0.0.1:$PORT
      echo "benchpassword" | "$BIN" users add --username bench --role teacher --password-stdin >/dev/null
      local token server spans_before spans_after
      token=$("$BIN" token --username bench --ttl-secs 86400)
      spans_before=$(field "$(curl -sf "http://127.0.0.1:$sink_port/count")" spans)
      if [ "$label" = on ]; then
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink_port" "$BIN" serve & server=$!
      else
        "$BIN" serve & server=$!
      fi
      wait_healthy
      "$LOAD" --url "http://127.0.0.1:$PORT" --token "$token" --clients 16 --duration 2 >/dev/null
      local r
      r=$("$LOAD" --url "http://127.0.0.1:$PORT" --token "$token" --clients 64 --duration "$DURATION")
      # SIGTERM: the server drains, then flushes the spans still queued.
      kill "$server"; wait "$server" 2>/dev/null || true
      spans_after=$(field "$(curl -sf "http://127.0.0.1:$sink_port/count")" spans)
      echo "tracing round $round export $label: $r" >&2
      printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$round" "$label" "$(field "$r" commands_per_second)" \
        "$(field "$r" p50_ms)" "$(field "$r" p99_ms)" "$(field "$r" errors)" \
        "$(python3 -c "print(int(float('$spans_after') - float('$spans_before')))")" >> "$OUT.tracing"
      if [ "$label" = on ]; then on+=("$(field "$r" commands_per_second)"); else off+=("$(field "$r" commands_per_second)"); fi
    done
  done
  kill "$sink"; wait "$sink" 2>/dev/null || true
  python3 -c "
import sys
on, off = [float(x) for x in sys.argv[1].split()], [float(x) for x in sys.argv[2].split()]
a, b = sum(on) / len(on), sum(off) / len(off)
print(f'Export on: {a:.0f} commands/s at 64 clients, export off: {b:.0f} (mean of {len(on)} round(s) each): '
      f'{100 * (a - b) / b:+.1f} % (target: at least -10 %).')
" "${on[*]}" "${off[*]}" > "$OUT.tracing-summary"
}

if [ "$ONLY" = all ] || [ "$ONLY" = engines ]; then
  run_engine postgres "$PG/$DB?$PG_OPTS"
  run_engine sqlite "sqlite:$WORK/bench.db"
fi
if [ "$ONLY" = all ] || [ "$ONLY" = class ]; then
  run_class
fi
if [ "$ONLY" = growth ]; then
  run_growth
fi
if [ "$ONLY" = all ] || [ "$ONLY" = login ]; then
  run_login
fi
if [ "$ONLY" = all ] || [ "$ONLY" = pipeline ]; then
  run_pipeline

  # Baseline: pgbench single-row inserts at 64 clients on the same database, same run.
  psql "$PG/$DB" -qc "CREATE TABLE IF NOT EXISTS pgbench_single_insert (id bigserial PRIMARY KEY, payload text)"
  echo "INSERT INTO pgbench_single_insert (payload) VALUES ('x');" > "$WORK/insert.sql"
  PGB=$(pgbench -n -c 64 -j 2 -T "$DURATION" -f "$WORK/insert.sql" "$PG/$DB?$PG_OPTS" 2>/dev/null | grep -E '^tps' | head -n 1)
fi
if [ "$ONLY" = all ] || [ "$ONLY" = ws ] || [ "$ONLY" = latency ]; then
  run_ws
fi
if [ "$ONLY" = scrape ]; then
  run_scrape
fi
if [ "$ONLY" = mix ]; then
  run_mix
fi
if [ "$ONLY" = edge ]; then
  run_edge
fi
if [ "$ONLY" = tracing ]; then
  run_tracing
fi
if [ "$ONLY" = page ]; then
  run_page
fi

{
  echo "Run on $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, ${DURATION}s per level."
  echo
  if [ "$ONLY" = all ] || [ "$ONLY" = engines ]; then
    echo "| engine | clients | accepted commands/s | p50 ms | p99 ms | errors |"
    echo "|---|---|---|---|---|---|"
    cat "$OUT.load"
    echo
    echo "| engine | projection | while | replay |"
    echo "|---|---|---|---|"
    cat "$OUT.replay"
    echo
  fi
  if [ -f "$OUT.class" ]; then
    echo "| engine | revision | essays | request -> completed, s | database growth, MB | live feed stored | GET the batch (size) / with its ETag (304), median |"
    echo "|---|---|---|---|---|---|---|"
    cat "$OUT.class"
    echo
  fi
  if [ -f "$OUT.login" ]; then
    echo "| engine | logins/s (16 clients, argon2id at the configured cost) | login p50 / p99 ms | logins refused | baseline: GET the batch alone, p50 / p99 ms | GET beside the logins, p50 / p99 ms |"
    echo "|---|---|---|---|---|---|"
    cat "$OUT.login"
    echo
  fi
  if [ -f "$OUT.growth" ]; then
    echo "| events in the store (PostgreSQL) | commands/s at 64 clients | p99 ms | replay batch_state events/s | replay dashboard events/s |"
    echo "|---|---|---|---|---|"
    cat "$OUT.growth"
    echo
  fi
  if [ "$ONLY" = all ] || [ "$ONLY" = pipeline ]; then
    echo "| pipeline run (PostgreSQL, Kafka, development processor at 0 ms) | essay-phases | seconds | essay-phases/s | PipelineRequested -> PipelineCompleted p50 ms | p99 ms |"
    echo "|---|---|---|---|---|---|"
    echo "$PIPELINE_ROW"
    echo
    echo "| publisher | what | seconds | throughput |"
    echo "|---|---|---|---|"
    echo "$RELAY_ROW"
    echo "$RAW_ROW"
    echo
    echo "Baseline (same run, same database): pgbench single-row INSERT, 64 clients: $PGB"
  fi
  if [ -f "$OUT.ws" ]; then
    [ "$ONLY" = ws ] || echo
    cat "$OUT.ws"
  fi
  if [ -f "$OUT.scrape" ]; then
    cat "$OUT.scrape"
    echo
  fi
  if [ -f "$OUT.page" ]; then
    cat "$OUT.page"
  fi
  if [ -f "$OUT.mix" ]; then
    echo "| clients (PostgreSQL, 90 % reads, 10 % commands, ${MIX_DURATION} s, think ${MIX_THINK_MS} ms) | requests/s | all p50 / p95 / p99 / max ms | reads p50 / p95 / p99 ms | commands p50 / p95 / p99 ms | 2xx / 304 / 4xx / 5xx | 429 | errors (rate) | p95 <= 100 ms, 0 errors | connections | set-up |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    cat "$OUT.mix"
    echo
  fi
  if [ -f "$OUT.edge" ]; then
    echo "| round | build | commands/s at 64 clients (PostgreSQL) | p50 ms | p99 ms | errors |"
    echo "|---|---|---|---|---|---|"
    cat "$OUT.edge"
    echo
    cat "$OUT.edge-summary"
  fi
  if [ -f "$OUT.tracing" ]; then
    echo "| round | trace export | commands/s at 64 clients (PostgreSQL) | p50 ms | p99 ms | errors | spans exported |"
    echo "|---|---|---|---|---|---|---|"
    cat "$OUT.tracing"
    echo
    cat "$OUT.tracing-summary"
  fi
} | tee "$OUT"
