#!/usr/bin/env bash
# Build nodeherd's Debian source and binary packages and its RPMs the way a
# distribution's build daemon does: from the two source tarballs only, in a
# clean Debian root holding nothing but the declared build dependencies,
# with the network cut, as an unprivileged user.
#
#   packaging/build-offline.sh [--tree DIR] [--only deb|rpm] [--keep-target]
#                              [--target-from DIR] OUTDIR
#
# 1. packaging/make-tarballs.sh [--tree DIR] OUTDIR: the upstream tarball
#    and the vendored-crates tarball (this needs crates.io once; later runs
#    take the crates from the cache).
# 2. .deb: a root of Debian $NODEHERD_BUILD_SUITE (default trixie) made by
#    tests/systemd/debian-root.sh --buildd --satisfy "<Build-Depends of
#    debian/control>" (build-essential and what Build-Depends names, no more);
#    in it, the tarballs are unpacked under their Debian names
#    (nodeherd_V.orig.tar.gz, nodeherd_V.orig-vendor.tar.xz -> vendor/),
#    debian/ is added, dpkg-checkbuilddeps must pass, and
#    `dpkg-buildpackage -us -uc` builds the 3.0 (quilt) source package and
#    the binary packages (nodeherd, nodeherd-dbgsym). Output: OUTDIR/deb/.
#    For an older release than the one debian/changelog targets (bookworm:
#    DEB_SUITE_SUFFIX below) a changelog entry is added first, as
#    `dch --bpo` would: VERSION~bpo12+1 sorts below VERSION, so the two
#    builds of one version never share a file name in an archive's pool,
#    and a host upgraded to Debian 13 moves to the Debian 13 build.
# 3. RPM: a root with rpm, debugedit, elfutils, cpio and file (what rpm-build
#    brings on Fedora) and the Debian packages standing for the spec's
#    BuildRequires (RPM_BUILDREQUIRES below; an unknown one stops the
#    build); `rpmbuild -ba --nodeps` (Debian's rpm database knows no
#    package) from the two tarballs, as Source0 and Source1. Output:
#    OUTDIR/rpm/ (the .src.rpm, nodeherd and nodeherd-debuginfo).
#
# Each build runs in a throwaway overlay on the cached root, in new mount
# and network namespaces (`unshare --mount --net`: only a loopback
# interface, down), chrooted, as user "builder" with HOME pointing nowhere.
# Before building, the script checks that a TCP connection to the Debian
# archive fails in there. Logs: OUTDIR/deb/build.log, OUTDIR/rpm/build.log.
#
# cargo's target directory is /build/target (OUTDIR/deb/target,
# OUTDIR/rpm/target), removed after the build unless --keep-target. With
# --only deb|rpm, --target-from DIR moves such a kept directory (of an
# earlier build of the same crates, toolchain and suite, for the same kind
# of package) in first, so cargo compiles only what changed: the packaging
# test builds its second packages this way. It works when the vendored
# crates are at the same path as before: the .deb is always built in
# /build/src, the RPM in rpmbuild's nodeherd-VERSION (so: the same version,
# another Release).
#
# Environment: NODEHERD_BUILD_SUITE (trixie), NODEHERD_BUILD_JOBS (the
# number of CPUs), SOURCE_DATE_EPOCH (see make-tarballs.sh).
# Needs root (namespaces, chroot, mmdebstrap the first time).

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
suite=${NODEHERD_BUILD_SUITE:-trixie}
jobs=${NODEHERD_BUILD_JOBS:-$(nproc)}

# The spec's BuildRequires, by the Debian dependency that provides the same
# (VERSION: the version the spec asks for), as debian/control has them.
declare -A RPM_BUILDREQUIRES=(
    [cargo]="cargo (>= VERSION) | cargo-web (>= VERSION)"
    [rust]="rustc (>= VERSION)"
    [gcc]="gcc"
    # The spec defines the systemd macros itself where they are missing.
    [systemd-rpm-macros]=""
)
RPM_TOOLS=(rpm debugedit elfutils cpio file)

# The .deb's version suffix and changelog distribution for each release
# older than the one debian/changelog targets (Debian's backports scheme).
declare -A DEB_SUITE_SUFFIX=([bookworm]="~bpo12+1")
declare -A DEB_SUITE_DIST=([bookworm]="bookworm-backports")

usage() { echo "usage: $0 [--tree DIR] [--only deb|rpm] [--keep-target] [--target-from DIR] OUTDIR" >&2; exit 2; }
tree_args=()
only=""
keep_target=""
target_from=""
while [[ ${1:-} == --* ]]; do
    case $1 in
    --keep-target) keep_target=1 ;;
    --target-from) target_from=${2:?}; [[ -d $target_from ]] || usage; shift ;;
    --tree) tree_args=(--tree "${2:?}"); shift ;;
    --only) only=${2:?}; [[ $only == deb || $only == rpm ]] || usage; shift ;;
    *) usage ;;
    esac
    shift
