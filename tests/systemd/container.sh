#!/usr/bin/env bash
# Boot a throwaway systemd (PID 1 of a systemd-nspawn container) on top of
# this machine's own root filesystem, and tear it down again.
#
#   container.sh start NAME HOSTDIR   boot; prints the container's PID 1
#   container.sh stop NAME            stop it; removes its cgroups and state
#   container.sh pid1 NAME            print PID 1 of a running container
#   container.sh reboot NAME          reboot it on the same root; prints the new PID 1
#
# Or source it and call container_start / container_stop / container_pid1.
#
# How it works. The host has systemd installed but does not run it as PID 1,
# and nspawn refuses `-D /`. So a background process enters a private mount
# namespace, builds an overlay with the host's / as its read-only lower layer
# and a tmpfs as the upper one (everything the container writes vanishes with
# the namespace), masks the host's own services so they do not start in
# there, and execs systemd-nspawn on it. The container shares the host's
# network: a unit listening on 127.0.0.1:PORT inside is reachable from here.
# HOSTDIR is bind-mounted at /shared inside.
#
# Everything started here runs in a dedicated cgroup (in both the cgroup2 and
# the name=systemd hierarchies), so `stop` can tell exactly which processes
# are ours, and cleanup is rmdir of those directories. Every wait is bounded.
#
# NODEHERD_CONTAINER_ROOT=DIR boots DIR instead of this machine's root (for
# instance a Debian 13 root from debian-root.sh), under the same throwaway
# overlay: DIR itself is never written.
#
# State lives in $NODEHERD_CONTAINER_STATE (default /run/nodeherd-containers)
# under NAME: nspawn.pid, pid1, boot.log (the container's console).
#
# Needs: root, systemd-nspawn (Debian package systemd-container).

set -euo pipefail

: "${NODEHERD_CONTAINER_STATE:=/run/nodeherd-containers}"
# Seconds to wait for boot and for shutdown.
: "${NODEHERD_CONTAINER_BOOT_TIMEOUT:=60}"
: "${NODEHERD_CONTAINER_STOP_TIMEOUT:=30}"

# Host units that must not start inside the container: they would run the
# host's services a second time (postgres, timers), or wait on a console.
CONTAINER_MASKED_UNITS=(
    postgresql.service postgresql@.service
    getty@.service console-getty.service container-getty@.service serial-getty@.service
    systemd-timesyncd.service e2scrub_reap.service e2scrub_all.timer
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer
    fstrim.timer man-db.timer systemd-pstore.service
    haproxy.service
)

_cgroup_dirs() {
    local name=$1 d
    for d in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd /sys/fs/cgroup; do
        # cgroup2 at /sys/fs/cgroup itself only on a pure-v2 host.
        if [[ $d == /sys/fs/cgroup && -d /sys/fs/cgroup/unified ]]; then continue; fi
        if [[ $d == /sys/fs/cgroup && ! -f /sys/fs/cgroup/cgroup.procs ]]; then continue; fi
        [[ -d $d ]] && echo "$d/nodeherd-ct-$name"
    done
}

_valid_name() {
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$ ]] || {
        echo "container.sh: bad container name '$1' (letters, digits, - and _)" >&2
        return 2
    }
}

# Runs in the background, inside `unshare --mount`: build the root and exec
# nspawn. Never returns on success.
_inner() {
    local name=$1 hostdir=$2 state=$3 cg
    for cg in $(_cgroup_dirs "$name"); do echo $$ >"$cg/cgroup.procs"; done

    local scratch=$state/scratch
    mount -t tmpfs -o mode=755 "nodeherd-ct-$name" "$scratch"
    mkdir -p "$scratch"/{upper,work,root}
    mount -t overlay overlay -o "lowerdir=${NODEHERD_CONTAINER_ROOT:-/},upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
    local root=$scratch/root
    local u
    mkdir -p "$root/etc/systemd/system"
    for u in "${CONTAINER_MASKED_UNITS[@]}"; do
        rm -f "$root/etc/systemd/system/$u"
        ln -s /dev/null "$root/etc/systemd/system/$u"
    done
    # A fresh machine-id, so the container's journal is its own.
    rm -f "$root/etc/machine-id"
    : >"$root/etc/machine-id"
    mkdir -p "$root/shared"
    # nspawn exits with 133 when the container asks for a reboot: boot it
    # again on the same root, so a test can show what starts at boot. A
    # SIGTERM (container_stop) is passed on for an orderly shutdown.
    local child rc
    trap 'kill -TERM "$child" 2>/dev/null' TERM
    while :; do
        # nspawn fills /dev itself, and wants it empty; /run must not show
        # the host's /run (and this very state directory). Fresh ones at
        # every boot, as a reboot would have them.
        mount -t tmpfs -o mode=755 tmpfs "$root/dev"
        mount -t tmpfs -o mode=755 tmpfs "$root/run"
        mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
        systemd-nspawn -q -D "$root" --register=no --keep-unit -M "$name" \
            --console=read-only --bind="$hostdir:/shared" -b &
        child=$!
        while :; do
            rc=0
            wait "$child" || rc=$?
            kill -0 "$child" 2>/dev/null || break
        done
        [[ $rc == 133 ]] || exit "$rc"
    done
}

