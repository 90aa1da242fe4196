#!/usr/bin/env bash
# Autoscaling against fixed worker counts, nodeherd and PM2 side by side in
# one run, on 127.0.0.1 only. See bench/README.md.
#
#   bench/autoscale.sh              1 round (~5 min), prints the report
#
# Each contender serves apps/burner.js (GET /burn: 10 ms of CPU) and goes
# through the same day: REST seconds idle, then oha at PEAK requests a
# second on /burn (keep-alive, -c 32) for RAMP seconds and then PEAK_SECS
# more (two oha runs, so the first seconds of the peak, while a scaler
# reacts, and the steady peak are measured apart), then QUIET seconds idle.
# Recorded: p99 latency of each part of the peak, the workers and their
# summed RSS at rest before the peak, at the end of the peak and after the
# quiet. Contenders: nodeherd with `instances: {min: 1, max: "max"}` and the
# autoscale pace below, nodeherd with a fixed `instances: "max"`, PM2 7's
# cluster mode with `instances: "max"`.
#
# Options: --bin PATH (default: a release build of this tree), --peak N
#          (default 150 requests/s), --contenders "A B" (default all three),
#          --quiet SECONDS (default 45), --nice N (default -10 as root).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
WORK=$HERE/.work
APPS=$HERE/apps
LIB=$HERE/lib
COMMAND_LINE="bench/autoscale.sh${*:+ $*}"

PM2_VERSION=7.0.4 # as bench/run.sh
PEAK=150
REST=5
RAMP=15
PEAK_SECS=25
QUIET=45
PACE='"up_after":"3s","down_after":"20s","settle":"3s"'
BIN=
NICE=
CONTENDERS="nodeherd-autoscale nodeherd-fixed pm2"
while (($#)); do
  case $1 in
    --bin) BIN=$2; shift ;;
    --peak) PEAK=$2; shift ;;
    --contenders) CONTENDERS=$2; shift ;;
    --quiet) QUIET=$2; shift ;;
    --nice) NICE=$2; shift ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "autoscale.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

PM2_HOME=$WORK/pm2-home-autoscale
export PM2_HOME
# shellcheck source=lib/proc.sh
. "$LIB/proc.sh"
bench_start "$NICE" "autoscale"

# workers_now CONTENDER: "count rss_kib" of the app's workers.
workers_now() {
  local pids
  case $1 in
    pm2) pids=$(timeout 30 "$PM2" jlist 2>/dev/null | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).filter(p=>p.pid>0).map(p=>p.pid).join(" ")))') ;;
    *) pids=$(pgrep -P "$MGR" -d ' ' || true) ;;
  esac
  local n=0 kib=0 p
  for p in $pids; do
    [[ -r /proc/$p/status ]] || continue
    n=$((n + 1))
    kib=$((kib + $(awk '/^VmRSS:/ {print $2}' /proc/"$p"/status)))
  done
  echo "$n $kib"
}

p99() { node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s);const p=j.latencyPercentiles||{};console.log(JSON.stringify({p99_ms:(p.p99||0)*1000,rps:j.summary.requestsPerSec,ok:(j.statusCodeDistribution||{})["200"]||0,errors:Object.values(j.errorDistribution||{}).reduce((a,b)=>a+b,0)}))})'; }

day() {
  local c=$1
  PORT=$(free_port)
  case $c in
    nodeherd-*)
      local instances='"max"'
      [[ $c == nodeherd-autoscale ]] && instances="{\"min\":1,\"max\":\"max\"},\"autoscale\":{$PACE}"
      cat >"$RUN/burn.json" <<JSON
{"apps":[{"name":"burn","script":"$APPS/burner.js","instances":$instances,"env":{"PORT":"$PORT"}}]}
JSON
      "$NH" run "$RUN/burn.json" --listen "127.0.0.1:$PORT" --bus "$BUS" >"$RUN/$c.log" 2>&1 &
      MGR=$!
      PIDS+=("$MGR")
      ;;
    pm2)
      cat >"$RUN/burn.config.js" <<JS
module.exports = { apps: [{ name: 'burn', script: '$APPS/burner.js', exec_mode: 'cluster', instances: 'max', env: { PORT: '$PORT' } }] };
JS
      timeout 60 "$PM2" start "$RUN/burn.config.js" >>"$RUN/pm2.log" 2>&1 || die "pm2 start failed"
      MGR=$(cat "$PM2_HOME/pm2.pid")
      ;;
  esac
  answering "$PORT" || die "$c did not answer on $PORT"
  sleep "$REST"
  local rest peak_end quiet ramp steady
  rest=$(workers_now "$c")
  ramp=$("$OHA" -z "${RAMP}s" -q "$PEAK" -c 32 --no-tui --output-format json "http://127.0.0.1:$PORT/burn" | p99)
  steady=$("$OHA" -z "${PEAK_SECS}s" -q "$PEAK" -c 32 --no-tui --output-format json "http://127.0.0.1:$PORT/burn" | p99)
  peak_end=$(workers_now "$c")
  sleep "$QUIET"
  quiet=$(workers_now "$c")
  case $c in
    pm2) timeout 60 "$PM2" delete all >/dev/null 2>&1 || log "pm2 delete failed" ;;
    *) end_pid "$MGR" ;;
  esac
  echo "{\"contender\":\"$c\",\"rest\":\"$rest\",\"peak_end\":\"$peak_end\",\"quiet\":\"$quiet\",\"ramp\":$ramp,\"steady\":$steady}" >>"$RESULTS"
  log "$c: at rest $rest, ramp $ramp, steady $steady, end of peak $peak_end, after quiet $quiet"
}

for c in $CONTENDERS; do day "$c"; done
[[ -f $RUN/nodeherd-autoscale.log ]] && grep -h 'autoscale:' "$RUN/nodeherd-autoscale.log" | sed 's/^/    /' >&2 || true

node - "$RESULTS" "$COMMAND_LINE" "$PEAK" "$RAMP" "$PEAK_SECS" "$QUIET" "$PACE" <<'JS'
const [file, cmd, peak, ramp, steady, quiet, pace] = process.argv.slice(2);
const rows = require('fs').readFileSync(file, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
const w = (s) => { const [n, kib] = s.split(' ').map(Number); return `${n} (${(kib / 1024).toFixed(0)} MiB)`; };
console.log(`Command: \`${cmd}\`; ${peak} requests/s of 10 ms CPU each at the peak (oha -q ${peak} -c 32); autoscale pace ${pace}.\n`);
console.log(`| contender | workers (RSS) at rest | p99, first ${ramp} s of the peak | p99, the ${steady} s after | errors | workers at the end of the peak | workers (RSS) ${quiet} s after |`);
console.log('|---|---|---|---|---|---|---|');
for (const r of rows) {
  console.log(`| ${r.contender} | ${w(r.rest)} | ${r.ramp.p99_ms.toFixed(1)} ms | ${r.steady.p99_ms.toFixed(1)} ms | ${r.ramp.errors + r.steady.errors} | ${w(r.peak_end)} | ${w(r.quiet)} |`);
}
JS
