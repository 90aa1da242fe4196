#!/usr/bin/env bash
# Make the two source tarballs both packages build from, offline:
#
#   packaging/make-tarballs.sh [--tree DIR] OUTDIR
#
#   OUTDIR/nodeherd-VERSION.tar.gz          the upstream source: every file
#       of this repository's HEAD commit; or with --tree DIR, the files of
#       DIR as they are on disk (those git does not ignore, when DIR is a git
#       work tree; else all but target/, vendor/ and .git/). Without debian/,
#       which is the Debian packaging's own tarball. Top directory
#       nodeherd-VERSION/.
#   OUTDIR/nodeherd-VERSION-vendor.tar.xz   every crate Cargo.lock names, as
#       `cargo vendor --locked --versioned-dirs` lays them out, each with its
#       .cargo-checksum.json (cargo checks every file against it when it
#       builds), without the Windows import libraries of winapi's two
#       *-pc-windows-gnu crates (see strip_windows_import_libs). Top
#       directory vendor/.
#
# VERSION is Cargo.toml's. The Debian names of the same files are
# nodeherd_VERSION.orig.tar.gz and nodeherd_VERSION.orig-vendor.tar.xz;
# the RPM's are the spec's Source0 and Source1.
#
# Reproducible: the same files give the same bytes. Entries are sorted,
# owned by 0:0, and compressed without a timestamp; the upstream tarball's
# are stamped with SOURCE_DATE_EPOCH (default: the time of the HEAD commit),
# the crates' with 1980-01-01 as Go's module archives are, so the crates
# tarball depends on nothing but the crates. `cargo vendor` needs crates.io
# (or cargo's own download cache) once: the crates tarball is kept under
# ${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}/vendor, keyed by the crates
# Cargo.lock names (not nodeherd's own entry, so a version bump reuses it)
# and cargo's version.
#
# Needs git, cargo (CARGO=, else cargo from PATH with ~/.cargo/bin first),
# GNU tar, gzip, xz, python3. Prints the two paths.

set -euo pipefail

tree=""
if [[ ${1:-} == --tree ]]; then
    tree=${2:?--tree needs a directory}
    shift 2
fi
(($# == 1)) || { echo "usage: $0 [--tree DIR] OUTDIR" >&2; exit 2; }
out=$1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo=${CARGO:-cargo}
cache=${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}/vendor

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/nodeherd-tarballs.XXXXXX")
trap 'rm -rf "$work"' EXIT

# normalized_tar DIR NAME EPOCH: a tar of DIR/NAME on stdout, the same
# bytes for the same files, every entry stamped with EPOCH.
normalized_tar() {
    tar -C "$1" --sort=name --format=gnu --mtime="@$3" \
        --owner=0 --group=0 --numeric-owner --mode='u+rw,go+r,go-w' -cf - "$2"
}

# strip_windows_import_libs VENDOR: winapi's two *-pc-windows-gnu crates are
# nothing but 2,800 prebuilt import libraries (lib/*.a) for linking on
# Windows with MinGW. `cargo vendor` takes every platform's crates; no Linux
# build compiles these two, and the distributions drop such blobs (lintian
# cannot even unpack them and reports an error for each). Their lib/ goes,
# and so do its entries in .cargo-checksum.json, which lists the files cargo
# checks: the crates stay, as Cargo.lock names them.
strip_windows_import_libs() {
    local dir
    for dir in "$1"/winapi-i686-pc-windows-gnu-* "$1"/winapi-x86_64-pc-windows-gnu-*; do
        [[ -d $dir/lib ]] || continue
        rm -rf "$dir/lib"
        python3 - "$dir/.cargo-checksum.json" <<'PY'
import json, sys
path = sys.argv[1]
with open(path) as f:
    sums = json.load(f)
sums["files"] = {k: v for k, v in sums["files"].items() if not k.startswith("lib/")}
with open(path, "w") as f:
    json.dump(sums, f, separators=(",", ":"), sort_keys=True)
PY
    done
}

# ------------------------------------------------------------- upstream
stage=$work/stage
mkdir -p "$stage/tree"
if [[ -n $tree ]]; then
    if git -C "$tree" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$tree" ls-files -z -co --exclude-standard |
            tar -C "$tree" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$stage/tree" -xf -
    else
        tar -C "$tree" --exclude=./target --exclude=./vendor --exclude=./.git -cf - . | tar -C "$stage/tree" -xf -
    fi
else
    git -C "$repo" archive --format=tar HEAD | tar -C "$stage/tree" -xf -
fi
rm -rf "$stage/tree/debian"
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$stage/tree/Cargo.toml" | head -n1)
[[ -n $version ]] || { echo "make-tarballs.sh: no version in Cargo.toml" >&2; exit 1; }
mv "$stage/tree" "$stage/nodeherd-$version"

epoch=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct HEAD)}
upstream=$out/nodeherd-$version.tar.gz
normalized_tar "$stage" "nodeherd-$version" "$epoch" | gzip -n -9 >"$upstream.tmp"
mv "$upstream.tmp" "$upstream"

# ------------------------------------------------------------- crates
lock=$stage/nodeherd-$version/Cargo.lock
cargo_version=$("$cargo" --version)
# Cargo.lock's entries but nodeherd's own (the one without a source).
crates=$(awk -v RS= '/\nsource = / { print; print "" }' "$lock")
# The recipe below changes what the tarball holds: its name is in the key.
recipe="vendor, windows-gnu import libraries removed"
key=$( { echo "$crates"; echo "$cargo_version"; echo "$recipe"; } | sha256sum | cut -c1-16)
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
    strip_windows_import_libs "$work/crates/vendor"
    normalized_tar "$work/crates" vendor 315532800 | xz -T1 -6 >"$cache/.$key.tmp"
    mv "$cache/.$key.tmp" "$cache/$key.tar.xz"
    cp "$cache/$key.tar.xz" "$vendor.tmp"
fi
mv "$vendor.tmp" "$vendor"
echo "$upstream"
echo "$vendor"
