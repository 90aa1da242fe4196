#!/usr/bin/env bash
# Re-exec in place (`nodeherd reexec`) against `pm2 update`, side by side in
# one run, on 127.0.0.1 only. See bench/README.md.
#
#   bench/reexec.sh            2 rounds (~5 min), prints the report, keeps raw results in bench/.work/runs/reexec-<date>/
#   bench/reexec.sh --quick    1 round, 20 re-execs in a row (~2 min)
#
# 1. Under load (`oha -c 64`, keep-alive off and on), 4 workers of
#    apps/hello.js each: per round and keep-alive setting, nodeherd re-execs
#    REEXECS times and PM2 updates UPDATES times, each under its own oha run
#    (the order of the two alternating by round), every call wrapped by
#    lib/outage.js, which probes the app with fresh connections meanwhile.
#    Recorded: oha's failed requests, nodeherd's own figure for "the new
#    manager answered N ms after the request", the time until the app
#    answers again, and the worker pids before and after. After each swap
#    the same probe runs once with nothing swapped (control).
# 2. A fresh nodeherd manager (4 workers, warmed up): VmRSS and open fds
#    before and after IN_A_ROW re-execs one after another (no load), and
#    after SIGNALS more by SIGUSR2 (no client: waited for by polling its
#    Reexecs property with busctl).
#
# Options: --rounds N, --reexecs N (per round and keep-alive setting, default 5),
#          --updates N (the same for pm2 update, default 3), --in-a-row N (default 100),
#          --nice N (default -10 as root, as bench/run.sh), --out FILE (the report, default: stdout only).
#
# Installs what it needs as bench/run.sh does (PM2 pinned, into bench/.work/pm2;
# oha; dbus), builds nodeherd, runs a private dbus-daemon and PM2 with a
# private PM2_HOME in the run directory. Every process it starts is ended by
# pid on exit (PM2: `pm2 kill` with that PM2_HOME, then its daemon's pid).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
WORK=$HERE/.work
APPS=$HERE/apps
LIB=$HERE/lib
COMMAND_LINE="bench/reexec.sh${*:+ $*}"

PM2_VERSION=7.0.4   # as bench/run.sh
WORKERS=4
CONNS=64            # oha -c
CLIENT_TIMEOUT=4    # oha -t: a request without an answer for this long counts as failed
GAP=1               # seconds of load between two swaps
LEAD=2              # seconds of load before the first swap

ROUNDS=2
REEXECS=5
UPDATES=3
IN_A_ROW=100
SIGNALS=10
NICE=
OUT=
while (($#)); do
  case $1 in
    --quick) ROUNDS=1 REEXECS=3 UPDATES=2 IN_A_ROW=20 SIGNALS=3 ;;
    --rounds) ROUNDS=$2; shift ;;
    --reexecs) REEXECS=$2; shift ;;
    --updates) UPDATES=$2; shift ;;
    --in-a-row) IN_A_ROW=$2; shift ;;
    --nice) NICE=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "reexec.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

if [[ -z $NICE ]]; then
  [[ $(id -u) == 0 ]] && NICE=-10 || NICE=0
fi
if [[ $NICE != 0 ]] && ! renice -n "$NICE" -p $$ >/dev/null 2>&1; then
  log "could not renice to $NICE; running at the default priority"
  NICE=0
fi

# --- processes we started, ended by pid on exit ------------------------------
PIDS=()
DBUS_PID=
PM2=
PM2_HOME=
PM2_TREE=()   # PM2's daemon and workers, pid:starttime, as last seen

