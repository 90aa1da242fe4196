#!/usr/bin/env bash
# Check packaging/dbus/org.nodeherd.conf against a real, private dbus-daemon
# that runs Debian's stock system-bus configuration with only the listening
# address changed and our file as the only <include>d policy.
#
#   tests/systemd/dbus-policy.sh
#
# Needs root, dbus-daemon, python3-dbus and python3-gi (Debian packages), and
# setpriv and unshare (util-linux). Users: the policy names user and group
# `nodeherd`; when this machine has none, the test runs in a private mount
# namespace where /etc/passwd and /etc/group are copies with `nodeherd` and
# an operator `nhoperator` (member of group nodeherd) added. The host's files
# are never touched.
#
# Prints `N passed, N failed`; exit status 1 on any failure.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
POLICY_SRC=${NODEHERD_DBUS_POLICY:-$REPO/packaging/dbus/org.nodeherd.conf}
PY=/usr/bin/python3

if [[ ${1:-} != --inner ]]; then
    [[ $(id -u) == 0 ]] || { echo "dbus-policy.sh: needs root" >&2; exit 1; }
    need=()
    command -v dbus-daemon >/dev/null || need+=(dbus-daemon)
    command -v setpriv >/dev/null || need+=(util-linux)
    "$PY" -c 'import dbus, dbus.mainloop.glib; from gi.repository import GLib' 2>/dev/null ||
        need+=(python3-dbus python3-gi)
    if ((${#need[@]})); then
        echo "dbus-policy.sh: installing ${need[*]}" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    exec unshare --mount --propagation private bash "${BASH_SOURCE[0]}" --inner
fi

# ---- inside a private mount namespace from here on ----

TMP=$(mktemp -d /tmp/nodeherd-dbus-policy.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.02; done
        kill -KILL "$p" 2>/dev/null || true
    done
    umount /etc/passwd /etc/group 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

# Users, only in this namespace when the host lacks them.
if ! getent passwd nodeherd >/dev/null || ! getent passwd nhoperator >/dev/null; then
    cp /etc/passwd "$TMP/passwd"
    cp /etc/group "$TMP/group"
    getent group nodeherd >/dev/null || echo "nodeherd:x:64990:nhoperator" >>"$TMP/group"
    getent passwd nodeherd >/dev/null || echo "nodeherd:x:64990:64990::/nonexistent:/usr/sbin/nologin" >>"$TMP/passwd"
    getent group nhoperator >/dev/null || echo "nhoperator:x:64991:" >>"$TMP/group"
    getent passwd nhoperator >/dev/null || echo "nhoperator:x:64991:64991::/nonexistent:/usr/sbin/nologin" >>"$TMP/passwd"
    if getent group nodeherd >/dev/null && ! id -nG nhoperator 2>/dev/null | grep -qw nodeherd; then
        sed -i -E '/^nodeherd:/ s/:([^:]*)$/:\1,nhoperator/; s/:,nhoperator$/:nhoperator/' "$TMP/group"
    fi
    mount --bind "$TMP/passwd" /etc/passwd
    mount --bind "$TMP/group" /etc/group
fi
id -nG nhoperator | grep -qw nodeherd || { echo "setup: nhoperator is not in group nodeherd" >&2; exit 1; }

cp "$POLICY_SRC" "$TMP/org.nodeherd.conf"
cp "$HERE/busprobe.py" "$TMP/busprobe.py"
chmod 644 "$TMP/org.nodeherd.conf"
chmod 755 "$TMP/busprobe.py"

# make_config OUT SOCKET [POLICY]: the stock system.conf, listening on
# SOCKET, not forking, not switching user, without activation or syslog, and
# with POLICY (if given) as its only included policy file.
make_config() {
    local out=$1 sock=$2 policy=${3:-}
    local inc=""
    [[ -n $policy ]] && inc="<include>$policy</include>"
    sed -E \
        -e '/<user>|<fork\/>|<pidfile>|<syslog\/>|<servicehelper>|<standard_system_servicedirs\/>/d' \
        -e "s#<listen>[^<]*</listen>#<listen>unix:path=$sock</listen>#" \
        -e "s#<includedir>[^<]*</includedir>#__INCLUDEDIR__#" \
        -e '/<include ignore_missing="yes">/d' \
        /usr/share/dbus-1/system.conf |
        awk -v inc="$inc" '/__INCLUDEDIR__/ { if (!done) print inc; done = 1; next } { print }' >"$out"
    # The edits must have landed, or this would test something else.
    [[ $(grep -c '<listen>' "$out") == 1 ]] && grep -q "unix:path=$sock" "$out" &&
        grep -q '<type>system</type>' "$out" && ! grep -q includedir "$out" || {
        echo "setup: could not derive a config from /usr/share/dbus-1/system.conf" >&2
        exit 1
    }
}

# start_bus CONFIG SOCKET LOG: start dbus-daemon, wait for its socket.
start_bus() {
    dbus-daemon --config-file="$1" --nofork --nopidfile >"$3" 2>&1 &
    PIDS+=($!)
    local i
    for i in $(seq 200); do
        [[ -S $2 ]] && return 0
        kill -0 "${PIDS[-1]}" 2>/dev/null || break
        sleep 0.01
    done
    echo "setup: dbus-daemon did not start:" >&2
    cat "$3" >&2
    exit 1
}

make_config "$TMP/bus.conf" "$TMP/bus" "$TMP/org.nodeherd.conf"
start_bus "$TMP/bus.conf" "$TMP/bus" "$TMP/bus.log"
ADDR=unix:path=$TMP/bus

PASS=0 FAIL=0
check() { # check DESCRIPTION EXPECTED ACTUAL: ACTUAL must equal EXPECTED exactly
    if [[ $3 == "$2" ]]; then
        PASS=$((PASS + 1)); echo "ok   - $1"
    else
        FAIL=$((FAIL + 1)); echo "FAIL - $1: expected '$2', got '$3'"
    fi
}
check_prefix() { # check_prefix DESCRIPTION PREFIX ACTUAL: for answers too long to spell out
    [[ -n $2 ]] || { echo "test bug: check_prefix '$1' with an empty prefix" >&2; exit 2; }
    if [[ $3 == "$2"* ]]; then
        PASS=$((PASS + 1)); echo "ok   - $1"
    else
        FAIL=$((FAIL + 1)); echo "FAIL - $1: expected '$2...', got '$3'"
    fi
}

as() { # as USER CMD...: run as USER with USER's groups from /etc/group
    local who=$1; shift
    case $who in
        root) "$@" ;;
        nobody) setpriv --reuid=65534 --regid=65534 --clear-groups "$@" ;;
        *) setpriv --reuid="$who" --regid="$(id -g "$who")" --init-groups "$@" ;;
    esac
}
probe() { local who=$1; shift; as "$who" "$PY" "$TMP/busprobe.py" "$ADDR" "$@" 2>&1 || true; }
call() { local who=$1 iface=$2 method=$3; shift 3; probe "$who" call org.nodeherd.probe /org/nodeherd "$iface" "$method" "$@"; }

DENIED=org.freedesktop.DBus.Error.AccessDenied
M=org.nodeherd.Manager1
P=org.freedesktop.DBus.Properties

# The bus understood every user and group our file names: nothing in its
# log mentions an unknown name, an error or a warning.
check "dbus-daemon accepts the policy without complaint" "" \
    "$(grep -iE 'unknown|error|warn|invalid' "$TMP/bus.log" | tr '\n' ' ' || true)"

# Ownership.
# setpriv execs python, so $! is the owner's own pid.
setpriv --reuid=nodeherd --regid=nodeherd --init-groups "$PY" "$TMP/busprobe.py" "$ADDR" own org.nodeherd.probe >"$TMP/owner.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 500); do grep -q ready "$TMP/owner.log" && break; kill -0 "${PIDS[-1]}" 2>/dev/null || break; sleep 0.01; done
check "user nodeherd owns org.nodeherd.probe" "ready" "$(cat "$TMP/owner.log")"
check "root may own org.nodeherd.*" "OK" "$(probe root try-own org.nodeherd.byroot)"
check "nobody may not own org.nodeherd.*" "$DENIED" "$(probe nobody try-own org.nodeherd.bynobody)"
check "a nodeherd group member may not own org.nodeherd.*" "$DENIED" "$(probe nhoperator try-own org.nodeherd.byoperator)"
check "user nodeherd may not own names outside org.nodeherd" "$DENIED" "$(probe nodeherd try-own org.nodeherdx.app)"

# Reading is open to everyone.
check "nobody: Properties.Get" "OK 2" "$(call nobody $P Get $M Instances)"
check_prefix "nobody: Properties.GetAll" "OK {" "$(call nobody $P GetAll $M)"
check_prefix "nobody: Introspect" "OK <!DOCTYPE" "$(call nobody org.freedesktop.DBus.Introspectable Introspect)"
check "nobody: Peer.Ping" "OK" "$(call nobody org.freedesktop.DBus.Peer Ping)"
check "nobody: Properties.Set refused" "$DENIED" "$(call nobody $P Set $M Instances i:3)"

# Acting is for root and group nodeherd.
check "nobody: Reload refused" "$DENIED" "$(call nobody $M Reload)"
check "nobody: Restart refused" "$DENIED" "$(call nobody $M Restart)"
check "nobody: Scale refused" "$DENIED" "$(call nobody $M Scale i:4)"
check "nobody: ScaleBy refused" "$DENIED" "$(call nobody $M ScaleBy i:1)"
check "nobody: Reload without interface field refused" "$DENIED" "$(call nobody - Reload)"
check "group member: Reload" "OK" "$(call nhoperator $M Reload)"
check "group member: Scale 3" "OK 3" "$(call nhoperator $M Scale i:3)"
check "group member: Reload without interface field refused" "$DENIED" "$(call nhoperator - Reload)"
check "user nodeherd (the unit's ExecReload): Reload" "OK" "$(call nodeherd $M Reload)"
check "root: Reload" "OK" "$(call root $M Reload)"
check "root: ScaleBy 1" "OK 4" "$(call root $M ScaleBy i:1)"

# Control: the same stock configuration without our file refuses the owner,
# so the passes above come from org.nodeherd.conf.
make_config "$TMP/bare.conf" "$TMP/bare"
start_bus "$TMP/bare.conf" "$TMP/bare" "$TMP/bare.log"
check "control: without the policy file user nodeherd may not own" "$DENIED" \
    "$(as nodeherd "$PY" "$TMP/busprobe.py" "unix:path=$TMP/bare" try-own org.nodeherd.probe 2>&1 || true)"

echo "$PASS passed, $FAIL failed"
(( FAIL == 0 ))
