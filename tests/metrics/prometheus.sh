#!/usr/bin/env bash
# The app's counters survive their workers, as a real Prometheus sees them.
#
# 3 workers of tests/apps/prom_app.js (prom-client's `app_requests_total`)
# behind nodeherd with its metrics endpoint, scraped every second by
# Debian's `prometheus` (installed when missing, as root), under a steady
# load of known rate from oha (-q). In the load's window a worker is killed
# with SIGKILL, the app is reloaded, scaled to 4 and then to 2. Then, from
# Prometheus' HTTP API:
#
#   - `sum(rate(app_requests_total[30s]))`, every second of the run once
#     30 s of samples are there, is within 5 % of the rate the load
#     generator got answers at over the same 30 s (from oha's record of
#     every request: on a loaded machine oha itself may stall and catch up);
#   - `sum(app_requests_total)` never goes down.
#
# Usage: tests/metrics/prometheus.sh [path/to/nodeherd]
# PROM_RATE (200 req/s) and PROM_TOLERANCE (0.05) change the load and the
# bound. Every process it starts is ended by its pid, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/nodeherd}
RATE=${PROM_RATE:-200}
TOLERANCE=${PROM_TOLERANCE:-0.05}
[ -x "$BIN" ] || cargo build --release --quiet
command -v oha >/dev/null || export PATH="${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}/oha/bin:$HOME/.cargo/bin:$PATH"
command -v oha >/dev/null || cargo install oha --locked --quiet
if ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "prometheus missing (apt-get install prometheus, or run as root)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
[ -d tests/apps/node_modules/prom-client ] ||
  (cd tests/apps && npm install --no-audit --no-fund --loglevel=error)

work=$(mktemp -d /tmp/nodeherd-prom.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=../load/lib.sh
. tests/load/lib.sh
private_bus

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port) metrics=$(free_port) prom=$(free_port)

"$BIN" run tests/apps/prom_app.js --name promrate -i 3 --listen "127.0.0.1:$port" \
  --metrics "127.0.0.1:$metrics" --bus "$BUS" --listen-timeout 15000 \
  >"$work/manager.log" 2>&1 &
pids+=("$!")

status() { "$BIN" status promrate --json --bus "$BUS" 2>/dev/null; }
ready() { status | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["ready_workers"], d["state"])'; }
wait_ready() {
  for _ in $(seq 1 300); do
    [ "$(ready 2>/dev/null || true)" = "$1 ready" ] && return 0
    sleep 0.1
  done
  echo "not $1 ready: $(ready 2>&1 || true)"
  return 1
}
wait_ready 3 || { cat "$work/manager.log"; exit 1; }

cat >"$work/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: nodeherd
    static_configs:
      - targets: ["127.0.0.1:$metrics"]
