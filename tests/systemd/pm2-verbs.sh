#!/usr/bin/env bash
# PM2's verbs under a real systemd (PID 1 of a throwaway container, see
# container.sh), typed as a PM2 user would, as root:
#
#   tests/systemd/pm2-verbs.sh [NODEHERD_BINARY]
#
#   a. two apps installed with `nodeherd install` (web started at once,
#      api on its socket only): `nodeherd ls` lists both, web ready 2/2
#      with its manager's pid (systemd's MainPID), api `listening`; --json
#   b. `nodeherd logs web`: the workers' lines from the journal after
#      `[web:N]`; `-i 1` only worker 1's; `status nosuchapp` names web
#   c. `nodeherd start app.js -i 2 --name solo`: a transient
#      nodeherd-solo.service, serving when start returns; ls, status,
#      logs and `systemctl reload` reach it
#   d. `nodeherd stop web`: its socket and service stopped, ls says
#      stopped; `nodeherd start web` starts both again
#   e. `nodeherd stop solo`: the transient unit is gone
#   f. `nodeherd delete api`: uninstalled, no longer listed
#   g. `nodeherd start ecosystem.config.js` of two apps listening on their
#      own ports: a transient unit each, both serving, `status` reaches
#      each; `stop` ends each
#   h. PM2 7 itself (`pm2 start` + `pm2 save` in the container of a
#      cluster app and a fork-mode one, from a shell exporting a token):
#      `nodeherd install ~/.pm2/dump.pm2 --now` installs the cluster app,
#      which serves, and skips the other; its copy holds the app's env and
#      none of the shell's; no value is printed (skipped, saying so, when
#      PM2 cannot be installed)
#
# Prints `N passed, N failed`; exits 1 on any failure. Every wait is
# bounded; the container, its mounts and cgroups are removed whatever
# happens. Needs root and systemd-nspawn.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=container.sh
source "$HERE/container.sh"