# _starttime PID: field 22 of /proc/PID/stat, to tell a pid from a reused one.
_starttime() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    set -- $stat
    echo "${20}"
}

_alive() { # _alive PID STARTTIME
    local st
    st=$(_starttime "$1") || return 1
    [[ $st == "$2" ]]
}

container_pid1() {
    local name=$1 state=$NODEHERD_CONTAINER_STATE/$1
    [[ -f $state/pid1 ]] || { echo "container.sh: no container '$name'" >&2; return 1; }
    local pid st
    read -r pid st <"$state/pid1"
    _alive "$pid" "$st" || { echo "container.sh: container '$name' is not running" >&2; return 1; }
    echo "$pid"
}

container_start() {
    local name=$1 hostdir=$2
    _valid_name "$name"
    [[ $(id -u) == 0 ]] || { echo "container.sh: needs root" >&2; return 1; }
    command -v systemd-nspawn >/dev/null || {
        echo "container.sh: systemd-nspawn missing (apt-get install systemd-container)" >&2
        return 1
    }
    [[ -d $hostdir ]] || { echo "container.sh: HOSTDIR '$hostdir' is not a directory" >&2; return 1; }
    hostdir=$(cd "$hostdir" && pwd)
    local state=$NODEHERD_CONTAINER_STATE/$name cg
    if [[ -e $state ]]; then
        echo "container.sh: '$name' exists ($state); run: $0 stop $name" >&2
        return 1
    fi
    mkdir -p "$state/scratch"
    for cg in $(_cgroup_dirs "$name"); do mkdir "$cg"; done

    local self
    self=$(readlink -f "${BASH_SOURCE[0]}")
    local t0=$EPOCHREALTIME
    setsid unshare --mount --propagation private bash "$self" _inner "$name" "$hostdir" "$state" \
        </dev/null >"$state/boot.log" 2>&1 &
    local outer=$!
    # `unshare` execs the bash that runs nspawn (again after a reboot).
    echo "$outer $(_starttime "$outer")" >"$state/nspawn.pid"

    local deadline=$((SECONDS + NODEHERD_CONTAINER_BOOT_TIMEOUT))
    _await_boot "$name" "$outer" "$deadline" "" || return 1
    local t1=$EPOCHREALTIME
    printf '%s\n' "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')" >"$state/boot_seconds"
    container_pid1 "$name"
}

# _descendants PID DEPTH: the processes below PID, DEPTH levels deep.
_descendants() {
    local pid=$1 depth=$2 c
    ((depth > 0)) || return 0
    for c in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
        echo "$c"
        _descendants "$c" $((depth - 1))
    done
}

# _await_boot NAME OUTER DEADLINE OLD_PID1: find the container's PID 1 (not
# OLD_PID1), record it, and wait until it has booted to "running".
_await_boot() {
    local name=$1 outer=$2 deadline=$3 old=$4 state=$NODEHERD_CONTAINER_STATE/$1 pid1="" c
    while [[ -z $pid1 ]]; do
        if ! kill -0 "$outer" 2>/dev/null; then
            echo "container.sh: nspawn for '$name' exited during boot; console:" >&2
            sed 's/^/  | /' "$state/boot.log" >&2
            return 1
        fi
        (( SECONDS < deadline )) || { echo "container.sh: no PID 1 for '$name' after ${NODEHERD_CONTAINER_BOOT_TIMEOUT}s" >&2; return 1; }
        # Below the launcher: nspawn, an intermediate child, and the
        # container's init, the one whose comm is "systemd".
        for c in $(_descendants "$outer" 3); do
            if [[ $c != "$old" && $(cat "/proc/$c/comm" 2>/dev/null) == systemd ]]; then pid1=$c; break; fi
        done
        [[ -n $pid1 ]] || sleep 0.02
    done
    echo "$pid1 $(_starttime "$pid1")" >"$state/pid1"

    while [[ ! -S /proc/$pid1/root/run/systemd/private ]]; do
        (( SECONDS < deadline )) || { echo "container.sh: '$name' manager socket never appeared" >&2; return 1; }
        kill -0 "$pid1" 2>/dev/null || { echo "container.sh: '$name' PID 1 died; console:" >&2; sed 's/^/  | /' "$state/boot.log" >&2; return 1; }
        sleep 0.02
    done
    local left=$((deadline - SECONDS)) st
    (( left > 0 )) || left=1
    st=$(timeout "$left" nsenter -t "$pid1" -a systemctl is-system-running --wait 2>/dev/null) || true
    if [[ $st != running ]]; then
        echo "container.sh: '$name' booted to '${st:-timeout}', not 'running'; failed units:" >&2
        nsenter -t "$pid1" -a systemctl --no-pager --failed >&2 || true
        return 1
    fi
}

