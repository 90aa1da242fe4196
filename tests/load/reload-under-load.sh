#!/usr/bin/env bash
# Zero failed requests while the manager reloads and scales under load.
#
# 4 workers of examples/hello behind nodeherd, oha sending load for 25 s
# (once with keep-alive, once with a new connection per request), while the
# manager reloads three times and scales 4 → 8 → 2 → 4 over D-Bus. Every
# failed request, connection error, reset or non-2xx answer counts; requests
# cut off by the end of the run ("aborted due to deadline") do not.
#
# Usage: tests/load/reload-under-load.sh [path/to/nodeherd]
# LOAD_APP=tests/apps/slow.js runs an app that takes 400 ms to listen and
# stops itself on SIGINT with server.close() (its own handler).
# It runs with the default balance (auto: here one shared accept queue,
# steered) and keep-alive rebalancing; LOAD_BALANCE=queue runs it with one
# plain shared queue, LOAD_BALANCE=reuseport with a socket per slot.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/nodeherd}
DURATION=${LOAD_SECONDS:-25}
APP=${LOAD_APP:-examples/hello/app.js}
[ -x "$BIN" ] || cargo build --release --quiet
command -v oha >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
command -v oha >/dev/null || cargo install oha --locked --quiet

work=$(mktemp -d /tmp/nodeherd-load.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.2
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=lib.sh
. tests/load/lib.sh
private_bus

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# A generous listen_timeout: this test is about failed requests, and on a
# loaded 2-core machine a node worker may take seconds to boot.
"$BIN" run "$APP" --name load -i 4 --listen "127.0.0.1:$port" --bus "$BUS" \
  --listen-timeout 15000 --balance "${LOAD_BALANCE:-auto}" \
  >"$work/manager.log" 2>&1 &
pids+=("$!")
ctl() {
  if ! "$BIN" "$@" --bus "$BUS"; then
    echo "FAILED: nodeherd $*"
    failures=$((failures + 1))
  fi
}

failures=0
ready() { "$BIN" status load --json --bus "$BUS" 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["ready_workers"], d["state"])'; }
for _ in $(seq 1 200); do
  [ "$(ready 2>/dev/null || true)" = "4 ready" ] && break
  sleep 0.05
done
[ "$(ready)" = "4 ready" ] || { echo "manager did not come up"; cat "$work/manager.log"; exit 1; }

run_case() {
  local label=$1; shift
  local json="$work/oha-$label.json"
  oha -z "${DURATION}s" -c 32 --no-tui --output-format json "$@" "http://127.0.0.1:$port/" >"$json" &
  local oha_pid=$!
  pids+=("$oha_pid")
  sleep 3
  ctl reload load; sleep 2
  ctl scale load 8; sleep 2
  ctl reload load; sleep 2
  ctl scale load 2; sleep 2
  ctl scale load 4; sleep 2
  ctl reload load
  wait "$oha_pid"
  oha_verdict "$json" "$label" || failures=$((failures + 1))
}

run_case keep-alive
run_case new-connection --disable-keepalive
grep -c "reload finished" "$work/manager.log" | xargs -I{} echo "reloads completed: {}"
if [ "$failures" -ne 0 ]; then
  echo "manager log:"; tail -50 "$work/manager.log"
  echo "0 passed, $failures failed"
  exit 1
fi
echo "2 passed, 0 failed"
