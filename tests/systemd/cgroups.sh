#!/usr/bin/env bash
# Per-worker cgroups under a booted systemd (issue 28): the template unit
# delegates its cgroup (Delegate=yes), the manager runs in supervisor/
# (DelegateSubgroup= on systemd >= 254, its own move before), each worker
# in a worker-SLOT-PID-ID/ of its own, made before its exec.
#
#   tests/systemd/cgroups.sh [--root host|trixie] [NODEHERD_BINARY]
#
# --root host: this machine's root (Debian 12, systemd 252) under a
# throwaway overlay; --root trixie: the cached Debian 13 root (systemd 257).
# Checks, with tests/apps/cgroup_worker.js as app `hello`, 2 workers:
#   1. the manager in .../supervisor, each worker in a cgroup of its own;
#      `nodeherd status` says per-worker cgroups are on, and which budget is
#      off for want of its controller
#   2. a worker's child in a session of its own is in the worker's cgroup
#      and its CPU shows in `nodeherd status` (cpu% of the worker)
#   3. the worker exits: its child goes with it (cgroup.kill), its cgroup
#      is removed, the unit stays active
#   4. nodeherd reexec: same workers in the same cgroups; a worker exiting
#      afterwards still has its cgroup removed
#   5. systemctl stop: nothing left in the unit's cgroup
# Prints `N passed, N failed`; exits 1 on any failure. Every wait is
# bounded; the container, its mounts and cgroups are removed whatever happens.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=container.sh
source "$HERE/container.sh"

APP=hello
UNIT=nodeherd@$APP.service
SOCK_UNIT=nodeherd@$APP.socket
NAME=nodeherd-cg-$$

log() { printf '%s %s\n' "$(date +%T.%3N)" "$*"; }
die() { echo "cgroups: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root"
ROOT_KIND=host
if [[ ${1:-} == --root ]]; then ROOT_KIND=${2:-}; shift 2; fi
case $ROOT_KIND in host | trixie) ;; *) die "--root host|trixie, not '$ROOT_KIND'" ;; esac
BIN=${1:-}
if [[ -z $BIN ]]; then
    for b in "$REPO/target/release/nodeherd" "$REPO/target/debug/nodeherd"; do
        [[ -x $b ]] && { BIN=$b; break; }
    done
fi
[[ -n $BIN && -x $BIN ]] || die "no nodeherd binary (build it, or pass its path)"
BIN=$(readlink -f "$BIN")

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v curl >/dev/null || need+=(curl)
command -v ss >/dev/null || need+=(iproute2)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [[ $ROOT_KIND == trixie ]]; then
    NODEHERD_CONTAINER_ROOT=$("$HERE/debian-root.sh" trixie nodejs dbus-bin util-linux) ||
        die "no Debian 13 root"
    export NODEHERD_CONTAINER_ROOT
fi

PASS=0 FAIL=0
pass() { PASS=$((PASS + 1)); echo "ok   - $*"; }
fail() { FAIL=$((FAIL + 1)); echo "FAIL - $*"; }
expect() { local d=$1; shift; if "$@"; then pass "$d"; else fail "$d"; fi; }

HOSTDIR=$(mktemp -d /tmp/nodeherd-cg.XXXXXX)
chmod 755 "$HOSTDIR"
STARTED=0
cleanup() {
    local rc=$?
    if ((STARTED)); then
        container_stop "$NAME" || echo "cgroups: container cleanup reported problems" >&2
    fi
    rm -rf "$HOSTDIR"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    local p
    for p in $(seq $((21000 + $$ % 11000)) $((21100 + $$ % 11000))); do
        [[ -z $(ss -Htln "sport = :$p") ]] && { echo "$p"; return; }
    done
    die "no free port"
}
PORT=$(free_port)
URL=http://127.0.0.1:$PORT

