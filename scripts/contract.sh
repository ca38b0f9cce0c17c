#!/usr/bin/env bash
# The contract test (docs/api-contract.md): Schemathesis, a property-based tester, generates
# requests from the published OpenAPI document (`/openapi.json`) and checks every answer
# against it (status declared, content type, headers, schema; schema-valid input accepted,
# invalid input refused; a 5xx is always a failure). It runs against the debug binary on SQLite,
# then on PostgreSQL (a fresh database), as an admin (every operation), as a teacher and as a
# service (its API key, on the results operation); any
# failure makes the script exit non-zero. Called by scripts/test.sh after the Rust tests;
# runnable on its own:
#
#   scripts/contract.sh                      # both engines
#   CONTRACT_ENGINES=sqlite scripts/contract.sh
#   CONTRACT_EXAMPLES=200 CONTRACT_SEED=7 scripts/contract.sh
#
# Schemathesis is installed once into a virtualenv cached under ~/.cache/essayflow (PyPI only).
# Reports (JUnit XML, and an NDJSON event log that names every request) go to
# target/contract/<engine>-<role>/.
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION=4.32.5
VENV="$HOME/.cache/essayflow/schemathesis-$ST_VERSION"
BIN=${CONTRACT_BIN:-${CARGO_TARGET_DIR:-target}/debug/essayflow}
PG=${ESSAYFLOW_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432}
PORT=${CONTRACT_PORT:-18281}
# Examples per operation and phase, and the seed: a fixed seed makes every run send the same
# requests, so a failure reproduces; change it to explore further.
EXAMPLES=${CONTRACT_EXAMPLES:-60}
SEED=${CONTRACT_SEED:-20261130}
ENGINES=${CONTRACT_ENGINES:-sqlite postgres}
REPORTS=${CONTRACT_REPORT_DIR:-target/contract}
SECRET=contract-test-secret-contract-test-secret-0123

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/st" ] || ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$ST_VERSION"; then
  step "installing Schemathesis $ST_VERSION into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"
fi
[ -x "$BIN" ] || cargo build --quiet -p api --bin essayflow

WORK=$(mktemp -d)
SERVER=
cleanup() {
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# The server's settings for a run: rate limits off (docs/rate-limits.md: the fuzzer sends
# thousands of requests from one address), a cheap password hash (users are created by the
# hundred), a long-lived token, the in-process bus.
export ESSAYFLOW_JWT_SECRET=$SECRET ESSAYFLOW_LOG=${ESSAYFLOW_LOG:-warn}
export ESSAYFLOW_BIND=127.0.0.1:$PORT
export ESSAYFLOW_RATE_LIMIT_ENABLED=false
export ESSAYFLOW_AUTH_HASH_MEMORY_KIB=1024 ESSAYFLOW_AUTH_HASH_ITERATIONS=1
unset ESSAYFLOW_KAFKA_BROKERS ESSAYFLOW_OPS_BIND

# st_run NAME HEADER ARGS...: one Schemathesis run sending HEADER (the credential) with every
# request; its reports in $REPORTS/NAME.
st_run() {
  local name=$1 credential=$2
  shift 2
  local dir="$REPORTS/$name"
  rm -rf "$dir"
  mkdir -p "$dir"
  local status=0
  "$VENV/bin/st" --config-file tests/contract/schemathesis.toml run \
    "http://127.0.0.1:$PORT/openapi.json" \
    --checks all \
    --phases examples,coverage,fuzzing \
    --max-examples "$EXAMPLES" \
    --seed "$SEED" \
    --workers 1 \
    --header "$credential" \
    --request-timeout 30 \
    --report junit,ndjson --report-junit-path "$dir/junit.xml" --report-ndjson-path "$dir/events.ndjson" \
    --no-color \
    "$@" >"$dir/output.txt" 2>&1 || status=$?
  # The summary (the last lines name every failure and the reproducing curl commands).
  sed -n '/SUMMARY\|FAILURES\|Failures:/,$p' "$dir/output.txt" | tail -n 60
  echo "report: $dir/output.txt ($dir/junit.xml, $dir/events.ndjson)"
  return "$status"
}

run_engine() {
  local engine=$1 url=$2 failed=0
  export ESSAYFLOW_DATABASE_URL=$url ESSAYFLOW_DATA_DIR=$WORK/data-$engine
  echo "contract-admin-password" | "$BIN" users add --username contract_admin --role admin --password-stdin >/dev/null
  echo "contract-teacher-password" | "$BIN" users add --username contract_teacher --role teacher --password-stdin >/dev/null
  echo "contract-service-password" | "$BIN" users add --username contract_service --role service --password-stdin >/dev/null
  local admin teacher key
  admin=$("$BIN" token --username contract_admin --ttl-secs 7200)
  teacher=$("$BIN" token --username contract_teacher --ttl-secs 7200)
  key=$("$BIN" keys create --username contract_service --name contract 2>/dev/null | tail -n 1)
  "$BIN" serve >"$WORK/server-$engine.log" 2>&1 &
  SERVER=$!
  local up=
  for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null; then up=1; break; fi
    sleep 0.1
  done
  if [ -z "$up" ]; then
    echo "essayflow did not start:" >&2; cat "$WORK/server-$engine.log" >&2; exit 1
  fi
  local started=$SECONDS
  # GET /v1/ws is left out: it is a WebSocket handshake (docs/websocket.md, tests/tests/live.rs),
  # and an HTTP client cannot read past its 101.
  step "contract ($engine): as an admin, every operation but logout"
  st_run "$engine-admin" "Authorization: Bearer $admin" \
    --exclude-path /v1/auth/logout --exclude-path /v1/ws || failed=1
  step "contract ($engine): as a teacher"
  st_run "$engine-teacher" "Authorization: Bearer $teacher" \
    --exclude-path /v1/auth/logout --exclude-path /v1/ws || failed=1
  step "contract ($engine): as a service (API key), the results operation"
  st_run "$engine-service" "X-API-Key: $key" --include-path /v1/internal/results || failed=1
  # Last: logout ends the session the tokens above belong to.
  step "contract ($engine): logout"
  st_run "$engine-logout" "Authorization: Bearer $admin" --include-path /v1/auth/logout || failed=1
  echo "contract ($engine): $((SECONDS - started)) s"
  kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
  SERVER=
  if grep -q "panicked\|request failed" "$WORK/server-$engine.log"; then
    echo "the server logged a panic or an internal error:" >&2
    grep -B2 -A8 "panicked\|request failed" "$WORK/server-$engine.log" | head -n 60 >&2
    failed=1
  fi
  return "$failed"
}

failures=0
for engine in $ENGINES; do
  case $engine in
    sqlite) run_engine sqlite "sqlite:$WORK/contract.db" || failures=$((failures + 1)) ;;
    postgres)
      db=essayflow_contract_$$
      psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
      run_engine postgres "$PG/$db" || failures=$((failures + 1))
      psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db" >/dev/null || true
      ;;
    *) echo "unknown engine $engine" >&2; exit 2 ;;
  esac
done
if [ "$failures" -ne 0 ]; then
  echo "contract test FAILED on $failures engine(s); reports under $REPORTS/" >&2
  exit 1
fi
echo "contract test passed on: $ENGINES (reports under $REPORTS/)"
