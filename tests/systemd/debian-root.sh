#!/usr/bin/env bash
# A Debian root file system for tests, made once with mmdebstrap and cached.
#
#   tests/systemd/debian-root.sh [--buildd | --dbus-daemon] [--satisfy DEPENDS] [--refresh] SUITE [PACKAGE...]
#
# prints (alone on stdout) the path of an unpacked root of Debian SUITE
# (bookworm, trixie, ...) from deb.debian.org, with SUITE-updates and
# SUITE-security:
#
#   default    mmdebstrap --variant=minbase with systemd, systemd-sysv,
#              dbus-broker and polkitd: it boots under systemd-nspawn
#              (tests/systemd/container.sh with NODEHERD_CONTAINER_ROOT=PATH)
#   --dbus-daemon  the same with dbus (dbus-daemon) as the system bus
#              instead of dbus-broker: what a Debian 12 server runs
#   --buildd   --variant=buildd (Essential, build-essential, apt), what a
#              Debian build daemon's chroot holds, for offline builds
#              (packaging/build-offline.sh)
#
# and every PACKAGE given (with its dependencies, no recommends), and
# whatever satisfies DEPENDS, a Depends-style list with versions and
# alternatives (`apt-get satisfy`), for instance a source package's
# Build-Depends.
#
# The same SUITE, variant and packages give the same root: the cache key is
# SUITE-VARIANT-HASH, HASH of the sorted package list and DEPENDS. Under
# ${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}/debian-roots/ it keeps
#   KEY.tar.zst   mmdebstrap's output (about 50 MB bare, 150 MB with a Rust
#                 toolchain)
#   KEY/          that tarball unpacked; KEY/.debian-root names what made it
# A root older than NODEHERD_DEBIAN_ROOT_MAX_AGE days (default 30), or any
# with --refresh, is made anew from the archive and replaces the old one;
# roots nobody asked for in that many days (other package sets) are removed.
#
# The directory is shared by every caller: use it read-only, as the lower
# layer of an overlay (container.sh, build-offline.sh do) or copy it. Two
# callers asking for the same key at once wait for each other (flock).
#
# Needs root, mmdebstrap, zstd (installed from Debian when missing) and the
# Debian archive over the network the first time; later calls are offline.

set -euo pipefail

usage() {
    echo "usage: $0 [--buildd | --dbus-daemon] [--satisfy DEPENDS] [--refresh] SUITE [PACKAGE...]" >&2
    exit 2
}

variant=minbase
bus=dbus-broker
refresh=""
satisfy=""
while [[ ${1:-} == --* ]]; do
    case $1 in
    --buildd) variant=buildd ;;
    --dbus-daemon) bus=dbus ;;
    --refresh) refresh=1 ;;
    --satisfy)
        satisfy=${2:-}
        [[ -n $satisfy && $satisfy != *"'"* ]] || usage
        shift
        ;;
    *) usage ;;
    esac
    shift
done
(($# >= 1)) || usage
suite=$1
shift
[[ $suite =~ ^[a-z]+$ ]] || { echo "debian-root.sh: bad suite '$suite'" >&2; exit 2; }
packages=("$@")
if [[ $variant == minbase ]]; then
    packages+=(systemd systemd-sysv "$bus" polkitd)
fi
for p in "${packages[@]}"; do
    [[ $p =~ ^[a-z0-9][a-z0-9.+-]*$ ]] || { echo "debian-root.sh: bad package name '$p'" >&2; exit 2; }
done
if ((${#packages[@]})); then
    mapfile -t packages < <(printf '%s\n' "${packages[@]}" | sort -u)
fi

[[ $(id -u) == 0 ]] || { echo "debian-root.sh: needs root" >&2; exit 1; }

cache=${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}/debian-roots
mirror=${NODEHERD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${NODEHERD_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
max_age=${NODEHERD_DEBIAN_ROOT_MAX_AGE:-30}
hash=$(printf '%s\n' "$suite" "$variant" "$mirror" "$security" "${packages[@]}" "satisfy=$satisfy" | sha256sum | cut -c1-12)
key=$suite-$variant-$hash
root=$cache/$key
mkdir -p "$cache"

exec {lock}>"$cache/.$key.lock"
# Bounded: making a root takes a minute or two; someone else's may be under way.
flock -w 900 "$lock" || { echo "debian-root.sh: $cache/.$key.lock is held for 15 min" >&2; exit 1; }

fresh() {
    [[ -f $root/.debian-root && -f $cache/$key.tar.zst ]] || return 1
    [[ -z $refresh ]] || return 1
    [[ -z $(find "$root/.debian-root" -mtime "+$max_age") ]]
}

if ! fresh; then
    for tool in mmdebstrap zstd; do
        command -v "$tool" >/dev/null && continue
        echo "debian-root.sh: installing $tool" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
            --no-install-recommends "$tool" >&2
    done
    echo "debian-root.sh: making $key ($variant ${packages[*]}${satisfy:+ satisfying: $satisfy})" >&2
    t0=$SECONDS
    tmp=$(mktemp -d "$cache/.$key.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    sources=("deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $security $suite-security main")
    include=$(IFS=,; echo "${packages[*]}")
    hooks=()
    if [[ -n $satisfy ]]; then
        hooks+=(--customize-hook="chroot \"\$1\" env DEBIAN_FRONTEND=noninteractive apt-get satisfy -y -qq '$satisfy' >/dev/null")
    fi
    mmdebstrap --quiet --mode=root --variant="$variant" ${include:+--include="$include"} \
        --aptopt='APT::Install-Recommends "false"' "${hooks[@]}" \
        "$suite" "$tmp/root.tar.zst" "${sources[@]}" >&2
    mkdir "$tmp/root"
    tar -C "$tmp/root" --numeric-owner -xf "$tmp/root.tar.zst" --zstd
    {
        echo "suite=$suite"
        echo "variant=$variant"
        echo "packages=${packages[*]}"
        echo "satisfy=$satisfy"
        echo "made=$(date -u +%FT%TZ)"
    } >"$tmp/root/.debian-root"
    # Replace the old root, if any, then drop it.
    if [[ -e $root ]]; then mv "$root" "$tmp/old"; fi
    mv "$tmp/root" "$root"
    mv "$tmp/root.tar.zst" "$cache/$key.tar.zst"
    rm -rf "$tmp"
    trap - EXIT
    echo "debian-root.sh: made $key in $((SECONDS - t0)) s" >&2
fi
touch "$cache/.$key.used"
# Roots of other keys that nobody used for max_age days, unless being made.
for used in "$cache"/.*.used; do
    [[ -n $(find "$used" -mtime "+$max_age" 2>/dev/null) ]] || continue
    old=${used%.used}
    old=$cache/${old##*/.}
    exec {oldlock}>"$cache/.${old##*/}.lock"
    if flock -n "$oldlock"; then
        rm -rf "$old" "$old.tar.zst" "$used"
    fi
    exec {oldlock}>&-
done
echo "$root"
