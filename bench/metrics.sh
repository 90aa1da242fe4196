#!/usr/bin/env bash
# What a scrape of nodeherd's metrics endpoint costs, with 8 workers of an
# app that keeps prom-client metrics (tests/apps/prom_app.js):
#   1. the latency of a scrape (the manager's figures plus every worker's
#      registry, collected over IPC and merged): 40 scrapes, one after another;
#   2. throughput under load (oha -c 64, no keep-alive, 5 s runs), with a
#      scrape every second and without, alternating, 3 runs each.
#
#   bench/metrics.sh [path/to/nodeherd]
#
# Prints the figures; BENCHMARKS.md quotes them. Everything it starts is
# ended by pid on exit. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/nodeherd}
RUNS=${RUNS:-3}
[ -x "$BIN" ] || cargo build --release --quiet
command -v oha >/dev/null || export PATH="${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}/oha/bin:$HOME/.cargo/bin:$PATH"
(cd tests/apps && npm install --no-audit --no-fund --loglevel=error >/dev/null)

work=$(mktemp -d /tmp/nodeherd-metrics-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$BIN" run tests/apps/prom_app.js -i 8 --listen 127.0.0.1:0 --metrics 127.0.0.1:0 --no-bus 2>"$work/log" &
pids+=($!)
for _ in $(seq 200); do
  grep -q '8/8 workers ready' "$work/log" && break
  sleep 0.1
done
grep -q '8/8 workers ready' "$work/log" || { cat "$work/log"; echo "not ready" >&2; exit 1; }
port=$(sed -n 's/.*socket: tcp 127.0.0.1:\([0-9]*\) .*/\1/p' "$work/log" | head -1)
mport=$(sed -n 's|.*metrics: http://127.0.0.1:\([0-9]*\)/metrics.*|\1|p' "$work/log" | head -1)
url=http://127.0.0.1:$mport/metrics
# Warm every worker's registry.
oha -n 2000 -c 16 --disable-keepalive --no-tui "http://127.0.0.1:$port/" >/dev/null 2>&1 || true

median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
pct() { sort -n | awk -v p="$1" '{ a[NR] = $1 } END { i = int(NR * p + 0.999); if (i < 1) i = 1; print a[i] }'; }

: >"$work/scrape-ms"
for _ in $(seq 40); do
  curl -s -o "$work/body" -w '%{time_total}\n' "$url" | awk '{ printf "%.1f\n", $1 * 1000 }' >>"$work/scrape-ms"
done
families=$(grep -c '^# TYPE' "$work/body")
samples=$(grep -vc '^#' "$work/body")
workers_in=$(grep -o 'worker="[0-9]*"' "$work/body" | sort -u | wc -l)
echo "scrape with 8 workers: median $(median <"$work/scrape-ms") ms, p90 $(pct 0.9 <"$work/scrape-ms") ms, max $(sort -n "$work/scrape-ms" | tail -1) ms ($families families, $samples samples, $workers_in workers labelled, $(wc -c <"$work/body") bytes)"

rps() { # rps SCRAPE(0|1)
  local sp=""
  if [ "$1" = 1 ]; then
    (while :; do curl -s -o /dev/null "$url"; sleep 1; done) &
    sp=$!
  fi
  oha -z 5s -c 64 --disable-keepalive --no-tui --output-format json "http://127.0.0.1:$port/" 2>/dev/null |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["summary"]["requestsPerSec"]))'
  if [ -n "$sp" ]; then kill "$sp" 2>/dev/null || true; wait "$sp" 2>/dev/null || true; fi
}
: >"$work/without"
: >"$work/with"
for i in $(seq "$RUNS"); do
  if ((i % 2)); then
    rps 0 >>"$work/without"
    rps 1 >>"$work/with"
  else
    rps 1 >>"$work/with"
    rps 0 >>"$work/without"
  fi
done
w=$(median <"$work/without")
s=$(median <"$work/with")
echo "throughput, 8 workers, no keep-alive: without scraping $w req/s ($(tr '\n' ' ' <"$work/without")), scraping every second $s req/s ($(tr '\n' ' ' <"$work/with")): ratio $(awk -v a="$s" -v b="$w" 'BEGIN { printf "%.3f", a / b }')"
