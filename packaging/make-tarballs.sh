#!/usr/bin/env bash
# Make the two source tarballs both packages build from, offline:
#
#   packaging/make-tarballs.sh [--tree] OUTDIR
#
#   OUTDIR/nodeherd-VERSION.tar.gz          the upstream source: every file
#       of the commit (HEAD), or with --tree every file git does not ignore in
#       the working tree as it is on disk; without debian/, which is the
#       Debian packaging's own tarball. Top directory nodeherd-VERSION/.
#   OUTDIR/nodeherd-VERSION-vendor.tar.xz   every crate Cargo.lock names, as
#       `cargo vendor --locked --versioned-dirs` lays them out, each with its
#       .cargo-checksum.json (cargo checks every file against it when it
#       builds). Top directory vendor/.
#
# VERSION is Cargo.toml's. The Debian names of the same files are
# nodeherd_VERSION.orig.tar.gz and nodeherd_VERSION.orig-vendor.tar.xz;
# the RPM's are the spec's Source0 and Source1.
#
# Reproducible: the same files give the same bytes. Entries are sorted, owned
# by 0:0, stamped with one time (the commit's for the upstream tarball; the
# last commit that changed Cargo.lock for the crates), and compressed without
# a timestamp. `cargo vendor` needs crates.io (or cargo's own cache) once:
# the crates tarball is kept under ${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}/vendor,
# keyed by Cargo.lock, cargo's version and that time, and reused from there.
#
# Needs git, cargo (CARGO=, else cargo from PATH with ~/.cargo/bin first),
# GNU tar, gzip, xz. Prints the two paths.

set -euo pipefail

tree_mode=""
if [[ ${1:-} == --tree ]]; then
    tree_mode=1
    shift
fi
(($# == 1)) || { echo "usage: $0 [--tree] OUTDIR" >&2; exit 2; }
out=$1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo=${CARGO:-cargo}
cache=${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}/vendor

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/nodeherd-tarballs.XXXXXX")
trap 'rm -rf "$work"' EXIT

# normalized_tar DIR NAME: a tar of DIR/NAME on stdout, the same bytes for
# the same files (mtime taken from SOURCE_DATE_EPOCH).
normalized_tar() {
    tar -C "$1" --sort=name --format=gnu --mtime="@$SOURCE_DATE_EPOCH" --clamp-mtime \
        --owner=0 --group=0 --numeric-owner --mode='u+rw,go+r,go-w' -cf - "$2"
}

# ------------------------------------------------------------- upstream
stage=$work/stage
mkdir -p "$stage/tree"
if [[ -n $tree_mode ]]; then
    git -C "$repo" ls-files -z -co --exclude-standard |
        tar -C "$repo" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$stage/tree" -xf -
else
    git -C "$repo" archive --format=tar HEAD | tar -C "$stage/tree" -xf -
fi
rm -rf "$stage/tree/debian"
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$stage/tree/Cargo.toml" | head -n1)
[[ -n $version ]] || { echo "make-tarballs.sh: no version in Cargo.toml" >&2; exit 1; }
mv "$stage/tree" "$stage/nodeherd-$version"

SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct HEAD)
upstream=$out/nodeherd-$version.tar.gz
normalized_tar "$stage" "nodeherd-$version" | gzip -n -9 >"$upstream.tmp"
mv "$upstream.tmp" "$upstream"

# ------------------------------------------------------------- crates
lock=$stage/nodeherd-$version/Cargo.lock
if git -C "$repo" diff --quiet HEAD -- Cargo.lock 2>/dev/null; then
    SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct -- Cargo.lock)
fi
cargo_version=$("$cargo" --version)
key=$( { sha256sum <"$lock"; echo "$cargo_version"; echo "$SOURCE_DATE_EPOCH"; } | sha256sum | cut -c1-16)
vendor=$out/nodeherd-$version-vendor.tar.xz
mkdir -p "$cache"
if [[ -s $cache/$key.tar.xz ]]; then
    cp "$cache/$key.tar.xz" "$vendor.tmp"
else
    echo "make-tarballs.sh: cargo vendor (Cargo.lock ${key:0:8}...)" >&2
    # A private CARGO_HOME config would hide the user's; only the download
    # cache is shared, so crates already fetched are not fetched again.
    (cd "$stage/nodeherd-$version" &&
        "$cargo" vendor --locked --versioned-dirs --quiet "$work/crates/vendor" >/dev/null)
    normalized_tar "$work/crates" vendor | xz -T1 -6 >"$cache/.$key.tmp"
    mv "$cache/.$key.tmp" "$cache/$key.tar.xz"
    cp "$cache/$key.tar.xz" "$vendor.tmp"
fi
mv "$vendor.tmp" "$vendor"
echo "$upstream"
echo "$vendor"
