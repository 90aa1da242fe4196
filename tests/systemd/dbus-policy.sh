#!/usr/bin/env bash
# The bus policy nodeherd writes for an app (`nodeherd install`; the
# package's packaging/dbus/org.nodeherd.conf is the one of app `hello`) and
# the manager's own authorization, against a real, private dbus-daemon that
# runs Debian's stock system-bus configuration with only the listening
# address changed, and the policy files of two apps and of a locked name
# as its only <include>d ones. No polkitd here: the manager's group check.
# The same checks (authz-checks.sh) run on dbus-broker and dbus-daemon with
# polkit inside the booted systems of e2e.sh.
#
#   tests/systemd/dbus-policy.sh [NODEHERD_BINARY]
#
# Needs root, dbus-daemon and dbus-send, node, setpriv and unshare. Users:
# the test runs in a private mount namespace where /etc/passwd and
# /etc/group are copies with the apps' users nodeherd-probe and
# nodeherd-other, the operators' group nodeherd and an operator nhoperator
# in it. The host's files are never touched.
#
# Prints `N passed, N failed`; exit status 1 on any failure.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

if [[ ${1:-} != --inner ]]; then
    [[ $(id -u) == 0 ]] || { echo "dbus-policy.sh: needs root" >&2; exit 1; }
    bin=${1:-}
    if [[ -z $bin ]]; then
        for b in "$REPO/target/release/nodeherd" "$REPO/target/debug/nodeherd"; do
            [[ -x $b ]] && { bin=$b; break; }
        done
    fi
    [[ -n $bin && -x $bin ]] || { echo "dbus-policy.sh: no nodeherd binary (build it, or pass its path)" >&2; exit 1; }
    need=()
    command -v dbus-daemon >/dev/null || need+=(dbus-daemon)
    command -v dbus-send >/dev/null || need+=(dbus-bin)
    command -v setpriv >/dev/null || need+=(util-linux)
    command -v node >/dev/null || need+=(nodejs)
    if ((${#need[@]})); then
        echo "dbus-policy.sh: installing ${need[*]}" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    exec unshare --mount --propagation private bash "${BASH_SOURCE[0]}" --inner "$(readlink -f "$bin")"
fi

# ---- inside a private mount namespace from here on ----

BIN=$2
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

# Users, only in this namespace: the host's files are not touched.
cp /etc/passwd "$TMP/passwd"
cp /etc/group "$TMP/group"
add_user() { # add_user NAME UID [GROUPS...]: a system user with its own group
    local name=$1 uid=$2; shift 2
    getent passwd "$name" >/dev/null || echo "$name:x:$uid:$uid::/nonexistent:/usr/sbin/nologin" >>"$TMP/passwd"
    getent group "$name" >/dev/null || echo "$name:x:$uid:" >>"$TMP/group"
}
add_user nodeherd-probe 64981
add_user nodeherd-other 64982
add_user nhoperator 64983
if getent group nodeherd >/dev/null; then
    sed -i -E '/^nodeherd:/ s/:([^:]*)$/:\1,nhoperator/; s/^(nodeherd:[^:]*:[^:]*):,nhoperator$/\1:nhoperator/' "$TMP/group"
else
    echo "nodeherd:x:64980:nhoperator" >>"$TMP/group"
fi
mount --bind "$TMP/passwd" /etc/passwd
mount --bind "$TMP/group" /etc/group
id -nG nhoperator | tr ' ' '\n' | grep -qx nodeherd || { echo "setup: nhoperator is not in group nodeherd" >&2; exit 1; }
id -nG nodeherd-other | tr ' ' '\n' | grep -qx nodeherd && { echo "setup: nodeherd-other is in group nodeherd" >&2; exit 1; }

# The policies `nodeherd install` writes for apps probe and other, and one
# letting root own a name nobody may send to.
policy_of() { # the file install would write for app $1, from its dry run
    mkdir -p "$TMP/eco-$1"
    echo "{\"apps\":[{\"name\":\"$1\",\"script\":\"$APP_JS\"}]}" >"$TMP/eco-$1/e.json"
    "$BIN" install "$TMP/eco-$1/e.json" --dry-run --bus-policy-dir "$TMP/policy" --config-dir "$TMP/etc" |
        awk '/^--- would write .*\/org\.nodeherd\..*\.conf$/ { f = 1; next } /^--- would/ { f = 0 } f' | sed '$d'
}
APP_JS=$REPO/examples/hello/app.js
mkdir -p "$TMP/policy"
policy_of probe >"$TMP/policy/org.nodeherd.probe.conf"
policy_of other >"$TMP/policy/org.nodeherd.other.conf"
grep -q '<allow own="org.nodeherd.probe"/>' "$TMP/policy/org.nodeherd.probe.conf" || { echo "setup: no policy from install --dry-run" >&2; exit 1; }
cat >"$TMP/policy/locked.conf" <<'XML'
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><policy user="root"><allow own="org.nodeherdtest.Locked"/></policy></busconfig>
XML
chmod -R a+rX "$TMP/policy"

# make_config OUT SOCKET [POLICY]: the stock system.conf, listening on
# SOCKET, not forking, not switching user, without activation or syslog, and
# with POLICY (if given) as its only included policy file.
make_config() {
    local out=$1 sock=$2 policy inc=""; shift 2
    for policy in "$@"; do inc+="<include>$policy</include>"; done
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

make_config "$TMP/bus.conf" "$TMP/bus" "$TMP"/policy/*.conf
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

# The bus understood every user and group the files name: nothing in its
# log mentions an unknown name, an error or a warning.
# (Not the fd limit it cannot raise without CAP_SYS_RESOURCE in here.)
complaints=$(grep -iE 'unknown|error|warn|invalid' "$TMP/bus.log" | grep -v 'Failed to set fd limit' | tr '\n' ' ' || true)
check "dbus-daemon accepts the policies without complaint" "(none)" "${complaints:-(none)}"

# start_manager USER APP [FLAGS...]: a real manager on the bus, as USER.
start_manager() {
    local user=$1 app=$2 rt=$TMP/rt-$2; shift 2
    install -d -m 700 -o "$user" "$rt"
    local as=()
    [[ $user == root ]] || as=(setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups)
    "${as[@]}" env -u INVOCATION_ID XDG_RUNTIME_DIR="$rt" "$BIN" run "$APP_JS" --name "$app" -i 2 \
        --listen 127.0.0.1:0 --bus "$ADDR" "$@" >"$TMP/$app.log" 2>&1 &
    PIDS+=($!)
}
owned() { dbus-send --bus="$ADDR" --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \
    org.freedesktop.DBus.NameHasOwner "string:$1" 2>/dev/null | grep -q 'boolean true'; }
wait_owned() {
    local i
    for i in $(seq 300); do owned "$1" && return 0; sleep 0.05; done
    echo "setup: nobody owns $1 after 15 s:" >&2
    cat "$TMP"/*.log >&2
    exit 1
}
ready2() { dbus-send --bus="$ADDR" --print-reply --dest=org.nodeherd.probe /org/nodeherd \
    org.freedesktop.DBus.Properties.Get string:org.nodeherd.Manager1 string:ReadyWorkers 2>/dev/null | grep -q 'int32 2'; }
start_manager nodeherd-probe probe
start_manager root locked --bus-name org.nodeherdtest.Locked
wait_owned org.nodeherd.probe
wait_owned org.nodeherdtest.Locked
for _ in $(seq 300); do ready2 && break; sleep 0.05; done

out=$(NODEHERD=$BIN bash "$HERE/authz-checks.sh" "$ADDR" probe groups nhoperator nodeherd-other org.nodeherdtest.Locked) && rc=0 || rc=$?
echo "$out" | sed '$d'
n_pass=$(tail -1 <<<"$out" | awk '{ print $1 }')
n_fail=$(tail -1 <<<"$out" | awk '{ print $3 }')
PASS=$((PASS + ${n_pass:-0})) FAIL=$((FAIL + ${n_fail:-0}))
((rc == 0)) || [[ ${n_fail:-0} != 0 ]] || { FAIL=$((FAIL + 1)); echo "FAIL - authz-checks.sh exited $rc: $(tail -3 <<<"$out")"; }

# Control: the same stock configuration without the app's file refuses its
# user the name, so the passes above come from the written policy.
make_config "$TMP/bare.conf" "$TMP/bare"
start_bus "$TMP/bare.conf" "$TMP/bare" "$TMP/bare.log"
got=$(setpriv --reuid=nodeherd-probe --regid=nodeherd-probe --init-groups dbus-send --bus="unix:path=$TMP/bare" \
    --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus.RequestName \
    string:org.nodeherd.probe uint32:4 2>&1 || true)
check "control: without the policy file user nodeherd-probe may not own org.nodeherd.probe" \
    "org.freedesktop.DBus.Error.AccessDenied" "$(sed -n '1s/^Error \([^:]*\):.*/\1/p' <<<"$got")"

echo "$PASS passed, $FAIL failed"
(( FAIL == 0 ))