cp "$BIN" "$HOSTDIR/nodeherd"
cp -r "$REPO/units" "$HOSTDIR/units"
cp "$REPO/packaging/dbus/org.nodeherd.conf" "$HOSTDIR/org.nodeherd.conf"
cp "$REPO/tests/apps/cgroup_worker.js" "$HOSTDIR/app.js"
cat >"$HOSTDIR/setup.sh" <<EOF
set -eu
install -m 755 /shared/nodeherd /usr/bin/nodeherd
systemd-sysusers /shared/units/sysusers.d/nodeherd.conf
install -m 644 /shared/units/nodeherd@.socket /shared/units/nodeherd@.service /etc/systemd/system/
mkdir -p /etc/systemd/system/$SOCK_UNIT.d /etc/systemd/system/$UNIT.d
printf '[Socket]\nListenStream=\nListenStream=127.0.0.1:$PORT\n' >/etc/systemd/system/$SOCK_UNIT.d/zz-cg-listen.conf
# systemd >= 254 places the manager in supervisor/ itself.
if [ "\$(systemctl --version | awk 'NR==1 {print \$2}')" -ge 254 ]; then
    printf '[Service]\nDelegateSubgroup=supervisor\n' >/etc/systemd/system/$UNIT.d/zz-cg-subgroup.conf
fi
install -d -m 755 /srv/$APP /etc/nodeherd
install -m 644 /shared/app.js /srv/$APP/app.js
cat >/etc/nodeherd/$APP.config.js <<'JS'
module.exports = { apps: [{ name: '$APP', script: '/srv/$APP/app.js', instances: 2, max_memory: '128M' }] };
JS
install -m 644 /shared/org.nodeherd.conf /etc/dbus-1/system.d/org.nodeherd.conf
busctl call org.freedesktop.DBus / org.freedesktop.DBus ReloadConfig
systemctl daemon-reload
systemctl enable --now $SOCK_UNIT
EOF

log "booting container $NAME ($ROOT_KIND root, port $PORT)"
STARTED=1
PID1=$(container_start "$NAME" "$HOSTDIR") || die "container did not boot"
ct() { nsenter -t "$PID1" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
prop() { ct systemctl show -P "$2" "$1"; }
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do ((SECONDS < deadline)) || return 1; sleep 0.05; done
}
CGROOT=/sys/fs/cgroup
if ct test -f /sys/fs/cgroup/unified/cgroup.procs; then CGROOT=/sys/fs/cgroup/unified; fi
if ! ct bash /shared/setup.sh >"$HOSTDIR/setup.log" 2>&1; then
    sed 's/^/  | /' "$HOSTDIR/setup.log"
    die "setup inside the container failed"
fi
log "systemd $(ct systemctl --version | awk 'NR==1 {print $2}'), cgroup2 at $CGROOT"
journal() { ct journalctl --no-pager -o cat -u "$UNIT" -n "${1:-30}" | sed 's/^/       | /'; }
ready2() { [[ $(ct busctl get-property org.nodeherd.$APP /org/nodeherd org.nodeherd.Manager1 ReadyWorkers 2>/dev/null) == "i 2" ]]; }
cg_of() { ct sed -n 's/^0:://p' "/proc/$1/cgroup"; }
workers() { local main; main=$(prop "$UNIT" MainPID); ct sh -c "cat /proc/$main/task/$main/children"; }
worker_dirs() { ct sh -c "ls -d $CGROOT$(prop "$UNIT" ControlGroup)/worker-* 2>/dev/null" | sort; }

# ---------------------------------------------------------------- 1
curl -fsS -m 30 "$URL/" >/dev/null || fail "1: the first request was not served"
expect "1: 2 workers ready" wait_for 60 ready2
UNIT_CG=$(prop "$UNIT" ControlGroup)
MAIN=$(prop "$UNIT" MainPID)
expect "1: the manager is in $UNIT_CG/supervisor ($(cg_of "$MAIN"))" test "$(cg_of "$MAIN")" = "$UNIT_CG/supervisor"
read -r -a W <<<"$(workers)"
expect "1: 2 workers (${W[*]})" test "${#W[@]}" = 2
C0=$(cg_of "${W[0]}") C1=$(cg_of "${W[1]}")
expect "1: each worker in a worker-* cgroup of its own ($C0, $C1)" \
    bash -c "[[ '$C0' == '$UNIT_CG'/worker-* && '$C1' == '$UNIT_CG'/worker-* && '$C0' != '$C1' ]]"
