#!/usr/bin/env bash
# Per-worker share of requests: nodeherd's balance modes (auto, the default:
# the steered shared queue; queue: the shared queue alone; reuseport: one
# SO_REUSEPORT socket per slot), each with
# keep-alive connections shared out evenly (the default) and without
# (--no-rebalance, mode "+fixed"), side by side in one run: A B C D A B ...,
# medians and min-max. Then, for each balance mode given (not the base- and
# +fixed variants), failed requests while scaling 6 -> 2 -> 6 under load
# (keep-alive on and off).
#
# Usage: bench/balance.sh [--rounds N] [--seconds S] [--workers N] [--modes "queue reuseport ..."]
#                         [--base-bin PATH] [--no-scale]
# A mode written "base-MODE" runs MODE with the binary given by --base-bin (an
# earlier build), for an A/B of two builds in one run; --no-scale skips the
# scaling runs. Prints a markdown table; traffic goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
ROUNDS=3 SECS=10 WORKERS=4 MODES="auto queue queue+fixed reuseport reuseport+fixed" BASE_BIN="" SCALE=1
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --base-bin) BASE_BIN=$2; shift 2 ;;
    --no-scale) SCALE=0; shift ;;
    *) echo "usage: $0 [--rounds N] [--seconds S] [--workers N] [--modes \"queue reuseport ...\"] [--base-bin PATH] [--no-scale]" >&2; exit 2 ;;
  esac
done
case " $MODES" in
  *" base-"*) [ -x "$BASE_BIN" ] || { echo "FATAL: a base-MODE needs --base-bin PATH, an executable (got '${BASE_BIN}')" >&2; exit 2; } ;;