done
(($# == 1)) || usage
[[ -z $target_from || -n $only ]] || usage
out=$1
[[ $(id -u) == 0 ]] || { echo "build-offline.sh: needs root" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)

say() { echo "build-offline.sh: $*" >&2; }

mapfile -t tarballs < <("$here/make-tarballs.sh" "${tree_args[@]}" "$out")
((${#tarballs[@]} == 2)) || { say "make-tarballs.sh failed"; exit 1; }
upstream=${tarballs[0]}
vendor=${tarballs[1]}
base=$(basename "$upstream" .tar.gz)
version=${base#nodeherd-}

# The packaging files as they are in that same tree.
srcdir=$(mktemp -d "${TMPDIR:-/tmp}/nodeherd-build.XXXXXX")
trap 'rm -rf "$srcdir"' EXIT
tar -C "$srcdir" -xzf "$upstream"
if ((${#tree_args[@]})); then
    cp -a "${tree_args[1]}/debian" "$srcdir/debian"
else
    git -C "$repo" archive --format=tar HEAD debian | tar -C "$srcdir" -xf -
fi

# run_offline ROOT WORKDIR SCRIPT: SCRIPT (a file in WORKDIR) run by bash
# in a throwaway overlay of ROOT with no network, WORKDIR at /build, as an
# unprivileged user.
run_offline() {
    DEB_BUILD_OPTIONS="parallel=$jobs" "$here/run-in-root.sh" --as-builder "$1" "$2" bash -euo pipefail "/build/$3"
}

# A check every build script starts with: the network must be cut.
no_network='
if timeout 5 bash -c "exec 3<>/dev/tcp/151.101.2.132/80" 2>/dev/null; then
    echo "NETWORK REACHABLE: the build is not offline" >&2
    exit 1
fi
echo "offline: a TCP connection to 151.101.2.132:80 (deb.debian.org) fails, as it should"
'

# ------------------------------------------------------------------ .deb
# rebuild_entry CHANGELOG SUFFIX DIST: a changelog entry on top for the
# rebuild: the top entry's version with SUFFIX, for DIST, by the same
# maintainer. Its date is the source tree's time stamp (make-tarballs.sh's:
# the commit's), or one second after the top entry's if that is not later
# (lintian: latest-changelog-entry-without-new-date): the same tree gives
# the same entry, and the build stays reproducible (dpkg takes
# SOURCE_DATE_EPOCH from it).
rebuild_entry() {
    local changelog=$1 suffix=$2 dist=$3 top maint date tree_time
    top=$(dpkg-parsechangelog -l "$changelog" -S Version)
    maint=$(dpkg-parsechangelog -l "$changelog" -S Maintainer)
    date=$(dpkg-parsechangelog -l "$changelog" -S Timestamp)
    tree_time=$(stat -c %Y "$srcdir/nodeherd-$version/Cargo.toml")
    [[ -n $top && -n $maint && $date =~ ^[0-9]+$ && $tree_time =~ ^[0-9]+$ ]] ||
        { say "deb: cannot read the top entry of $changelog"; return 1; }
    if ((tree_time > date)); then date=$tree_time; else date=$((date + 1)); fi
    date=$(LC_ALL=C date -u -R -d "@$date")
    {
        printf 'nodeherd (%s%s) %s; urgency=medium\n\n' "$top" "$suffix" "$dist"
        printf '  * Rebuild for %s (%s), with its own Rust toolchain.\n\n' "$(suite_name "$suite")" "$suite"
        printf ' -- %s  %s\n\n' "$maint" "$date"
        cat "$changelog"
    } >"$changelog.new"
    mv "$changelog.new" "$changelog"
    say "deb: version $top$suffix for $dist"
}
suite_name() {
    case $1 in
    bookworm) echo "Debian 12" ;;
    trixie) echo "Debian 13" ;;
    *) echo "Debian $1" ;;
    esac
}

build_deb() {
    local build_deps root work=$out/deb t0=$SECONDS
    build_deps=$(perl -MDpkg::Control::Info -e '
        my $b = Dpkg::Control::Info->new($ARGV[0])->get_source->{"Build-Depends"};
        $b =~ s/\s+/ /g; $b =~ s/^ | ?,? *$//g; print $b' "$srcdir/debian/control")
    say "deb: root of $suite for: $build_deps"
    root=$("$repo/tests/systemd/debian-root.sh" --buildd --satisfy "$build_deps" "$suite") || return 1
    rm -rf "$work"
    mkdir -p "$work"
    cp "$upstream" "$work/nodeherd_$version.orig.tar.gz"
    cp "$vendor" "$work/nodeherd_$version.orig-vendor.tar.xz"
    cp -a "$srcdir/debian" "$work/debian"
    if [[ -v DEB_SUITE_SUFFIX[$suite] ]]; then
        rebuild_entry "$work/debian/changelog" "${DEB_SUITE_SUFFIX[$suite]}" "${DEB_SUITE_DIST[$suite]}" || return 1
    fi
    if [[ -n $target_from ]]; then
        mv "$target_from" "$work/target"
        say "deb: reusing cargo's target directory $target_from"
    fi
    cat >"$work/build.sh" <<EOF
$no_network
cd /build
tar -xzf nodeherd_$version.orig.tar.gz
mv nodeherd-$version src
tar -C src -xJf nodeherd_$version.orig-vendor.tar.xz
mv debian src/debian
cd src
export CARGO_TARGET_DIR=/build/target
echo "toolchain: \$(cargo --version), \$(rustc --version)"
echo "toolchain packages: \$(dpkg-query -S "\$(readlink -f "\$(command -v rustc)")" | cut -d: -f1 | xargs dpkg-query -W -f='\${Package} \${Version} (source \${source:Package} \${source:Version})'), debian_version \$(cat /etc/debian_version)"
dpkg-checkbuilddeps
dpkg-buildpackage -us -uc
EOF
    say "deb: dpkg-buildpackage in $root (offline; log: $work/build.log)"
    if ! run_offline "$root" "$work" build.sh >"$work/build.log" 2>&1; then
        tail -30 "$work/build.log" >&2
        say "deb: the build failed (log: $work/build.log)"
        return 1
    fi
    rm -rf "$work/src" "$work/build.sh"
    [[ -n $keep_target ]] || rm -rf "$work/target"
    say "deb: built in $((SECONDS - t0)) s: $(cd "$work" && echo *.deb *.dsc)"
}

# ------------------------------------------------------------------ RPM
build_rpm() {
    local root work=$out/rpm spec=$srcdir/nodeherd-$version/rpm/nodeherd.spec t0=$SECONDS req name op ver dep deps=""
    while read -r name op ver; do
        [[ -v RPM_BUILDREQUIRES[$name] ]] || {
            say "rpm: BuildRequires '$name' has no Debian counterpart in RPM_BUILDREQUIRES"
            return 1
        }
        dep=${RPM_BUILDREQUIRES[$name]}
        if [[ $dep == *VERSION* ]]; then
            [[ $op == ">=" && -n $ver ]] || { say "rpm: BuildRequires '$name $op $ver': expected '>= VERSION'"; return 1; }
            dep=${dep//VERSION/$ver}
        fi
        [[ -n $dep ]] && deps+=${deps:+, }$dep
    done < <(rpmspec -q --buildrequires "$spec" || echo "rpmspec-failed")
    say "rpm: root of $suite with ${RPM_TOOLS[*]} and $deps"
    root=$("$repo/tests/systemd/debian-root.sh" --buildd --satisfy "$deps" "$suite" "${RPM_TOOLS[@]}") || return 1
    rm -rf "$work"
    mkdir -p "$work/rpmbuild/SOURCES"
    cp "$upstream" "$vendor" "$work/rpmbuild/SOURCES/"
    cp "$spec" "$work/nodeherd.spec"
    if [[ -n $target_from ]]; then
        mv "$target_from" "$work/target"
        say "rpm: reusing cargo's target directory $target_from"
    fi
    cat >"$work/build.sh" <<EOF
$no_network
cd /build
export CARGO_TARGET_DIR=/build/target
echo "toolchain: \$(cargo --version), \$(rustc --version)"
rpmbuild -ba --nodeps --define "_topdir /build/rpmbuild" --define "_smp_build_ncpus $jobs" nodeherd.spec
EOF
    say "rpm: rpmbuild -ba in $root (offline; log: $work/build.log)"
    if ! run_offline "$root" "$work" build.sh >"$work/build.log" 2>&1; then
        tail -30 "$work/build.log" >&2
        say "rpm: the build failed (log: $work/build.log)"
        return 1
    fi
    find "$work/rpmbuild/RPMS" "$work/rpmbuild/SRPMS" -name '*.rpm' -exec mv {} "$work/" \;
    rm -rf "$work/rpmbuild" "$work/build.sh"
    [[ -n $keep_target ]] || rm -rf "$work/target"
    say "rpm: built in $((SECONDS - t0)) s: $(cd "$work" && echo *.rpm)"
}

rc=0
if [[ $only != rpm ]]; then build_deb || rc=1; fi
if [[ $only != deb ]]; then build_rpm || rc=1; fi
exit $rc