# container_reboot NAME: reboot the container (same root, same files) and
# print its new PID 1 once it is running again.
container_reboot() {
    local name=$1 state=$NODEHERD_CONTAINER_STATE/$1 old outer st
    old=$(container_pid1 "$name") || return 1
    read -r outer st <"$state/nspawn.pid"
    nsenter -t "$old" -a systemctl reboot || return 1
    local deadline=$((SECONDS + NODEHERD_CONTAINER_BOOT_TIMEOUT))
    while kill -0 "$old" 2>/dev/null; do
        (( SECONDS < deadline )) || { echo "container.sh: '$name' did not go down for the reboot" >&2; return 1; }
        sleep 0.05
    done
    _await_boot "$name" "$outer" "$deadline" "$old" || return 1
    container_pid1 "$name"
}

container_stop() {
    local name=$1
    _valid_name "$name"
    local state=$NODEHERD_CONTAINER_STATE/$name cg rc=0 pid st
    if [[ -f $state/nspawn.pid ]]; then
        read -r pid st <"$state/nspawn.pid"
        if [[ -n $st ]] && _alive "$pid" "$st"; then
            # nspawn turns SIGTERM into an orderly shutdown of the container
            # (SIGRTMIN+3 to its PID 1), then exits.
            kill -TERM "$pid" 2>/dev/null || true
            local deadline=$((SECONDS + NODEHERD_CONTAINER_STOP_TIMEOUT))
            while _alive "$pid" "$st" && (( SECONDS < deadline )); do sleep 0.05; done
            if _alive "$pid" "$st"; then
                echo "container.sh: '$name' did not stop in ${NODEHERD_CONTAINER_STOP_TIMEOUT}s; killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
                rc=1
            fi
        fi
    fi
    # Whatever is still in our cgroups was started by us: end it by pid.
    local p pass
    for pass in 1 2 3 4 5 6 7 8 9 10; do
        local left=""
        for cg in $(_cgroup_dirs "$name"); do
            [[ -d $cg ]] || continue
            for p in $(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null); do
                left+=" $p"
                kill -KILL "$p" 2>/dev/null || true
            done
        done
        [[ -n $left ]] || break
        (( pass == 1 )) && { echo "container.sh: killed leftover processes:$left" >&2; rc=1; }
        sleep 0.1
    done
    for cg in $(_cgroup_dirs "$name"); do
        [[ -d $cg ]] && find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
        if [[ -d $cg ]]; then echo "container.sh: could not remove cgroup $cg" >&2; rc=1; fi
    done
    # The overlay and tmpfs mounts lived only in the namespace, which is gone
    # with its last process; scratch is an empty directory on the host.
    if [[ -d $state ]]; then
        if mountpoint -q "$state/scratch" 2>/dev/null; then
            echo "container.sh: $state/scratch still mounted on the host" >&2; rc=1
        else
            rm -rf "$state"
        fi
    fi
    return $rc
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    cmd=${1:-}
    case $cmd in
        start) [[ $# == 3 ]] || { echo "usage: $0 start NAME HOSTDIR" >&2; exit 2; }; container_start "$2" "$3" ;;
        stop) [[ $# == 2 ]] || { echo "usage: $0 stop NAME" >&2; exit 2; }; container_stop "$2" ;;
        pid1) [[ $# == 2 ]] || { echo "usage: $0 pid1 NAME" >&2; exit 2; }; container_pid1 "$2" ;;
        reboot) [[ $# == 2 ]] || { echo "usage: $0 reboot NAME" >&2; exit 2; }; container_reboot "$2" ;;
        _inner) _inner "$2" "$3" "$4" ;;
        *) echo "usage: $0 start NAME HOSTDIR | stop NAME | pid1 NAME" >&2; exit 2 ;;
    esac
fi