esac
command -v oha >/dev/null || cargo install oha --locked --quiet
cargo build --release --quiet
BIN=target/release/nodeherd
work=$(mktemp -d /tmp/nodeherd-balance.XXXXXX)
mgr=""
cleanup() {
  [ -n "$mgr" ] && kill -TERM "$mgr" 2>/dev/null || true
  [ -n "$mgr" ] && wait "$mgr" 2>/dev/null || true
  [ -n "${DBUS_PID:-}" ] && kill -TERM "$DBUS_PID" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
die() { echo "FATAL: $*" >&2; exit 1; }
# shellcheck source=lib/tools.sh
. bench/lib/tools.sh
RUN=$work bench_bus

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One measurement: mode, keep-alive on/off -> "req_per_s max_over_min shares"
measure() {
  local mode=$1 ka=$2 port counts fixed=() bin=$BIN
  case $mode in
    base-*) bin=$BASE_BIN; mode=${mode#base-} ;;
  esac
  port=$(free_port)
  counts="$work/counts-$mode-$ka"
  rm -rf "$counts"; mkdir -p "$counts"
  [ "${mode#*+}" = fixed ] && fixed=(--no-rebalance)
  BENCH_COUNT_DIR=$counts "$bin" run bench/apps/hello.js -i "$WORKERS" --balance "${mode%+*}" "${fixed[@]}" \
    --listen "127.0.0.1:$port" --no-bus >"$work/manager.log" 2>&1 &
  mgr=$!
  for _ in $(seq 1 300); do
    [ "$(grep -c ' ready (pid' "$work/manager.log" || true)" -ge "$WORKERS" ] && break
    sleep 0.05
  done
  oha -z 2s -c 64 --no-tui --output-format json http://127.0.0.1:$port/ >/dev/null 2>&1 || true
  python3 - "$counts" >"$work/before.json" <<'PY'
import json, os, sys, time
def read(p):
    for _ in range(50):  # a worker may be rewriting the file right now
        try:
            return json.load(open(p))["count"]
        except ValueError:
            time.sleep(0.01)
    raise SystemExit(f"cannot read {p}")
d = sys.argv[1]
print(json.dumps({f: read(os.path.join(d, f)) for f in os.listdir(d)}))
PY
  local flag=""
  [ "$ka" = off ] && flag=--disable-keepalive
  oha -z "${SECS}s" -c 64 --no-tui --output-format json $flag "http://127.0.0.1:$port/" >"$work/oha.json"
  sleep 0.4
  python3 - "$counts" "$work/before.json" "$work/oha.json" <<'PY'
import json, os, sys, time
def read(p):
    for _ in range(50):  # a worker may be rewriting the file right now
        try:
            return json.load(open(p))["count"]
        except ValueError:
            time.sleep(0.01)
    raise SystemExit(f"cannot read {p}")
d, before, oha = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
now = {f: read(os.path.join(d, f)) for f in os.listdir(d)}
per = sorted(now[f] - before.get(f, 0) for f in now)
total = sum(per)
print(f"{oha['summary']['requestsPerSec']:.0f} {per[-1] / max(per[0], 1):.2f} {'/'.join(f'{100 * p / total:.0f}' for p in per)}")
PY
  kill -TERM "$mgr"; wait "$mgr" 2>/dev/null || true; mgr=""
}

# Scale 6 -> 2 -> 6 under `oha -c 64` for 9 s: mode, keep-alive -> "failed total"
scale_under_load() {
  local mode=$1 ka=$2 port flag=()
  port=$(free_port)
  [ "$ka" = off ] && flag=(--disable-keepalive)
  "$BIN" run bench/apps/hello.js --name scaled -i 6 --balance "$mode" \
    --listen "127.0.0.1:$port" --bus "$BUS" >"$work/scale.log" 2>&1 &
  mgr=$!
  for _ in $(seq 1 300); do
    [ "$(grep -c ' ready (pid' "$work/scale.log" || true)" -ge 6 ] && break
    sleep 0.05
  done
  oha -z 9s -c 64 -t 4s --no-tui --output-format json "${flag[@]}" "http://127.0.0.1:$port/" >"$work/scale.json" &
  local oha_pid=$!
  sleep 2
  "$BIN" scale scaled 2 --bus "$BUS" >/dev/null
  sleep 2.5
  "$BIN" scale scaled 6 --bus "$BUS" >/dev/null
  wait "$oha_pid" || true
  python3 - "$work/scale.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
codes = d.get("statusCodeDistribution", {})
errors = sum(v for k, v in d.get("errorDistribution", {}).items() if "aborted due to deadline" not in k)
ok = sum(v for k, v in codes.items() if k.startswith("2"))
failed = errors + sum(v for k, v in codes.items() if not k.startswith("2"))
print(failed, ok + failed)
PY
  kill -TERM "$mgr"; wait "$mgr" 2>/dev/null || true; mgr=""
}

declare -A rps ratio shares
for r in $(seq 1 "$ROUNDS"); do
  for ka in off on; do
    for mode in $MODES; do
      read -r a b c < <(measure "$mode" "$ka")
      rps[$mode-$ka]+="$a "; ratio[$mode-$ka]+="$b "; shares[$mode-$ka]+="$c "
      echo "round $r, keep-alive $ka, $mode: $a req/s, max/min $b, shares % $c" >&2
    done
  done
done

med() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):g} ({min(v):g}-{max(v):g})")' "$@"; }
echo "| balance (+fixed: --no-rebalance) | keep-alive | req/s, median (min-max) | max/min share, median (min-max) | shares per worker, % (each round) |"
echo "|---|---|---|---|---|"
for ka in off on; do
  for mode in $MODES; do
    # shellcheck disable=SC2086
    echo "| $mode | $ka | $(med ${rps[$mode-$ka]}) | $(med ${ratio[$mode-$ka]}) | ${shares[$mode-$ka]} |"
  done
done

[ "$SCALE" = 1 ] || exit 0
echo
echo "Scaling 6 -> 2 -> 6 under load (oha -c 64, 9 s), failed requests per run:"
echo
echo "| balance | keep-alive | failed of requests, each round |"
echo "|---|---|---|"
scaled=()
for mode in $MODES; do
  case $mode in base-* | *+*) ;; *) scaled+=("$mode") ;; esac
done
for ka in off on; do
  for mode in "${scaled[@]}"; do
    runs=""
    for r in $(seq 1 "$ROUNDS"); do
      read -r f t < <(scale_under_load "$mode" "$ka")
      echo "scale round $r, keep-alive $ka, $mode: $f failed of $t" >&2
      runs+="$f of $t; "
    done
    echo "| $mode | $ka | ${runs%; } |"
  done
done