descendants() {
  local c
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    echo "$c"
    descendants "$c"
  done
}
alive() { [[ -e /proc/$1 ]] && ! grep -q '^State:.*Z' /proc/"$1"/status 2>/dev/null; }
started() { awk '{sub(/.*\) /, ""); print $20}' /proc/"$1"/stat 2>/dev/null || true; }
forget() {
  local p keep=()
  for p in "${PIDS[@]}"; do [[ $p != "$1" ]] && keep+=("$p"); done
  PIDS=("${keep[@]}")
}
# End pid and everything under it: TERM, up to 5 s, then KILL whatever of them is still the same process.
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
pm2_tree() { # remember PM2's daemon and its workers (pid:starttime)
  local d p
  PM2_TREE=()
  [[ -n $PM2_HOME && -f $PM2_HOME/pm2.pid ]] || return 0
  d=$(cat "$PM2_HOME/pm2.pid")
  alive "$d" || return 0
  for p in "$d" $(descendants "$d"); do PM2_TREE+=("$p:$(started "$p")"); done
}
pm2_end() {
  local p
  [[ -n $PM2 && -n $PM2_HOME && -d $PM2_HOME ]] || return 0
  pm2_tree
  timeout 30 "$PM2" kill >/dev/null 2>&1 || true
  for p in "${PM2_TREE[@]}"; do
    [[ -n ${p#*:} && $(started "${p%%:*}") == "${p#*:}" ]] && kill -KILL "${p%%:*}" 2>/dev/null
  done
  PM2_TREE=()
}
cleanup() {
  local rc=$? pid
  set +e
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do end_tree "$pid"; done
  wait
  pm2_end
  [[ -n $DBUS_PID ]] && kill -TERM "$DBUS_PID" 2>/dev/null
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools (as bench/run.sh) -------------------------------------------------
# shellcheck source=lib/tools.sh
. "$ROOT/bench/lib/tools.sh"
command -v busctl >/dev/null || die "busctl is needed (systemd)"
bench_tools

# --- where this run writes ---------------------------------------------------
RUN=$WORK/runs/reexec-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RUN/oha" "$RUN/logs"
RESULTS=$RUN/results.jsonl
: >"$RESULTS"
rec() { printf '%s\n' "$1" >>"$RESULTS"; }
log "results in $RUN"

# PM2 with its own home in the run directory: nothing of another PM2 is touched.
PM2_HOME=$RUN/pm2-home
export PM2_HOME
mkdir -p "$PM2_HOME"

bench_bus

COMMAND_LINE=$COMMAND_LINE NICE=$NICE QUICK=0 ROUNDS=$ROUNDS PM2_VERSION_SEEN=$PM2_VERSION_SEEN OHA=$OHA NH=$NH ROOT=$ROOT \
SETTINGS="{\"workers\":$WORKERS,\"conns\":$CONNS,\"client_timeout\":$CLIENT_TIMEOUT,\"gap\":$GAP,\"lead\":$LEAD,\"reexecs\":$REEXECS,\"updates\":$UPDATES,\"in_a_row\":$IN_A_ROW,\"signals\":$SIGNALS}" \
  node "$LIB/meta.js" >"$RUN/meta.json"

# --- helpers -----------------------------------------------------------------
PORT=19200
next_port() {
  local i
  for ((i = 0; i < 100; i++)); do
    PORT=$((PORT + 1))
    ((PORT > 19299)) && PORT=19201
    ss -Hltn "sport = :$PORT" | grep -q . || return 0
  done
  die "no free port in 19201-19299"
}
children() { cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | grep . | sort -n | paste -sd, || true; }
rss_kib() { awk -v k="${2:-VmRSS}:" '$1 == k {print $2}' /proc/"$1"/status; }
fd_count() { ls /proc/"$1"/fd | wc -l; }
fd_kinds() { # {"socket":n,"pipe":n,...}: what the fds point at
  local f
  for f in /proc/"$1"/fd/*; do readlink "$f" 2>/dev/null || true; done |
    sed -E 's/^(socket|pipe):\[[0-9]+\]$/\1/; s/^anon_inode:\[?([^]]*)\]?$/\1/; s|^/memfd:.*|memfd|; s|^/.*|file|' | sort | uniq -c |
    awk 'BEGIN { printf "{" } { printf "%s\"%s\":%d", (NR > 1 ? "," : ""), $2, $1 } END { printf "}" }'
}
mem_json() { # the manager's memory and fds, as JSON fields
  printf '"vmrss_kib":%s,"rss_anon_kib":%s,"rss_file_kib":%s,"fds":%s,"fd_kinds":%s' \
    "$(rss_kib "$1")" "$(rss_kib "$1" RssAnon)" "$(rss_kib "$1" RssFile)" "$(fd_count "$1")" "$(fd_kinds "$1")"
}
answering() { # PORT N: wait until N distinct instances answer
  local out
  out=$(timeout 60 node "$LIB/probe.js" pids "$1" "$2") || die "probe failed on :$1"
  [[ $out == *'"timeout":false'* ]] || die "$2 instances did not all answer on :$1: $out"
}
reexecs() { # the manager's Reexecs property (null if it does not answer)
  local n
  n=$(timeout 5 busctl --address="$BUS" get-property org.nodeherd.hello /org/nodeherd org.nodeherd.Manager1 Reexecs 2>/dev/null |
    awk '{print $2}' || true)
  echo "${n:-null}"
}

# SYNs dropped because an accept queue was full (this network namespace, every
# listener): a dropped SYN is retried after 1 s, a stall no request error shows.
listen_drops() {
  if command -v nstat >/dev/null; then
    nstat -asz TcpExtListenDrops 2>/dev/null | awk '$1 == "TcpExtListenDrops" {print $2; f = 1} END {if (!f) print 0}'
  else
    echo 0
  fi
}

NH_PID=
NH_PORT=
NH_LOG=
nodeherd_up() {
  local i
  next_port
  NH_PORT=$PORT
  NH_LOG=$RUN/logs/nodeherd-$1.log
  PORT=$NH_PORT "$NH" run "$APPS/hello.js" -i "$WORKERS" --listen "127.0.0.1:$NH_PORT" --bus "$BUS" >"$NH_LOG" 2>&1 &
  NH_PID=$!
  PIDS+=("$NH_PID")
  for ((i = 0; i < 100; i++)); do
    "$NH" status hello --json --bus "$BUS" >/dev/null 2>&1 && break
    alive "$NH_PID" || die "nodeherd exited: $(tail -5 "$NH_LOG")"
    sleep 0.1
  done
  answering "$NH_PORT" "$WORKERS"
}

PM2_PORT=
pm2_up() {
  next_port
  PM2_PORT=$PORT
  cat >"$RUN/hello.config.js" <<EOF
module.exports = { apps: [{ name: 'hello', script: '$APPS/hello.js', exec_mode: 'cluster', instances: $WORKERS,
  env: { PORT: '$PM2_PORT' } }] };
EOF
  timeout 60 "$PM2" start "$RUN/hello.config.js" >>"$RUN/logs/pm2.log" 2>&1 || die "pm2 start failed: $(tail -5 "$RUN/logs/pm2.log")"
  pm2_tree
  answering "$PM2_PORT" "$WORKERS"
}
pm2_daemon() { cat "$PM2_HOME/pm2.pid" 2>/dev/null || echo 0; }

# --- 1. swaps under load -----------------------------------------------------
nodeherd_up load
pm2_up
sleep 1
rec "{\"kind\":\"load_start\",\"pid\":$NH_PID,\"start\":$(started "$NH_PID"),\"children\":\"$(children "$NH_PID")\",$(mem_json "$NH_PID")}"

swaps() { # CONTENDER ROUND KA: one oha run, K swaps under it
  local c=$1 round=$2 ka=$3 port k n oha_pid f out i before after d0 d1 drops0
  case $c in
    nodeherd) port=$NH_PORT n=$REEXECS ;;
    pm2) port=$PM2_PORT n=$UPDATES ;;
  esac
  f=$RUN/oha/$round-$c-$ka.json
  local args=(-z 300s -c "$CONNS" -t "${CLIENT_TIMEOUT}s" --no-tui --output-format json)
  [[ $ka == off ]] && args+=(--disable-keepalive)
  log "round $round: $c, keep-alive $ka: $n swap(s) under oha -c $CONNS"
  # oha runs until told to stop (SIGINT: it prints its results), CLIENT_TIMEOUT
  # + 1 s after the last swap returned, so that a request left hanging shows
  # up as a timeout. -z is only a safety cap.
  drops0=$(listen_drops)
  "$OHA" "${args[@]}" "http://127.0.0.1:$port/" >"$f" 2>>"$RUN/oha.err" &
  oha_pid=$!
  PIDS+=("$oha_pid")
  sleep "$LEAD"
  for ((k = 1; k <= n; k++)); do
    case $c in
      nodeherd)
        before=$(children "$NH_PID")
        out=$(timeout 90 node "$LIB/outage.js" "$port" "$WORKERS" -- "$NH" reexec hello --bus "$BUS") || die "outage probe failed"
        after=$(children "$NH_PID")
        rec "{\"kind\":\"swap\",\"contender\":\"$c\",\"round\":$round,\"ka\":\"$ka\",\"k\":$k,\"manager\":$NH_PID,\"manager_alive\":$(alive "$NH_PID" && echo true || echo false),\"children_before\":\"$before\",\"children_after\":\"$after\",\"probe\":$out}"
        ;;
      pm2)
        d0=$(pm2_daemon)
        before=$(children "$d0")
        out=$(timeout 120 node "$LIB/outage.js" "$port" "$WORKERS" -- "$PM2" update) || die "outage probe failed"
        d1=$(pm2_daemon)
        after=$(children "$d1")
        pm2_tree
        rec "{\"kind\":\"swap\",\"contender\":\"$c\",\"round\":$round,\"ka\":\"$ka\",\"k\":$k,\"manager\":$d0,\"manager_after\":$d1,\"children_before\":\"$before\",\"children_after\":\"$after\",\"probe\":$out}"
        ;;
    esac
    log "  $c swap $k: $out"
    sleep "$GAP"
    # The same probe with nothing swapped (a 200 ms sleep): what the load
    # alone does to it on this machine.
    out=$(timeout 90 node "$LIB/outage.js" "$port" "$WORKERS" -- sleep 0.2) || die "outage probe failed"
    rec "{\"kind\":\"control\",\"contender\":\"$c\",\"round\":$round,\"ka\":\"$ka\",\"k\":$k,\"probe\":$out}"
    sleep "$GAP"
  done
  sleep $((CLIENT_TIMEOUT + 1))
  kill -INT "$oha_pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do alive "$oha_pid" || break; sleep 0.1; done
  end_tree "$oha_pid"
  rec "{\"kind\":\"oha\",\"contender\":\"$c\",\"round\":$round,\"ka\":\"$ka\",\"swaps\":$n,\"oha\":\"$f\",\"listen_drops\":$(($(listen_drops) - drops0))}"
  sleep 1
}

START=$(date +%s)
for ((round = 1; round <= ROUNDS; round++)); do
  for ka in off on; do
    if ((round % 2)); then order=(nodeherd pm2); else order=(pm2 nodeherd); fi
    for c in "${order[@]}"; do swaps "$c" "$round" "$ka"; done
  done
done
alive "$NH_PID" || die "nodeherd exited during the load phase: $(tail -5 "$NH_LOG")"
rec "{\"kind\":\"load_end\",\"pid\":$NH_PID,\"start\":$(started "$NH_PID"),\"children\":\"$(children "$NH_PID")\",$(mem_json "$NH_PID")}"
pm2_end
end_tree "$NH_PID"

# --- 2. many re-execs in a row: memory and fds ------------------------------
log "$IN_A_ROW re-execs in a row (fresh manager, no load)"
nodeherd_up memory
timeout 30 "$OHA" -z 1s -c 16 --no-tui "http://127.0.0.1:$NH_PORT/" >/dev/null 2>&1 || true # warm-up
sleep 3
ls -l /proc/"$NH_PID"/fd | awk 'NR > 1 {print $9, $11}' | sort -n >"$RUN/fds-before.txt"
rec "{\"kind\":\"row_before\",\"pid\":$NH_PID,\"start\":$(started "$NH_PID"),\"children\":\"$(children "$NH_PID")\",\"reexecs\":$(reexecs),$(mem_json "$NH_PID")}"
for ((k = 1; k <= IN_A_ROW; k++)); do
  t0=$(date +%s%N)
  if err=$(timeout 60 "$NH" reexec hello --bus "$BUS" 2>&1 >/dev/null); then st=0; else st=$?; fi
  t1=$(date +%s%N)
  ms=$(sed -n 's/.*answered \([0-9]*\) ms after the request.*/\1/p' <<<"$err")
  rec "{\"kind\":\"row\",\"k\":$k,\"status\":$st,\"reported_ms\":${ms:-null},\"command_ms\":$(((t1 - t0) / 1000000))}"
  ((st == 0)) || log "re-exec $k failed ($st): $err"
  if ((k % 25 == 0)); then
    rec "{\"kind\":\"row_trace\",\"k\":$k,$(mem_json "$NH_PID")}"
    log "  $k re-execs: VmRSS $(rss_kib "$NH_PID") KiB, $(fd_count "$NH_PID") fds, workers $(children "$NH_PID")"
  fi
done
sleep 3
ls -l /proc/"$NH_PID"/fd | awk 'NR > 1 {print $9, $11}' | sort -n >"$RUN/fds-after.txt"
rec "{\"kind\":\"row_after\",\"pid\":$NH_PID,\"start\":$(started "$NH_PID"),\"children\":\"$(children "$NH_PID")\",\"reexecs\":$(reexecs),$(mem_json "$NH_PID")}"

# The same by SIGUSR2, no client: wait until the Reexecs property is one higher.
for ((k = 1; k <= SIGNALS; k++)); do
  n0=$(reexecs)
  [[ $n0 == null ]] && die "the manager does not answer on the bus: $(tail -5 "$NH_LOG")"
  t0=$(date +%s%N)
  kill -USR2 "$NH_PID"
  ms=null
  for ((i = 0; i < 3000; i++)); do
    n1=$(reexecs)
    if [[ $n1 != null && $n1 -gt $n0 ]]; then ms=$((($(date +%s%N) - t0) / 1000000)); break; fi
    sleep 0.01
  done
  rec "{\"kind\":\"signal\",\"k\":$k,\"ms\":$ms}"
  sleep 0.5
done
sleep 1
rec "{\"kind\":\"signal_after\",\"pid\":$NH_PID,\"start\":$(started "$NH_PID"),\"children\":\"$(children "$NH_PID")\",\"reexecs\":$(reexecs),$(mem_json "$NH_PID")}"
answering "$NH_PORT" "$WORKERS"
end_tree "$NH_PID"
log "measurements done in $(($(date +%s) - START)) s"

node -e '
  const fs = require("fs"); const f = process.argv[1]; const m = JSON.parse(fs.readFileSync(f));
  m.loadavg_end = require("os").loadavg(); m.seconds = Number(process.argv[2]);
  fs.writeFileSync(f, JSON.stringify(m, null, 1));' "$RUN/meta.json" "$(($(date +%s) - START))"

node "$LIB/reexec-report.js" "$RUN" >"$RUN/report.md"
[[ -n $OUT ]] && cp "$RUN/report.md" "$OUT"
cat "$RUN/report.md"
