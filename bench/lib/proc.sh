# Processes and ports for the smaller side-by-side benchmarks (canary.sh,
# autoscale.sh): every process they start is recorded in PIDS and ended by
# pid on exit, PM2 with its private PM2_HOME, the private bus by its pid.
# Sourced after PM2_HOME is set; then `bench_start NICE NAME` once.
PIDS=()
DBUS_PID=
alive() { kill -0 "$1" 2>/dev/null; }
end_pid() {
  local pid=$1 i
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do end_pid "$pid"; done
  if [[ -n ${PM2:-} && -x $PM2 ]]; then
    timeout 30 "$PM2" kill >/dev/null 2>&1
    [[ -f $PM2_HOME/pm2.pid ]] && kill -KILL "$(cat "$PM2_HOME/pm2.pid")" 2>/dev/null
  fi
  [[ -n $DBUS_PID ]] && kill -TERM "$DBUS_PID" 2>/dev/null
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
ms() { date +%s%3N; }
# answering PORT [PATH]: wait (up to 20 s) for a 200 on a fresh connection.
answering() {
  local i
  for ((i = 0; i < 200; i++)); do
    node -e 'require("http").get({host:"127.0.0.1",port:+process.argv[1],path:process.argv[2]||"/",agent:false},(r)=>process.exit(r.statusCode===200?0:1)).on("error",()=>process.exit(1))' "$1" "${2:-/}" && return 0
    sleep 0.1
  done
  return 1
}
# bench_only_tools BIN: what these scripts need when given a binary (node,
# PM2 pinned, oha, dbus-daemon), without building nodeherd; sets PM2, OHA, NH.
bench_only_tools() {
  command -v node >/dev/null || die "node is needed"
  command -v dbus-daemon >/dev/null || die "dbus-daemon is needed (apt-get install dbus)"
  PM2=$WORK/pm2/node_modules/.bin/pm2
  if [[ ! -x $PM2 ]]; then
    timeout 600 npm install --prefix "$WORK/pm2" --no-audit --no-fund --loglevel=error "pm2@$PM2_VERSION" >&2
  fi
  OHA=$(command -v oha || true)
  [[ -n $OHA ]] || die "oha is needed on PATH"
  NH=$1
}
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
# bench_start NICE NAME: renice (-10 as root unless NICE says otherwise),
# find or install the tools (BIN given: no build), make the run directory
# (RUN, RESULTS), a fresh PM2_HOME and the private bus.
bench_start() {
  local nice=$1
  if [[ -z $nice && $(id -u) == 0 ]]; then nice=-10; fi
  [[ -n $nice ]] && renice -n "$nice" $$ >/dev/null
  # shellcheck source=lib/tools.sh
  . "$ROOT/bench/lib/tools.sh"
  if [[ -n $BIN ]]; then bench_only_tools "$BIN"; else bench_tools; fi
  RUN=$WORK/runs/$2-$(date -u +%Y%m%dT%H%M%SZ)
  mkdir -p "$RUN"
  RESULTS=$RUN/results.jsonl
  : >"$RESULTS"
  log "results in $RUN"
  rm -rf "$PM2_HOME"
  mkdir -p "$PM2_HOME"
  bench_bus
}