YML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom" >"$work/prometheus.log" 2>&1 &
pids+=("$!")
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$prom/-/ready" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$prom/-/ready" >/dev/null || { cat "$work/prometheus.log"; exit 1; }
# Ready is not scraping yet (its discovery settles first): wait for samples,
# so that every window the checks read holds the whole load.
scraped() { curl -sf "http://127.0.0.1:$prom/api/v1/query?query=count_over_time(up%5B1m%5D)" | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; sys.exit(0 if r and float(r[0]["value"][1]) >= 2 else 1)'; }
for _ in $(seq 1 300); do scraped && break; sleep 0.1; done
scraped || { echo "prometheus does not scrape 127.0.0.1:$metrics"; cat "$work/prometheus.log"; exit 1; }

failures=0
ctl() {
  if ! "$BIN" "$@" --bus "$BUS" >/dev/null; then
    echo "FAILED: nodeherd $*"
    failures=$((failures + 1))
  fi
}
worker_pid() {
  status | python3 -c "import json,sys; print(next(w['pid'] for w in json.load(sys.stdin)['workers'] if w['instance']==$1 and w['pid']>0))"
}

# The run: 30 s to fill the first window, then a lifecycle event every
# 12-15 s, then 30 s more so the last windows hold all of them.
DURATION=110
start=$(date +%s.%N)
oha -z "${DURATION}s" -q "$RATE" -c 8 --no-tui --output-format csv \
  "http://127.0.0.1:$port/" >"$work/oha.csv" &
oha_pid=$!
pids+=("$oha_pid")
at() { sleep "$(python3 -c "import time; print(max(0, $start + $1 - time.time()))")"; echo "t+$1s: $2"; }
at 38 "kill -9 worker 1"
kill -KILL "$(worker_pid 1)"
at 50 "reload"
ctl reload promrate
at 64 "scale to 4"
ctl scale promrate 4
at 76 "scale to 2"
ctl scale promrate 2
wait "$oha_pid"
end=$(date +%s)
# What Prometheus holds of the last scrapes.
sleep 3

python3 - "$work/oha.csv" "$prom" "$start" "$end" "$TOLERANCE" "${PROM_VERBOSE:-}" <<'PY' || failures=$((failures + 1))
import bisect, csv, json, sys, urllib.parse, urllib.request
path, prom, t0, end, tol = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
start = int(t0)
# When each request was answered (2xx), from oha's record of every one:
# the true rate of any window, even when the load generator itself stalls
# on a loaded machine and catches up.
done, failed = [], 0
with open(path) as f:
    for row in csv.DictReader(f):
        if row["status"].startswith("2"):
            done.append(t0 + float(row["request-start"]) + float(row["request-duration"]))
        else:
            failed += 1
done.sort()
took = done[-1] - done[0]
print(f"load: {len(done)} answered 2xx in {took:.1f} s: {len(done) / took:.1f} req/s ({failed} not 2xx)")

def true_rate(t, window=30):
    return (bisect.bisect_right(done, t) - bisect.bisect_right(done, t - window)) / window

def query(expr, lo, hi):
    q = urllib.parse.urlencode({"query": expr, "start": lo, "end": hi, "step": 1})
    r = json.load(urllib.request.urlopen(f"http://127.0.0.1:{prom}/api/v1/query_range?{q}"))
    res = r["data"]["result"]
    return [(int(float(t)), float(v)) for t, v in res[0]["values"]] if res else []

bad = 0
# Windows wholly inside the load, with 30 s of samples.
rates = query("sum(rate(app_requests_total[30s]))", start + 32, end - 1)
if len(rates) < (end - 1 - start - 32) * 0.9:
    print(f"FAILED: only {len(rates)} points of the rate")
    bad += 1
offs = [(t, v, true_rate(t)) for t, v in rates]
worst = max(offs, key=lambda p: abs(p[1] - p[2]) / p[2], default=(0, 0, 1))
dev = abs(worst[1] - worst[2]) / worst[2]
lo_r, hi_r = min(v for _, v in rates), max(v for _, v in rates)
lo_t, hi_t = min(p[2] for p in offs), max(p[2] for p in offs)
print(f"sum(rate(app_requests_total[30s])) over {len(rates)} s: {lo_r:.1f} .. {hi_r:.1f} req/s, "
      f"the load's own 30 s rate {lo_t:.1f} .. {hi_t:.1f}; worst t+{worst[0] - start}s: "
      f"{worst[1]:.1f} against {worst[2]:.1f}, {dev * 100:.2f} % off (bound {tol * 100:.0f} %)")
for t, v, want in offs:
    if abs(v - want) / want > tol:
        print(f"  t+{t - start}s: {v:.1f} req/s against {want:.1f}")
if dev > tol:
    print("FAILED: the rate left the bound")
    bad += 1
totals = query("sum(app_requests_total)", start, end + 2)
drops = [(t, a, b) for (_, a), (t, b) in zip(totals, totals[1:]) if b < a]
for t, a, b in drops:
    print(f"FAILED: sum(app_requests_total) went down at t+{t - start}s: {a:.0f} -> {b:.0f}")
bad += bool(drops)
if bad or sys.argv[6]:
    print("sum(app_requests_total) by second:", [(t - start, round(v)) for t, v in totals])
    print("up:", [(t - start, v) for t, v in query("min(up)", start, end)])
    print("scrape s:", [(t - start, round(v, 2)) for t, v in query("max(scrape_duration_seconds)", start, end)])
print(f"sum(app_requests_total): {totals[0][1]:.0f} -> {totals[-1][1]:.0f}, never down: {not drops}")
sys.exit(1 if bad else 0)
PY

if [ "$failures" -ne 0 ]; then
  echo "manager log:"
  tail -40 "$work/manager.log"
  echo "FAILED: $failures check(s)"
  exit 1
fi
echo "ok: the app's rate is right across kill -9, reload and scale"