st=$(ct nodeherd status "$APP" 2>&1 || true)
expect "1: status says per-worker cgroups are on" grep -q "per-worker cgroups on under" <<<"$st"
if ct grep -qw memory "$CGROOT$UNIT_CG/cgroup.controllers"; then
    expect "1: memory.max of a worker is max_memory" test "$(ct cat "$CGROOT$C0/memory.max")" = $((128 << 20))
else
    expect "1: status says the memory budget is off, and why" grep -q "memory budget off: the memory controller is not available" <<<"$st"
fi
expect "1: the heap follows max_memory" bash -c "curl -fsS -m 10 '$URL/' | grep -q -- --max-old-space-size=96"

# ---------------------------------------------------------------- 2
child_of() { curl -fsS -m 10 "$URL/burn" | sed -n 's/.*"child":\([0-9]*\).*/\1/p'; }
CHILD=$(child_of)
# The answer names a pid in the container's namespace; find its worker.
CHILD_CG=$(cg_of "$CHILD")
expect "2: the burning child ($CHILD) is in its worker's cgroup ($CHILD_CG)" \
    bash -c "[[ '$CHILD_CG' == '$C0' || '$CHILD_CG' == '$C1' ]]"
OWNER=${W[0]}; [[ $CHILD_CG == "$C1" ]] && OWNER=${W[1]}
busy() {
    # cpu% is the third column from the end (then gen, node).
    ct nodeherd status "$APP" 2>/dev/null | awk -v p="$OWNER" '$2 == p { found = 1; ok = ($(NF - 2) + 0 >= 40) } END { exit !(found && ok) }'
}
expect "2: nodeherd status shows the child's CPU as its worker's" wait_for 20 busy
own_cpu=$(ct awk '{print $14 + $15}' "/proc/$OWNER/stat")
expect "2: (the worker itself is idle: $own_cpu ticks)" test "$own_cpu" -lt 100

# ---------------------------------------------------------------- 3
exit_of() { curl -fsS -m 10 "$URL/exit" >/dev/null || true; }
gone() { ! ct test -d "/proc/$1"; }
no_dir() { ! ct test -d "$CGROOT$1"; }
BEFORE=$(worker_dirs)
# The worker with the child dies (by its pid: asking /exit until the
# kernel hands it the request made the other slot die young again and
# again, into its crash-loop backoff).
ct sh -c "kill -KILL $OWNER"
expect "3: the worker with the child exited" wait_for 10 gone "$OWNER"
expect "3: its child went with its cgroup" wait_for 10 gone "$CHILD"
expect "3: its cgroup was removed" wait_for 10 no_dir "$CHILD_CG"
expect "3: the unit is still active" test "$(prop "$UNIT" ActiveState)" = active
expect "3: 2 workers ready again" wait_for 60 ready2

# ---------------------------------------------------------------- 4
read -r -a W <<<"$(workers)"
before="${W[*]} $(cg_of "${W[0]}") $(cg_of "${W[1]}")"
ct nodeherd reexec "$APP" >/dev/null 2>&1 || fail "4: nodeherd reexec failed"
read -r -a W2 <<<"$(workers)"
after="${W2[*]} $(cg_of "${W2[0]}") $(cg_of "${W2[1]}")"
expect "4: after reexec the same workers in the same cgroups ($after)" test "$before" = "$after"
expect "4: the manager still in supervisor" test "$(cg_of "$(prop "$UNIT" MainPID)")" = "$UNIT_CG/supervisor"
first=$(worker_dirs)
exit_of
changed() { local now; now=$(worker_dirs); [[ $now != "$first" && $(wc -l <<<"$now") == 2 ]]; }
expect "4: a worker exiting after reexec has its cgroup removed" wait_for 20 changed

# ---------------------------------------------------------------- 5
expect "5: 2 workers ready again" wait_for 60 ready2
CHILD=$(child_of)
timeout 60 nsenter -t "$PID1" -a systemctl stop "$UNIT" || fail "5: stop failed"
expect "5: the child is gone after stop" wait_for 10 gone "$CHILD"
expect "5: the unit's cgroup is gone" wait_for 10 no_dir "$UNIT_CG"

((FAIL == 0)) || journal 60
echo "$PASS passed, $FAIL failed"
((FAIL == 0))
