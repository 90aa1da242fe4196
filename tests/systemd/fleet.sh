#!/usr/bin/env bash
# A fleet behind a real load balancer: three hosts, each a booted systemd
# (a throwaway container, see container.sh) running nodeherd under its unit
# with the example app of examples/fleet/, and Debian's HAProxy on this
# machine in front of them with examples/fleet/haproxy.cfg. All traffic is
# on loopback: host N listens on 127.0.0.1N (app and /health), HAProxy on
# 127.0.0.10.
#
#   tests/systemd/fleet.sh [NODEHERD_BINARY]
#
# HAProxy checks /health and reads each host's agent-check (taken as valid:
# `up ready 100%`). Under continuous load through HAProxy (8 keep-alive lanes):
#   a. examples/fleet/roll.sh rolls release v2 over the three hosts, one at
#      a time (deploy, drain, wait for the balancer, systemctl reload,
#      check, undrain): it succeeds and every host answers v2
#   b. roll.sh -c restart restarts one host the same way
#   c. another host is stopped for good (`systemctl stop` of its socket and
#      service): with drain_before_stop its manager says 503 and serves
#      2 s before any worker stops
#   d. 0 failed requests at the balancer over a, b and c
#   e. every request begun after the roll was answered by release v2
# Then the same restart and stop without drain_before_stop (set to 0 in the
# hosts' configuration and reloaded): the failed requests are counted, and
# must not be 0 (the check of d, seen red without the feature).
#   f. a 3 s drain_before_stop under TimeoutStopSec=1s: the manager extends
#      systemd's stop timeout, so the drain runs its course and the stop is
#      clean (no timeout, no SIGKILL)
#
# Prints `N passed, N failed` and the two counts; exits 1 on any failure.
# Every wait is bounded; HAProxy and the load client are ended by pid, the
# containers, their mounts and cgroups removed, whatever happens. Needs
# root and systemd-nspawn; installs haproxy from Debian's archive if missing.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
EXAMPLE=$REPO/examples/fleet
# shellcheck source=container.sh
source "$HERE/container.sh"

