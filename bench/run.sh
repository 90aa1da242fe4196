#!/usr/bin/env bash
# nodeherd against PM2 cluster mode and a plain Node cluster (SCHED_NONE),
# side by side in one run, on 127.0.0.1 only. See bench/README.md.
#
#   bench/run.sh            full run (3 rounds, ~45 min of measuring on 2 cores), writes BENCHMARKS.md
#   bench/run.sh --quick    1 round, short runs (~10 min of measuring), writes bench/.work/BENCHMARKS-quick.md
#
# Options: --rounds N, --out FILE, --strict (exit 1 when a target is missed),
#          --phases LIST (comma-separated subset of: tput,tail,reload,walltime,crash,scale,memory),
#          --nice N (default -10 when run as root: the bench and everything it
#          starts, all contenders alike, get ahead of unrelated work on a shared machine; 0 to leave it).
#
# Everything it installs goes under bench/.work/ (PM2 in a private npm prefix,
# with its own PM2_HOME), except oha (`cargo install oha --locked`, when it is
# not on PATH already). Every process it starts is ended by pid on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
WORK=$HERE/.work
APPS=$HERE/apps
LIB=$HERE/lib
COMMAND_LINE="bench/run.sh${*:+ $*}"

PM2_VERSION=7.0.4
CONTENDERS=(nodeherd pm2 cluster)
# The throughput phase also runs nodeherd with --balance queue (one plain
# shared accept queue; the default, balance auto, steers a shared queue), in
# the same rotation, so the balance modes are compared in one run.
TPUT_CONTENDERS=(nodeherd nodeherd-queue pm2 cluster)
# The tail phase compares all three of nodeherd's balance modes: where a
# connection lands matters most when some requests are slow.
TAIL_CONTENDERS=(nodeherd nodeherd-queue nodeherd-reuseport pm2 cluster)

# --- options -----------------------------------------------------------------
QUICK=0
ROUNDS=
OUT=
STRICT=0
PHASES=tput,tail,reload,walltime,crash,scale,memory
NICE=
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --strict) STRICT=1 ;;
    --phases) PHASES=$2; shift ;;
    --nice) NICE=$2; shift ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

if ((QUICK)); then
  : "${ROUNDS:=1}"
  : "${OUT:=$WORK/BENCHMARKS-quick.md}"
  TPUT_SECS=3          # each throughput measurement
  TPUT_REPS=1          # throughput runs per contender, keep-alive setting and round
  TAIL_SECS=5          # each slow + fast run of the tail phase
  TAIL_REPS=1          # tail runs per contender, workers, keep-alive setting and round
  RELOAD_GAP=1         # seconds of load before, between and after the 3 reloads
  WALL_RELOADS=2       # timed idle reloads per app and contender per round
  CRASHES=2            # kill -9 per contender per round
  MEM_RELOADS=20       # reloads between the two RSS readings
else
  : "${ROUNDS:=3}"
  : "${OUT:=$ROOT/BENCHMARKS.md}"
  TPUT_SECS=4
  TPUT_REPS=4
  TAIL_SECS=8
  TAIL_REPS=1
  RELOAD_GAP=2
  WALL_RELOADS=3
  CRASHES=4
  MEM_RELOADS=200
fi
CONNS=64              # oha -c, for every load run
CLIENT_TIMEOUT=4      # oha -t during reloads: a request without an answer for this long counts as failed
SCALE_TO=8
# The tail phase (apps/mixed.js): one client asks for /slow (40 ms of CPU)
# at SLOW_RATE req/s while another asks for / at FAST_RATE req/s.
SLOW_RATE=20
SLOW_CONNS=4
FAST_RATE=300
FAST_CONNS=8
HANG_SECS=3           # fast requests after a /hang, 2 workers
HANG_TIMEOUT=1        # oha -t for them: a request sent to the hung worker fails after this long

has_phase() { [[ ",$PHASES," == *",$1,"* ]]; }
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# Everything started from here on inherits this priority.
if [[ -z $NICE ]]; then
  [[ $(id -u) == 0 ]] && NICE=-10 || NICE=0
fi
if [[ $NICE != 0 ]] && ! renice -n "$NICE" -p $$ >/dev/null 2>&1; then
  log "could not renice to $NICE; running at the default priority"
  NICE=0
