#!/usr/bin/env bash
# The bus policy and the manager's own authorization, checked against a real
# system bus where a nodeherd manager serves app APP as user nodeherd-APP.
#
#   authz-checks.sh ADDRESS APP MODE OPERATOR OTHER LOCKED
#
#   ADDRESS   the bus (unix:path=...): a private dbus-daemon
#             (dbus-policy.sh) or a booted system's own bus, dbus-daemon or
#             dbus-broker (e2e.sh runs this inside its container)
#   APP       the app whose manager owns org.nodeherd.APP, with the policy
#             `nodeherd install` writes for it
#   MODE      polkit: polkitd decides (the shipped .policy and .rules are
#             installed); groups: no polkitd, the manager checks group nodeherd
#   OPERATOR  a user in group nodeherd
#   OTHER     another app's user (nodeherd-OTHER), as an attacking app would be
#   LOCKED    a name owned on this bus that no policy lets anyone send to:
#             nothing in nodeherd's policy may reach it
#
# NODEHERD names the client binary (default: nodeherd on PATH).
# Runs as root and switches user with setpriv; the callers are dbus-send
# (every answer is "OK <reply>" or "ERR <error name>", compared exactly, and
# for the manager's refusals the message too) and the nodeherd client.
# Leaves the app at 2 workers. Prints `N passed, N failed`; exit 1 on failure.

set -euo pipefail

(($# == 6)) || { echo "usage: $0 ADDRESS APP MODE OPERATOR OTHER LOCKED" >&2; exit 2; }
ADDR=$1 APP=$2 MODE=$3 OPERATOR=$4 OTHER=$5 LOCKED=$6
[[ $MODE == polkit || $MODE == groups ]] || { echo "MODE is polkit or groups" >&2; exit 2; }
APPUSER=nodeherd-$APP
NODEHERD=${NODEHERD:-nodeherd}
DEST=org.nodeherd.$APP
M=org.nodeherd.Manager1
P=org.freedesktop.DBus.Properties
DENIED=org.freedesktop.DBus.Error.AccessDenied

PASS=0 FAIL=0
check() { # check DESCRIPTION EXPECTED ACTUAL: ACTUAL must equal EXPECTED exactly
    [[ -n $2 ]] || { echo "test bug: '$1' expects nothing" >&2; exit 2; }
    if [[ $3 == "$2" ]]; then
        PASS=$((PASS + 1)); echo "ok   - $1"
    else
        FAIL=$((FAIL + 1)); echo "FAIL - $1: expected '$2', got '$3'"
    fi
}

as() { # as WHO CMD...: nobody is uid 65534 without groups; others with theirs
    local who=$1; shift
    case $who in
        root) "$@" ;;
        nobody) setpriv --reuid=65534 --regid=65534 --clear-groups "$@" ;;
        *) setpriv --reuid="$who" --regid="$(id -g "$who")" --init-groups "$@" ;;
    esac
}

