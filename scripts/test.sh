#!/usr/bin/env bash
# The one test command (README, CI): makes sure PostgreSQL runs and a Kafka-compatible broker
# (tansu, built once and cached under ~/.cache/essayflow) is started, then checks formatting,
# lints, checks the Prometheus alert rules (promtool), and runs every test (unit, property and
# integration, on PostgreSQL, SQLite and Kafka), then the TypeScript client's and the page's checks
# and tests (Node, and Debian's Chromium, installed if missing) and the contract test.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_HOST=127.0.0.1
PG_PORT=5432
export ESSAYFLOW_TEST_PG_URL="${ESSAYFLOW_TEST_PG_URL:-postgres://postgres@${PG_HOST}:${PG_PORT}}"

step() { printf '\n==> %s\n' "$*"; }
CARGO_DENY_VERSION=0.20.2

ensure_postgres() {
  if pg_isready -h "$PG_HOST" -p "$PG_PORT" -q 2>/dev/null; then return; fi
  step "starting PostgreSQL"
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  local version
  version=$(ls /etc/postgresql | sort -n | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 60); do
    pg_isready -h "$PG_HOST" -p "$PG_PORT" -q && return
    sleep 0.5
  done
  echo "PostgreSQL did not become ready on $PG_HOST:$PG_PORT" >&2
  exit 1
}

ensure_postgres
# Databases left by earlier runs (each test creates its own).
psql "$ESSAYFLOW_TEST_PG_URL/postgres" -Atqc \
  "SELECT 'DROP DATABASE ' || quote_ident(datname) || ';' FROM pg_database WHERE datname LIKE 'essayflow_test_%'" \
  | psql "$ESSAYFLOW_TEST_PG_URL/postgres" -q >/dev/null

# shellcheck source=scripts/kafka.sh
. scripts/kafka.sh
ensure_tansu
step "starting the tansu broker"
start_tansu
trap 'kill "$TANSU_PID" 2>/dev/null || true' EXIT

if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

step "promtool: the alert rules and their unit tests"
if ! command -v promtool >/dev/null 2>&1; then
  # promtool comes with Debian's prometheus package.
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo deny (licences, bans, sources; deny.toml)"
if ! cargo deny --version 2>/dev/null | grep -q "^cargo-deny $CARGO_DENY_VERSION"; then
  step "installing cargo-deny $CARGO_DENY_VERSION (first run only)"
  cargo install cargo-deny --version "$CARGO_DENY_VERSION" --locked
fi
# Errors only: the duplicate-version warnings are many, and come from dependencies.
cargo deny --log-level error check licenses bans sources
# Advisories need the RustSec database, fetched from GitHub: checked when it can be reached,
# reported as skipped when it cannot (never passed silently).
if timeout 20 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  cargo deny check advisories
else
  echo "cargo deny check advisories: SKIPPED (the RustSec advisory database on GitHub cannot be reached from here)"
fi

step "tests"
# Tests that run the binary as separate server processes (two nodes, the CLI) use this build.
cargo build --quiet -p api --bin essayflow
cargo nextest run --workspace --no-fail-fast

step "TypeScript client and web page (clients/typescript, web): drift, types, Node and browser tests"
# Debian's Chromium for the browser tests (playwright-core drives it; nothing is downloaded) and
# certutil, which puts the test CA in the browser's trust store.
if ! command -v "${CHROMIUM:-/usr/bin/chromium}" >/dev/null 2>&1 || ! command -v certutil >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libnss3-tools >/dev/null
fi
(cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error)
(cd web && npm ci --no-audit --no-fund --loglevel=error)
# The committed client equals a fresh generation from this build's `essayflow openapi` and the
# WebSocket schemas; both packages type-check.
(cd clients/typescript && npm run --silent check)
(cd web && npm run --silent check)
# The committed page (web/dist, embedded in the binary) equals a fresh build of web/src.
fresh_dist=$(mktemp -d)
(cd web && npx vite build --logLevel error --outDir "$fresh_dist" --emptyOutDir)
if ! diff -r web/dist "$fresh_dist"; then
  echo "web/dist differs from a fresh build of web/src: run \`npm run build\` in web/ and commit web/dist" >&2
  exit 1
fi
rm -rf "$fresh_dist"
(cd clients/typescript && npm test)
# Screenshots of each step go to web/test-results/ (or $ARTIFACTS_DIR).
(cd web && npm test)

step "contract test (Schemathesis against /openapi.json, both engines; docs/api-contract.md)"
scripts/contract.sh