fi

# --- processes we started, ended by pid on exit ------------------------------
PIDS=()              # long-lived processes started here (managers, oha, dbus-daemon)
DBUS_PID=
PM2=
PM2_HOME=$WORK/pm2-home
export PM2_HOME

descendants() { # pid -> its children, grandchildren, ... (one per line)
  local c
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    echo "$c"
    descendants "$c"
  done
}

alive() { [[ -e /proc/$1 ]] && ! grep -q '^State:.*Z' /proc/"$1"/status 2>/dev/null; }
# A process's start time (clock ticks since boot): tells a pid from a later reuse of it.
started() { awk '{sub(/.*\) /, ""); print $20}' /proc/"$1"/stat 2>/dev/null || true; }

forget() { # drop a pid from PIDS once it is ended
  local p keep=()
  for p in "${PIDS[@]}"; do [[ $p != "$1" ]] && keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# End pid and everything under it: TERM, up to 5 s, then KILL whatever of
# them is still the same process.
end_tree() {
  local pid=$1 p i all=()
  if alive "$pid"; then
    for p in "$pid" $(descendants "$pid"); do all+=("$p:$(started "$p")"); done
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
    for p in "${all[@]}"; do
      [[ -n ${p#*:} && $(started "${p%%:*}") == "${p#*:}" ]] && kill -KILL "${p%%:*}" 2>/dev/null
    done
  fi
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do end_tree "$pid"; done
  wait
  if [[ -n $PM2 && -x $PM2 ]]; then
    timeout 30 "$PM2" kill >/dev/null 2>&1
    [[ -f $PM2_HOME/pm2.pid ]] && kill -KILL "$(cat "$PM2_HOME/pm2.pid")" 2>/dev/null
  fi
  [[ -n $DBUS_PID ]] && kill -TERM "$DBUS_PID" 2>/dev/null
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools -------------------------------------------------------------------
# shellcheck source=lib/tools.sh
. "$ROOT/bench/lib/tools.sh"
bench_tools

# --- where this run writes ---------------------------------------------------
RUN=$WORK/runs/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RUN"
RESULTS=$RUN/results.jsonl
: >"$RESULTS"
log "results in $RUN"

rec() { printf '%s\n' "$1" >>"$RESULTS"; } # one JSON object per line

rm -rf "$PM2_HOME"
mkdir -p "$PM2_HOME"

bench_bus

# Metadata for the report.
COMMAND_LINE=$COMMAND_LINE NICE=$NICE QUICK=$QUICK ROUNDS=$ROUNDS PM2_VERSION_SEEN=$PM2_VERSION_SEEN OHA=$OHA WRK=$WRK NH=$NH ROOT=$ROOT \
SETTINGS="{\"tput_secs\":$TPUT_SECS,\"tput_reps\":$TPUT_REPS,\"reload_gap\":$RELOAD_GAP,\"conns\":$CONNS,\"client_timeout\":$CLIENT_TIMEOUT,\"wall_reloads\":$WALL_RELOADS,\"crashes\":$CRASHES,\"mem_reloads\":$MEM_RELOADS,\"scale_to\":$SCALE_TO,\"tail_secs\":$TAIL_SECS,\"tail_reps\":$TAIL_REPS,\"slow_rate\":$SLOW_RATE,\"slow_conns\":$SLOW_CONNS,\"fast_rate\":$FAST_RATE,\"fast_conns\":$FAST_CONNS,\"hang_secs\":$HANG_SECS,\"hang_timeout\":$HANG_TIMEOUT}" \
  node "$LIB/meta.js" >"$RUN/meta.json"

# --- contenders --------------------------------------------------------------
# up CONTENDER APP N: start APP with N workers on a fresh port; sets PORT,
# MGR (the manager's pid: nodeherd, PM2's daemon, the cluster primary), APPNAME,
# COUNTS (the directory the workers write their request counts to).
PORT=18200
MGR=
APPNAME=
COUNTS=
UPS=0
next_port() {
  local i
  for ((i = 0; i < 200; i++)); do
    PORT=$((PORT + 1))
    ((PORT > 18899)) && PORT=18201
    ss -Hltn "sport = :$PORT" | grep -q . || return 0
  done
  die "no free port in 18201-18899"
}

probe() { timeout 60 node "$LIB/probe.js" "$@"; }

# Wait until N distinct instances answer; prints the probe's JSON.
wait_answering() {
  local n=$1 out
  out=$(probe pids "$PORT" "$n") || die "$CONTENDER: probe failed"
  [[ $out == *'"timeout":false'* ]] || die "$CONTENDER $APPNAME: $n instances did not all answer on :$PORT: $out"
}

up() {
  CONTENDER=$1 APPNAME=$2
  local n=$3 i
  next_port
  UPS=$((UPS + 1))
  COUNTS=$RUN/counts/$UPS
  mkdir -p "$COUNTS"
  local logf=$RUN/logs/$UPS-$CONTENDER-$APPNAME.log
  mkdir -p "$RUN/logs"
  case $CONTENDER in
    nodeherd*)
      # nodeherd-1: --reload-parallel 1 (the default is 2); nodeherd-queue,
      # nodeherd-reuseport: --balance queue / reuseport (the default is auto).
      local extra=()
      case $CONTENDER in
        nodeherd-queue | nodeherd-reuseport) extra=(--balance "${CONTENDER#nodeherd-}") ;;
        nodeherd-*) extra=(--reload-parallel "${CONTENDER#nodeherd-}") ;;
      esac
      PORT=$PORT BENCH_COUNT_DIR=$COUNTS "$NH" run "$APPS/$APPNAME.js" -i "$n" \
        --listen "127.0.0.1:$PORT" --bus "$BUS" ${extra[@]+"${extra[@]}"} >"$logf" 2>&1 &
      MGR=$!
      PIDS+=("$MGR")
      for ((i = 0; i < 100; i++)); do
        "$NH" status "$APPNAME" --json --bus "$BUS" >/dev/null 2>&1 && break
        alive "$MGR" || die "nodeherd exited: $(tail -5 "$logf")"
        sleep 0.1
      done
      ;;
    pm2)
      cat >"$RUN/$APPNAME.config.js" <<EOF
module.exports = { apps: [{ name: '$APPNAME', script: '$APPS/$APPNAME.js', exec_mode: 'cluster', instances: $n,
  env: { PORT: '$PORT', BENCH_COUNT_DIR: '$COUNTS' } }] };
EOF
      timeout 60 "$PM2" start "$RUN/$APPNAME.config.js" >>"$logf" 2>&1 || die "pm2 start failed: $(tail -5 "$logf")"
      MGR=$(cat "$PM2_HOME/pm2.pid")
      ;;
    cluster)
      PORT=$PORT BENCH_COUNT_DIR=$COUNTS node "$APPS/cluster.js" "$APPS/$APPNAME.js" "$n" >"$logf" 2>&1 &
      MGR=$!
      PIDS+=("$MGR")
      ;;
  esac
  wait_answering "$n"
}

