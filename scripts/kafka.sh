# Sourced by scripts/test.sh and scripts/bench.sh: builds (once, cached) and starts the
# Kafka-compatible broker tansu, in memory, on a free port of 127.0.0.1.
#   ensure_tansu   -> sets TANSU_BIN (builds it when missing: about 20 minutes on 2 cores)
#   start_tansu    -> starts a broker (pid in TANSU_PID; the caller stops it), exports
#                     ESSAYFLOW_TEST_KAFKA=127.0.0.1:PORT

TANSU_VERSION=0.6.0
TANSU_ROOT="${ESSAYFLOW_TANSU_ROOT:-$HOME/.cache/essayflow/tansu-$TANSU_VERSION}"
TANSU_BIN="$TANSU_ROOT/bin/tansu"
export ESSAYFLOW_TANSU_BIN="$TANSU_BIN"

ensure_tansu() {
  if [ -x "$TANSU_BIN" ]; then return; fi
  printf '\n==> building the tansu broker %s (first run only; about 20 minutes)\n' "$TANSU_VERSION"
  CARGO_TARGET_DIR="$HOME/.cache/essayflow/tansu-target" \
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore --root "$TANSU_ROOT"
  rm -rf "$HOME/.cache/essayflow/tansu-target"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_tansu() {
  local port log
  port=$(free_port)
  log="${TMPDIR:-/tmp}/essayflow-tansu-$port.log"
  "$TANSU_BIN" broker --storage-engine memory://tansu/ \
    --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    >"$log" 2>&1 &
  TANSU_PID=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      export ESSAYFLOW_TEST_KAFKA="127.0.0.1:$port"
      echo "tansu broker on $ESSAYFLOW_TEST_KAFKA (log: $log)"
      return
    fi
    sleep 0.1
  done
  echo "tansu did not start; see $log" >&2
  exit 1
}
