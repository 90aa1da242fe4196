#!/usr/bin/env bash
# Canary reloads against a plain rolling reload and PM2's reload, side by
# side in one run, on 127.0.0.1 only. See bench/README.md.
#
#   bench/canary.sh                 2 rounds (~8 min), prints the report
#   bench/canary.sh --quick         1 round, a 5 s soak (~2 min)
#
# 1. Exposure of a bad release: 4 workers of apps/release.js serving the
#    "good" release under a steady load of fresh connections
#    (lib/canary-load.js, RATE requests a second); then a reload to the
#    "bad" release (500 on every fifth request it serves) and WINDOW seconds
#    of the same load from the moment the reload is asked. Contenders, in
#    alternation by round: nodeherd with `reload_strategy: canary` (the
#    default soak and thresholds unless --quick), nodeherd's rolling reload
#    (as PM2), PM2 7's `pm2 reload --update-env`. Recorded: how long the
#    reload command took and its exit status, and within the window the
#    requests answered by the bad release, the 500s, the failed requests,
#    and the last moment the bad release answered.
# 2. A slow release: both releases answer after a timer, "good" after
#    SLOW_BASE ms (20), "slow" after 3 times as long (p99 3×): nodeherd's
#    canary once per round; the reload's exit status and message.
# 3. With --base-bin B (a nodeherd built without the per-response counting,
#    e.g. with `countResponse` returning at once): throughput of the hello
#    app, 2 workers, oha -c 64, keep-alive on and off, this build against B
#    in alternation, TPUT_REPS times each; the ratio of medians.
#
# Options: --rounds N, --quick, --bin PATH (default: a release build of this
#          tree), --base-bin PATH, --rate N (default 200), --phases LIST
#          (default bad,slow,tput), --nice N (default -10 as root).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
WORK=$HERE/.work
APPS=$HERE/apps
LIB=$HERE/lib
COMMAND_LINE="bench/canary.sh${*:+ $*}"

PM2_VERSION=7.0.4 # as bench/run.sh
WORKERS=4
RATE=200
ROUNDS=2
QUICK=0
BIN=
BASE_BIN=
TPUT_REPS=3
TPUT_SECS=5
NICE=
PHASES=bad,slow,tput
SLOW_BASE=20
while (($#)); do
  case $1 in
    --rounds) ROUNDS=$2; shift ;;
    --quick) QUICK=1 ;;
    --bin) BIN=$2; shift ;;
    --base-bin) BASE_BIN=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --phases) PHASES=$2; shift ;;
    --nice) NICE=$2; shift ;;
    -h | --help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "canary.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
if ((QUICK)); then
  ROUNDS=1
  SOAK='"canary":{"soak":"5s"},'
  WINDOW=15
  TPUT_REPS=1
  TPUT_SECS=3
else
  SOAK=
  WINDOW=45 # the default soak is 30 s; the rollback and the swap back fit in the rest
fi

PM2_HOME=$WORK/pm2-home-canary
export PM2_HOME
# shellcheck source=lib/proc.sh
. "$LIB/proc.sh"
bench_start "$NICE" "canary"

# up CONTENDER RELEASE [BASE_MS]: start 4 workers of the release; sets PORT and MGR.
up() {
  local c=$1 release=$2 base=${3:-0}
  PORT=$(free_port)
  case $c in
    nodeherd-*)
      local strategy=rolling
      [[ $c == nodeherd-canary ]] && strategy=canary
      cat >"$RUN/api.json" <<EOF
{"apps":[{"name":"api","script":"$APPS/release.js","instances":$WORKERS,"reload_strategy":"$strategy",$SOAK
  "env":{"RELEASE":"$release","BASE_MS":"$base","PORT":"$PORT"}}]}
EOF
      "$NH" run "$RUN/api.json" --listen "127.0.0.1:$PORT" --bus "$BUS" >"$RUN/$c.log" 2>&1 &
      MGR=$!
      PIDS+=("$MGR")
      ;;
    pm2)
      cat >"$RUN/api.config.js" <<EOF
