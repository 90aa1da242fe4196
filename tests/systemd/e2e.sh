#!/usr/bin/env bash
# End-to-end: nodeherd under a real systemd (PID 1 of a throwaway container),
# installed the way a user would, driven from outside over loopback.
#
#   tests/systemd/e2e.sh [--root host|trixie] [NODEHERD_BINARY]
#
# NODEHERD_BINARY defaults to target/release/nodeherd, else target/debug/nodeherd.
# Needs root. Installs what it lacks from Debian (systemd-container for
# systemd-nspawn, curl, iproute2, dbus-bin, nodejs, jq, util-linux).
#
# --root host (the default): the container (see container.sh) is this
# machine's root file system (Debian 12: systemd 252, dbus-daemon, polkitd
# 122) under a throwaway overlay. --root trixie: a Debian 13 root (systemd
# 257, dbus-broker, polkitd, nodejs 20, dbus-bin) made by debian-root.sh from
# the archive the first time and cached under
# ${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}/debian-roots, under the same
# kind of overlay. Either way the container shares the host network. Into it go the binary as
# /usr/bin/nodeherd, units/nodeherd@.{socket,service}, units/sysusers.d,
# packaging/dbus/org.nodeherd.conf and the example app as app `hello`, whose
# socket listens on 127.0.0.1:PORT through a drop-in. Then:
#   a. only the .socket is started; the first request starts the service
#   b. `systemctl reload` under continuous load (a new connection per request,
#      then keep-alive): zero failed requests
#   n. nodeherd reexec under load, after the binary is replaced as an
#      upgrade does, 3 times with and 3 without keep-alive: 0 failed, the
#      same main pid and workers, NRestarts and start time unchanged, the
#      manager's exe the new file, the journal's `reexecuted` events
#   c. Scale to 4 over D-Bus; systemctl status and nodeherd status show 4
#   d. journalctl NODE_APP_INSTANCE=1 shows that worker's lines only
#   e. authz-checks.sh on the real bus with polkit (owning, reading, nothing
#      granted on another name, every method refused with the action named
#      to nobody and to another app's user, operators allowed); app `other`
#      (tests/systemd/tenant.js, installed with `nodeherd install`) tries from
#      its own unit to own hello's name, scale and restart it, kill its
#      processes, read its files and its runtime directory: all refused;
#      an operator reads none of the apps' files either
#   m. a name squatter: root owns org.nodeherd.hello first; the manager
#      stops with exit 4 and says who owns it; clients refuse to talk to
#      the squatter; gone, the app starts again
#   g. kill -9 of the manager: systemd restarts it, no connection refused
#   h. the manager feeds the watchdog; a hung (SIGSTOPped) one is replaced
#   f. systemctl stop leaves no process in the unit's cgroup
#   i. Documentation=, FreeBind=, RestartPreventExitStatus= as installed
#   j. systemctl reload re-reads /etc/nodeherd/hello.config.js under load
#      (new env, 2 -> 3 workers, 0 failed); a broken edit fails it closed
#   k. a bad configuration at start: connections keep starting the service
#      for 14 s and the socket never fails; fixed, the next one is served
#   l. nodeherd install of a two-app file, idempotent, names that used to
#      collide kept apart, a name that cannot be a user refused;
#      --boot shown by rebooting the container; uninstall
#   o. a root nodeherd install of a hostile ecosystem file: its .config.js
#      runs as nobody and cannot write /etc; a listen address carrying a
#      line of its own is refused and nothing written; the app's Unix socket
#      is 0660 for the app's group, refuses other users, and with
#      --socket-group www-data serves www-data
#   p. units/root-manager.conf: balance reuseport under a root manager
#      whose workers run as the app's user, with only CAP_SETUID,
#      CAP_SETGID and CAP_KILL, seccomp and no new privileges; a worker's
#      request for port 812 is refused; reload, a killed worker, stop
# Prints `N passed, N failed`; exits 1 on any failure. Every wait is bounded,
# everything started here is ended by pid, and the container, its mounts and
# cgroups are removed whatever happens.
#
# Environment: NODEHERD_E2E_KEEP=1 keeps the container after the run (stop
# it with `tests/systemd/container.sh stop NAME`); NODEHERD_E2E_PORT picks
# the port.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=container.sh
source "$HERE/container.sh"

APP=hello
UNIT=nodeherd@$APP.service
SOCK_UNIT=nodeherd@$APP.socket
BUS_NAME=org.nodeherd.$APP
NAME=nodeherd-e2e-$$

log() { printf '%s %s\n' "$(date +%T.%3N)" "$*"; }
die() { echo "e2e: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root"

ROOT_KIND=host
if [[ ${1:-} == --root ]]; then
    ROOT_KIND=${2:-}
    shift 2
fi
case $ROOT_KIND in
    host | trixie) ;;
    *) die "--root host|trixie, not '$ROOT_KIND'" ;;
esac

BIN=${1:-}
if [[ -z $BIN ]]; then
    for b in "$REPO/target/release/nodeherd" "$REPO/target/debug/nodeherd"; do
        [[ -x $b ]] && { BIN=$b; break; }
    done
fi
[[ -n $BIN && -x $BIN ]] || die "no nodeherd binary (build it, or pass its path)"
BIN=$(readlink -f "$BIN")

APP_JS=$REPO/examples/hello/app.js
[[ -f $APP_JS ]] || APP_JS=$HERE/hello/app.js

# ---------------------------------------------------------------- packages
need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v curl >/dev/null || need+=(curl)
command -v ss >/dev/null || need+=(iproute2)
command -v dbus-send >/dev/null || need+=(dbus-bin)
command -v node >/dev/null || need+=(nodejs)
command -v jq >/dev/null || need+=(jq)
command -v setpriv >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The Debian 13 root: made once, then cached (a minute or two the first time).
if [[ $ROOT_KIND == trixie ]]; then
    t0=$SECONDS
    NODEHERD_CONTAINER_ROOT=$("$HERE/debian-root.sh" trixie nodejs dbus-bin util-linux) ||
        die "no Debian 13 root"
    export NODEHERD_CONTAINER_ROOT
    log "Debian 13 root $NODEHERD_CONTAINER_ROOT ready in $((SECONDS - t0)) s"
    EXPECT_BUS=dbus-broker.service
else
    EXPECT_BUS=dbus.service
fi

# ---------------------------------------------------------------- results
PASS=0 FAIL=0
pass() { PASS=$((PASS + 1)); echo "ok   - $*"; }
fail() { FAIL=$((FAIL + 1)); echo "FAIL - $*"; }
# expect DESCRIPTION COMMAND...: pass if the command succeeds.
expect() { local d=$1; shift; if "$@"; then pass "$d"; else fail "$d"; fi; }