down() {
  case $CONTENDER in
    pm2) timeout 60 "$PM2" delete all >/dev/null 2>&1 || log "pm2 delete failed" ;;
    *) end_tree "$MGR" ;;
  esac
  sleep 0.5
}

# Reload the running app and wait for the result; prints the wall time in ms.
reload() {
  local t0 t1 n i
  t0=$(date +%s%N)
  case $CONTENDER in
    nodeherd*) timeout 120 "$NH" reload "$APPNAME" --bus "$BUS" >/dev/null 2>&1 || { log "nodeherd reload failed"; echo -1; return; } ;;
    pm2) timeout 120 "$PM2" reload "$APPNAME" >/dev/null 2>&1 || { log "pm2 reload failed"; echo -1; return; } ;;
    cluster)
      n=$(grep -c reloaded "$RUN/logs/$UPS-cluster-$APPNAME.log" || true)
      kill -HUP "$MGR"
      for ((i = 0; i < 12000; i++)); do
        (($(grep -c reloaded "$RUN/logs/$UPS-cluster-$APPNAME.log" || true) > n)) && break
        sleep 0.01
      done
      ;;
  esac
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000000))
}

kid_ticks() { # pid -> "child:utime+stime" for each of its children
  local k
  for k in $(cat /proc/"$1"/task/*/children 2>/dev/null); do echo "$k:$(cpu_ticks "$k" 2>/dev/null || echo 0)"; done
}
rss_kib() { awk '/^VmRSS:/ {print $2}' /proc/"$1"/status; }
cpu_ticks() { awk '{sub(/.*\) /, ""); print $12 + $13}' /proc/"$1"/stat; } # utime + stime of the process itself
counts() { node -e '
  const fs = require("fs"); const d = process.argv[1]; const o = {};
  for (const f of fs.readdirSync(d).filter((f) => f.endsWith(".json"))) { const c = JSON.parse(fs.readFileSync(d + "/" + f)); o[c.pid] = c; }
  console.log(JSON.stringify(o));' "$1"; }

# The workers' pids are the names of the files in their count directory.
worker_pids() { local f; for f in "$1"/*.json; do [[ -e $f ]] && f=${f##*/} && echo "${f%.json}"; done; }
worker_ticks() { # worker_ticks COUNTS_DIR: {pid: utime+stime} of each worker, as JSON
  local pid out='{' sep=''
  for pid in $(worker_pids "$1"); do
    out+="$sep\"$pid\":$(cpu_ticks "$pid" 2>/dev/null || echo null)"
    sep=,
  done
  echo "$out}"
}
# conns_of PORT COUNTS_DIR: {pid: established connections to PORT that the
# worker holds}, as JSON: the sockets ss lists on the port, matched by inode
# to the worker's open fds (cheap: netlink and four small fd directories,
# no scan of every process as `ss -p` does).
conns_of() {
  local port=$1 dir=$2 pid n inos out='{' sep=''
  # (grep finds nothing once the client has closed: not an error here)
  inos=$(ss -tnHe state established "( sport = :$port )" | { grep -o 'ino:[0-9]*' || true; } | cut -d: -f2 | sort)
  for pid in $(worker_pids "$dir"); do
    n=$({ find "/proc/$pid/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null || true; } | tr -dc '0-9\n' | sort | comm -12 - <(printf '%s\n' "$inos") | wc -l)
    out+="$sep\"$pid\":$n"
    sep=,
  done
  echo "$out}"
}
# sample_conns SECS PORT COUNTS_DIR OUTFILE: conns_of once a second from
# 1.5 s into a run of SECS (the keep-alive connections have settled by then:
# the rebalancing takes a few hundred ms) until a second before its end (the
# client closes its connections as the run ends).
sample_conns() {
  local secs=$1 i
  : >"$4"
  sleep 1.5
  for ((i = 0; i < secs - 2; i++)); do # at 1.5, 2.5, ... up to SECS - 1.5
    ((i > 0)) && sleep 1
    conns_of "$2" "$3" >>"$4"
  done
}

oha_run() { # oha_run SECS KA OUTFILE [extra oha args]
  local secs=$1 ka=$2 outf=$3
  shift 3
  local args=(-z "${secs}s" -c "$CONNS" --no-tui --output-format json)
  [[ $ka == off ]] && args+=(--disable-keepalive)
  timeout $((secs + 60)) "$OHA" "${args[@]}" "$@" "http://127.0.0.1:$PORT/" >"$outf" 2>>"$RUN/oha.err" || true
}

# wrk_run SECS KA OUTFILE: the same load from wrk (-c CONNS, a thread per
# CPU); keep-alive off is `Connection: close` on every request. Writes wrk's
# summary as JSON (lib/wrk-json.lua).
wrk_run() {
  local secs=$1 ka=$2 outf=$3 args
  args=(-t "$(nproc)" -c "$CONNS" -d "${secs}s" -s "$LIB/wrk-json.lua")
  [[ $ka == off ]] && args+=(-H 'Connection: close')
  rm -f "$outf"
  WRK_OUT=$outf timeout $((secs + 60)) "$WRK" "${args[@]}" "http://127.0.0.1:$PORT/" >/dev/null 2>>"$RUN/wrk.err" || true
}

# --- phases ------------------------------------------------------------------
# All three contenders are up side by side (idle ones cost nothing) so that
# their runs can alternate closely: for each repetition, every contender once
# per keep-alive setting, the starting contender rotating. A burst of noise on
# the machine then hits all of them alike.
declare -A PORT_OF MGR_OF COUNTS_OF UPS_OF
phase_tput() { # throughput, latency, fairness, manager CPU: 2 and 4 workers, keep-alive on and off
  local round=$1 w c ka f before after t0 t1 wt0 wt1 cf sampler rep i order
  for w in 2 4; do
    for c in "${TPUT_CONTENDERS[@]}"; do
      up "$c" hello "$w"
      PORT_OF[$c]=$PORT MGR_OF[$c]=$MGR COUNTS_OF[$c]=$COUNTS UPS_OF[$c]=$UPS
      oha_run 1 on /dev/null # warm-up
    done
    sleep 0.7
    for ((rep = 1; rep <= TPUT_REPS; rep++)); do
      for ka in off on; do
        order=()
        for ((i = 0; i < ${#TPUT_CONTENDERS[@]}; i++)); do
          order+=("${TPUT_CONTENDERS[(i + rep + round) % ${#TPUT_CONTENDERS[@]}]}")
        done
        for c in "${order[@]}"; do
          PORT=${PORT_OF[$c]} MGR=${MGR_OF[$c]} COUNTS=${COUNTS_OF[$c]}
          before=$(counts "$COUNTS")
          wt0=$(worker_ticks "$COUNTS")
          t0=$(cpu_ticks "$MGR")
          f=$RUN/oha/tput-$round-$rep-$w-$c-$ka.json
          mkdir -p "$RUN/oha" "$RUN/conns"
          log "round $round.$rep: throughput $c, $w workers, keep-alive $ka"
          # With keep-alive, how the connections sit on the workers, sampled
          # during the run (without it a connection lives for one request).
          cf=$RUN/conns/tput-$round-$rep-$w-$c-$ka.jsonl
          sampler=
          if [[ $ka == on ]]; then
            sample_conns "$TPUT_SECS" "$PORT" "$COUNTS" "$cf" &
            sampler=$!
          fi
          oha_run "$TPUT_SECS" "$ka" "$f"
          t1=$(cpu_ticks "$MGR")
          wt1=$(worker_ticks "$COUNTS")
          # A sample that failed costs the figure, not the run.
          if [[ -n $sampler ]]; then wait "$sampler" || log "connection sampler failed ($cf)"; fi
          sleep 0.7 # the workers write their counts every 250 ms
          after=$(counts "$COUNTS")
          rec "{\"kind\":\"tput\",\"round\":$round,\"pair\":\"$round.$rep\",\"contender\":\"$c\",\"workers\":$w,\"ka\":\"$ka\",\"oha\":\"$f\",\"mgr_cpu_ticks\":$((t1 - t0)),\"clk_tck\":$(getconf CLK_TCK),\"counts_before\":$before,\"counts_after\":$after,\"worker_ticks_before\":$wt0,\"worker_ticks_after\":$wt1${sampler:+,\"conns\":\"$cf\"}}"
          # The same run from wrk, 2 workers: a second load generator
          # (its own connection handling and pacing) checks oha's ratios.
          if [[ -n $WRK ]] && ((w == 2)); then
            f=$RUN/wrk/tput-$round-$rep-$w-$c-$ka.json
            mkdir -p "$RUN/wrk"
            log "round $round.$rep: throughput $c, $w workers, keep-alive $ka, wrk"
            wrk_run "$TPUT_SECS" "$ka" "$f"
            rec "{\"kind\":\"wrk\",\"round\":$round,\"pair\":\"$round.$rep\",\"contender\":\"$c\",\"workers\":$w,\"ka\":\"$ka\",\"wrk\":\"$f\"}"
          fi
        done
      done
    done
    for c in "${TPUT_CONTENDERS[@]}"; do
      CONTENDER=$c PORT=${PORT_OF[$c]} MGR=${MGR_OF[$c]} UPS=${UPS_OF[$c]}
      down
    done
  done
}

# mix_run SECS KA SLOW_OUT FAST_OUT: /slow and / from two clients side by
# side, each at a fixed rate. -w: requests still open at the end are waited
# for (up to CLIENT_TIMEOUT), not cut off, so every request is counted.
mix_run() {
  local secs=$1 ka=$2 slow_out=$3 fast_out=$4 slow_pid
  local args=(-z "${secs}s" -w -t "${CLIENT_TIMEOUT}s" --no-tui --output-format json)
  [[ $ka == off ]] && args+=(--disable-keepalive)
  timeout $((secs + 60)) "$OHA" "${args[@]}" -q "$SLOW_RATE" -c "$SLOW_CONNS" "http://127.0.0.1:$PORT/slow" >"$slow_out" 2>>"$RUN/oha.err" &
  slow_pid=$!
  PIDS+=("$slow_pid")
  timeout $((secs + 60)) "$OHA" "${args[@]}" -q "$FAST_RATE" -c "$FAST_CONNS" "http://127.0.0.1:$PORT/" >"$fast_out" 2>>"$RUN/oha.err" || true
  wait "$slow_pid" || true
  forget "$slow_pid"
}

phase_tail() { # fast requests beside slow ones; then a hung worker
  local round=$1 w c ka rep i order fs ff fh hang_pid kv spin d t0 t1
  local -A ticks
  mkdir -p "$RUN/oha"
  for w in 2 4; do
    for c in "${TAIL_CONTENDERS[@]}"; do
      up "$c" mixed "$w"
      PORT_OF[$c]=$PORT MGR_OF[$c]=$MGR UPS_OF[$c]=$UPS
      mix_run 1 on /dev/null /dev/null # warm-up
    done
    sleep 0.7
    for ((rep = 1; rep <= TAIL_REPS; rep++)); do
      for ka in off on; do
        order=()
        for ((i = 0; i < ${#TAIL_CONTENDERS[@]}; i++)); do
          order+=("${TAIL_CONTENDERS[(i + rep + round) % ${#TAIL_CONTENDERS[@]}]}")
        done
        for c in "${order[@]}"; do
          PORT=${PORT_OF[$c]}
          fs=$RUN/oha/tail-$round-$rep-$w-$c-$ka-slow.json
          ff=$RUN/oha/tail-$round-$rep-$w-$c-$ka-fast.json
          log "round $round.$rep: tail $c, $w workers, keep-alive $ka"
          mix_run "$TAIL_SECS" "$ka" "$fs" "$ff"
          rec "{\"kind\":\"tail\",\"round\":$round,\"pair\":\"$round.$rep\",\"contender\":\"$c\",\"workers\":$w,\"ka\":\"$ka\",\"slow\":\"$fs\",\"fast\":\"$ff\"}"
          sleep 0.5
        done
      done
    done
    for c in "${TAIL_CONTENDERS[@]}"; do
      CONTENDER=$c PORT=${PORT_OF[$c]} MGR=${MGR_OF[$c]} UPS=${UPS_OF[$c]}
      down
    done
  done

  # A hung worker spins a core until it is killed, so each contender is up
  # alone for this: 2 workers, one /hang, then HANG_SECS of fast requests on
  # new connections, each failing after HANG_TIMEOUT without an answer.
  for ((i = 0; i < ${#TAIL_CONTENDERS[@]}; i++)); do
    c=${TAIL_CONTENDERS[(i + round) % ${#TAIL_CONTENDERS[@]}]}
    up "$c" mixed 2
    sleep 0.5
    fh=$RUN/oha/hang-$round-$c-hang.json
    ff=$RUN/oha/hang-$round-$c-fast.json
    log "round $round: hung worker, $c"
    # The busiest worker's CPU time over the run shows that one really hung.
    ticks=()
    for kv in $(kid_ticks "$MGR"); do ticks[${kv%%:*}]=${kv#*:}; done
    t0=$(date +%s%N)
    timeout 60 "$OHA" -n 1 -c 1 -t 2s --no-tui --output-format json "http://127.0.0.1:$PORT/hang" >"$fh" 2>>"$RUN/oha.err" &
    hang_pid=$!
    PIDS+=("$hang_pid")
    sleep 0.5
    timeout $((HANG_SECS + 60)) "$OHA" -z "${HANG_SECS}s" -w -t "${HANG_TIMEOUT}s" -q "$FAST_RATE" -c "$FAST_CONNS" --disable-keepalive \
      --no-tui --output-format json "http://127.0.0.1:$PORT/" >"$ff" 2>>"$RUN/oha.err" || true
    t1=$(date +%s%N)
    spin=0
    for kv in $(kid_ticks "$MGR"); do
      d=$((${kv#*:} - ${ticks[${kv%%:*}]:-0}))
      ((d > spin)) && spin=$d
    done
    wait "$hang_pid" || true
    forget "$hang_pid"
    rec "{\"kind\":\"hang\",\"round\":$round,\"contender\":\"$c\",\"workers\":2,\"ka\":\"off\",\"hang\":\"$fh\",\"fast\":\"$ff\",\"busiest_worker_ticks\":$spin,\"clk_tck\":$(getconf CLK_TCK),\"ms\":$(((t1 - t0) / 1000000))}"
    down
  done
}

phase_reload() { # failed requests during 3 reloads under load
  local round=$1 app c ka f oha_pid t0 times k ms i
  for app in hello slow; do
    for c in "${CONTENDERS[@]}"; do
      up "$c" "$app" 2
      for ka in off on; do
        f=$RUN/oha/reload-$round-$app-$c-$ka.json
        mkdir -p "$RUN/oha"
        log "round $round: 3 reloads under load, $c, $app, keep-alive $ka"
        # oha runs until told to stop (SIGINT: it prints its results), which
        # is CLIENT_TIMEOUT + 1 s after the last reload returned, so that a
        # request left hanging by a reload shows up as a timeout instead of
        # being cut off by the end of the run. -z is only a safety cap.
        t0=$(date +%s%N)
        local args=(-z 300s -c "$CONNS" -t "${CLIENT_TIMEOUT}s" --no-tui --output-format json)
        [[ $ka == off ]] && args+=(--disable-keepalive)
        "$OHA" "${args[@]}" "http://127.0.0.1:$PORT/" >"$f" 2>>"$RUN/oha.err" &
        oha_pid=$!
        PIDS+=("$oha_pid")
        times=()
        sleep "$RELOAD_GAP"
        for k in 1 2 3; do
          ms=$(reload)
          times+=("$ms")
          sleep "$RELOAD_GAP"
        done
        sleep $((CLIENT_TIMEOUT + 1))
        kill -INT "$oha_pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do alive "$oha_pid" || break; sleep 0.1; done
        end_tree "$oha_pid"
        rec "{\"kind\":\"reload\",\"round\":$round,\"contender\":\"$c\",\"app\":\"$app\",\"workers\":2,\"ka\":\"$ka\",\"oha\":\"$f\",\"reload_ms\":[$(IFS=,; echo "${times[*]}")],\"run_ms\":$((($(date +%s%N) - t0) / 1000000))}"
        sleep 1
      done
      down
    done
  done
}

phase_walltime() { # reload wall time, 4 idle workers
  # nodeherd also with one swap at a time, after the three contenders.
  local round=$1 app c k ms
  for app in hello slow; do
    for c in "${CONTENDERS[@]}" nodeherd-1; do
      up "$c" "$app" 4
      sleep 1
      for ((k = 0; k < WALL_RELOADS; k++)); do
        ms=$(reload)
        log "round $round: reload wall time $c $app 4 workers: $ms ms"
        rec "{\"kind\":\"walltime\",\"round\":$round,\"contender\":\"$c\",\"app\":\"$app\",\"workers\":4,\"ms\":$ms}"
        sleep 1
      done
      down
    done
  done
}

phase_crash() { # kill -9 a worker: time until its replacement answers; and node's own boot time
  # The three contenders are up side by side, and every kill is next to a
  # fresh measure of node's boot time, so both see the same machine.
  local round=$1 c k i kids victim out order
  for c in "${CONTENDERS[@]}"; do
    up "$c" hello 2
    PORT_OF[$c]=$PORT MGR_OF[$c]=$MGR UPS_OF[$c]=$UPS
  done
  sleep 1.5
  for c in "${CONTENDERS[@]}"; do
    rec "{\"kind\":\"rss_idle_warm\",\"round\":$round,\"contender\":\"$c\",\"kib\":$(rss_kib "${MGR_OF[$c]}")}"
  done
  for ((k = 0; k < CRASHES; k++)); do
    out=$(probe boot "$APPS/hello.js" "$((18900 + k))")
    log "round $round: node boot: $out"
    rec "{\"kind\":\"boot\",\"round\":$round,\"k\":$k,${out:1}"
    order=()
    for ((i = 0; i < ${#CONTENDERS[@]}; i++)); do order+=("${CONTENDERS[(i + k + round) % ${#CONTENDERS[@]}]}"); done
    for c in "${order[@]}"; do
      CONTENDER=$c PORT=${PORT_OF[$c]} MGR=${MGR_OF[$c]}
      kids=$(cat /proc/"$MGR"/task/*/children | tr ' ' '\n' | grep . | paste -sd,)
      victim=${kids%%,*}
      ((k % 2)) && victim=${kids##*,}
      out=$(probe crash "$PORT" "$victim" "$kids")
      log "round $round: kill -9 $c worker $victim: $out"
      rec "{\"kind\":\"crash\",\"round\":$round,\"k\":$k,\"contender\":\"$c\",${out:1}"
    done
    sleep 2 # PM2 counts a restart younger than min_uptime (1 s) as unstable
    for c in "${CONTENDERS[@]}"; do
      CONTENDER=$c PORT=${PORT_OF[$c]}
      wait_answering 2
    done
  done
  for c in "${CONTENDERS[@]}"; do
    CONTENDER=$c PORT=${PORT_OF[$c]} MGR=${MGR_OF[$c]} UPS=${UPS_OF[$c]}
    down
  done
}

phase_scale() { # scale 2 -> 8: time from the command until all 8 answer
  local round=$1 c out cmd
  for c in nodeherd pm2; do
    up "$c" hello 2
    sleep 1
    case $c in
      nodeherd) cmd=("$NH" scale hello "$SCALE_TO" --bus "$BUS") ;;
      pm2) cmd=("$PM2" scale hello "$SCALE_TO") ;;
    esac
    out=$(probe until "$PORT" "$SCALE_TO" -- "${cmd[@]}")
    log "round $round: scale $c 2 -> $SCALE_TO: $out"
    rec "{\"kind\":\"scale\",\"round\":$round,\"contender\":\"$c\",${out:1}"
    down
  done
}

phase_memory() { # manager RSS: idle with 2 workers, then after MEM_RELOADS reloads
  local c k ms idle mid fails trace
  for c in nodeherd pm2 cluster; do
    [[ $c == pm2 ]] && { timeout 30 "$PM2" kill >/dev/null 2>&1 || true; } # a fresh daemon
    up "$c" hello 2
    sleep 3
    idle=$(rss_kib "$MGR")
    log "memory: $c idle ${idle} KiB"
    fails=0
    mid=0
    trace=()
    if [[ $c != cluster ]]; then
      for ((k = 1; k <= MEM_RELOADS; k++)); do
        ms=$(reload)
        ((ms < 0)) && fails=$((fails + 1))
        ((k == MEM_RELOADS / 2)) && mid=$(rss_kib "$MGR")
        if ((k % 25 == 0)); then
          trace+=("$(rss_kib "$MGR")")
          log "memory: $c $k reloads, RSS ${trace[-1]} KiB"
        fi
      done
      sleep 3
    fi
    rec "{\"kind\":\"memory\",\"contender\":\"$c\",\"idle_kib\":$idle,\"mid_kib\":$mid,\"after_kib\":$(rss_kib "$MGR"),\"reloads\":$([[ $c == cluster ]] && echo 0 || echo "$MEM_RELOADS"),\"failed_reloads\":$fails,\"trace_every_25\":[$(IFS=,; echo "${trace[*]}")]}"
    down
  done
}

START=$(date +%s)
for ((round = 1; round <= ROUNDS; round++)); do
  has_phase tput && phase_tput "$round"
  has_phase tail && phase_tail "$round"
  has_phase reload && phase_reload "$round"
  has_phase walltime && phase_walltime "$round"
  has_phase crash && phase_crash "$round"
  has_phase scale && phase_scale "$round"
done
has_phase memory && phase_memory
log "measurements done in $(($(date +%s) - START)) s"

node -e '
  const fs = require("fs"); const f = process.argv[1]; const m = JSON.parse(fs.readFileSync(f));
  m.loadavg_end = require("os").loadavg(); m.seconds = Number(process.argv[2]);
  fs.writeFileSync(f, JSON.stringify(m, null, 1));' "$RUN/meta.json" "$(($(date +%s) - START))"

report_args=("$RUN" "$OUT")
((STRICT)) && report_args+=(--strict)
node "$LIB/report.js" "${report_args[@]}"
log "wrote $OUT"