module.exports = { apps: [{ name: 'api', script: '$APPS/release.js', exec_mode: 'cluster', instances: $WORKERS,
  env: { RELEASE: '$release', BASE_MS: '$base', PORT: '$PORT' } }] };
EOF
      timeout 60 "$PM2" start "$RUN/api.config.js" >>"$RUN/pm2.log" 2>&1 || die "pm2 start failed"
      MGR=$(cat "$PM2_HOME/pm2.pid")
      ;;
  esac
  answering "$PORT" || die "$c did not answer on $PORT"
}

down() {
  case $1 in
    pm2) timeout 60 "$PM2" delete all >/dev/null 2>&1 || log "pm2 delete failed" ;;
    *) end_pid "$MGR" ;;
  esac
}

# reload CONTENDER RELEASE: switch the configuration to RELEASE and reload;
# sets RC and OUT.
reload() {
  local c=$1 release=$2
  case $c in
    nodeherd-*)
      sed -i "s/\"RELEASE\":\"[a-z]*\"/\"RELEASE\":\"$release\"/" "$RUN/api.json"
      set +e
      OUT=$(timeout 300 "$NH" reload api --bus "$BUS" 2>&1)
      RC=$?
      set -e
      ;;
    pm2)
      sed -i "s/RELEASE: '[a-z]*'/RELEASE: '$release'/" "$RUN/api.config.js"
      set +e
      OUT=$(timeout 300 "$PM2" reload "$RUN/api.config.js" --update-env 2>&1)
      RC=$?
      OUT=$(tail -1 <<<"$OUT")
      set -e
      ;;
  esac
}

# exposure ROUND CONTENDER RELEASE [BASE_MS]
exposure() {
  local round=$1 c=$2 release=$3 load t_ask t_done f
  up "$c" good "${4:-0}"
  f=$RUN/load-$c-$release-$round.json
  node "$LIB/canary-load.js" "$PORT" "$RATE" "$f" &
  load=$!
  PIDS+=("$load")
  sleep 3
  t_ask=$(ms)
  reload "$c" "$release"
  t_done=$(ms)
  log "$c, $release, round $round: reload exit $RC in $((t_done - t_ask)) ms: ${OUT//$'\n'/ }"
  local left=$((t_ask + WINDOW * 1000 - $(ms)))
  ((left > 0)) && sleep "$((left / 1000)).$(printf '%03d' $((left % 1000)))"
  kill -TERM "$load"
  wait "$load" 2>/dev/null || true
  down "$c"
  node -e '
    const [f, ask, done, rc, c, release, round, out] = process.argv.slice(1);
    const { t0, seen } = JSON.parse(require("fs").readFileSync(f));
    const from = Number(ask) - t0, to = from + Number(process.env.WINDOW) * 1000;
    const w = seen.filter((s) => s[0] >= from && s[0] < to);
    const bad = w.filter((s) => s[2] === release);
    const lat = w.filter((s) => s[1] === 200).map((s) => s[3]).sort((a, b) => a - b);
    const last = bad.length ? Math.max(...bad.map((s) => s[0])) - from : null;
    console.log(JSON.stringify({ phase: "exposure", contender: c, release, round: Number(round),
      reload_ms: Number(done) - Number(ask), exit: Number(rc), said: out.slice(0, 300),
      requests: w.length, by_release: bad.length, status_500: w.filter((s) => s[1] === 500).length,
      failed: w.filter((s) => s[1] === 0).length, last_by_release_ms: last,
      p99_ms: lat.length ? lat[Math.floor(lat.length * 0.99)] : null }));
  ' "$f" "$t_ask" "$t_done" "$RC" "$c" "$release" "$round" "$OUT" >>"$RESULTS"
}

