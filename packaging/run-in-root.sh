#!/usr/bin/env bash
# Run a command in a throwaway copy of a Debian root, with no network.
#
#   packaging/run-in-root.sh [--as-builder] ROOT WORKDIR COMMAND [ARG...]
#
# ROOT (for instance from tests/systemd/debian-root.sh) is the read-only
# lower layer of an overlay whose upper layer is a tmpfs: whatever the
# command changes outside /build vanishes with it. WORKDIR is bind-mounted
# read-write at /build, and the command starts there. It runs chrooted, in
# new mount and network namespaces (`unshare --mount --net`: a loopback
# interface only, down, so no route anywhere), with a clean environment
# (PATH, HOME=/nonexistent, LC_ALL=C.UTF-8, and DEB_BUILD_OPTIONS and
# SOURCE_DATE_EPOCH when set).
#
# --as-builder: as user "builder" (uid 2000, created in the overlay) rather
# than root, as a build daemon builds; WORKDIR is chowned to 2000:2000.
#
# Exits with the command's status. Needs root.

set -euo pipefail

as_builder=""
if [[ ${1:-} == --as-builder ]]; then
    as_builder=1
    shift
fi
(($# >= 3)) || { echo "usage: $0 [--as-builder] ROOT WORKDIR COMMAND [ARG...]" >&2; exit 2; }
root=$1 work=$2
shift 2
[[ -n $root && $root != / && -f $root/etc/debian_version ]] || { echo "run-in-root.sh: $root is not a Debian root" >&2; exit 1; }
[[ -d $work ]] || { echo "run-in-root.sh: $work is not a directory" >&2; exit 1; }
work=$(cd "$work" && pwd)
[[ -n $as_builder ]] && chown -R 2000:2000 "$work"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/nodeherd-root.XXXXXX")
rc=0
unshare --mount --net --propagation private -- bash -euo pipefail -c '
    root=$1 work=$2 as_builder=$3 scratch=$4
    shift 4
    mount -t tmpfs -o mode=755 nodeherd-root "$scratch"
    mkdir "$scratch"/{upper,work,merged}
    mount -t overlay overlay -o "lowerdir=$root,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/merged"
    m=$scratch/merged
    mount -t proc proc "$m/proc"
    mount -t tmpfs -o mode=755 tmpfs "$m/dev"
    for d in null zero full random urandom tty; do
        : >"$m/dev/$d"
        mount --bind "/dev/$d" "$m/dev/$d"
    done
    ln -s /proc/self/fd "$m/dev/fd"
    mkdir "$m/dev/shm" "$m/dev/pts"
    mount -t tmpfs -o mode=1777 tmpfs "$m/dev/shm"
    mount -t tmpfs -o mode=1777 tmpfs "$m/tmp"
    mkdir -p "$m/build"
    mount --bind "$work" "$m/build"
    user=(env)
    if [[ -n $as_builder ]]; then
        chroot "$m" useradd --uid 2000 --user-group --no-create-home --home-dir /nonexistent builder
        user=(runuser -u builder -- env)
    fi
    exec chroot "$m" "${user[@]}" -i -C /build \
        PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/nonexistent LC_ALL=C.UTF-8 \
        ${DEB_BUILD_OPTIONS:+DEB_BUILD_OPTIONS="$DEB_BUILD_OPTIONS"} \
        ${SOURCE_DATE_EPOCH:+SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH"} \
        "$@"
' run-in-root "$root" "$work" "$as_builder" "$scratch" "$@" || rc=$?
# Its mounts lived in the namespace only: the directory is empty again.
rmdir "$scratch"
exit $rc