NAME=nodeherd-pm2-$$
log() { printf '%s %s\n' "$(date +%T.%3N)" "$*"; }
die() { echo "pm2-verbs: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "needs root"

BIN=${1:-}
if [[ -z $BIN ]]; then
    for b in "$REPO/target/release/nodeherd" "$REPO/target/debug/nodeherd"; do
        [[ -x $b ]] && { BIN=$b; break; }
    done
fi
[[ -n $BIN && -x $BIN ]] || die "no nodeherd binary (build it, or pass its path)"
BIN=$(readlink -f "$BIN")
command -v systemd-nspawn >/dev/null || die "systemd-nspawn missing (apt-get install systemd-container)"
command -v jq >/dev/null || die "jq missing"

PASS=0 FAIL=0
pass() { PASS=$((PASS + 1)); echo "ok   - $*"; }
fail() { FAIL=$((FAIL + 1)); echo "FAIL - $*"; }
expect() { local d=$1; shift; if "$@"; then pass "$d"; else fail "$d"; fi; }

HOSTDIR=$(mktemp -d /tmp/nodeherd-pm2.XXXXXX)
chmod 755 "$HOSTDIR"
STARTED=0
cleanup() {
    local rc=$?
    ((STARTED)) && { container_stop "$NAME" || echo "pm2-verbs: container cleanup reported problems" >&2; }
    rm -rf "$HOSTDIR"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    local p
    for p in $(seq $((21000 + $$ % 11000)) $((21100 + $$ % 11000))); do
        [[ -z $(ss -Htln "sport = :$p") && -z $(ss -Htln "sport = :$((p + 1))") && -z $(ss -Htln "sport = :$((p + 2))") \
            && -z $(ss -Htln "sport = :$((p + 3))") && -z $(ss -Htln "sport = :$((p + 4))") \
            && -z $(ss -Htln "sport = :$((p + 5))") ]] && { echo "$p"; return; }
    done
    die "no free port"
}
PORT=$(free_port)
WEB_PORT=$PORT API_PORT=$((PORT + 1)) SOLO_PORT=$((PORT + 2)) PA_PORT=$((PORT + 3)) PB_PORT=$((PORT + 4)) DUMP_PORT=$((PORT + 5))

cp "$BIN" "$HOSTDIR/nodeherd"
cp -r "$REPO/units" "$HOSTDIR/units"
cat >"$HOSTDIR/talker.js" <<'JS'
const i = process.env.NODE_APP_INSTANCE;
console.log(`hello from ${i}`);
require('http').createServer((q, r) => { console.log(`request ${q.url} on ${i}`); r.end(`${i}\n`); })
  .listen(Number(process.env.PORT || 8000));
JS
cat >"$HOSTDIR/setup.sh" <<EOF
set -eu
install -m 755 /shared/nodeherd /usr/bin/nodeherd
systemd-sysusers /shared/units/sysusers.d/nodeherd.conf
install -m 644 /shared/units/nodeherd@.socket /shared/units/nodeherd@.service /etc/systemd/system/
install -d -m 755 /srv/web /srv/solo
install -m 644 /shared/talker.js /srv/web/talker.js
install -m 644 /shared/talker.js /srv/solo/app.js
install -d -m 755 /srv/dumped
install -m 644 /shared/talker.js /srv/dumped/talker.js
cat >/srv/dumped/ecosystem.config.js <<'JS'
module.exports = { apps: [
  { name: 'dumped', script: './talker.js', exec_mode: 'cluster', instances: 2,
    env: { PORT: '$DUMP_PORT', DUMP_SECRET: 'dump-secret-55a1' } },
  { name: 'dumpjob', script: './job.js', exec_mode: 'fork', env: { JOB: '1' } },
] };
JS
echo 'setInterval(() => {}, 1000);' >/srv/dumped/job.js
install -d -m 755 /srv/pair
install -m 644 /shared/talker.js /srv/pair/talker.js
cat >/srv/pair/ecosystem.config.js <<'JS'
module.exports = { apps: [
  { name: 'pa', script: './talker.js', instances: 2, env: { PORT: '$PA_PORT' } },
  { name: 'pb', script: './talker.js', instances: 2, env: { PORT: '$PB_PORT' } },
] };
JS
cat >/srv/web/ecosystem.config.js <<'JS'
module.exports = { apps: [
  { name: 'web', script: './talker.js', instances: 2, listen: '127.0.0.1:$WEB_PORT' },
  { name: 'api', script: './talker.js', instances: 1, listen: '127.0.0.1:$API_PORT' },
] };
JS
systemctl daemon-reload
nodeherd install /srv/web/ecosystem.config.js --now
systemctl start nodeherd@web.service
EOF

log "booting a container"
STARTED=1
PID1=$(container_start "$NAME" "$HOSTDIR") || die "the container did not boot"
ct() { nsenter -t "$PID1" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}
prop() { ct systemctl show -P "$2" "$1"; }
if ! ct bash /shared/setup.sh >"$HOSTDIR/setup.log" 2>&1; then
    sed 's/^/  | /' "$HOSTDIR/setup.log"
    die "setup inside the container failed"
fi
answers() { [[ $(curl -s --max-time 2 "http://127.0.0.1:$1/$2") =~ ^[0-9]+$ ]]; }

# ---------------------------------------------------------------- a. ls
ls_json() { ct nodeherd ls --json; }
# app_is APP JQ-EXPR VALUE: that field of APP in `nodeherd ls --json`.
app_is() { [[ $(ls_json | jq -r ".apps[] | select(.name==\"$1\") | $2") == "$3" ]]; }
wait_for 30 answers "$WEB_PORT" ls || fail "a: web does not answer"
wait_for 30 app_is web '"\(.state) \(.ready_workers)/\(.instances)"' "ready 2/2" || true
out=$(ct nodeherd ls 2>&1) || true
echo "$out" | sed 's/^/       | /'
main=$(prop nodeherd@web.service MainPID)
expect "a: ls shows web ready 2/2 with its manager's pid $main" \
    app_is web '"\(.state) \(.ready_workers)/\(.instances) \(.manager_pid) \(.service.name)"' "ready 2/2 $main nodeherd@web.service"
expect "a: the table has web's row with that pid" \
    grep -qE "^web +ready +2/2 +0 .* $main +nodeherd@web.service\$" <<<"$out"
expect "a: ls shows api listening on its socket, not started" \
    app_is api '"\(.state) \(.manager_pid) \(.socket.sub)"' "listening null listening"
expect "a: ls --json says systemd is there" test "$(ls_json | jq -r .systemd)" = true

# ---------------------------------------------------------------- b. logs
both_workers_logged() {
    local o
    o=$(ct nodeherd logs web --lines 100 2>/dev/null) || return 1
    grep -qx '\[web:0\] hello from 0' <<<"$o" && grep -qx '\[web:1\] hello from 1' <<<"$o"
}
expect "b: logs web shows [web:0] and [web:1] lines" wait_for 20 both_workers_logged
one=$(ct nodeherd logs web -i 1 --lines 100 2>&1) || true
expect "b: logs web -i 1 shows worker 1's lines" grep -qx '\[web:1\] hello from 1' <<<"$one"
expect "b: and no other worker's" test -z "$(grep '^\[web:0\]' <<<"$one")"
rc=0; err=$(ct nodeherd status nosuchapp 2>&1) || rc=$?
expect "b: status nosuchapp names what runs, exit 3 ($err)" \
    test "$rc $err" = "3 nodeherd: no app nosuchapp; running: web"

# ---------------------------------------------------------------- c. start
start_solo() { ct sh -c "cd /srv/solo && exec nodeherd start app.js -i 2 --name solo --listen 127.0.0.1:$SOLO_PORT" 2>&1; }
rc=0; out=$(start_solo) || rc=$?
expect "c: start app.js as root exits 0 ($out)" test "$rc" = 0
expect "c: it runs as the transient nodeherd-solo.service" \
    test "$(prop nodeherd-solo.service ActiveState)" = active
expect "c: it serves when start returns" answers "$SOLO_PORT" start
spid=$(prop nodeherd-solo.service MainPID)
expect "c: ls lists solo with its pid $spid" \
    app_is solo '"\(.state) \(.manager_pid) \(.transient_unit.name)"' "ready $spid nodeherd-solo.service"
solo_status() { local o; o=$(ct nodeherd status solo 2>&1); grep -q "^solo: ready" <<<"$o" || { echo "$o" | sed "s/^/       | /"; return 1; }; }
expect "c: status solo reaches it" solo_status
expect "c: systemctl reload nodeherd-solo" ct systemctl reload nodeherd-solo.service
solo_logged() { ct nodeherd logs solo --lines 50 2>/dev/null | grep -qx '\[solo:1\] hello from 1'; }
expect "c: logs solo reads its lines from the journal" wait_for 10 solo_logged
rc=0; out=$(start_solo) || rc=$?
expect "c: a second start is refused, exit 1 ($out)" test "$rc" = 1

# ---------------------------------------------------------------- d. stop, start
rc=0; out=$(ct nodeherd stop web 2>&1) || rc=$?
expect "d: stop web exits 0 ($out)" test "$rc" = 0
expect "d: its service and socket are stopped" \
    test "$(prop nodeherd@web.service ActiveState) $(prop nodeherd@web.socket ActiveState)" = "inactive inactive"
expect "d: ls says web is stopped" app_is web .state stopped
rc=0; out=$(ct nodeherd start web 2>&1) || rc=$?
expect "d: start web exits 0 ($out)" test "$rc" = 0
expect "d: web serves again" wait_for 20 answers "$WEB_PORT" again

# ---------------------------------------------------------------- e. stop a transient one
rc=0; out=$(ct nodeherd stop solo 2>&1) || rc=$?
expect "e: stop solo exits 0 ($out)" test "$rc" = 0
expect "e: the transient unit is gone" test "$(prop nodeherd-solo.service ActiveState)" != active
expect "e: ls no longer lists solo" app_is solo .name ""

# ---------------------------------------------------------------- f. delete
rc=0; out=$(ct nodeherd delete api 2>&1) || rc=$?
expect "f: delete api exits 0 ($out)" test "$rc" = 0
expect "f: api is no longer listed" app_is api .name ""
expect "f: its configuration is gone" test ! -e "/proc/$PID1/root/etc/nodeherd/api.json"

# ---------------------------------------------------------------- g. start a file of two apps
rc=0; out=$(ct sh -c "cd /srv/pair && exec nodeherd start ecosystem.config.js" 2>&1) || rc=$?
expect "g: start of a file of two apps exits 0 ($out)" test "$rc" = 0
for a in pa pb; do
    expect "g: $a runs as the transient nodeherd-$a.service" \
        test "$(prop "nodeherd-$a.service" ActiveState)" = active
done
# With no socket of its own a worker counts as ready once started, before
# its listen(): so a bounded wait, not "when start returns".
expect "g: pa serves on its own port" wait_for 20 answers "$PA_PORT" pair
expect "g: pb serves on its own port" wait_for 20 answers "$PB_PORT" pair
for a in pa pb; do
    st() { ct nodeherd status "$1" 2>&1 | grep -q "^$1: ready"; }
    expect "g: status $a reaches it" st "$a"
    rc=0; out=$(ct nodeherd stop "$a" 2>&1) || rc=$?
    expect "g: stop $a exits 0 ($out)" test "$rc" = 0
done

# ---------------------------------------------------------------- h. PM2's saved list
# PM2 as the benchmark and tests/pm2_dump.rs install it, into the cache
# (the container sees the host's files).
PM2_PREFIX=/var/cache/nodeherd-ci/pm2-7.0.4
PM2=$PM2_PREFIX/node_modules/.bin/pm2
[[ -x $PM2 ]] || timeout 300 npm install --prefix "$PM2_PREFIX" --cache /var/cache/nodeherd-ci/npm \
    --prefer-offline --no-audit --no-fund --loglevel=error pm2@7.0.4 >/dev/null 2>&1 || true
if [[ -x $PM2 ]]; then
    pm2_in_ct() { ct env HOME=/root PM2_HOME=/root/.pm2 SHELL_TOKEN=shell-token-91e0 sh -c "cd /srv/dumped && $PM2 $*" >/dev/null 2>&1; }
    expect "h: pm2 start (cluster, 2 instances) in the container" pm2_in_ct start ecosystem.config.js
    expect "h: pm2 save" pm2_in_ct save
    # The daemon and its workers go, by its pid.
    ppid=$(cat "/proc/$PID1/root/root/.pm2/pm2.pid" 2>/dev/null || true)
    pm2_in_ct kill || true
    [[ -n $ppid ]] && ct kill -KILL "$ppid" 2>/dev/null || true
    rc=0; out=$(ct nodeherd install /root/.pm2/dump.pm2 --listen "127.0.0.1:$DUMP_PORT" --now 2>&1) || rc=$?
    expect "h: install of PM2's dump exits 0 ($out)" test "$rc" = 0
    expect "h: it names the app's env" grep -q 'dumped: 2 instance(s), env DUMP_SECRET, PORT (values not shown)' <<<"$out"
    expect "h: and the shell's as left out" grep -q 'left out as the environment of the shell.*SHELL_TOKEN' <<<"$out"
    expect "h: the fork-mode app is skipped, saying so" grep -q 'dumpjob: skipped: fork_mode' <<<"$out"
    expect "h: no value is printed" test -z "$(grep -E 'dump-secret-55a1|shell-token-91e0' <<<"$out")"
    expect "h: the installed app serves" wait_for 30 answers "$DUMP_PORT" dumped
    copy=/proc/$PID1/root/etc/nodeherd/dumped.json
    expect "h: its copy holds 2 instances and the app's env" \
        jq -e '.apps[0].instances == 2 and .apps[0].env.DUMP_SECRET == "dump-secret-55a1"' "$copy"
    expect "h: and none of the shell's" \
        jq -e '.apps[0].env | (has("SHELL_TOKEN") or has("PATH") or has("HOME") or has("PM2_HOME")) | not' "$copy"
    ct nodeherd delete dumped >/dev/null 2>&1 || true
else
    echo "skip - h: pm2@7.0.4 could not be installed into $PM2_PREFIX: no real PM2 dump"
fi

echo "$PASS passed, $FAIL failed"
((FAIL == 0))