log() { printf '%s %s\n' "$(date +%T.%3N)" "$*"; }
die() { echo "fleet: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "needs root"

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
command -v haproxy >/dev/null || need+=(haproxy)
command -v curl >/dev/null || need+=(curl)
command -v ss >/dev/null || need+=(iproute2)
if ((${#need[@]})); then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v node >/dev/null || die "node missing"
command -v python3 >/dev/null || die "python3 missing"

PASS=0 FAIL=0
pass() { PASS=$((PASS + 1)); echo "ok   - $*"; }
fail() { FAIL=$((FAIL + 1)); echo "FAIL - $*"; }
expect() { local d=$1; shift; if "$@"; then pass "$d"; else fail "$d"; fi; }

HOSTS=(127.0.0.11 127.0.0.12 127.0.0.13)
NAMES=()
HOSTDIR=$(mktemp -d /tmp/nodeherd-fleet.XXXXXX)
chmod 755 "$HOSTDIR"
HAPID="" LOADPID=""
cleanup() {
    local rc=$? n
    [[ -n $LOADPID ]] && kill "$LOADPID" 2>/dev/null || true
    if [[ -n $HAPID ]]; then
        kill "$HAPID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$HAPID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$HAPID" 2>/dev/null || true
    fi
    for n in "${NAMES[@]}"; do
        container_stop "$n" || echo "fleet: container $n cleanup reported problems" >&2
    done
    rm -rf "$HOSTDIR"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Four ports free on every address: the app's, /health's, the balancer's,
# the agent-check's.
free_port() {
    local p
    for p in $(seq $((23000 + $$ % 9000)) 5 $((23500 + $$ % 9000))); do
        [[ -z $(ss -Htln "sport >= :$p and sport <= :$((p + 3))") ]] && { echo "$p"; return; }
    done
    die "no free port"
}
PORT=$(free_port)
APP_PORT=$PORT HEALTH_PORT=$((PORT + 1)) LB_PORT=$((PORT + 2)) AGENT_PORT=$((PORT + 3))
LB=http://127.0.0.10:$LB_PORT/

# ---------------------------------------------------------------- the hosts
cp "$BIN" "$HOSTDIR/nodeherd"
cp -r "$REPO/units" "$HOSTDIR/units"
cp "$EXAMPLE/app.js" "$EXAMPLE/ecosystem.config.js" "$HOSTDIR/"
cat >"$HOSTDIR/setup.sh" <<EOF
set -eu
addr=\$1
install -m 755 /shared/nodeherd /usr/bin/nodeherd
systemd-sysusers /shared/units/sysusers.d/nodeherd.conf
install -m 644 /shared/units/nodeherd@.socket /shared/units/nodeherd@.service /etc/systemd/system/
install -d -m 755 /srv/web
install -m 644 /shared/app.js /srv/web/app.js
echo v1 >/srv/web/RELEASE
chmod 644 /srv/web/RELEASE
# The example's file, on this host's own address (the hosts share this
# machine's network).
sed -e "s/'0.0.0.0:8080'/'\$addr:$APP_PORT'/" -e "s/'0.0.0.0:9210'/'\$addr:$HEALTH_PORT'/" \
    -e "s/'0.0.0.0:9211'/'\$addr:$AGENT_PORT'/" \
    /shared/ecosystem.config.js >/srv/web/ecosystem.config.js
grep -q "\$addr:$HEALTH_PORT" /srv/web/ecosystem.config.js
grep -q "\$addr:$AGENT_PORT" /srv/web/ecosystem.config.js
systemctl daemon-reload
nodeherd install /srv/web/ecosystem.config.js --now
systemctl start nodeherd@web.service
EOF
# How roll.sh reaches a host: the container that has its address.
cat >"$HOSTDIR/remote.sh" <<EOF
#!/bin/sh
host=\$1; shift
pid=\$(cat "$HOSTDIR/pid1.\$host") || exit 255
exec nsenter -t "\$pid" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "\$@"
EOF
chmod 755 "$HOSTDIR/remote.sh"
on() { "$HOSTDIR/remote.sh" "$@"; }

for i in 0 1 2; do
    name=nodeherd-fleet-$$-$i
    NAMES+=("$name")
    log "booting host ${HOSTS[i]} ($name)"
    pid1=$(container_start "$name" "$HOSTDIR") || die "container $name did not boot"
    echo "$pid1" >"$HOSTDIR/pid1.${HOSTS[i]}"
    if ! on "${HOSTS[i]}" bash /shared/setup.sh "${HOSTS[i]}" >"$HOSTDIR/setup.log" 2>&1; then
        sed 's/^/  | /' "$HOSTDIR/setup.log"
        die "setup of ${HOSTS[i]} failed"
    fi
done

# ---------------------------------------------------------------- the balancer
sed -e "s|stats socket /run/haproxy/fleet.sock|stats socket $HOSTDIR/haproxy.sock|" \
    -e "s|bind 10.0.0.10:80|bind 127.0.0.10:$LB_PORT|" \
    -e "s|10.0.0.1\([1-3]\):8080|127.0.0.1\1:$APP_PORT|" \
    -e "s|check port 9210|check port $HEALTH_PORT|" \
    -e "s|agent-port 9211|agent-port $AGENT_PORT|" \
    "$EXAMPLE/haproxy.cfg" >"$HOSTDIR/haproxy.cfg"
grep -q "127.0.0.13:$APP_PORT" "$HOSTDIR/haproxy.cfg" && grep -q "agent-port $AGENT_PORT" "$HOSTDIR/haproxy.cfg" ||
    die "the example's haproxy.cfg was not adapted"
haproxy -c -q -f "$HOSTDIR/haproxy.cfg" || die "haproxy rejects the example configuration"
haproxy -f "$HOSTDIR/haproxy.cfg" -db >"$HOSTDIR/haproxy.log" 2>&1 &
HAPID=$!

# server_field NAME FIELD: a field of server NAME in HAProxy's `show stat`
# (status: UP, DOWN, ...; last_agt: the agent's last answer).
server_field() {
    python3 - "$HOSTDIR/haproxy.sock" "$1" "$2" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
try:
    s.connect(sys.argv[1])
    s.sendall(b"show stat\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except OSError:
    sys.exit(0)
lines = data.decode().splitlines()
if not lines:
    sys.exit(0)
names = lines[0].lstrip("# ").split(",")
for line in lines[1:]:
    f = line.split(",")
    if len(f) == len(names) and f[0] == "app" and f[1] == sys.argv[2]:
        print(f[names.index(sys.argv[3])])
PY
}
server_state() { server_field "$1" status; }
is_state() { [[ $(server_state "$1") == "$2"* ]]; }
# Out of rotation: DOWN (its checks fail), or MAINT when the agent's last
# answer before the stop was `maint` (the manager stopping its workers):
# HAProxy keeps that until the agent says `ready` again.
is_out() { is_state "$1" DOWN || is_state "$1" MAINT; }
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}
all_up() { is_state web1 UP && is_state web2 UP && is_state web3 UP; }
wait_for 30 all_up || { sed 's/^/  | /' "$HOSTDIR/haproxy.log"; die "HAProxy never saw the three hosts up"; }
log "HAProxy (pid $HAPID) sees web1, web2 and web3 up"
agent_up() { [[ $(server_field "$1" agent_status) == L7OK && $(server_field "$1" last_agt) == "via agent : up" ]]; }
for s in web1 web2 web3; do
    expect "HAProxy takes $s's agent-check answer (up ready 100%) as valid" wait_for 10 agent_up "$s"
done

# ---------------------------------------------------------------- load
start_load() { # start_load OUT
    rm -f "$HOSTDIR/stop"
    node "$HERE/fleet-load.js" "$LB" 8 "$HOSTDIR/stop" 600 "$1" &
    LOADPID=$!
    sleep 1
}
stop_load() {
    touch "$HOSTDIR/stop"
    local deadline=$((SECONDS + 30))
    while kill -0 "$LOADPID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill "$LOADPID" 2>/dev/null || true
    LOADPID=""
}
failed_in() { awk '$3 != "200"' "$1" | wc -l; }
describe_failures() { awk '$3 != "200" {print $3}' "$1" | sort | uniq -c | tr '\n' ' '; }
now_ms() { date +%s%3N; }
roll() { NODEHERD_REMOTE=$HOSTDIR/remote.sh sh "$EXAMPLE/roll.sh" -a web -p "$HEALTH_PORT" -w 1 "$@"; }
stop_for_good() { on "$1" systemctl stop nodeherd@web.socket nodeherd@web.service; }

# ---------------------------------------------------------------- with drain_before_stop
log "phase 1: with drain_before_stop 2s"
start_load "$HOSTDIR/with.txt"
rc=0
roll -d 'echo v2 >/srv/web/RELEASE' -P "$APP_PORT" -e release=v2 "${HOSTS[@]}" || rc=$?
ROLLED=$(now_ms)
expect "a: roll.sh rolled v2 over the three hosts (exit $rc)" test "$rc" = 0
for h in "${HOSTS[@]}"; do
    expect "a: $h answers release v2" grep -q 'release=v2' <<<"$(curl -s -m 2 "http://$h:$APP_PORT/")"
done
rc=0
roll -c restart "${HOSTS[1]}" || rc=$?
expect "b: roll.sh -c restart of ${HOSTS[1]} (exit $rc)" test "$rc" = 0
wait_for 30 is_state web2 UP || fail "b: web2 never came back up"
t0=$SECONDS
stop_for_good "${HOSTS[2]}"
took=$((SECONDS - t0))
expect "c: the stop of ${HOSTS[2]} drained first (took ${took}s, drain_before_stop 2s)" test "$took" -ge 2
expect "c: its service is inactive" test "$(on "${HOSTS[2]}" systemctl is-active nodeherd@web.service)" = inactive
if wait_for 10 is_out web3; then pass "c: HAProxy has it out of rotation ($(server_state web3))"
else fail "c: HAProxy has it out of rotation ($(server_state web3))"; fi
sleep 1
stop_load
total1=$(wc -l <"$HOSTDIR/with.txt")
failed1=$(failed_in "$HOSTDIR/with.txt")
expect "d: 0 failed requests of $total1 at the balancer ($(describe_failures "$HOSTDIR/with.txt"))" test "$failed1" = 0
after=$(awk -v t="$ROLLED" '$1 >= t' "$HOSTDIR/with.txt" | wc -l)
old=$(awk -v t="$ROLLED" '$1 >= t && $4 != "v2"' "$HOSTDIR/with.txt" | wc -l)
expect "e: every request begun after the roll answered by v2 ($old of $after not)" test "$old" = 0 -a "$after" -gt 0

# ---------------------------------------------------------------- without
log "phase 2: the same restart and stop without drain_before_stop"
on "${HOSTS[2]}" systemctl start nodeherd@web.socket nodeherd@web.service
for h in "${HOSTS[@]}"; do
    on "$h" sed -i 's/"drain_before_stop": "2s"/"drain_before_stop": 0/' /etc/nodeherd/web.json
    on "$h" grep -q '"drain_before_stop": 0' /etc/nodeherd/web.json || die "drain_before_stop not found in $h's copy"
    on "$h" systemctl reload nodeherd@web.service
done
wait_for 30 all_up || die "the three hosts never came back up"
start_load "$HOSTDIR/without.txt"
t_restart=$(now_ms)
on "${HOSTS[1]}" systemctl restart nodeherd@web.service
wait_for 30 is_state web2 UP || fail "web2 never came back up"
sleep 1
t_stop=$(now_ms)
t0=$SECONDS
stop_for_good "${HOSTS[2]}"
took=$((SECONDS - t0))
wait_for 10 is_out web3 || true
sleep 1
stop_load
total2=$(wc -l <"$HOSTDIR/without.txt")
failed2=$(failed_in "$HOSTDIR/without.txt")
f_restart=$(awk -v a="$t_restart" -v b="$t_stop" '$1 >= a && $1 < b && $3 != "200"' "$HOSTDIR/without.txt" | wc -l)
f_stop=$((failed2 - f_restart))
expect "without drain_before_stop the same check fails: $failed2 failed of $total2 ($f_restart around the restart, $f_stop around the stop, which took ${took}s; $(describe_failures "$HOSTDIR/without.txt"))" \
    test "$failed2" -gt 0

# ---------------------------------------------------------------- systemd's stop timeout
# A drain longer than the unit's TimeoutStopSec=: the manager extends it
# (EXTEND_TIMEOUT_USEC=), so systemd neither kills it nor calls it a timeout.
h=${HOSTS[0]}
on "$h" mkdir -p /etc/systemd/system/nodeherd@web.service.d
on "$h" sh -c 'printf "[Service]\nTimeoutStopSec=1s\n" >/etc/systemd/system/nodeherd@web.service.d/stop.conf'
on "$h" systemctl daemon-reload
on "$h" sed -i 's/"drain_before_stop": 0/"drain_before_stop": "3s"/' /etc/nodeherd/web.json
on "$h" systemctl reload nodeherd@web.service
t0=$SECONDS
on "$h" systemctl stop nodeherd@web.service || true
took=$((SECONDS - t0))
expect "f: a 3 s drain under TimeoutStopSec=1s ran its course (stop took ${took}s)" test "$took" -ge 3
result=$(on "$h" systemctl show -P Result nodeherd@web.service)
expect "f: and systemd saw a clean stop, no timeout (Result=$result)" test "$result" = success

echo "with drain_before_stop: $failed1 failed of $total1; without: $failed2 failed of $total2"
echo "$PASS passed, $FAIL failed"
((FAIL == 0))