# send WHO DEST PATH IFACE.METHOD [ARG...]: "OK <reply values>" or "ERR <name>";
# the error's message goes to $HERE_MSG.
MSG_FILE=$(mktemp /tmp/nodeherd-authz.XXXXXX)
trap 'rm -f "$MSG_FILE"' EXIT
send() {
    local who=$1 dest=$2 path=$3 member=$4 out rc=0; shift 4
    out=$(as "$who" dbus-send --bus="$ADDR" --print-reply --reply-timeout=20000 \
        --dest="$dest" "$path" "$member" "$@" 2>&1) || rc=$?
    if [[ $out == Error\ * ]]; then
        local first=${out%%$'\n'*}
        first=${first#Error }
        echo "${first#*: }" >"$MSG_FILE"
        echo "ERR ${first%%:*}"
    elif ((rc == 0)); then
        : >"$MSG_FILE"
        # Drop the "method return time=..." header; values on one line.
        echo "OK$(sed 1d <<<"$out" | tr -s ' \n' ' ' | sed 's/ *$//')"
    else
        echo "TRANSPORT $out"
    fi
}
msg() { cat "$MSG_FILE"; }
own() { send "$1" org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus.RequestName "string:$2" uint32:4; }

uid_of() { if [[ $1 == nobody ]]; then echo 65534; else id -u "$1"; fi; }
refusal() { # refusal ACTION WHO: the manager's exact words
    local uid
    uid=$(uid_of "$2")
    if [[ $MODE == polkit ]]; then
        echo "org.nodeherd.$1: uid $uid is not authorized (polkit); root and members of group nodeherd are"
    else
        echo "org.nodeherd.$1: uid $uid is neither root, the app's own user nor a member of group nodeherd"
    fi
}

# ---------------------------------------------------------------- setup
check "root: Scale to 2 first" "OK int32 2" "$(send root "$DEST" /org/nodeherd $M.Scale int32:2)"

# ---------------------------------------------------------------- owning
check "$OTHER (another app) may not own $DEST" "ERR $DENIED" "$(own "$OTHER" "$DEST")"
check "nobody may not own $DEST" "ERR $DENIED" "$(own nobody "$DEST")"
check "$OPERATOR (operator) may not own $DEST" "ERR $DENIED" "$(own "$OPERATOR" "$DEST")"
check "$APPUSER may not own another app's name org.nodeherd.${OTHER#nodeherd-}" "ERR $DENIED" \
    "$(own "$APPUSER" "org.nodeherd.${OTHER#nodeherd-}")"
check "$APPUSER may not own a name outside its own ($DEST-x)" "ERR $DENIED" "$(own "$APPUSER" "$DEST-x")"
check "$APPUSER asking for its own name, held by its manager, is told it exists (3)" "OK uint32 3" \
    "$(own "$APPUSER" "$DEST")"

# ---------------------------------------------------------------- reading
check "nobody: Properties.Get Instances" "OK variant int32 2" "$(send nobody "$DEST" /org/nodeherd $P.Get string:$M string:Instances)"
check "nobody: Properties.Get Name" "OK variant string \"$APP\"" "$(send nobody "$DEST" /org/nodeherd $P.Get string:$M string:Name)"
got=$(send nobody "$DEST" /org/nodeherd $P.GetAll string:$M)
check "nobody: Properties.GetAll answers" "OK" "${got%% *}"
got=$(send nobody "$DEST" /org/nodeherd org.freedesktop.DBus.Introspectable.Introspect)
check "nobody: Introspect answers" "OK" "${got%% *}"
check "nobody: Peer.Ping" "OK" "$(send nobody "$DEST" /org/nodeherd org.freedesktop.DBus.Peer.Ping)"
check "nobody: Properties.Set refused by the bus" "ERR $DENIED" \
    "$(send nobody "$DEST" /org/nodeherd $P.Set string:$M string:Instances variant:int32:3)"

# ---------------------------------------------------------------- nothing granted elsewhere
for call in org.freedesktop.DBus.Introspectable.Introspect org.freedesktop.DBus.Peer.Ping; do
    check "nobody: $call on $LOCKED refused (the policy grants nothing on other names)" "ERR $DENIED" \
        "$(send nobody "$LOCKED" /org/nodeherd "$call")"
done
check "nobody: Properties.GetAll on $LOCKED refused" "ERR $DENIED" "$(send nobody "$LOCKED" /org/nodeherd $P.GetAll string:$M)"
check "nobody: Manager1.Scale on $LOCKED refused" "ERR $DENIED" "$(send nobody "$LOCKED" /org/nodeherd $M.Scale int32:1)"

# ---------------------------------------------------------------- acting
for who in nobody "$OTHER"; do
    for c in "Reload reload" "Restart restart" "Scale scale int32:1" "ScaleBy scale int32:1" "Drain restart" "Undrain restart" \
        "Diagnose restart uint32:0 string:heap-snapshot uint32:0 string:replace"; do
        set -- $c
        check "$who: $1 refused by the manager" "ERR $DENIED" "$(send "$who" "$DEST" /org/nodeherd "$M.$1" "${@:3}")"
        check "$who: $1 refusal names the action ($2)" "$(refusal "$2" "$who")" "$(msg)"
    done
done
check "the refused calls changed nothing: still 2 workers" "OK variant int32 2" \
    "$(send root "$DEST" /org/nodeherd $P.Get string:$M string:Instances)"
rc=0; out=$(as nobody "$NODEHERD" scale "$APP" 1 --bus "$ADDR" 2>&1) || rc=$?
check "nobody: 'nodeherd scale $APP 1' exits 5" "5" "$rc"
check "nobody: and says why" "nodeherd: access denied: $(refusal scale nobody)" "$out"

check "$OPERATOR (group nodeherd): Scale 3" "OK int32 3" "$(send "$OPERATOR" "$DEST" /org/nodeherd $M.Scale int32:3)"
got=$(send "$OPERATOR" "$DEST" /org/nodeherd $M.Reload)
check "$OPERATOR: Reload" "OK" "${got%% *}"
check "$APPUSER (the unit's ExecReload): ScaleBy -1" "OK int32 2" "$(send "$APPUSER" "$DEST" /org/nodeherd $M.ScaleBy int32:-1)"
rc=0; out=$(as "$APPUSER" "$NODEHERD" reload "$APP" --bus "$ADDR" 2>&1) || rc=$?
check "$APPUSER: 'nodeherd reload $APP' exits 0 ($out)" "0" "$rc"
check "root: ScaleBy 1" "OK int32 3" "$(send root "$DEST" /org/nodeherd $M.ScaleBy int32:1)"
check "root: Scale 2" "OK int32 2" "$(send root "$DEST" /org/nodeherd $M.Scale int32:2)"

echo "$PASS passed, $FAIL failed"
((FAIL == 0))