# ---------------------------------------------------------------- cleanup
HOSTDIR=$(mktemp -d /tmp/nodeherd-e2e.XXXXXX)
chmod 755 "$HOSTDIR"
BG_PIDS=()
STARTED=0
cleanup() {
    local rc=$? p
    touch "$HOSTDIR/stop-load" 2>/dev/null || true
    for p in "${BG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${BG_PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.02; done
        kill -KILL "$p" 2>/dev/null || true
    done
    if ((STARTED)); then
        if [[ ${NODEHERD_E2E_KEEP:-} == 1 ]]; then
            echo "e2e: keeping container $NAME (PID 1 $PID1); stop: $HERE/container.sh stop $NAME" >&2
        else
            container_stop "$NAME" || echo "e2e: container cleanup reported problems" >&2
        fi
    fi
    [[ ${NODEHERD_E2E_KEEP:-} == 1 ]] || rm -rf "$HOSTDIR"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- port
# Below the kernel's ephemeral range (32768-60999 by default): a port in it
# may be taken between this check and systemd's bind by any outgoing
# connection or listen(0) on the host, as happened once.
free_port() {
    local p
    for p in $(seq $((20000 + $$ % 12000)) $((20100 + $$ % 12000))); do
        [[ -z $(ss -Htln "sport = :$p") ]] && { echo "$p"; return; }
    done
    die "no free port"
}
PORT=${NODEHERD_E2E_PORT:-$(free_port)}
URL=http://127.0.0.1:$PORT/
MYAPP_PORT=$((PORT + 1))
[[ -z $(ss -Htln "sport = :$MYAPP_PORT") ]] || die "port $MYAPP_PORT is taken"
RP_PORT=$((PORT + 6))
[[ -z $(ss -Htln "sport = :$RP_PORT") ]] || die "port $RP_PORT is taken"

# ---------------------------------------------------------------- files for the container
cp "$BIN" "$HOSTDIR/nodeherd"
cp -r "$REPO/units" "$HOSTDIR/units"
cp "$REPO/packaging/dbus/org.nodeherd.conf" "$HOSTDIR/org.nodeherd.conf"
cp -r "$REPO/packaging/polkit" "$HOSTDIR/polkit"
cp "$APP_JS" "$HOSTDIR/app.js"
cp "$HERE/tenant.js" "$HERE/authz-checks.sh" "$HERE/probe.js" "$HOSTDIR/"
OTHER_PORT=$((PORT + 4)) SQUAT_PORT=$((PORT + 5))
cat >"$HOSTDIR/setup.sh" <<EOF
set -eu
install -m 755 /shared/nodeherd /usr/bin/nodeherd
# As the package: group nodeherd (operators) and the example app's user.
systemd-sysusers /shared/units/sysusers.d/nodeherd.conf
# An operator allowed to act on the bus through group nodeherd.
useradd --system --no-create-home --shell /usr/sbin/nologin -G nodeherd nhoperator
# The package's polkit actions and the operators' rule.
install -D -m 644 /shared/polkit/org.nodeherd.policy /usr/share/polkit-1/actions/org.nodeherd.policy
install -D -m 644 /shared/polkit/org.nodeherd.rules /usr/share/polkit-1/rules.d/org.nodeherd.rules
install -m 644 /shared/units/nodeherd@.socket /shared/units/nodeherd@.service /etc/systemd/system/
mkdir -p /etc/systemd/system/$SOCK_UNIT.d
printf '[Socket]\nListenStream=\nListenStream=127.0.0.1:$PORT\n' >/etc/systemd/system/$SOCK_UNIT.d/zz-e2e-listen.conf
install -d -m 755 /srv/$APP /etc/nodeherd
install -m 644 /shared/app.js /srv/$APP/app.js
cat >/etc/nodeherd/$APP.config.js <<'JS'
module.exports = {
  apps: [{ name: '$APP', script: '/srv/$APP/app.js', instances: 2 }],
};
JS
install -m 644 /shared/org.nodeherd.conf /etc/dbus-1/system.d/org.nodeherd.conf
# Data hello wrote under UMask=0027 (its own, as the unit makes them).
install -d -m 750 -o nodeherd-hello -g nodeherd-hello /srv/$APP-data
echo "hello's secret" >/srv/$APP-data/secret
chown nodeherd-hello:nodeherd-hello /srv/$APP-data/secret
chmod 640 /srv/$APP-data/secret
# A name only root may own and nobody may send to: nodeherd's policy must
# reach nothing there.
cat >/etc/dbus-1/system.d/zz-nodeherd-e2e-locked.conf <<'XML'
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><policy user="root"><allow own="org.nodeherdtest.Locked"/></policy></busconfig>
XML
# myapp.service's own user and policy, as its comments say.
mkdir -p /etc/sysusers.d
echo 'u nodeherd-myapp - "nodeherd app myapp" /nonexistent /usr/sbin/nologin' >/etc/sysusers.d/nodeherd-myapp.conf
systemd-sysusers
sed 's/hello/myapp/g' /etc/dbus-1/system.d/org.nodeherd.conf >/etc/dbus-1/system.d/org.nodeherd.myapp.conf
busctl call org.freedesktop.DBus / org.freedesktop.DBus ReloadConfig
# The example pair as its comments say: copied, port changed by a drop-in.
install -m 644 /shared/units/myapp.socket /shared/units/myapp.service /etc/systemd/system/
mkdir -p /etc/systemd/system/myapp.socket.d
printf '[Socket]\nListenStream=\nListenStream=127.0.0.1:$MYAPP_PORT\n' >/etc/systemd/system/myapp.socket.d/zz-e2e-listen.conf
cat >/etc/nodeherd/myapp.config.js <<'JS'
module.exports = { apps: [{ name: 'myapp', script: '/srv/$APP/app.js', instances: 1 }] };
JS
# The hostile tenant, another app, installed the ordinary way.
install -d -m 755 /srv/other
install -m 644 /shared/tenant.js /srv/other/tenant.js
cat >/srv/other/ecosystem.config.js <<'JS'
module.exports = { apps: [{ name: 'other', script: './tenant.js', instances: 1, listen: '127.0.0.1:$OTHER_PORT' }] };
JS
nodeherd install /srv/other/ecosystem.config.js --now
systemctl daemon-reload
# Seen once in CI: the first start of the socket failed with no cause kept.
# Say why, then try once more; a second failure fails the suite.
if ! systemctl enable --now $SOCK_UNIT; then
    systemctl status --no-pager $SOCK_UNIT || true
    journalctl --no-pager -n 30 -u $SOCK_UNIT || true
    ss -Htlnp "sport = :$PORT" || true
    sleep 1
    systemctl reset-failed $SOCK_UNIT || true
    systemctl start $SOCK_UNIT
fi
EOF

# ---------------------------------------------------------------- boot
log "booting container $NAME (port $PORT, binary $BIN, app $APP_JS)"
STARTED=1
PID1=$(container_start "$NAME" "$HOSTDIR") || die "container did not boot"
BOOT_S=$(cat "$NODEHERD_CONTAINER_STATE/$NAME/boot_seconds")
log "container PID 1 is $PID1 (host pid), booted to 'running' in ${BOOT_S}s"

# ct CMD...: run CMD inside the container as root, with a clean environment.
ct() { nsenter -t "$PID1" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
# ct_as WHO CMD...: same, as user WHO (nobody: uid 65534 without groups).
ct_as() {
    local who=$1; shift
    if [[ $who == nobody ]]; then
        ct setpriv --reuid=65534 --regid=65534 --clear-groups "$@"
    else
        ct setpriv --reuid="$who" --regid="$who" --init-groups "$@"
    fi
}
prop() { ct systemctl show -P "$2" "$1"; }
bus_prop() { ct busctl get-property "$BUS_NAME" /org/nodeherd org.nodeherd.Manager1 "$1" 2>/dev/null; }
ready_is() { [[ $(bus_prop ReadyWorkers) == "i $1" ]]; }
active_is() { [[ $(prop "$UNIT" ActiveState) == "$1" ]]; }
# wait_for SECONDS COMMAND...: poll every 50 ms until COMMAND succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}
# Processes of the service's cgroup, as pids inside the container.
unit_pids() {
    local cg
    cg=$(prop "$UNIT" ControlGroup)
    [[ -n $cg ]] || return 0
    ct sh -c "cat $CGROOT$cg/cgroup.procs 2>/dev/null; find $CGROOT$cg -mindepth 1 -name cgroup.procs -exec cat {} + 2>/dev/null" | sort -n | uniq
}
# Worker pids: everything in the cgroup but the manager.
worker_pids() {
    local main
    main=$(prop "$UNIT" MainPID)
    unit_pids | grep -vx "$main" || true
}
journal_dump() { ct journalctl --no-pager -o short-precise -u "$UNIT" -u "$SOCK_UNIT" -n "${1:-40}" | sed 's/^/       | /'; }

# The container's cgroup2 hierarchy: hybrid like this host, or unified.
CGROOT=/sys/fs/cgroup
if ct test -f /sys/fs/cgroup/unified/cgroup.procs; then CGROOT=/sys/fs/cgroup/unified; fi

if ! ct bash /shared/setup.sh >"$HOSTDIR/setup.log" 2>&1; then
    sed 's/^/  | /' "$HOSTDIR/setup.log"
    die "setup inside the container failed"
fi

# ================================================================ a
log "units as installed, with their drop-ins"
err=$(ct systemd-analyze verify --man=no /etc/systemd/system/$UNIT /etc/systemd/system/$SOCK_UNIT \
      /etc/systemd/system/myapp.service /etc/systemd/system/myapp.socket 2>&1 >/dev/null || echo "(exit $?)")
expect "systemd-analyze verify of the installed units is silent${err:+: $err}" test -z "$err"

log "a. socket activation"
expect "a: $SOCK_UNIT is active before any request" test "$(prop "$SOCK_UNIT" ActiveState)" = active
expect "a: $UNIT is not running before any request" test "$(prop "$UNIT" ActiveState)" = inactive
listeners=$(ss -Htlnp "sport = :$PORT")
if [[ $(wc -l <<<"$listeners") == 1 && $listeners == *'"systemd"'* && $listeners != *node* ]]; then
    pass "a: the port is held by systemd alone before activation"
else
    fail "a: expected one listener on :$PORT owned by systemd, got: $listeners"
fi
t0=$EPOCHREALTIME
first=$(curl -sS --max-time 60 -w '\n%{http_code}' "$URL" 2>&1) || true
t1=$EPOCHREALTIME
FIRST_MS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", (b - a) * 1000 }')
if [[ ${first##*$'\n'} == 200 ]]; then
    pass "a: first request answered in ${FIRST_MS} ms: ${first%%$'\n'*}"
else
    fail "a: first request not answered (after ${FIRST_MS} ms): $first"
    journal_dump
fi
expect "a: $UNIT is active after the first request" wait_for 30 active_is active
triggered=$(prop "$UNIT" TriggeredBy)
expect "a: $UNIT was started by its socket (TriggeredBy=$triggered)" test "$triggered" = "$SOCK_UNIT"
listeners=$(ss -Htln "sport = :$PORT")
if [[ $(wc -l <<<"$listeners") == 1 ]]; then
    pass "a: still exactly one listening socket on :$PORT (the workers use systemd's)"
else
    fail "a: more than one listener on :$PORT: $listeners"
fi
main=$(prop "$UNIT" MainPID)
comm=$(ct cat "/proc/$main/comm" 2>/dev/null || true)
expect "a: the main process is nodeherd (pid $main, comm $comm)" test "$comm" = nodeherd
expect "a: ReadyWorkers reaches 2 (config instances: 2)" wait_for 30 ready_is 2

log "a. the example pair myapp.socket + myapp.service"
ct systemctl start myapp.socket || fail "a: myapp.socket does not start"
body=$(curl -sS --max-time 60 -w ' %{http_code}' "http://127.0.0.1:$MYAPP_PORT/" 2>&1 | tr '\n' ' ' || true)
body=${body% }
expect "a: myapp answers its first request ($body)" test "${body##* }" = 200
expect "a: myapp.service runs the .config.js path (org.nodeherd.myapp on the bus)" \
    test "$(ct busctl get-property org.nodeherd.myapp /org/nodeherd org.nodeherd.Manager1 Name 2>&1)" = 's "myapp"'
if [[ ${body##* } != 200 ]]; then ct journalctl --no-pager -u myapp.service -n 20 | sed 's/^/       | /'; fi
timeout 60 nsenter -t "$PID1" -a systemctl stop myapp.service myapp.socket || fail "a: myapp does not stop"

# ---------------------------------------------------------------- load
# start_load TAG LANES [keepalive]: load.js in the background (new connection
# per request unless keepalive), until stop_load, at most 90 s.
start_load() {
    rm -f "$HOSTDIR/stop-load" "$HOSTDIR/load-$1"
    node "$HERE/load.js" "$URL" "$2" "$HOSTDIR/stop-load" 90 "$HOSTDIR/load-$1" ${3:-} &
    LOAD_PID=$!
    BG_PIDS+=("$LOAD_PID")
}
stop_load() { # lets requests in flight finish (20 s timeout each)
    touch "$HOSTDIR/stop-load"
    for _ in $(seq 500); do kill -0 "$LOAD_PID" 2>/dev/null || break; sleep 0.05; done
    kill -TERM "$LOAD_PID" 2>/dev/null || true
    wait "$LOAD_PID" 2>/dev/null || true
    BG_PIDS=()
}
# Lines: "<unix time> <HTTP status or error code> <pid or ->".
load_total() { wc -l <"$HOSTDIR/load-$1"; }
load_failed() { awk '$2 != 200' "$HOSTDIR/load-$1"; }
load_between() { awk -v a="$2" -v b="$3" '$1 >= a && $1 <= b' "$HOSTDIR/load-$1" | wc -l; }
load_summary() { awk '{ n[$2]++ } END { for (k in n) printf "%s%s: %d", (i++ ? ", " : ""), k, n[k] }' "$HOSTDIR/load-$1"; }

# ================================================================ b
log "b. reload under load"
before=$(worker_pids | tr '\n' ' ')
start_load reload 8
sleep 1
r0=$EPOCHREALTIME
reload_rc=0
reload_out=$(timeout 120 nsenter -t "$PID1" -a systemctl reload "$UNIT" 2>&1) || reload_rc=$?
r1=$EPOCHREALTIME
RELOAD_MS=$(awk -v a="$r0" -v b="$r1" 'BEGIN { printf "%d", (b - a) * 1000 }')
sleep 1
stop_load
after=$(worker_pids | tr '\n' ' ')
if ((reload_rc == 0)); then
    pass "b: systemctl reload returned 0 after ${RELOAD_MS} ms"
else
    fail "b: systemctl reload exited $reload_rc after ${RELOAD_MS} ms: $reload_out"
    journal_dump
fi
expect "b: $UNIT is active after the reload" test "$(prop "$UNIT" ActiveState)" = active
common=$(comm -12 <(tr ' ' '\n' <<<"$before" | sort) <(tr ' ' '\n' <<<"$after" | sort) | grep -c . || true)
if [[ -n ${after// /} && $common == 0 ]]; then
    pass "b: every worker was replaced (before: $before; after: $after)"
else
    fail "b: workers not all replaced (before: $before; after: $after)"
fi
RELOAD_TOTAL=$(load_total reload)
RELOAD_DURING=$(load_between reload "$r0" "$r1")
RELOAD_FAILED=$(load_failed reload | wc -l)
if ((RELOAD_DURING >= 10)); then
    pass "b: load kept running through the reload ($RELOAD_DURING requests during it, $RELOAD_TOTAL in all)"
else
    fail "b: too little load during the reload to judge ($RELOAD_DURING requests during it)"
fi
if ((RELOAD_FAILED == 0 && RELOAD_TOTAL > 0)); then
    pass "b: zero failed requests out of $RELOAD_TOTAL"
else
    fail "b: $RELOAD_FAILED of $RELOAD_TOTAL requests failed ($(load_summary reload)); first ones:"
    load_failed reload | sort -n | head -5 | sed 's/^/       | /'
fi
served_by=$(awk '$3 != "-" { print $3 }' "$HOSTDIR/load-reload" | sort -u | wc -l)
log "   requests were served by $served_by distinct worker pids"

# The same with keep-alive: each lane keeps one connection open; a worker
# being replaced must close its connections between requests, never under
# one in flight (Node's client does not retry, so a reset shows up here).
log "b. reload under keep-alive load"
start_load keepalive 8 keepalive
sleep 1
r0=$EPOCHREALTIME
reload_rc=0
reload_out=$(timeout 120 nsenter -t "$PID1" -a systemctl reload "$UNIT" 2>&1) || reload_rc=$?
r1=$EPOCHREALTIME
sleep 1
stop_load
KA_TOTAL=$(load_total keepalive)
KA_DURING=$(load_between keepalive "$r0" "$r1")
KA_FAILED=$(load_failed keepalive | wc -l)
expect "b: second reload returned 0 (${reload_out:-no output})" test "$reload_rc" = 0
if ((KA_FAILED == 0 && KA_DURING >= 10)); then
    pass "b: keep-alive: zero failed requests out of $KA_TOTAL ($KA_DURING during the reload)"
else
    fail "b: keep-alive: $KA_FAILED of $KA_TOTAL requests failed, $KA_DURING during the reload ($(load_summary keepalive))"
    load_failed keepalive | sort -n | head -5 | sed 's/^/       | /'
fi

# ================================================================ n
# The binary is replaced the way a package upgrade does it (a new file
# renamed over the old one), then `nodeherd reexec` moves the running
# manager onto it: three times with a new connection per request, three
# times with keep-alive.
log "n. re-exec in place under load: the same main pid and workers, no restart"
main0=$(prop "$UNIT" MainPID)
nrestarts0=$(prop "$UNIT" NRestarts)
started0=$(prop "$UNIT" ExecMainStartTimestampMonotonic)
workers0=$(worker_pids | tr '\n' ' ')
for mode in new keepalive; do
    start_load "reexec-$mode" 8 "$([[ $mode == keepalive ]] && echo keepalive)"
    sleep 1
    rc=0 out=
    for _ in 1 2 3; do
        ct sh -c 'cp /usr/bin/nodeherd /usr/bin/nodeherd.new && mv -f /usr/bin/nodeherd.new /usr/bin/nodeherd'
        out=$(ct timeout 60 nodeherd reexec "$APP" 2>&1) || { rc=$?; break; }
    done
    sleep 1
    stop_load
    expect "n: three re-execs ($mode connections) exit 0 ($out)" test "$rc" = 0
    total=$(load_total "reexec-$mode")
    failed=$(load_failed "reexec-$mode" | wc -l)
    if ((failed == 0 && total > 0)); then
        pass "n: $mode connections: zero failed requests out of $total"
    else
        fail "n: $mode connections: $failed of $total requests failed ($(load_summary "reexec-$mode"))"
        load_failed "reexec-$mode" | sort -n | head -5 | sed 's/^/       | /'
    fi
done
expect "n: the main pid is the same ($main0 -> $(prop "$UNIT" MainPID))" test "$(prop "$UNIT" MainPID)" = "$main0"
expect "n: systemd saw no restart (NRestarts $nrestarts0 -> $(prop "$UNIT" NRestarts), start time kept)" \
    test "$(prop "$UNIT" NRestarts)" = "$nrestarts0" -a "$(prop "$UNIT" ExecMainStartTimestampMonotonic)" = "$started0"
expect "n: $UNIT is active" test "$(prop "$UNIT" ActiveState)" = active
workers1=$(worker_pids | tr '\n' ' ')
expect "n: the same workers ($workers0 -> $workers1)" test "$workers0" = "$workers1"
exe=$(ct readlink "/proc/$main0/exe")
expect "n: the manager runs the new file ($exe)" test "$exe" = /usr/bin/nodeherd
expect "n: Reexecs counts six ($(bus_prop Reexecs))" test "$(bus_prop Reexecs)" = "u 6"
events=$(ct journalctl --no-pager -u "$UNIT" NODEHERD_EVENT=reexecuted -o cat | wc -l)
expect "n: the journal has six 're-executed' lines ($events)" test "$events" = 6

# ================================================================ c
log "c. scale to 4 over D-Bus"
scale_out=$(ct busctl call "$BUS_NAME" /org/nodeherd org.nodeherd.Manager1 Scale i 4 2>&1) || true
expect "c: busctl Scale i 4 returns 'i 4' (got '$scale_out')" test "$scale_out" = "i 4"
if wait_for 30 ready_is 4; then
    pass "c: ReadyWorkers reaches 4"
else
    fail "c: ReadyWorkers is '$(bus_prop ReadyWorkers)', not 4"
fi
nworkers=$(worker_pids | wc -l)
expect "c: the unit's cgroup holds the manager and 4 workers (workers: $nworkers)" test "$nworkers" = 4
status=$(ct systemctl status --no-pager -l "$UNIT" 2>&1 || true)
echo "$status" | sed -n '1,30p' | sed 's/^/       | /'
main=$(prop "$UNIT" MainPID)
status_nodes=$(grep -oE '[├└]─[0-9]+' <<<"$status" | grep -oE '[0-9]+' | grep -vxc "$main" || true)
expect "c: systemctl status lists the manager and 4 more processes (found $status_nodes)" test "$status_nodes" = 4
nh_status=$(ct nodeherd status "$APP" 2>&1) && nh_rc=0 || nh_rc=$?
echo "$nh_status" | sed 's/^/       | /'
expect "c: nodeherd status $APP exits 0" test "$nh_rc" = 0
nh_json=$(ct nodeherd status "$APP" --json 2>&1) || true
nh_ready=$(jq -r '.workers | map(select(.state == "ready")) | length' <<<"$nh_json" 2>/dev/null || echo "?")
expect "c: nodeherd status --json shows 4 ready workers (found $nh_ready)" test "$nh_ready" = 4
# Table rows: instance, pid, state, restarts, uptime, memory.
nh_rows=$(awk '$1 ~ /^[0-9]+$/ && $3 == "ready"' <<<"$nh_status" | wc -l)
expect "c: nodeherd status lists 4 ready workers (rows: $nh_rows)" test "$nh_rows" = 4

# ================================================================ d
log "d. journal per worker"
# Worker 1's pid, from the bus: Workers a(uusuttt) = instance, pid, state, ...
workers=$(ct busctl --json=short get-property "$BUS_NAME" /org/nodeherd org.nodeherd.Manager1 Workers 2>&1 || true)
w1_pid=$(jq -r '.data[] | select(.[0] == 1) | .[1]' <<<"$workers" 2>/dev/null | head -1 || true)
j1=$(ct journalctl --no-pager -o json -u "$UNIT" NODE_APP_INSTANCE=1 2>&1 || true)
j1_n=$(grep -c . <<<"$j1" || true)
if ((j1_n > 0)); then
    pass "d: journalctl -u $UNIT NODE_APP_INSTANCE=1 has $j1_n lines"
else
    fail "d: journalctl -u $UNIT NODE_APP_INSTANCE=1 has no lines"
fi
{ ct journalctl --no-pager -u "$UNIT" NODE_APP_INSTANCE=1 || true; } | tail -5 | sed 's/^/       | /'
# The app prints "worker N listening" (the stand-in: "instance N pid P
# listening"): lines tagged instance 1 must be worker 1's own words.
msgs1=$(jq -r 'select(.MESSAGE | type == "string") | .MESSAGE' <<<"$j1" 2>/dev/null || true)
wrong=$(grep -oE '(worker|instance) [0-9]+' <<<"$msgs1" | grep -vE '^(worker|instance) 1$' | sort -u || true)
said=$(grep -cE '(worker|instance) 1 .*listening' <<<"$msgs1" || true)
if [[ -z $wrong && $said -gt 0 ]]; then
    pass "d: the lines tagged NODE_APP_INSTANCE=1 are worker 1's ($said start-up lines, no other worker's)"
else
    fail "d: lines tagged NODE_APP_INSTANCE=1: worker 1 start-up lines: $said, other workers named: ${wrong:-none}"
fi
pids1=$(jq -r '.WORKER_PID // empty' <<<"$j1" 2>/dev/null | sort -u || true)
j0=$(ct journalctl --no-pager -o json -u "$UNIT" NODE_APP_INSTANCE=0 2>&1 || true)
pids0=$(jq -r '.WORKER_PID // empty' <<<"$j0" 2>/dev/null | sort -u || true)
shared=$(comm -12 <(echo "$pids0") <(echo "$pids1") | grep . || true)
if [[ -n $pids1 && -n $pids0 && -z $shared ]]; then
    pass "d: instance 0 and 1 lines come from disjoint worker pids (1: $(echo $pids1); 0: $(echo $pids0))"
else
    fail "d: WORKER_PID of instance 1 lines: $(echo $pids1); of instance 0: $(echo $pids0); in both: $(echo $shared)"
fi
if [[ -n $w1_pid ]] && grep -qx "$w1_pid" <<<"$pids1"; then
    pass "d: the current worker 1 (pid $w1_pid, from the Workers property) has lines under NODE_APP_INSTANCE=1"
else
    fail "d: the current worker 1 (pid '${w1_pid}', Workers: $workers) has no line under NODE_APP_INSTANCE=1"
fi

# ================================================================ e
log "e. authorization on the real bus ($(ct systemctl show -P Id dbus.service)), with polkit"
expect "e: the system bus is $EXPECT_BUS" test "$(ct systemctl show -P Id dbus.service)" = "$EXPECT_BUS"
M=org.nodeherd.Manager1
owner=$(ct busctl status --no-pager "$BUS_NAME" 2>/dev/null | sed -n 's/^UID=\([0-9]*\).*/\1/p' || true)
expect "e: $BUS_NAME is owned by user nodeherd-hello (uid $owner)" test "$owner" = "$(ct id -u nodeherd-hello)"
wuids=$(for p in $(worker_pids); do ct stat -c %u "/proc/$p"; done | sort -u | tr '\n' ' ')
expect "e: hello's workers run as nodeherd-hello too (uids: $wuids)" test "$wuids" = "$(ct id -u nodeherd-hello) "
locked_rc=0
ct systemd-run --quiet --unit=nodeherd-e2e-locked --property=User=root \
    nodeherd run /srv/$APP/app.js --name locked --bus-name org.nodeherdtest.Locked --listen 127.0.0.1:0 -i 1 || locked_rc=$?
locked_up() { ct busctl status --no-pager org.nodeherdtest.Locked >/dev/null 2>&1; }
expect "e: a root manager holds org.nodeherdtest.Locked (exit $locked_rc)" wait_for 30 locked_up
authz=$(ct env NODEHERD=nodeherd bash /shared/authz-checks.sh unix:path=/run/dbus/system_bus_socket \
    "$APP" polkit nhoperator nodeherd-other org.nodeherdtest.Locked 2>&1) || true
while IFS= read -r line; do
    case $line in
        "ok   - "*) pass "e: ${line#ok   - }" ;;
        "FAIL - "*) fail "e: ${line#FAIL - }" ;;
        *" passed, "*" failed") ;;
        *) echo "       | $line" ;;
    esac
done <<<"$authz"
expect "e: authz-checks.sh ran to its end" test -n "$(grep -E '^[0-9]+ passed, [0-9]+ failed$' <<<"$authz")"
ct systemctl stop nodeherd-e2e-locked || true

log "e. app other attacks app hello from its own unit"
uid_other=$(ct id -u nodeherd-other)
wait_for 30 test "$(ct systemctl show -P ActiveState nodeherd@other.socket)" = active || true
victims=$(echo $(prop "$UNIT" MainPID) $(worker_pids) | tr ' ' ',')
report=$(curl -sS --max-time 60 "http://127.0.0.1:$OTHER_PORT/attack?victim=$APP&pids=$victims" 2>&1 || true)
echo "$report" | sed 's/^/       | /'
field() { jq -r "$1" <<<"$report" 2>/dev/null || echo "(no answer)"; }
expect "e: the tenant runs as nodeherd-other (uid $(field .uid))" test "$(field .uid)" = "$uid_other"
expect "e: other may not own $BUS_NAME" test "$(field .own)" = "ERR org.freedesktop.DBus.Error.AccessDenied"
expect "e: other's Scale on hello is refused, naming the action" test "$(field .scale)" = \
    "ERR org.freedesktop.DBus.Error.AccessDenied: org.nodeherd.scale: uid $uid_other is not authorized (polkit); root and members of group nodeherd are"
expect "e: other's Restart on hello is refused, naming the action" test "$(field .restart)" = \
    "ERR org.freedesktop.DBus.Error.AccessDenied: org.nodeherd.restart: uid $uid_other is not authorized (polkit); root and members of group nodeherd are"
nv=$(tr ',' '\n' <<<"$victims" | grep -c .)
expect "e: other's SIGKILL to each of hello's $nv processes ($victims) fails with EPERM" \
    test "$(field '.kill | join(",")')" = "$(yes EPERM | head -n "$nv" | paste -sd,)"
expect "e: other may not read hello's data (/srv/$APP-data/secret)" test "$(field .read)" = EACCES
expect "e: other may not look into hello's runtime directory (its control socket)" test "$(field .runtime)" = EACCES
expect "e: hello's manager and workers all still run" test "$(echo $(prop "$UNIT" MainPID) $(worker_pids) | tr ' ' ',')" = "$victims"
expect "e: and hello still has 2 workers" test "$(bus_prop Instances)" = "i 2"
got=$(ct_as nhoperator cat /srv/$APP-data/secret 2>&1 || true)
expect "e: an operator (group nodeherd) may not read hello's data ($got)" test "$got" = "cat: /srv/$APP-data/secret: Permission denied"
got=$(ct_as nhoperator cat /etc/nodeherd/other.json 2>&1 || true)
expect "e: nor the configuration install wrote for other ($got)" test "$got" = "cat: /etc/nodeherd/other.json: Permission denied"
expect "e: which is root's and group nodeherd-other's, 0640" test "$(ct stat -c '%U:%G %a' /etc/nodeherd/other.json)" = "root:nodeherd-other 640"
rc=0; out=$(ct_as nobody nodeherd scale "$APP" 1 2>&1) || rc=$?
expect "e: 'nodeherd scale $APP 1' as nobody exits 5 ($out)" test "$rc" = 5
expect "e: and says why" test "$out" = "nodeherd: access denied: org.nodeherd.scale: uid 65534 is not authorized (polkit); root and members of group nodeherd are"
got=$(ct_as nhoperator nodeherd scale "$APP" 2 2>&1 || true)
expect "e: 'nodeherd scale $APP 2' as an operator ($got)" test "$got" = "nodeherd: $APP now runs 2 worker(s)"

# ================================================================ m
log "m. a squatter on hello's bus name"
timeout 60 nsenter -t "$PID1" -a systemctl stop "$UNIT" || fail "m: stop failed"
ct systemd-run --quiet --unit=nodeherd-e2e-squat --property=User=root \
    nodeherd run /srv/$APP/app.js --name squat --bus-name "$BUS_NAME" --listen "127.0.0.1:$SQUAT_PORT" -i 1 ||
    fail "m: the squatter did not start"
squatting() { [[ $(ct busctl status --no-pager "$BUS_NAME" 2>/dev/null | sed -n 's/^PID=//p') == "$(prop nodeherd-e2e-squat.service MainPID)" ]]; }
expect "m: root's squatter owns $BUS_NAME" wait_for 30 squatting
sq_pid=$(prop nodeherd-e2e-squat.service MainPID)
sq_name=$(ct busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus GetNameOwner s "$BUS_NAME" | sed 's/^s "\(.*\)"$/\1/')
m0=$EPOCHREALTIME
rc=0; timeout 60 nsenter -t "$PID1" -a systemctl start "$UNIT" 2>/dev/null || rc=$?
expect "m: systemctl start $UNIT fails (exit $rc)" test "$rc" != 0
expect "m: the manager exited with status 4 ($(prop "$UNIT" ExecMainStatus))" test "$(prop "$UNIT" ExecMainStatus)" = 4
expect "m: $UNIT is failed" test "$(prop "$UNIT" ActiveState)" = failed
said=$(ct journalctl --no-pager -o cat -u "$UNIT" --since "@${m0%.*}" | grep -F 'is already owned' | head -1 || true)
expect "m: the journal says who owns the name ($said)" test "$said" = \
    "error: $BUS_NAME is already owned on the system bus by connection $sq_name (pid $sq_pid, uid 0); refusing to run beside it, as \`systemctl reload\` and nodeherd's clients would be talking to that process"
expect "m: no worker of hello was started" test -z "$(worker_pids)"
expect "m: $SOCK_UNIT still listens" test "$(prop "$SOCK_UNIT" ActiveState)" = active
rc=0; out=$(ct nodeherd status "$APP" 2>&1) || rc=$?
expect "m: nodeherd status $APP refuses the squatter (exit $rc)" test "$rc" = 3
expect "m: and says so" test "$out" = \
    "nodeherd: $BUS_NAME is owned by pid $sq_pid ($sq_name), not by the main process of $UNIT, which is not running: not talking to it (see \`journalctl -u $UNIT\`)"
rc=0; out=$(ct env MAINPID=1 nodeherd reload "$APP" 2>&1) || rc=$?
expect "m: nodeherd reload as ExecReload (\$MAINPID=1) refuses it too (exit $rc)" test "$rc" = 3
expect "m: and says so" test "$out" = \
    "nodeherd: $BUS_NAME is owned by pid $sq_pid ($sq_name), not by this unit's main process (\$MAINPID 1): not talking to it"
ct systemctl stop nodeherd-e2e-squat || fail "m: the squatter did not stop"
ct systemctl reset-failed "$UNIT" || true
timeout 60 nsenter -t "$PID1" -a systemctl start "$UNIT" || fail "m: $UNIT does not start once the squatter is gone"
expect "m: with the squatter gone $UNIT runs again" wait_for 30 ready_is 2
expect "m: and its manager owns $BUS_NAME" test "$(ct busctl status --no-pager "$BUS_NAME" 2>/dev/null | sed -n 's/^PID=//p')" = "$(prop "$UNIT" MainPID)"
rc=0; out=$(ct nodeherd status "$APP" 2>&1) || rc=$?
expect "m: nodeherd status $APP talks to it (exit $rc)" test "$rc" = 0

# ================================================================ g
log "g. kill -9 of the manager"
old_main=$(prop "$UNIT" MainPID)
old_restarts=$(prop "$UNIT" NRestarts)
start_load kill 8
sleep 1
k0=$EPOCHREALTIME
ct sh -c "kill -KILL $old_main" || fail "g: could not kill pid $old_main"
recovered() {
    local m
    m=$(prop "$UNIT" MainPID)
    [[ $m != 0 && $m != "$old_main" && $(prop "$UNIT" ActiveState) == active ]]
}
if wait_for 60 recovered; then
    k1=$EPOCHREALTIME
    pass "g: systemd restarted the manager (pid $old_main -> $(prop "$UNIT" MainPID)) in $(awk -v a="$k0" -v b="$k1" 'BEGIN { printf "%d", (b - a) * 1000 }') ms"
else
    fail "g: the manager was not restarted: $(prop "$UNIT" ActiveState)/$(prop "$UNIT" SubState)"
    journal_dump
fi
expect "g: NRestarts went up by one" test "$(prop "$UNIT" NRestarts)" = $((old_restarts + 1))
wait_for 30 ready_is 2 || true
sleep 1
stop_load
KILL_TOTAL=$(load_total kill)
KILL_REFUSED=$(awk '$2 == "ECONNREFUSED"' "$HOSTDIR/load-kill" | wc -l)
KILL_FAILED=$(load_failed kill | wc -l)
if ((KILL_REFUSED == 0 && KILL_TOTAL > 0)); then
    pass "g: no connection refused out of $KILL_TOTAL requests"
else
    fail "g: $KILL_REFUSED of $KILL_TOTAL connections were refused"
fi
# Requests in flight on a worker when systemd SIGKILLs the dead manager's
# workers are cut; they are reported, not counted as failures of the units.
log "   requests cut by the kill (in flight on a killed worker): $((KILL_FAILED - KILL_REFUSED))"
load_failed kill | sort -n | head -5 | sed 's/^/       | /'
after_kill=$(curl -sS --max-time 20 -w ' %{http_code}' "$URL" 2>&1 | tr '\n' ' ' || true)
after_kill=${after_kill% }
expect "g: requests are answered after the restart ($after_kill)" test "${after_kill##* }" = 200

# ================================================================ h
log "h. watchdog"
# A short interval through a drop-in, so the test need not wait 20 s; no
# core file from the SIGABRT below.
ct sh -c "mkdir -p /etc/systemd/system/$UNIT.d && printf '[Service]\nWatchdogSec=3s\nLimitCORE=0\n' >/etc/systemd/system/$UNIT.d/watchdog.conf && systemctl daemon-reload"
timeout 60 nsenter -t "$PID1" -a systemctl restart "$UNIT" || fail "h: restart with WatchdogSec=3s failed"
wait_for 30 ready_is 2 || true
expect "h: WatchdogUSec is 3 s after the drop-in" test "$(prop "$UNIT" WatchdogUSec)" = 3s
wd_changed() { [[ $(prop "$UNIT" WatchdogTimestampMonotonic) != "$1" ]]; }
w0=$(prop "$UNIT" WatchdogTimestampMonotonic)
if wait_for 5 wd_changed "$w0"; then
    w1=$(prop "$UNIT" WatchdogTimestampMonotonic)
    wait_for 5 wd_changed "$w1" || true
    w2=$(prop "$UNIT" WatchdogTimestampMonotonic)
    pass "h: the manager sends WATCHDOG=1 (two pings $(( (w2 - w1) / 1000 )) ms apart; WatchdogSec=3s)"
else
    fail "h: no WATCHDOG=1 within 5 s of WatchdogSec=3s (timestamp stays $w0)"
fi
old_main=$(prop "$UNIT" MainPID)
old_restarts=$(prop "$UNIT" NRestarts)
h0=$EPOCHREALTIME
ct sh -c "kill -STOP $old_main" || fail "h: could not SIGSTOP pid $old_main"
if wait_for 30 recovered; then
    pass "h: a hung (SIGSTOPped) manager is killed and restarted by systemd in $(awk -v a="$h0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%d", (b - a) * 1000 }') ms"
else
    fail "h: the hung manager was not replaced: $(prop "$UNIT" ActiveState)/$(prop "$UNIT" SubState)"
    journal_dump
fi
wd_log=$(ct journalctl --no-pager -u "$UNIT" --since "@${h0%.*}" | grep -i 'watchdog timeout' || true)
expect "h: systemd logged the watchdog timeout" test -n "$wd_log"
expect "h: NRestarts went up by one" test "$(prop "$UNIT" NRestarts)" = $((old_restarts + 1))
after_wd=$(curl -sS --max-time 20 -w ' %{http_code}' "$URL" 2>&1 | tr '\n' ' ' || true)
after_wd=${after_wd% }
expect "h: requests are answered after the watchdog restart ($after_wd)" test "${after_wd##* }" = 200
ct sh -c "rm -r /etc/systemd/system/$UNIT.d && systemctl daemon-reload"

# ================================================================ f
log "f. systemctl stop"
cg=$(prop "$UNIT" ControlGroup)
pids=$(unit_pids | tr '\n' ' ' || true)
s0=$EPOCHREALTIME
stop_rc=0
timeout 60 nsenter -t "$PID1" -a systemctl stop "$UNIT" || stop_rc=$?
s1=$EPOCHREALTIME
STOP_MS=$(awk -v a="$s0" -v b="$s1" 'BEGIN { printf "%d", (b - a) * 1000 }')
expect "f: systemctl stop returned 0 in ${STOP_MS} ms" test "$stop_rc" = 0
expect "f: $UNIT is inactive (Result=$(prop "$UNIT" Result))" test "$(prop "$UNIT" ActiveState)" = inactive
left=$(ct sh -c "cat $CGROOT$cg/cgroup.procs 2>/dev/null" | tr '\n' ' ' || true)
expect "f: no process left in $cg (${left:-empty})" test -z "${left// /}"
alive=""
for p in $pids; do
    if ct test -d "/proc/$p"; then alive+=" $p"; fi
done
expect "f: none of the unit's processes ($pids) is alive" test -z "$alive"
killed=$(ct journalctl --no-pager -u "$UNIT" --since "@${s0%.*}" | grep -E 'Killing process|SIGKILL' || true)
if [[ -z $killed ]]; then
    pass "f: the manager stopped its workers itself (systemd killed nothing)"
else
    fail "f: systemd had to kill leftovers:"; sed 's/^/       | /' <<<"$killed"
fi
expect "f: $SOCK_UNIT still listens after the stop" test "$(prop "$SOCK_UNIT" ActiveState)" = active


# ================================================================ i
log "i. unit details: Documentation=, FreeBind=, RestartPreventExitStatus="
expect "i: $UNIT names its documentation ($(prop "$UNIT" Documentation))" test "$(prop "$UNIT" Documentation | tr -d '"')" = "man:nodeherd(1)"
expect "i: $SOCK_UNIT binds with FreeBind (an IP address not yet up at boot)" test "$(prop "$SOCK_UNIT" FreeBind)" = yes
expect "i: $UNIT is not restarted on exit status 2 or 4" test "$(prop "$UNIT" RestartPreventExitStatus)" = "2 4"

# write_config INSTANCES: /etc/nodeherd/$APP.config.js with a GREETING env.
write_config() {
    ct sh -c "cat >/etc/nodeherd/$APP.config.js" <<JS
module.exports = {
  apps: [{ name: '$APP', script: '/srv/$APP/app.js', instances: $1, env: { GREETING: 'from-reload' } }],
};
JS
}
env_of() { ct cat "/proc/$1/environ" 2>/dev/null | tr '\0' '\n' | grep -x "$2" >/dev/null; }

# ================================================================ j
log "j. systemctl reload re-reads the configuration, under load"
timeout 60 nsenter -t "$PID1" -a systemctl start "$UNIT" || fail "j: $UNIT does not start"
wait_for 30 ready_is 2 || fail "j: not 2 ready workers before the edit: $(bus_prop ReadyWorkers)"
before=$(worker_pids | tr '\n' ' ')
write_config 3
start_load conf 8 keepalive
sleep 1
j0=$EPOCHREALTIME
reload_rc=0
reload_out=$(timeout 120 nsenter -t "$PID1" -a systemctl reload "$UNIT" 2>&1) || reload_rc=$?
sleep 1
stop_load
expect "j: systemctl reload returned 0 (${reload_out:-no output})" test "$reload_rc" = 0
expect "j: ReadyWorkers reaches 3 (instances 2 -> 3 in the file)" wait_for 30 ready_is 3
after=$(worker_pids)
with_env=0
for p in $after; do env_of "$p" GREETING=from-reload && with_env=$((with_env + 1)); done
expect "j: every worker ($(echo $after)) has the new env GREETING=from-reload ($with_env of 3)" test "$with_env" = 3
common=$(comm -12 <(tr ' ' '\n' <<<"$before" | sort) <(sort <<<"$after") | grep -c . || true)
expect "j: no worker from before the reload is left (before: $before)" test "$common" = 0
CONF_TOTAL=$(load_total conf)
CONF_FAILED=$(load_failed conf | wc -l)
if ((CONF_FAILED == 0 && CONF_TOTAL > 0)); then
    pass "j: zero failed requests out of $CONF_TOTAL (keep-alive) while the reload applied the new file"
else
    fail "j: $CONF_FAILED of $CONF_TOTAL requests failed ($(load_summary conf))"
    load_failed conf | sort -n | head -5 | sed 's/^/       | /'
fi
said=$(ct journalctl --no-pager -u "$UNIT" --since "@${j0%.*}" | grep -F 'configuration reloaded: env: GREETING added; instances 2 → 3' || true)
expect "j: the journal says what changed" test -n "$said"

log "j. a broken edit fails the reload; the workers serve on"
before=$(worker_pids | tr '\n' ' ')
write_config "'lots'"
j0=$EPOCHREALTIME
reload_rc=0
timeout 60 nsenter -t "$PID1" -a systemctl reload "$UNIT" >/dev/null 2>&1 || reload_rc=$?
expect "j: systemctl reload of a broken file fails (exit $reload_rc)" test "$reload_rc" != 0
refused=$(ct journalctl --no-pager -u "$UNIT" --since "@${j0%.*}" | grep -F 'reload refused' | grep -F 'key `instances`' || true)
expect "j: the journal names the key (${refused:0:160})" test -n "$refused"
expect "j: $UNIT is still active" test "$(prop "$UNIT" ActiveState)" = active
after=$(worker_pids | tr '\n' ' ')
expect "j: the same workers serve (before: $before; after: $after)" test "$before" = "$after"
body=$(curl -sS --max-time 10 -w ' %{http_code}' "$URL" 2>&1 | tr '\n' ' ' || true)
expect "j: and answer (${body% })" test "${body% }" != "" -a "${body##* }" = 200

log "j. a canary that dies in its soak: systemctl reload fails, the old generation serves"
ct sh -c "cat >/srv/$APP/bad.js" <<'JS'
require('http').createServer((q, s) => s.end('bad release\n')).listen(8000, () => setTimeout(() => process.exit(1), 1000));
JS
ct sh -c "cat >/etc/nodeherd/$APP.config.js" <<JS
module.exports = {
  apps: [{ name: '$APP', script: '/srv/$APP/bad.js', instances: 3, env: { GREETING: 'from-reload' },
           reload_strategy: 'canary', canary: { soak: '5s' } }],
};
JS
ready_before=$(bus_prop ReadyWorkers | awk '{ print $2 }')
j0=$EPOCHREALTIME
reload_rc=0
reload_out=$(timeout 120 nsenter -t "$PID1" -a systemctl reload "$UNIT" 2>&1) || reload_rc=$?
expect "j: systemctl reload exits non-zero when the canary is rolled back (exit $reload_rc)" test "$reload_rc" != 0
rolled=$(ct journalctl --no-pager -u "$UNIT" --since "@${j0%.*}" | grep -F 'reload rolled back' | grep -F 'died during the soak' || true)
expect "j: the journal says the canary was rolled back (${rolled:0:160})" test -n "$rolled"
expect "j: $UNIT is still active" test "$(prop "$UNIT" ActiveState)" = active
expect "j: $ready_before workers ready again" wait_for 30 ready_is "$ready_before"
body=$(curl -sS --max-time 10 "$URL" 2>&1 || true)
expect "j: the old release answers (${body})" test "${body#hello from worker}" != "$body"
hist=$(ct nodeherd history "$APP" --json 2>&1 || true)
expect "j: the history says the canary's generation was rolled back ($(jq -c '[.[] | .outcome]' <<<"$hist" 2>&1))" \
    test "$(jq -r '.[-1].outcome' <<<"$hist" 2>/dev/null)" = "rolled back"
expect "j: and is kept in the state directory, owned by the app's user" \
    test "$(ct stat -c %U /var/lib/nodeherd/$APP/history-$APP.json 2>&1)" = "nodeherd-$APP"
# k starts from the broken file.
write_config "'lots'"

# ================================================================ k
log "k. a bad configuration at start never fails the socket"
timeout 60 nsenter -t "$PID1" -a systemctl stop "$UNIT" || fail "k: stop failed"
ct systemctl reset-failed "$UNIT" 2>/dev/null || true
# Connections keep coming, each one starting the service again.
( for _ in $(seq 60); do
      [[ -e $HOSTDIR/stop-knock ]] && break
      curl -s -o /dev/null --max-time 1 "$URL" || true
      sleep 0.2
  done ) &
KNOCK_PID=$!
BG_PIDS+=("$KNOCK_PID")
k0=$EPOCHREALTIME
sleep 14
touch "$HOSTDIR/stop-knock"
wait "$KNOCK_PID" 2>/dev/null || true
expect "k: $SOCK_UNIT is still listening after 14 s of connections to a bad configuration ($(prop "$SOCK_UNIT" ActiveState)/$(prop "$SOCK_UNIT" Result))" \
    test "$(prop "$SOCK_UNIT" ActiveState)" = active
starts=$(ct journalctl --no-pager -u "$UNIT" --since "@${k0%.*}" | grep -c 'configuration error\|error: .*key `instances`' || true)
expect "k: the journal has the error ($starts times)" test "$starts" -gt 0
expect "k: $UNIT did not hit the start limit (Result=$(prop "$UNIT" Result))" test "$(prop "$UNIT" Result)" != start-limit-hit
write_config 2
fixed=$(curl -sS --max-time 30 -w ' %{http_code}' "$URL" 2>&1 | tr '\n' ' ' || true)
expect "k: once the file is fixed, the next connection is served (${fixed% })" test "${fixed##* }" = 200

# ================================================================ l
log "l. nodeherd install of a two-app ecosystem file"
P2=$((PORT + 2)) P3=$((PORT + 3))
ct install -d -m 755 /srv/two
ct install -m 644 /shared/app.js /srv/two/app.js
ct sh -c "cat >/srv/two/ecosystem.config.js" <<JS
module.exports = {
  apps: [
    { name: 'alpha', script: './app.js', instances: 1, listen: '127.0.0.1:$P2' },
    { name: 'beta', script: './app.js', instances: 1, listen: '127.0.0.1:$P3' },
  ],
};
JS
rc=0; out=$(ct nodeherd install /srv/two/ecosystem.config.js --now 2>&1) || rc=$?
echo "$out" | sed 's/^/       | /'
expect "l: nodeherd install exits 0" test "$rc" = 0
for a in alpha beta; do
    expect "l: install made user nodeherd-$a" ct id -u "nodeherd-$a"
    expect "l: and /etc/dbus-1/system.d/org.nodeherd.$a.conf" ct test -f "/etc/dbus-1/system.d/org.nodeherd.$a.conf"
done
for a in alpha:$P2 beta:$P3; do
    body=$(curl -sS --max-time 60 -w ' %{http_code}' "http://127.0.0.1:${a#*:}/" 2>&1 | tr '\n' ' ' || true)
    expect "l: ${a%%:*} answers on ${a#*:} after a connection (${body% })" test "${body##* }" = 200
done
rc=0; out=$(ct nodeherd install /srv/two/ecosystem.config.js 2>&1) || rc=$?
expect "l: a second install changes nothing (exit $rc)" test "$rc" = 0 -a "$(grep -c '^unchanged' <<<"$out")" = 8
ct sh -c "cat >/srv/two/pair.json" <<JS
{"apps": [{"name": "my-app", "script": "./app.js"}, {"name": "my_app", "script": "./app.js"}]}
JS
rc=0; out=$(ct nodeherd install /srv/two/pair.json --dry-run 2>&1) || rc=$?
policies=$(grep -E '^--- would write /etc/dbus-1/system.d/' <<<"$out" | tr '\n' ' ')
expect "l: my-app and my_app get a bus name each (exit $rc: $policies)" test "$rc" = 0 -a \
    "$policies" = "--- would write /etc/dbus-1/system.d/org.nodeherd.my-app.conf --- would write /etc/dbus-1/system.d/org.nodeherd.my_5fapp.conf "
ct sh -c "cat >/srv/two/dotted.json" <<JS
{"apps": [{"name": "my.app", "script": "./app.js"}]}
JS
rc=0; out=$(ct nodeherd install /srv/two/dotted.json 2>&1) || rc=$?
expect "l: a name that cannot be a user name is refused (exit $rc: $out)" test "$rc" = 2 -a \
    "$out" = "nodeherd: app name \"my.app\" cannot be part of a user name (nodeherd-my.app, which the app runs as): use letters, digits, _ and - only, at most 22 characters"
rc=0; out=$(ct nodeherd install /srv/two/ecosystem.config.js --only alpha --boot 2>&1) || rc=$?
expect "l: install --boot alpha exits 0 ($out)" test "$rc" = 0
expect "l: nodeherd@alpha.service is enabled" test "$(ct systemctl is-enabled nodeherd@alpha.service)" = enabled

log "l. reboot the container: alpha starts at boot, beta waits for a connection"
PID1=$(container_reboot "$NAME") || die "the container did not come back from the reboot"
expect "l: after the reboot nodeherd@alpha.service runs without a connection" wait_for 60 \
    test "$(ct systemctl show -P ActiveState nodeherd@alpha.service)" = active
expect "l: nodeherd@beta.service does not ($(ct systemctl show -P ActiveState nodeherd@beta.service))" \
    test "$(ct systemctl show -P ActiveState nodeherd@beta.service)" = inactive
expect "l: but nodeherd@beta.socket listens" test "$(ct systemctl show -P ActiveState nodeherd@beta.socket)" = active
body=$(curl -sS --max-time 60 -w ' %{http_code}' "http://127.0.0.1:$P3/" 2>&1 | tr '\n' ' ' || true)
expect "l: and beta answers its first connection (${body% })" test "${body##* }" = 200
rc=0; out=$(ct nodeherd uninstall beta 2>&1) || rc=$?
expect "l: uninstall beta exits 0 ($out)" test "$rc" = 0
expect "l: beta's socket is gone" test "$(ct systemctl show -P ActiveState nodeherd@beta.socket)" = inactive
expect "l: and its configuration" test ! -e "/proc/$PID1/root/etc/nodeherd/beta.json"

# ================================================================ o
log "o. a root install of a hostile ecosystem file, and the app's Unix socket"
ct install -d -m 755 /srv/sock
ct install -m 644 /shared/app.js /srv/sock/app.js
ct sh -c "cat >/srv/sock/ecosystem.config.js" <<'JS'
const fs = require('fs');
let wrote;
try { fs.writeFileSync('/etc/nodeherd-pwned', 'pwned\n'); wrote = 'written'; } catch (e) { wrote = e.code; }
// PORT: the app listens on the template's Unix socket (a port would be
// a TCP listen of its own, which no Unix socket stands for).
module.exports = { apps: [{ name: 'sock', script: './app.js', instances: 1,
  env: { PORT: '/run/nodeherd/sock.sock', EVALUATED_AS: process.getuid() + ' ' + wrote } }] };
JS
rc=0; out=$(ct nodeherd install /srv/sock/ecosystem.config.js --now 2>&1) || rc=$?
expect "o: nodeherd install of a .config.js that writes to /etc exits 0 (${out//$'\n'/ | })" test "$rc" = 0
evaluated=$(jq -r '.apps[0].env.EVALUATED_AS' "/proc/$PID1/root/etc/nodeherd/sock.json" 2>&1 || true)
expect "o: it was evaluated as nobody and could not write (uid, write: $evaluated)" test "$evaluated" = "65534 EACCES"
expect "o: /etc/nodeherd-pwned does not exist" ct test ! -e /etc/nodeherd-pwned
SOCK=/run/nodeherd/sock.sock
# get_unix WHO: the HTTP status of GET / on $SOCK as WHO, or the error code.
get_unix() {
    local as=(ct)
    [[ $1 == root ]] || as=(ct_as "$1")
    "${as[@]}" timeout 30 node -e "require('http').get({ socketPath: '$SOCK', path: '/' }, (r) => { console.log(r.statusCode); r.resume(); }).on('error', (e) => console.log(e.code))" 2>&1 || echo "timeout/$?"
}
expect "o: the socket is 0660, group nodeherd-sock ($(ct stat -c '%a %G' $SOCK))" test "$(ct stat -c '%a %G' $SOCK)" = "660 nodeherd-sock"
got=$(get_unix root)
expect "o: root is served on it ($got)" test "$got" = 200
got=$(get_unix nobody)
expect "o: another local user (nobody) cannot connect past the proxy ($got)" test "$got" = EACCES
got=$(get_unix www-data)
expect "o: nor can the proxy's user before --socket-group ($got)" test "$got" = EACCES
rc=0; out=$(ct nodeherd install /srv/sock/ecosystem.config.js --socket-group www-data 2>&1) || rc=$?
expect "o: install --socket-group www-data exits 0 (${out//$'\n'/ | })" test "$rc" = 0
ct systemctl stop nodeherd@sock.service nodeherd@sock.socket || fail "o: sock does not stop"
ct systemctl start nodeherd@sock.socket || fail "o: sock's socket does not start again"
expect "o: then the socket is 0660, group www-data ($(ct stat -c '%a %G' $SOCK))" test "$(ct stat -c '%a %G' $SOCK)" = "660 www-data"
got=$(get_unix www-data)
expect "o: www-data is served ($got)" test "$got" = 200
got=$(get_unix nobody)
expect "o: nobody still is not ($got)" test "$got" = EACCES
ct systemctl stop nodeherd@sock.service || true
ct sh -c "cat >/srv/sock/inject.json" <<'JSON'
{"apps": [{"name": "inject", "script": "./app.js",
  "listen": ["unix:/run/inject.sock\nExecStartPre=/bin/touch /run/nodeherd-injected"]}]}
JSON
rc=0; out=$(ct nodeherd install /srv/sock/inject.json --now 2>&1) || rc=$?
expect "o: a listen address carrying a line of its own is refused (exit $rc)" test "$rc" = 2
expect "o: naming the key (${out//$'\n'/ | })" grep -qF 'app "inject": key `listen`' <<<"$out"
expect "o: and nothing was written for it" ct sh -c 'for f in /etc/systemd/system/nodeherd@inject.* /etc/nodeherd/inject.json /etc/sysusers.d/nodeherd-inject.conf /etc/dbus-1/system.d/org.nodeherd.inject.conf; do [ -e "$f" ] && exit 1; done; exit 0'
expect "o: nor run" ct test ! -e /run/nodeherd-injected

# ================================================================ p
log "p. units/root-manager.conf: reuseport under a root manager, workers as the app's user"
RP=nodeherd@rp.service
ct install -d -m 755 /srv/rp
ct install -m 644 /shared/probe.js /srv/rp/app.js
ct sh -c "cat >/srv/rp/ecosystem.json" <<JSON
{"apps": [{"name": "rp", "script": "./app.js", "instances": 2, "balance": "reuseport",
  "uid": "nodeherd-rp", "gid": "nodeherd-rp", "listen": "127.0.0.1:$RP_PORT"}]}
JSON
rc=0; out=$(ct nodeherd install /srv/rp/ecosystem.json 2>&1) || rc=$?
expect "p: install of an app with uid/gid nodeherd-rp exits 0 (${out//$'\n'/ | })" test "$rc" = 0
ct sh -c "mkdir -p /etc/systemd/system/nodeherd@rp.socket.d /etc/systemd/system/$RP.d &&
    printf '[Socket]\nReusePort=yes\n' >/etc/systemd/system/nodeherd@rp.socket.d/reuseport.conf &&
    install -m 644 /shared/units/root-manager.conf /etc/systemd/system/$RP.d/root-manager.conf &&
    systemctl daemon-reload && systemctl restart nodeherd@rp.socket"
err=$(ct systemd-analyze verify --man=no "/etc/systemd/system/nodeherd@.service" 2>&1 >/dev/null || echo "(exit $?)")
expect "p: systemd-analyze verify is silent${err:+: $err}" test -z "$err"
rc=0; timeout 90 nsenter -t "$PID1" -a systemctl start "$RP" || rc=$?
expect "p: $RP starts (exit $rc)" test "$rc" = 0
[[ $rc == 0 ]] || ct journalctl --no-pager -u "$RP" -n 20 | sed 's/^/       | /'
rp_main=$(prop "$RP" MainPID)
rp_uid=$(ct id -u nodeherd-rp)
rp_workers() { ct cat "/proc/$rp_main/task/$rp_main/children" 2>/dev/null | tr ' ' '\n' | grep . || true; }
proc_field() { ct sh -c "grep '^$2:' /proc/$1/status" | awk '{ print $2 }'; }
expect "p: the manager runs as root" test "$(proc_field "$rp_main" Uid)" = 0
expect "p: with CAP_SETUID, CAP_SETGID and CAP_KILL alone ($(proc_field "$rp_main" CapBnd))" test "$(proc_field "$rp_main" CapBnd)" = 00000000000000e0
expect "p: no new privileges, and a seccomp filter" test "$(proc_field "$rp_main" NoNewPrivs) $(proc_field "$rp_main" Seccomp)" = "1 2"
wait_for 30 test "$(rp_workers | wc -l)" = 2 || true
w=$(rp_workers | tr '\n' ' ')
wuids=$(for p in $w; do proc_field "$p" Uid; done | sort -u | tr '\n' ' ')
expect "p: its 2 workers ($w) run as nodeherd-rp ($wuids)" test "$wuids" = "$rp_uid "
wcaps=$(for p in $w; do proc_field "$p" CapEff; done | sort -u | tr '\n' ' ')
expect "p: with no capability ($wcaps)" test "$wcaps" = "0000000000000000 "
listeners=$(ss -Htln "sport = :$RP_PORT" | wc -l)
expect "p: balance reuseport: a socket per worker on :$RP_PORT, systemd's being worker 0's ($listeners)" test "$listeners" = 2
answers=""
for _ in $(seq 40); do
    answers+=$(curl -sS --max-time 10 "http://127.0.0.1:$RP_PORT/" 2>&1 || true)$'\n'
done
pids=$(jq -r '.pid' <<<"$answers" 2>/dev/null | sort -u | wc -l)
expect "p: requests are served by both workers ($pids pids in 40 requests)" test "$pids" = 2
uids=$(jq -r '.uid' <<<"$answers" 2>/dev/null | sort -u | tr '\n' ' ')
expect "p: as nodeherd-rp ($uids)" test "$uids" = "$rp_uid "
privileged=$(jq -r '.privileged' <<<"$answers" 2>/dev/null | sort -u | tr '\n' ' ')
expect "p: a worker's listen(812) is refused: the manager cannot bind it either ($privileged)" test "$privileged" = "EACCES "
expect "p: nothing listens on :812" test -z "$(ss -Htln 'sport = :812')"
mem=$(ct nodeherd status rp --json 2>&1 | jq -r '[.workers[].memory_bytes] | map(select(. > 0)) | length' 2>/dev/null || echo "?")
expect "p: nodeherd status sees both workers' memory ($mem)" test "$mem" = 2
rc=0; out=$(timeout 120 nsenter -t "$PID1" -a systemctl reload "$RP" 2>&1) || rc=$?
expect "p: systemctl reload exits 0 ($out)" test "$rc" = 0
w2=$(rp_workers | tr '\n' ' ')
common=$(comm -12 <(tr ' ' '\n' <<<"$w" | sort) <(tr ' ' '\n' <<<"$w2" | sort) | grep -c . || true)
wuids=$(for p in $w2; do proc_field "$p" Uid; done | sort -u | tr '\n' ' ')
expect "p: every worker replaced ($w -> $w2), as nodeherd-rp again ($wuids)" test "$common" = 0 -a "$wuids" = "$rp_uid "
victim=$(rp_workers | head -1)
ct sh -c "kill -KILL $victim" || fail "p: cannot kill worker $victim"
replaced() { [[ $(rp_workers | wc -l) == 2 ]] && ! rp_workers | grep -qx "$victim"; }
expect "p: a killed worker is replaced" wait_for 30 replaced
body=$(curl -sS --max-time 10 "http://127.0.0.1:$RP_PORT/" 2>&1 || true)
expect "p: and the app answers ($body)" test "$(jq -r .uid <<<"$body" 2>/dev/null)" = "$rp_uid"
rp_cg=$(prop "$RP" ControlGroup)
s0=$EPOCHREALTIME
rc=0; timeout 60 nsenter -t "$PID1" -a systemctl stop "$RP" || rc=$?
left=$(ct sh -c "cat $CGROOT$rp_cg/cgroup.procs 2>/dev/null" | tr '\n' ' ' || true)
expect "p: systemctl stop exits 0 ($rc), no process left in $rp_cg (${left:-none})" test "$rc" = 0 -a -n "$rp_cg" -a -z "${left// /}"
killed=$(ct journalctl --no-pager -u "$RP" --since "@${s0%.*}" | grep -E 'Killing process' || true)
expect "p: the manager stopped its workers itself${killed:+: $killed}" test -z "$killed"

echo
echo "boot ${BOOT_S}s, first request ${FIRST_MS} ms, reload ${RELOAD_MS} ms ($RELOAD_FAILED/$RELOAD_TOTAL failed; keep-alive $KA_FAILED/$KA_TOTAL), kill -9: $KILL_REFUSED refused/$KILL_TOTAL, stop ${STOP_MS} ms"
echo "$PASS passed, $FAIL failed"
((FAIL == 0))