export WINDOW
CONTENDERS=(nodeherd-canary nodeherd-rolling pm2)
has_phase() { [[ ",$PHASES," == *",$1,"* ]]; }
for ((round = 1; round <= ROUNDS; round++)); do
  if has_phase bad; then
    for ((i = 0; i < ${#CONTENDERS[@]}; i++)); do
      exposure "$round" "${CONTENDERS[(i + round - 1) % ${#CONTENDERS[@]}]}" bad
    done
  fi
  has_phase slow && exposure "$round" nodeherd-canary slow "$SLOW_BASE"
done

# Throughput with and without the per-response counting.
if [[ -n $BASE_BIN ]] && has_phase tput; then
  for ((rep = 1; rep <= TPUT_REPS; rep++)); do
    for ka in off on; do
      for which in this base; do
        bin=$NH
        [[ $which == base ]] && bin=$BASE_BIN
        PORT=$(free_port)
        PORT=$PORT "$bin" run "$APPS/hello.js" -i 2 --listen "127.0.0.1:$PORT" --no-bus >"$RUN/tput-$which.log" 2>&1 &
        MGR=$!
        PIDS+=("$MGR")
        for ((i = 0; i < 100; i++)); do
          curl -fsS "http://127.0.0.1:$PORT/" >/dev/null 2>&1 && break
          sleep 0.1
        done
        "$OHA" -z 1s -c 64 --no-tui "http://127.0.0.1:$PORT/" >/dev/null 2>&1 || true
        args=(-z "${TPUT_SECS}s" -c 64 --no-tui --output-format json)
        [[ $ka == off ]] && args+=(--disable-keepalive)
        rps=$("$OHA" "${args[@]}" "http://127.0.0.1:$PORT/" 2>/dev/null | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).summary.requestsPerSec))')
        end_pid "$MGR"
        echo "{\"phase\":\"tput\",\"which\":\"$which\",\"keepalive\":\"$ka\",\"rep\":$rep,\"rps\":$rps}" >>"$RESULTS"
        log "throughput, $which, keep-alive $ka: $rps req/s"
      done
    done
  done
fi

# --- report ------------------------------------------------------------------
node - "$RESULTS" "$COMMAND_LINE" "$RATE" "$WINDOW" <<'EOF'
const [file, cmd, rate, windowS] = process.argv.slice(2);
const rows = require('fs').readFileSync(file, 'utf8').trim().split('\n').filter(Boolean).map((l) => JSON.parse(l));
const med = (xs) => { const s = [...xs].sort((a, b) => a - b); return s.length ? (s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2) : NaN; };
const pct = (a, b) => (b ? ((100 * a) / b).toFixed(2) + ' %' : '–');
console.log(`Command: \`${cmd}\`; ${rate} requests/s on fresh connections, a window of ${windowS} s from the reload's request.\n`);
console.log('| contender | release | round | reload took, exit | requests in window | answered by the new release | 500s | failed | new release last answered | p99 of 200s |');
console.log('|---|---|---|---|---|---|---|---|---|---|');
for (const r of rows.filter((r) => r.phase === 'exposure')) {
  const last = r.last_by_release_ms === null ? 'never' : `${(r.last_by_release_ms / 1000).toFixed(1)} s`;
  console.log(`| ${r.contender} | ${r.release} | ${r.round} | ${(r.reload_ms / 1000).toFixed(1)} s, ${r.exit} | ${r.requests} | ${r.by_release} (${pct(r.by_release, r.requests)}) | ${r.status_500} (${pct(r.status_500, r.requests)}) | ${r.failed} | ${last} | ${r.p99_ms} ms |`);
}
const said = rows.filter((r) => r.phase === 'exposure' && r.contender === 'nodeherd-canary');
if (said.length) {
  console.log('\nWhat the canary reloads said:\n');
  for (const r of said) console.log(`- ${r.release}, round ${r.round}: exit ${r.exit}: ${r.said.replace(/\n/g, ' ')}`);
}
const t = rows.filter((r) => r.phase === 'tput');
if (t.length) {
  console.log('\n| keep-alive | with counting, req/s (median) | without, req/s (median) | ratio |');
  console.log('|---|---|---|---|');
  for (const ka of ['off', 'on']) {
    const a = med(t.filter((r) => r.keepalive === ka && r.which === 'this').map((r) => r.rps));
    const b = med(t.filter((r) => r.keepalive === ka && r.which === 'base').map((r) => r.rps));
    console.log(`| ${ka} | ${a.toFixed(0)} | ${b.toFixed(0)} | ${(a / b).toFixed(3)} |`);
  }
}
EOF
