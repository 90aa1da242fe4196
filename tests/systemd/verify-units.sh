#!/usr/bin/env bash
# `systemd-analyze verify` every unit in units/, and record the
# `systemd-analyze security --offline=true` score of each service.
#
#   tests/systemd/verify-units.sh [NODEHERD_BINARY]
#
# verify checks that ExecStart='s program exists and is executable. The units
# name /usr/bin/nodeherd, so this runs in a private mount namespace where an
# overlay on /usr/bin adds NODEHERD_BINARY there (by default the release or
# debug build in target/, else a stub script). The host's /usr/bin is not
# touched.
#
# verify reports unknown keys and bad values as warnings with exit status 0:
# here any output on stderr is a failure. A deliberately broken unit is
# checked too, so the test is seen to catch such warnings.
#
# Prints `N passed, N failed`; exit status 1 on any failure.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
UNITS=$REPO/units

if [[ ${1:-} != --inner ]]; then
    [[ $(id -u) == 0 ]] || { echo "verify-units.sh: needs root" >&2; exit 1; }
    bin=${1:-}
    if [[ -z $bin ]]; then
        for b in "$REPO/target/release/nodeherd" "$REPO/target/debug/nodeherd"; do
            [[ -x $b ]] && { bin=$b; break; }
        done
    fi
    [[ -z $bin || -x $bin ]] || { echo "verify-units.sh: $bin is not executable" >&2; exit 1; }
    exec unshare --mount --propagation private bash "${BASH_SOURCE[0]}" --inner "${bin:+$(readlink -f "$bin")}"
fi

# ---- inside a private mount namespace ----
bin=${2:-}
TMP=$(mktemp -d /tmp/nodeherd-verify.XXXXXX)
trap 'umount /usr/bin 2>/dev/null || true; umount "$TMP/ov" 2>/dev/null || true; rm -rf "$TMP"' EXIT

mkdir -p "$TMP/ov"
mount -t tmpfs tmpfs "$TMP/ov"
mkdir -p "$TMP/ov/upper" "$TMP/ov/work"
if [[ -n $bin ]]; then
    cp "$bin" "$TMP/ov/upper/nodeherd"
    echo "using $bin as /usr/bin/nodeherd"
else
    printf '#!/bin/sh\nexit 0\n' >"$TMP/ov/upper/nodeherd"
    echo "no nodeherd build found: using a stub as /usr/bin/nodeherd"
fi
chmod 755 "$TMP/ov/upper/nodeherd"
if [[ ! -e /usr/bin/nodeherd ]]; then
    mount -t overlay overlay -o "lowerdir=/usr/bin,upperdir=$TMP/ov/upper,workdir=$TMP/ov/work" /usr/bin
fi

PASS=0 FAIL=0
# verify_quiet LABEL PATH...: verify must exit 0 and print nothing on stderr.
verify_quiet() {
    local label=$1 err rc=0; shift
    err=$(cd "$TMP" && systemd-analyze verify --man=no "$@" 2>&1 >/dev/null) || rc=$?
    if [[ $rc == 0 && -z $err ]]; then
        PASS=$((PASS + 1)); echo "ok   - verify $label"
    else
        FAIL=$((FAIL + 1)); echo "FAIL - verify $label (exit $rc):"; sed 's/^/       /' <<<"$err"
    fi
}

# Each file on its own, and the template pair as an instance with a name
# that needs escaping rules to hold ("-" is kept in %i, "_" in the bus name).
mkdir -p "$TMP/units"
cp "$UNITS"/*.socket "$UNITS"/*.service "$TMP/units/"
for u in "$TMP"/units/*.socket "$TMP"/units/*.service; do
    verify_quiet "$(basename "$u")" "$u"
done
cp "$UNITS/nodeherd@.service" "$TMP/units/nodeherd@my-app.service"
cp "$UNITS/nodeherd@.socket" "$TMP/units/nodeherd@my-app.socket"
verify_quiet "nodeherd@my-app.socket + .service" "$TMP/units/nodeherd@my-app.socket" "$TMP/units/nodeherd@my-app.service"

# The template with the root-manager drop-in (units/root-manager.conf), as
# an operator installs it for one app.
mkdir -p "$TMP/rm/nodeherd@rp.service.d"
cp "$UNITS/nodeherd@.service" "$TMP/rm/nodeherd@rp.service"
cp "$UNITS/nodeherd@.socket" "$TMP/rm/nodeherd@rp.socket"
cp "$UNITS/root-manager.conf" "$TMP/rm/nodeherd@rp.service.d/"
verify_quiet "nodeherd@rp.service + root-manager.conf" "$TMP/rm/nodeherd@rp.socket" "$TMP/rm/nodeherd@rp.service"

# Control: a typo in a key is only a warning for systemd-analyze (exit 0).
mkdir -p "$TMP/broken"
sed 's/^KillMode=mixed/KilMode=mixed/' "$UNITS/myapp.service" >"$TMP/broken/myapp.service"
cp "$UNITS/myapp.socket" "$TMP/broken/"
err=$(cd "$TMP" && systemd-analyze verify --man=no "$TMP/broken/myapp.service" 2>&1 >/dev/null) && rc=0 || rc=$?
if [[ $rc == 0 && $err == *KilMode* ]]; then
    PASS=$((PASS + 1)); echo "ok   - control: a misspelt key exits 0 but warns on stderr, and is caught"
else
    FAIL=$((FAIL + 1)); echo "FAIL - control: expected exit 0 and a warning naming KilMode, got exit $rc: $err"
fi

# Security exposure scores (lower is better), each with a ceiling at what
# it is now (systemd 252), so that a hardening line lost by mistake shows
# up. The root-manager drop-in runs the manager as root with three
# capabilities: it has a ceiling of its own.
# Delegate=yes with ProtectControlGroups=no (per-worker cgroups) costs 0.2.
MAX_EXPOSURE=${NODEHERD_MAX_EXPOSURE:-1.3}
MAX_EXPOSURE_ROOT_MANAGER=${NODEHERD_MAX_EXPOSURE_ROOT_MANAGER:-2.3}
for u in units/myapp.service units/nodeherd@my-app.service rm/nodeherd@rp.service; do
    max=$MAX_EXPOSURE
    [[ $u == rm/* ]] && max=$MAX_EXPOSURE_ROOT_MANAGER
    out=$(cd "$TMP" && systemd-analyze security --offline=true --no-pager "$TMP/$u" 2>&1) || true
    line=$(grep -E 'Overall exposure level' <<<"$out" || true)
    score=$(sed -E 's/.*: *([0-9.]+).*/\1/' <<<"$line")
    echo "     $u: ${line#→ }"
    if [[ -n $score ]] && awk -v s="$score" -v m="$max" 'BEGIN { exit !(s <= m) }'; then
        PASS=$((PASS + 1)); echo "ok   - security exposure of $u is $score (<= $max)"
    else
        FAIL=$((FAIL + 1)); echo "FAIL - security exposure of $u is '${score:-unknown}' (> $max)"
        tail -5 <<<"$out"
    fi
done
if [[ -n ${NODEHERD_SECURITY_REPORT:-} ]]; then
    (cd "$TMP" && systemd-analyze security --offline=true --no-pager "$TMP/units/nodeherd@my-app.service") >"$NODEHERD_SECURITY_REPORT" 2>&1 || true
fi

echo "$PASS passed, $FAIL failed"
(( FAIL == 0 ))
