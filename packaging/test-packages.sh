#!/usr/bin/env bash
# Build nodeherd's Debian and RPM packages as a distribution would (from
# the source and vendored-crates tarballs, offline, in a clean Debian 13
# root; the .deb also in a clean Debian 12 root), check them, lint them,
# and run them under a booted systemd of the release they were built for:
#
#   1. tools (apt-get update once, only if one is missing)
#   2. a copy of the tree: `git archive HEAD` (committed files only), or
#      NODEHERD_TREE=DIR for a working tree as it is
#   3. sources: the tarballs (packaging/make-tarballs.sh) are reproducible
#      and hold both licence files; debian/copyright and the spec's License:
#      and bundled(crate()) lines are what packaging/update-licenses.py
#      makes from the vendored crates
#   4. packaging/build-offline.sh: the tree's version from scratch (the .deb
#      as 3.0 (quilt) source and binaries, the .src.rpm and RPMs); then, for
#      the upgrade test, the .deb of the tree bumped to the next patch
#      version and the RPM of the tree with the next Release, both reusing
#      the first builds' compiled crates (cargo compiles what changed).
#      The .deb for Debian 12 (VERSION-1~bpo12+1, with bookworm-security's
#      rustc-web) from scratch, in the background at nice 19 beside the
#      Debian 13 builds (it takes the CPU they leave idle), then its next
#      revision (VERSION-2~bpo12+1) reusing those crates:
#      nothing to compile, a new file of the same version to upgrade to
#   5. what the packages hold: files, conffiles, licences, Static-Built-Using,
#      bundled provides, debug symbols in nodeherd-dbgsym and
#      nodeherd-debuginfo (and not in the binary), the scriptlets
#   6. lintian (Debian 13's, --pedantic) and rpmlint: no error, no warning;
#      every override and filter has its reason in a comment above it;
#      Debian 12's lintian on the Debian 12 binaries
#   7. in a throwaway Debian 13 container booted by systemd
#      (tests/systemd/container.sh on a root from debian-root.sh): install
#      the first .deb (nothing runs), enable the example, use it; with
#      requests running, install the second version: the manager re-executes
#      into the new binary in place (the same main pid, no restart in
#      systemd's eyes, the same workers, its Version and Reexecs properties,
#      its journal line), and no request fails; remove, purge, nothing left.
#      The fallback: the same upgrade from a .deb of nodeherd before re-exec
#      in place (built once from that commit and cached): the scriptlet says
#      its manager cannot re-exec and restarts it, and no request fails.
#      The same with the RPMs (rpm -i, -U, -e), whose second package has the
#      same binary under a higher Release; their fallback runs the older
#      manager's binary put in place by hand, then rpm -U --replacepkgs.
#   8. in a throwaway Debian 12 container (systemd 252, dbus-daemon): the
#      Debian 12 .debs, the same install, use, upgrade under load (re-exec
#      in place, no request failed) and removal.
#
# Every check prints PASS or FAIL with what it saw; the last lines are the
# time each step took and "N passed, N failed"; the exit status is non-zero
# when anything failed. Whatever the script started is ended on exit.
#
# Environment:
#   NODEHERD_TREE=DIR      build from DIR as it is instead of `git archive HEAD`
#   NODEHERD_PKG_OUT=DIR   copy the packages, the logs and the lint reports there
#   NODEHERD_SKIP_SMOKE=1  build and check the packages only (no container)
#   NODEHERD_ONLY_SOURCES=1  stop after the tarball and licence checks
#   NODEHERD_PKG_IN=DIR    build nothing: take the packages from DIR, as an
#                          earlier run's NODEHERD_PKG_OUT left them (DIR/first,
#                          DIR/deb-upgrade, DIR/rpm-upgrade, DIR/deb12-first,
#                          DIR/deb12-upgrade), then check, lint
#                          and try them as usual
#   NODEHERD_CI_CACHE      where the Debian roots and the crates are cached
#                          (default /var/cache/nodeherd-ci)
# Needs root (namespaces, chroot, the container), and the network the first
# time (Debian's archive for the roots, crates.io for the crates).

set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d /tmp/nodeherd-packages.XXXXXX)
container=""
container_sh=""
load_pid=""
passed=0
failed=0
timings=()
upgrade_figures=()

pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
note() { echo "--- $*"; }
# check DESCRIPTION COMMAND...: PASS when the command succeeds.
check() {
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
show() { sed 's/^/    | /' "$@"; }
# timed LABEL: record how long the step since the last mark took.
mark=$SECONDS
timed() {
    timings+=("$1: $((SECONDS - mark)) s")
    mark=$SECONDS
}

# The script's own stdout and stderr: a signal can arrive while a command's
# output goes to a log file, and the trap would then run with that
# redirection in force.
exec {stdout}>&1 {stderr}>&2

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    exec 1>&"$stdout" 2>&"$stderr"
    if [[ -n $load_pid ]]; then
        kill "$load_pid" 2>/dev/null
        wait "$load_pid" 2>/dev/null
    fi
    # The background build: its own process group, which this script started.
    if [[ -n $bg_build ]]; then
        kill -TERM -- "-$bg_build" 2>/dev/null
        wait "$bg_build" 2>/dev/null
    fi
    if [[ -n $container ]]; then
        "$container_sh" stop "$container" >/dev/null 2>"$work/container-stop.err" ||
            { fail "stopping container $container"; show "$work/container-stop.err"; }
    fi
    rm -rf "$work"
    if ((rc != 0 && failed == 0)); then
        fail "the script stopped early (exit status $rc); see the output above"
    fi
    if ((${#timings[@]})); then
        echo "time taken:"
        printf '    %s\n' "${timings[@]}"
    fi
    if ((${#upgrade_figures[@]})); then
        echo "upgrades under load:"
        printf '    %s\n' "${upgrade_figures[@]}"
    fi
    echo "$passed passed, $failed failed"
    ((failed == 0)) && exit 0
    exit 1
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- tools
if [[ $(id -u) != 0 ]]; then
    fail "needs root (namespaces, chroot, dpkg in a systemd container)"
    exit 1
fi
note "tools"
need_debs=(dpkg-dev git curl rpm rpmlint systemd-container mmdebstrap zstd xz-utils python3 nodejs binutils cpio)
missing=()
for p in "${need_debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    note "installing ${missing[*]}"
    # Another apt-get may hold the lists lock for a while: wait for it,
    # bounded; any other failure is final.
    for try in $(seq 1 60); do
        apt-get update -qq 2>"$work/apt-update.err" && break
        if ! grep -q 'Could not get lock' "$work/apt-update.err" || ((try == 60)); then
            cat "$work/apt-update.err"
            fail "apt-get update"
            exit 1
        fi
        sleep 5
    done
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "${missing[@]}" >"$work/apt.log" 2>&1 ||
        { tail -20 "$work/apt.log"; fail "apt-get install ${missing[*]}"; exit 1; }
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v cargo >/dev/null || { fail "no cargo on the host (to vendor the crates)"; exit 1; }
timed "tools"

# ---------------------------------------------------------------- source
src=$work/tree
mkdir -p "$src"
if [[ -n ${NODEHERD_TREE:-} ]]; then
    note "source: $NODEHERD_TREE as it is"
    if git -C "$NODEHERD_TREE" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # Tracked and untracked files, as they are on disk; not what
        # .gitignore names (target/, benchmark scratch).
        git -C "$NODEHERD_TREE" ls-files -z -co --exclude-standard |
            tar -C "$NODEHERD_TREE" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$src" -xf -
    else
        tar -C "$NODEHERD_TREE" --exclude=./target --exclude=./vendor --exclude=./.git -cf - . | tar -C "$src" -xf -
    fi
else
    note "source: git archive HEAD ($(git -C "$repo" rev-parse --short HEAD))"
    git -C "$repo" archive --format=tar HEAD | tar -C "$src" -xf -
fi
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$src/Cargo.toml" | head -n1)
arch=$(dpkg --print-architecture)
# One time stamp for every tarball made here (the copy is not a git tree).
SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct HEAD)
export SOURCE_DATE_EPOCH

# ---------------------------------------------------------------- sources
note "source tarballs and licences"
tarballs() { "$src/packaging/make-tarballs.sh" --tree "$1" "$2" >"$work/tarballs-$3.log" 2>&1; }
# The second time from a copy elsewhere whose files all have other times.
cp -a "$src" "$work/tree-copy"
find "$work/tree-copy" -exec touch -h -d '2001-02-03 04:05:06' {} +
if tarballs "$src" "$work/sources-1" 1 && tarballs "$work/tree-copy" "$work/sources-2" 2; then
    pass "packaging/make-tarballs.sh made nodeherd-$version.tar.gz and nodeherd-$version-vendor.tar.xz"
    # The crates tarball comes from the cache on the second run: only the
    # first one made it (see make-tarballs.sh for how it stays reproducible).
    check "the upstream tarball is reproducible (made twice, from copies with other file times: same bytes)" \
        cmp -s "$work/sources-1/nodeherd-$version.tar.gz" "$work/sources-2/nodeherd-$version.tar.gz"
    tar -tzf "$work/sources-1/nodeherd-$version.tar.gz" >"$work/upstream-list.txt"
    check "the upstream tarball holds LICENSE-MIT and LICENSE-APACHE" \
        bash -c "grep -qx 'nodeherd-$version/LICENSE-MIT' '$work/upstream-list.txt' && grep -qx 'nodeherd-$version/LICENSE-APACHE' '$work/upstream-list.txt'"
    check "the upstream tarball holds no debian/ (the Debian packaging is its own tarball)" \
        bash -c "! grep -q '^nodeherd-$version/debian/' '$work/upstream-list.txt'"
    mkdir -p "$work/crates"
    tar -C "$work/crates" -xJf "$work/sources-1/nodeherd-$version-vendor.tar.xz"
    check "every vendored crate keeps its .cargo-checksum.json" \
        bash -c "for d in '$work'/crates/vendor/*/; do [[ -s \$d.cargo-checksum.json ]] || { echo \"    no checksums: \$d\"; exit 1; }; done"
    if "$src/packaging/update-licenses.py" --check --vendor "$work/crates/vendor" >"$work/licenses.txt" 2>&1; then
        pass "debian/copyright, the spec's License: and bundled provides are up to date: $(tail -1 "$work/licenses.txt")"
    else
        head -60 "$work/licenses.txt" | show
        fail "debian/copyright or the spec's licences are out of date (run packaging/update-licenses.py)"
    fi
    rm -rf "$work/crates" "$work/sources-2" "$work/tree-copy"
else
    cat "$work"/tarballs-*.log | show
    fail "packaging/make-tarballs.sh"
    exit 1
fi
timed "tarballs, reproducibility and licence check"
if [[ -n ${NODEHERD_ONLY_SOURCES:-} ]]; then
    note "stopping after the sources (NODEHERD_ONLY_SOURCES)"
    exit 0
fi

# ---------------------------------------------------------------- builds
# The second version, for the upgrade test: the next patch release.
IFS=. read -r major minor patch <<<"${version%%[-+]*}"
version2=$major.$minor.$((patch + 1))
src2=$work/tree-$version2
cp -a "$src" "$src2"
bump() { # DIR NEW
    local dir=$1 new=$2 date
    date=$(date -R)
    sed -i "0,/^version *= *\".*\"/s//version = \"$new\"/" "$dir/Cargo.toml"
    awk -v new="$new" '
        $0 == "name = \"nodeherd\"" { print; getline; print "version = \"" new "\""; next } { print }
    ' "$dir/Cargo.lock" >"$dir/Cargo.lock.new" && mv "$dir/Cargo.lock.new" "$dir/Cargo.lock"
    { printf 'nodeherd (%s-1) unstable; urgency=medium\n\n  * Upgrade test build.\n\n -- %s  %s\n\n' \
        "$new" "$(sed -n 's/^ -- \(.*>\)  .*/\1/p' "$dir/debian/changelog" | head -n1)" "$date"
        cat "$dir/debian/changelog"; } >"$dir/debian/changelog.new"
    mv "$dir/debian/changelog.new" "$dir/debian/changelog"
    sed -i -e "s/^Version:\( *\).*/Version:\1$new/" -e "s/^Release:\( *\).*/Release:\11%{?dist}/" \
        -e "/^%changelog/a * $(date '+%a %b %d %Y') nodeherd tests <tests@invalid> - $new-1\n- Upgrade test build.\n" \
        "$dir/rpm/nodeherd.spec"
}
bump "$src2" "$version2"
# The RPM's second package: the same version, the next Release (so that
# rpmbuild's build directory, and the crates' path in it, stay the same).
rpm_release=$(sed -n 's/^Release: *\([0-9]*\).*/\1/p' "$src/rpm/nodeherd.spec")
rpm_release2=$((rpm_release + 1))
src3=$work/tree-$version-$rpm_release2
cp -a "$src" "$src3"
sed -i -e "s/^Release:\( *\)[0-9]*/Release:\1$rpm_release2/" \
    -e "/^%changelog/a * $(date '+%a %b %d %Y') nodeherd tests <tests@invalid> - $version-$rpm_release2\n- Upgrade test build.\n" \
    "$src3/rpm/nodeherd.spec"

# The Debian 12 .debs: the tree's version (VERSION-1~bpo12+1, see
# build-offline.sh), and for the upgrade test the same tree with the next
# Debian revision (VERSION-2~bpo12+1). The second reuses the first's
# compiled crates at the same path, so cargo compiles nothing: one build of
# the code for Debian 12, and the upgrade moves the running manager onto a
# new file of the same version (as the RPM's does).
src4=$work/tree-$version-2
cp -a "$src" "$src4"
{ printf 'nodeherd (%s-2) unstable; urgency=medium\n\n  * Upgrade test build.\n\n -- %s  %s\n\n' \
    "$version" "$(sed -n 's/^ -- \(.*>\)  .*/\1/p' "$src/debian/changelog" | head -n1)" "$(date -R)"
    cat "$src/debian/changelog"; } >"$src4/debian/changelog"

# suite_name SUITE: the release's number, for the messages.
suite_name() {
    case $1 in
    bookworm) echo "Debian 12" ;;
    trixie) echo "Debian 13" ;;
    *) echo "Debian $1" ;;
    esac
}
# build_offline LABEL OUTDIR [--suite SUITE] ARGS...: build-offline.sh ARGS
# OUTDIR in a root of SUITE (trixie unless given).
build_offline() {
    local label=$1 out=$2 suite=trixie
    shift 2
    if [[ ${1:-} == --suite ]]; then
        suite=$2
        shift 2
    fi
    note "$label: NODEHERD_BUILD_SUITE=$suite packaging/build-offline.sh $*"
    NODEHERD_BUILD_SUITE=$suite "$src/packaging/build-offline.sh" "$@" "$out" >"$work/build-offline-$label.log" 2>&1
    built "$label" "$out" "$suite" $?
}
# built LABEL OUTDIR SUITE STATUS: PASS or FAIL for a build-offline.sh run.
built() {
    local label=$1 out=$2 suite=$3 rc=$4
    if ((rc == 0)); then
        pass "$label: built offline in a clean $(suite_name "$suite") root: $(cd "$out" && ls deb/*.deb deb/*.dsc rpm/*.rpm 2>/dev/null | tr '\n' ' ')"
    else
        tail -40 "$work/build-offline-$label.log" | show
        fail "$label: packaging/build-offline.sh (log above)"
        return 1
    fi
}
# The Debian 12 build from scratch runs in the background at nice 19 from
# the start of the Debian 13 builds: it takes the CPU they leave idle (the
# single-threaded compile, LTO and link of nodeherd itself, dwz, strip,
# xz, dpkg-source, lintian) and yields it as soon as they want it (CFS gives
# nice 19 about 1/70 of a core against a nice 0 process; its autogroup is
# made nice 19 as well). It is waited for
# before the containers: nothing runs beside the upgrades under load.
# build_in_background LABEL OUTDIR SUITE ARGS... starts it in its own
# process group ($bg_build), build_in_background_wait reports it.
bg_build=""
bg_build_label=""
bg_build_out=""
bg_build_suite=""
bg_build_t0=0
build_in_background() {
    bg_build_label=$1 bg_build_out=$2 bg_build_suite=$3
    shift 3
    note "$bg_build_label: NODEHERD_BUILD_SUITE=$bg_build_suite packaging/build-offline.sh $* (in the background, nice 19)"
    # setsid: a process group to end it by, and a new session, which with
    # the scheduler's autogroups (sched_autogroup_enabled) is a group of its
    # own, weighed against the script's whatever its processes' nice: so
    # that group is made nice 19 too.
    NODEHERD_BUILD_SUITE=$bg_build_suite setsid bash -c '
        [[ ! -w /proc/self/autogroup ]] || echo 19 >/proc/self/autogroup
        "$@" >"$0" 2>&1; echo $? >"$0.rc"' \
        "$work/build-offline-$bg_build_label.log" nice -n 19 "$src/packaging/build-offline.sh" "$@" "$bg_build_out" </dev/null &
    bg_build=$!
    bg_build_t0=$SECONDS
}
build_in_background_wait() {
    [[ -n $bg_build ]] || return 0
    wait "$bg_build" 2>/dev/null || true
    bg_build=""
    local rc
    rc=$(cat "$work/build-offline-$bg_build_label.log.rc" 2>/dev/null || echo 1)
    note "$bg_build_label: finished after $((SECONDS - bg_build_t0)) s (in the background)"
    timings+=("$bg_build_label, in the background (nice 19) from the start of the Debian 13 builds: $((SECONDS - bg_build_t0)) s")
    built "$bg_build_label" "$bg_build_out" "$bg_build_suite" "$rc"
}
v1=$work/first
v2=$work/deb-upgrade
r2=$work/rpm-upgrade
b1=$work/deb12-first
b2=$work/deb12-upgrade
if [[ -n ${NODEHERD_PKG_IN:-} ]]; then
    note "packages from $NODEHERD_PKG_IN (NODEHERD_PKG_IN): nothing is built"
    v1=$NODEHERD_PKG_IN/first
    v2=$NODEHERD_PKG_IN/deb-upgrade
    r2=$NODEHERD_PKG_IN/rpm-upgrade
    b1=$NODEHERD_PKG_IN/deb12-first
    b2=$NODEHERD_PKG_IN/deb12-upgrade
fi

# The fallback test's old manager: nodeherd as it was just before re-exec in
# place came (the parent of the commit that brought it), whose bus object
# has no Reexec method, as a .deb built offline like the others. It is cached
# by commit: built once (reusing the first build's crates when there is one).
pre_reexec=5a333d62b4f5aab642dced75999b63408b201e0a
pre_cache=${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}/pre-reexec-deb/$pre_reexec
pre_deb=""
pre_src=$work/tree-pre-reexec
# build_pre_reexec [--target-from DIR]: make $pre_deb (from the cache, else
# built; its cargo target directory kept in $work/pre-reexec/deb/target).
build_pre_reexec() {
    local pre_version
    if ! git -C "$repo" cat-file -e "$pre_reexec^{commit}" 2>/dev/null; then
        fail "the fallback test needs commit ${pre_reexec:0:12} (nodeherd before re-exec in place) in $repo: a shallow clone? (git fetch --unshallow)"
        return 0
    fi
    mkdir -p "$pre_src"
    git -C "$repo" archive --format=tar "$pre_reexec" | tar -C "$pre_src" -xf -
    pre_version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$pre_src/Cargo.toml" | head -n1)
    if [[ -f $pre_cache/nodeherd_${pre_version}-1_$arch.deb ]]; then
        pre_deb=$pre_cache/nodeherd_${pre_version}-1_$arch.deb
        note "the .deb of nodeherd before re-exec in place (${pre_reexec:0:12}): cached, $pre_deb"
        return 0
    fi
    if build_offline "pre-reexec .deb" "$work/pre-reexec" --tree "$pre_src" --only deb --keep-target "$@"; then
        mkdir -p "$pre_cache"
        cp "$work/pre-reexec/deb/nodeherd_${pre_version}-1_$arch.deb" "$pre_cache/"
        pre_deb=$pre_cache/nodeherd_${pre_version}-1_$arch.deb
    fi
}

if [[ -n ${NODEHERD_PKG_IN:-} ]]; then
    [[ -n ${NODEHERD_SKIP_SMOKE:-} ]] || build_pre_reexec || true
    timed ".deb before re-exec in place (cached after the first run)"
else
    build_in_background "$version .deb for Debian 12" "$b1" bookworm --tree "$src" --only deb --keep-target
    build_offline "$version .deb" "$v1" --tree "$src" --only deb --keep-target || true
    timed ".deb $version (from scratch, offline)"
    build_offline "$version RPM" "$v1" --tree "$src" --only rpm --keep-target || true
    timed "RPM $version-$rpm_release (from scratch, offline)"
    reuse=()
    [[ -d $v1/deb/target ]] && reuse=(--target-from "$v1/deb/target")
    [[ -n ${NODEHERD_SKIP_SMOKE:-} ]] || build_pre_reexec "${reuse[@]}" || true
    timed ".deb before re-exec in place (offline, reusing the first build's crates; cached after)"
    reuse=()
    [[ -d $v1/deb/target ]] && reuse=(--target-from "$v1/deb/target")
    [[ -d $work/pre-reexec/deb/target ]] && reuse=(--target-from "$work/pre-reexec/deb/target")
    build_offline "$version2 .deb" "$v2" --tree "$src2" --only deb "${reuse[@]}" || true
    timed ".deb $version2 (offline, reusing the first build's crates)"
    reuse=()
    [[ -d $v1/rpm/target ]] && reuse=(--target-from "$v1/rpm/target")
    build_offline "$version-$rpm_release2 RPM" "$r2" --tree "$src3" --only rpm "${reuse[@]}" || true
    timed "RPM $version-$rpm_release2 (offline, reusing the first build's crates)"
fi
deb1=$v1/deb/nodeherd_${version}-1_$arch.deb
deb2=$v2/deb/nodeherd_${version2}-1_$arch.deb
bpo='~bpo12+1'
deb12_1=$b1/deb/nodeherd_${version}-1${bpo}_$arch.deb
deb12_2=$b2/deb/nodeherd_${version}-2${bpo}_$arch.deb
rpm_arch=$(rpm --eval '%{_arch}')
rpm1=$v1/rpm/nodeherd-$version-$rpm_release.$rpm_arch.rpm
rpm2=$r2/rpm/nodeherd-$version-$rpm_release2.$rpm_arch.rpm
if [[ -n ${NODEHERD_PKG_OUT:-} && -z ${NODEHERD_PKG_IN:-} ]]; then
    mkdir -p "$NODEHERD_PKG_OUT"
    for d in "$v1" "$v2" "$r2"; do
        [[ -d $d ]] && cp -r "$d" "$NODEHERD_PKG_OUT/"
    done
fi

testroot=""
if [[ -f $deb1 || -f $rpm1 || -z ${NODEHERD_SKIP_SMOKE:-} ]]; then
    note "Debian 13 root to run the binaries, lintian and the container (tests/systemd/debian-root.sh)"
    if ! testroot=$("$src/tests/systemd/debian-root.sh" trixie lintian nodejs procps rpm 2>"$work/testroot.log"); then
        show "$work/testroot.log"
        fail "making the Debian 13 test root"
        testroot=""
    fi
fi
timed "Debian 13 test root (cached after the first run)"
# in_root ROOT DIR CMD...: CMD in a throwaway copy of ROOT, DIR at /build
# (the Debian 13 binaries need Debian 13's C library, newer than this host's).
in_root() {
    [[ -n $1 ]] || { echo "    no such root"; return 1; }
    local root=$1 dir=$2
    shift 2
    "$src/packaging/run-in-root.sh" "$root" "$dir" "$@"
}
# version_is ROOT DIR VERSION: DIR/nodeherd --version, run in ROOT, names VERSION.
version_is() { in_root "$1" "$2" ./nodeherd --version | grep -qF "$3"; }

# ---------------------------------------------------------------- contents
# What both packages must hold (zsh's directory differs by distribution).
common_paths=(
    /usr/bin/nodeherd
    /usr/lib/systemd/system/nodeherd@.socket
    /usr/lib/systemd/system/nodeherd@.service
    /usr/lib/systemd/system/nodeherd@hello.socket.d/listen-8000.conf
    /usr/share/dbus-1/system.d/org.nodeherd.conf
    /usr/share/polkit-1/actions/org.nodeherd.policy
    /usr/share/polkit-1/rules.d/org.nodeherd.rules
    /usr/lib/sysusers.d/nodeherd.conf
    /etc/nodeherd/hello.config.js
    /usr/share/nodeherd/examples/hello/app.js
    /usr/share/bash-completion/completions/nodeherd
    /usr/share/fish/vendor_completions.d/nodeherd.fish
    # dh_compress gzips docs over 4 kB; rpm does not.
    '/usr/share/doc/nodeherd/README.md*'
    '/usr/share/doc/nodeherd/interfaces.md*'
    /usr/share/doc/nodeherd/examples/myapp.socket
    /usr/share/doc/nodeherd/examples/myapp.service
    /usr/share/doc/nodeherd/examples/root-manager.conf
)
deb_paths=(
    "${common_paths[@]}"
    /usr/share/zsh/vendor-completions/_nodeherd
    /usr/share/man/man1/nodeherd.1.gz
    /usr/share/doc/nodeherd/changelog.Debian.gz
    /usr/share/doc/nodeherd/copyright
)
rpm_paths=(
    "${common_paths[@]}"
    /usr/share/zsh/site-functions/_nodeherd
    # Compressed or not, as the distribution's rpm macros decide.
    '/usr/share/man/man1/nodeherd.1*'
    /usr/share/licenses/nodeherd/LICENSE-MIT
    /usr/share/licenses/nodeherd/LICENSE-APACHE
    /usr/share/licenses/nodeherd/bundled-crates.txt
    /usr/share/licenses/nodeherd/LICENSE.dependencies
)

# has_paths LISTING PATH...: every PATH is a line of LISTING (a PATH
# ending in * or - names a prefix).
has_paths() {
    local listing=$1 p missing=()
    shift
    for p in "$@"; do
        if [[ $p == *'*' || $p == *- ]]; then
            awk -v p="${p%'*'}" 'index($0, p) == 1 { f = 1 } END { exit !f }' "$listing" || missing+=("$p")
        else
            grep -qxF "$p" "$listing" || missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    printf '    missing: %s\n' "${missing[@]}"
    return 1
}

# has_debug_info FILE: an ELF file with DWARF debug info in it.
# (readelf also complains about a .debug file's missing interpreter.)
has_debug_info() {
    local sections
    sections=$(readelf -S --wide "$1" 2>/dev/null || true)
    grep -Eq '\.z?debug_info ' <<<"$sections"
}

# overrides_have_reasons FILE: each paragraph (lines between blank lines)
# holding an override or filter starts with a comment: its reason.
overrides_have_reasons() {
    awk '
        /^[[:space:]]*$/ { para = 0; next }
        /^[[:space:]]*#/ { if (para == 0) para = 1; next }
        { if (para != 1) { print "    no reason above: " $0; bad = 1 } ; if (para == 0) para = 2 }
        END { exit bad }
    ' "$1"
}

# deb_checks WHICH DIR DEBVERSION ROOT SUITE: what the .deb built in DIR
# (nodeherd_DEBVERSION_ARCH.deb and its source package) holds; its binary
# runs in ROOT, a root of SUITE. WHICH starts every message.
deb_checks() {
    local which=$1 dir=$2 debversion=$3 root=$4 suite=$5
    local deb=$2/nodeherd_${3}_$arch.deb dsc=$2/nodeherd_${3}.dsc toolchain packages sbu debug_file build_id
    local r=$work/$which-root d=$work/$which-dbgsym-root name
    name=$(suite_name "$suite")
    note "$which: the .deb for $name and its source package"
    check "$which: .dsc is 3.0 (quilt) with the upstream and the crates tarballs" bash -c "
        grep -qx 'Format: 3.0 (quilt)' '$dsc' &&
        grep -q ' nodeherd_$version.orig.tar.gz\$' '$dsc' &&
        grep -q ' nodeherd_$version.orig-vendor.tar.xz\$' '$dsc'"
    check "$which: .deb build ran with the network cut" grep -q '^offline: ' "$dir/build.log"
    toolchain=$(sed -n 's/^toolchain: //p' "$dir/build.log")
    check "$which: .deb built with Debian's toolchain ($toolchain)" grep -q '(built from a source tarball)' <<<"$toolchain"
    # The package rustc is, and the root's release (build-offline.sh says).
    packages=$(sed -n 's/^toolchain packages: //p' "$dir/build.log")
    case $suite in
    bookworm)
        check "$which: the toolchain is bookworm-security's rustc-web in a Debian 12 root ($packages)" \
            grep -Eq '^rustc-web 1\.(8[89]|9[0-9])\.[^ ]*~deb12u[0-9]+ .*, debian_version 12\.' <<<"$packages" ;;
    *)
        check "$which: the toolchain is the root's own rustc ($packages)" \
            grep -Eq '^rustc(-web)? [0-9]' <<<"$packages" ;;
    esac
    dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|; s|/$||' >"$work/$which-paths.txt"
    check "$which: .deb holds every expected file" has_paths "$work/$which-paths.txt" "${deb_paths[@]}"
    dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles >"$work/$which-conffiles" 2>/dev/null || true
    check "$which: .deb has /etc/nodeherd/hello.config.js as a conffile" \
        grep -qxF /etc/nodeherd/hello.config.js "$work/$which-conffiles"
    # The source of the standard library linked in: the toolchain's own
    # source package, at the version the build ran with (a binNMU's binary
    # version has +bN; the source's has not).
    sbu=$(dpkg-deb -f "$deb" Static-Built-Using)
    check "$which: .deb Static-Built-Using names the Rust standard library's source, the toolchain's ($sbu)" \
        bash -c '[[ $1 =~ ^(rustc(-web)?)\ \(=\ ([^\)]+)\)$ && $2 == *"(source ${BASH_REMATCH[1]} ${BASH_REMATCH[3]}),"* ]]' _ "$sbu" "$packages"
    mkdir -p "$r"
    dpkg-deb -x "$deb" "$r"
    mit_text=$(sed -n '/^Permission is hereby granted/,$p' "$src/LICENSE-MIT" | tr -s ' \n' ' ')
    copyright_text=$(sed 's/^ \.$//; s/^ //' "$r/usr/share/doc/nodeherd/copyright" | tr -s ' \n' ' ')
    check "$which: .deb copyright holds LICENSE-MIT's text and names Apache-2.0 in common-licenses" bash -c '
        [[ $2 == *"$1"* && $2 == *"/usr/share/common-licenses/Apache-2.0"* ]]' _ "$mit_text" "$copyright_text"
    check "$which: .deb binary reports version $version (run in $name)" version_is "$root" "$r/usr/bin" "$version"
    check "$which: .deb binary is stripped (no DWARF in it)" bash -c "! readelf -S --wide '$r/usr/bin/nodeherd' | grep -Eq '\.z?debug_info '"
    dbgsym=$dir/nodeherd-dbgsym_${debversion}_$arch.deb
    if [[ -f $dbgsym ]]; then
        mkdir -p "$d"
        dpkg-deb -x "$dbgsym" "$d"
        build_id=$(readelf -n "$r/usr/bin/nodeherd" | sed -n 's/.*Build ID: //p')
        debug_file=$d/usr/lib/debug/.build-id/${build_id:0:2}/${build_id:2}.debug
        check "$which: nodeherd-dbgsym holds the binary's DWARF debug info (build id $build_id)" has_debug_info "$debug_file"
    else
        fail "$which: no nodeherd-dbgsym package"
    fi
    dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./postinst >"$work/$which-postinst"
    check "$which: .deb postinst creates the user with systemd-sysusers" grep -q 'systemd-sysusers.*nodeherd.conf' "$work/$which-postinst"
    check "$which: .deb installs and starts no unit (no enable/start in postinst)" \
        bash -c "! grep -Eq 'deb-systemd-helper (enable|unmask)|deb-systemd-invoke (start|restart) ' '$work/$which-postinst'"
    check "$which: .deb postinst reloads systemd before it moves instances to the new binary" bash -c "
        r=\$(grep -n 'daemon-reload' '$work/$which-postinst' | tail -1 | cut -d: -f1)
        m=\$(grep -n '^[[:space:]]*nodeherd_move_instances_to_new_binary\$' '$work/$which-postinst' | tail -1 | cut -d: -f1)
        [[ -n \$r && -n \$m && \$r -lt \$m ]]"
}
if [[ -f $deb1 ]]; then
    deb_checks deb "$v1/deb" "$version-1" "$testroot" trixie
fi

if [[ -f $rpm1 ]]; then
    note "the RPMs"
    check "RPM build ran with the network cut" grep -q '^offline: ' "$v1/rpm/build.log"
    rpmspec -q --buildrequires "$src/rpm/nodeherd.spec" >"$work/buildrequires.txt" 2>/dev/null || true
    check "the spec's BuildRequires name the toolchain ($(paste -sd, "$work/buildrequires.txt"))" \
        bash -c "grep -q '^cargo >= ' '$work/buildrequires.txt' && grep -q '^rust >= ' '$work/buildrequires.txt'"
    srpm=$v1/rpm/nodeherd-$version-$rpm_release.src.rpm
    check ".src.rpm holds the spec and both tarballs" bash -c "
        rpm -qpl '$srpm' 2>/dev/null | LC_ALL=C sort | tr '\n' ' ' |
        grep -qx 'nodeherd-$version-vendor.tar.xz nodeherd-$version.tar.gz nodeherd.spec '"
    rpm -qlp "$rpm1" 2>/dev/null >"$work/rpm-paths.txt"
    check ".rpm holds every expected file, the licences among them" has_paths "$work/rpm-paths.txt" "${rpm_paths[@]}"
    check ".rpm has /etc/nodeherd/hello.config.js as %config(noreplace)" \
        bash -c "rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' '$rpm1' 2>/dev/null | grep -qx 'cn /etc/nodeherd/hello.config.js'"
    spec_license=$(rpmspec -q --qf '%{LICENSE}\n' --srpm "$src/rpm/nodeherd.spec" 2>/dev/null)
    check ".rpm License: is the generated SPDX expression ($(rpm -qp --qf '%{LICENSE}' "$rpm1" 2>/dev/null))" \
        bash -c "[[ -n '$spec_license' && \"\$(rpm -qp --qf '%{LICENSE}' '$rpm1' 2>/dev/null)\" == '$spec_license' ]] && [[ '$spec_license' == *BSD-3-Clause* ]]"
    bundled=$(rpm -qp --provides "$rpm1" 2>/dev/null | grep -c '^bundled(crate(' || true)
    check ".rpm provides bundled(crate(NAME)) for each crate linked in ($bundled; packaging/bundled-crates.txt has $(wc -l <"$src/packaging/bundled-crates.txt"))" \
        test "$bundled" -eq "$(wc -l <"$src/packaging/bundled-crates.txt")"
    mkdir -p "$work/rpm-root" "$work/debuginfo-root"
    (cd "$work/rpm-root" && rpm2cpio "$rpm1" | cpio -idm --quiet)
    check ".rpm LICENSE.dependencies holds the licence texts of the linked crates (subtle's BSD-3-Clause among them)" bash -c "
        f='$work/rpm-root/usr/share/licenses/nodeherd/LICENSE.dependencies'
        [[ \$(grep -c '^=== ' \"\$f\") == \$(wc -l <'$src/packaging/bundled-crates.txt') ]] &&
        grep -q '^--- subtle-[0-9.]*/LICENSE\$' \"\$f\" && grep -q 'Redistribution and use in source and binary forms' \"\$f\""
    check ".rpm binary reports version $version (run in Debian 13)" version_is "$testroot" "$work/rpm-root/usr/bin" "$version"
    check ".rpm binary is stripped (no DWARF in it)" bash -c "! readelf -S --wide '$work/rpm-root/usr/bin/nodeherd' | grep -Eq '\.z?debug_info '"
    debuginfo=$v1/rpm/nodeherd-debuginfo-$version-$rpm_release.$rpm_arch.rpm
    if [[ -f $debuginfo ]]; then
        (cd "$work/debuginfo-root" && rpm2cpio "$debuginfo" | cpio -idm --quiet)
        debug_file=$(find "$work/debuginfo-root/usr/lib/debug/usr/bin" -name 'nodeherd*.debug' 2>/dev/null | head -n1)
        check "nodeherd-debuginfo holds the binary's DWARF debug info (${debug_file#"$work/debuginfo-root"})" \
            has_debug_info "${debug_file:-/nonexistent}"
    else
        fail "no nodeherd-debuginfo RPM"
    fi
    rpm -qp --scripts "$rpm1" >"$work/rpm-scripts.txt" 2>/dev/null
    check ".rpm %post creates the user with systemd-sysusers" grep -q 'systemd-sysusers nodeherd.conf' "$work/rpm-scripts.txt"
    check ".rpm stops instances on erase; %posttrans reloads systemd, then moves instances to the new binary" bash -c "
        grep -qF \"stop 'nodeherd@*.socket' 'nodeherd@*.service'\" '$work/rpm-scripts.txt' &&
        sed -n '/^posttrans scriptlet/,\$p' '$work/rpm-scripts.txt' >'$work/posttrans.txt' &&
        r=\$(grep -n 'daemon-reload' '$work/posttrans.txt' | head -1 | cut -d: -f1) &&
        m=\$(grep -n '^[[:space:]]*nodeherd_move_instances_to_new_binary\$' '$work/posttrans.txt' | head -1 | cut -d: -f1) &&
        [[ -n \$r && -n \$m && \$r -lt \$m ]]"
    check ".rpm applies no systemd macro to a template name" \
        bash -c "! grep -Eq '(preset|disable|try-restart|enable).*nodeherd@\\.(socket|service)' '$work/rpm-scripts.txt'"
    check ".rpm has a %changelog for $version" \
        bash -c "rpm -qp --changelog '$rpm1' 2>/dev/null | grep -q -- '- $version-$rpm_release\$'"
fi
timed "package checks"

# ---------------------------------------------------------------- lint

for f in "$src"/debian/*lintian-overrides "$src"/debian/source/lintian-overrides "$src"/rpm/*.rpmlintrc; do
    [[ -f $f ]] || continue
    check "every entry of ${f#"$src/"} has its reason in a comment above it" overrides_have_reasons "$f"
done

if [[ -f $deb1 && -n $testroot ]]; then
    note "lintian (Debian 13's) on the source package and the binaries"
    mkdir -p "$work/lint"
    cp "$v1"/deb/*.changes "$v1"/deb/*.dsc "$v1"/deb/*.deb "$v1"/deb/*.tar.* "$v1"/deb/*.buildinfo "$work/lint/"
    # Exit status 0: nothing at warning level or above; 2: a tag at the
    # --fail-on level; 1: lintian itself failed.
    lintian_rc=0
    "$src/packaging/run-in-root.sh" --as-builder "$testroot" "$work/lint" \
        lintian --pedantic --display-info --tag-display-limit 0 --fail-on error,warning \
        "nodeherd_${version}-1_$arch.changes" >"$work/lintian.txt" 2>&1 || lintian_rc=$?
    show "$work/lintian.txt"
    errors=$(grep -c '^E:' "$work/lintian.txt" || true)
    warnings=$(grep -c '^W:' "$work/lintian.txt" || true)
    check "lintian on the .changes (source and binaries): no error ($errors), no warning ($warnings), exit status $lintian_rc" \
        test "$errors" = 0 -a "$warnings" = 0 -a "$lintian_rc" = 0
    [[ -n ${NODEHERD_PKG_OUT:-} ]] && cp "$work/lintian.txt" "$NODEHERD_PKG_OUT/"
fi
if [[ -f $rpm1 ]]; then
    note "rpmlint on the spec, the .src.rpm and the RPMs"
    rpmlint_args=()
    [[ -f $src/rpm/nodeherd.rpmlintrc ]] && rpmlint_args=(-r "$src/rpm/nodeherd.rpmlintrc")
    rpmlint "${rpmlint_args[@]}" "$src/rpm/nodeherd.spec" "$v1"/rpm/*.rpm >"$work/rpmlint.txt" 2>&1 || true
    show "$work/rpmlint.txt"
    errors=$(grep -c ': E: ' "$work/rpmlint.txt" || true)
    warnings=$(grep -c ': W: ' "$work/rpmlint.txt" || true)
    check "rpmlint: no error ($errors) and no warning ($warnings)" \
        bash -c "test '$errors' = 0 -a '$warnings' = 0 && grep -q 'packages and 1 specfiles checked\|packages and 1 specfile checked' '$work/rpmlint.txt'"
    [[ -n ${NODEHERD_PKG_OUT:-} ]] && cp "$work/rpmlint.txt" "$NODEHERD_PKG_OUT/"
fi
timed "lintian and rpmlint"

# ---------------------------------------------------------------- Debian 12
# The .deb for Debian 12, built once (in the background since the Debian 13
# builds began), then its second revision for the upgrade test.
if [[ -z ${NODEHERD_PKG_IN:-} ]]; then
    build_in_background_wait || true
    timed "waiting for the Debian 12 .deb built in the background"
    # Without the first (its build failed), the second would be a second
    # build from scratch, for nothing.
    if [[ -f $deb12_1 && -d $b1/deb/target ]]; then
        build_offline "$version-2 .deb for Debian 12" "$b2" --suite bookworm --tree "$src4" --only deb \
            --target-from "$b1/deb/target" || true
    fi
    timed ".deb $version-2$bpo for Debian 12 (offline, reusing the first build's crates: nothing to compile)"
    if [[ -n ${NODEHERD_PKG_OUT:-} ]]; then
        for d in "$b1" "$b2"; do
            [[ -d $d ]] && cp -r "$d" "$NODEHERD_PKG_OUT/"
        done
    fi
fi
testroot12=""
if [[ -f $deb12_1 || -z ${NODEHERD_SKIP_SMOKE:-} ]]; then
    note "Debian 12 root to run the binary, lintian and the container (tests/systemd/debian-root.sh --dbus-daemon)"
    if ! testroot12=$("$src/tests/systemd/debian-root.sh" --dbus-daemon bookworm lintian nodejs procps 2>"$work/testroot12.log"); then
        show "$work/testroot12.log"
        fail "making the Debian 12 test root"
        testroot12=""
    fi
fi
timed "Debian 12 test root (cached after the first run)"
if [[ -f $deb12_1 ]]; then
    deb_checks deb12 "$b1/deb" "$version-1$bpo" "$testroot12" bookworm
    deb12_version=$(dpkg-deb -f "$deb12_1" Version)
    check "deb12: its version ($deb12_version) is $version's and sorts below the Debian 13 package's ($version-1): a host upgraded to Debian 13 moves to that" \
        bash -c '[[ $1 == "$3"-* ]] && dpkg --compare-versions "$1" lt "$2"' _ "$deb12_version" "$version-1" "$version"
fi
if [[ -f $deb12_1 && -n $testroot12 ]]; then
    # The source package differs from the one linted above by its changelog
    # entry alone; Debian 12's lintian looks at what it built: the binaries.
    note "lintian (Debian 12's) on the Debian 12 binaries"
    mkdir -p "$work/lint12"
    cp "$b1"/deb/*.deb "$work/lint12/"
    lintian_rc=0
    "$src/packaging/run-in-root.sh" --as-builder "$testroot12" "$work/lint12" \
        lintian --pedantic --display-info --tag-display-limit 0 --fail-on error,warning \
        "nodeherd_${version}-1${bpo}_$arch.deb" "nodeherd-dbgsym_${version}-1${bpo}_$arch.deb" >"$work/lintian12.txt" 2>&1 || lintian_rc=$?
    show "$work/lintian12.txt"
    # What Debian 12's lintian (2.116) says that Debian 13's does not, each
    # with its reason; anything else at warning level or above fails.
    #  - Static-Built-Using is a field dpkg 1.21 writes (Debian 12's
    #    dpkg-gencontrol takes it without a word) and policy defines for
    #    statically linked sources, which this lintian does not know yet:
    #    unknown-field, on the package and on its -dbgsym, which inherits it.
    lintian12_known='^W: nodeherd(-dbgsym)?: unknown-field Static-Built-Using$'
    grep -Ev "$lintian12_known" "$work/lintian12.txt" >"$work/lintian12-left.txt" || true
    errors=$(grep -c '^E:' "$work/lintian12-left.txt" || true)
    warnings=$(grep -c '^W:' "$work/lintian12-left.txt" || true)
    known=$(grep -Ec "$lintian12_known" "$work/lintian12.txt" || true)
    # Exit status 2 (a tag at the --fail-on level) is expected when only the
    # known ones are there; 1 is lintian itself failing.
    check "deb12: lintian (Debian 12's) on the binaries: no error ($errors), no warning ($warnings) besides the $known known (unknown-field Static-Built-Using), exit status $lintian_rc" \
        test "$errors" = 0 -a "$warnings" = 0 -a \( "$lintian_rc" = 0 -o \( "$lintian_rc" = 2 -a "$known" -gt 0 \) \)
    [[ -n ${NODEHERD_PKG_OUT:-} ]] && cp "$work/lintian12.txt" "$NODEHERD_PKG_OUT/"
fi
timed "Debian 12 package checks and lintian"

# ---------------------------------------------------------------- smoke test
if [[ -n ${NODEHERD_SKIP_SMOKE:-} ]]; then
    note "container tests skipped (NODEHERD_SKIP_SMOKE)"
    exit 0
fi
container_sh=$src/tests/systemd/container.sh
if [[ -z $testroot ]]; then
    fail "container tests: no Debian 13 root to boot"
    exit 1
fi
if [[ ! -f $deb1 || ! -f $deb2 ]]; then
    fail "container tests: the two .debs were not both built"
fi

note "a Debian 13 container under systemd"
shared=$work/shared
mkdir -p "$shared"
for f in "$deb1" "$deb2" "$rpm1" "$rpm2"; do
    [[ -f $f ]] && cp "$f" "$shared/"
done
name=nhpkg$$
if ! pid1=$(NODEHERD_CONTAINER_ROOT=$testroot "$container_sh" start "$name" "$shared" 2>"$work/container.err"); then
    show "$work/container.err"
    fail "booting the systemd container"
    exit 1
fi
container=$name
pass "container booted: $(timeout 10 nsenter -t "$pid1" -a systemctl --version | head -n1), PID 1 is $pid1"

# ct CMD...: run CMD inside the container, bounded.
ct() { timeout 120 nsenter -t "$pid1" -a "$@"; }
# poll SECONDS CMD...: retry CMD every 0.2 s until it succeeds or time is up.
poll() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}
url=http://127.0.0.1:8000/
answers() { curl -fsS --max-time 3 "$url" >"$work/answer.txt" 2>"$work/curl.err"; }
refused() { ! curl -sS --max-time 3 -o /dev/null "$url" 2>/dev/null; }
journal() {
    ct journalctl --no-pager -n 40 -u 'nodeherd@hello.socket' -u 'nodeherd@hello.service' 2>&1 | show
}
# run_logged LABEL CMD...: PASS/FAIL on CMD's status, its output shown on failure.
run_logged() {
    local what=$1
    shift
    if "$@" >"$work/step.log" 2>&1; then
        pass "$what"
    else
        show "$work/step.log"
        fail "$what"
        return 1
    fi
}

if answers; then
    fail "something already answers on $url before the install; the test cannot tell it apart"
    exit 1
fi
# A root from mmdebstrap has no policy-rc.d; a real host has none either.
check "the container has no policy-rc.d forbidding service actions" test ! -e "/proc/$pid1/root/usr/sbin/policy-rc.d"

# installed_idle PKG: after installing, the operators' group and the
# example's user exist and nothing runs.
installed_idle() {
    local pkg=$1 running enabled
    check "$pkg: group nodeherd (operators) exists after install" ct getent group nodeherd
    check "$pkg: user nodeherd-hello (the example app's) exists after install" ct getent passwd nodeherd-hello
    running=$(ct systemctl list-units --no-legend --plain 'nodeherd@*' || true)
    check "$pkg: nothing runs after install${running:+ (running: $running)}" test -z "$running"
    enabled=$(ct systemctl is-enabled nodeherd@hello.socket 2>&1 || true)
    check "$pkg: nodeherd@hello.socket is not enabled after install (it is '$enabled')" test "$enabled" = disabled
}

# serves PKG: enable the example and use it as a person would.
serves() {
    local pkg=$1 distinct state=""
    run_logged "$pkg: systemctl enable --now nodeherd@hello.socket" \
        ct systemctl enable --now nodeherd@hello.socket || return 0
    if ! poll 30 answers; then
        fail "$pkg: nothing answers on $url 30 s after enable --now: $(cat "$work/curl.err")"
        ct systemctl --no-pager status nodeherd@hello.socket nodeherd@hello.service 2>&1 | show
        journal
        return 0
    fi
    pass "$pkg: the hello app answers on $url: $(head -c 200 "$work/answer.txt")"
    # It answers as soon as one worker listens; the unit is active once the
    # manager has sent READY=1 for all of them.
    is_active() { state=$(ct systemctl is-active nodeherd@hello.service) || return 1; }
    check "$pkg: nodeherd@hello.service becomes active" poll 30 is_active
    [[ $state == active ]] || echo "    it is '$state'"
    # Two workers: new connections should reach both.
    : >"$work/bodies.txt"
    for _ in $(seq 1 40); do
        curl -fsS --max-time 3 "$url" >>"$work/bodies.txt" 2>/dev/null && echo >>"$work/bodies.txt"
    done
    distinct=$(sort -u "$work/bodies.txt" | grep -c . || true)
    check "$pkg: 40 requests reached more than one worker ($distinct distinct answers)" test "$distinct" -ge 2
    run_logged "$pkg: nodeherd status hello (over the system bus)" ct nodeherd status hello &&
        show "$work/step.log"
    if run_logged "$pkg: systemctl reload nodeherd@hello.service" ct systemctl reload nodeherd@hello.service; then
        check "$pkg: it still answers after the reload" poll 10 answers
    else
        journal
    fi
}

# running_version: the version the running manager's own binary reports
# (/proc/PID/exe is the file it was started from, even once replaced).
main_pid() { ct systemctl show -p MainPID --value nodeherd@hello.service 2>/dev/null || true; }
running_version() {
    local pid
    pid=$(main_pid)
    [[ -n $pid && $pid != 0 ]] || return 1
    ct "/proc/$pid/exe" --version 2>/dev/null | awk '{print $NF}'
}

# What systemd says of the unit's main process: its pid, how many times
# systemd restarted it (NRestarts counts the automatic restarts), when it
# was started, and when the unit last became active (what `systemctl
# status` shows after "since"). Key=value lines.
unit_starts() {
    ct systemctl show -p MainPID -p NRestarts -p ExecMainStartTimestamp -p ActiveEnterTimestamp \
        nodeherd@hello.service 2>/dev/null || true
}
# bus_property NAME: the manager's property NAME on the system bus, as
# busctl prints its value ("none" when the manager has no such property).
bus_property() {
    local out
    out=$(ct busctl get-property org.nodeherd.hello /org/nodeherd org.nodeherd.Manager1 "$1" 2>/dev/null) ||
        { echo none; return 0; }
    out=${out#* }
    out=${out#\"}
    echo "${out%\"}"
}
# children PID: the pids of PID's child processes (the workers), sorted.
children() { ct pgrep -P "$1" 2>/dev/null | sort -n | paste -sd' ' || true; }
# reported_pids: the workers' pids as the manager reports them (nodeherd
# status --json), sorted.
reported_pids() {
    ct nodeherd status --json hello 2>/dev/null |
        python3 -c 'import json, sys; print(" ".join(sorted((str(w["pid"]) for w in json.load(sys.stdin)["workers"]), key=int)))' 2>/dev/null || true
}
# reexec_lines: the manager's journal lines with NODEHERD_EVENT=reexecuted.
reexec_lines() {
    ct journalctl --no-pager -o cat _SYSTEMD_UNIT=nodeherd@hello.service NODEHERD_EVENT=reexecuted 2>/dev/null || true
}

# upgrades_under_load PKG NEW_VERSION HOW CMD...: with requests running (4
# lanes, a new connection each), install the new version (CMD); the app is
# to run the new binary afterwards, and no request may fail. HOW is what the
# package's scriptlet is to do with the running instance:
#   in-place  re-exec it (nodeherd reexec): the manager keeps its pid and
#             systemd sees no restart (NRestarts, the main process's start
#             time and the unit's "active since" all unchanged); the same
#             workers (the manager's children and the pids it reports, before
#             and after; and every request of the load was answered by one of
#             them); its exe is the new file; its Version property goes from
#             the old version to the new, its Reexecs one up; its journal has
#             the NODEHERD_EVENT=reexecuted line; the scriptlet says so.
#   restart   its manager is a version that cannot re-exec (no Reexec
#             method): the scriptlet says so and restarts the unit: a new
#             main pid with new workers, running the new file.
upgrades_under_load() {
    local pkg=$1 new=$2 how=$3 before after old_version new_version lines total bad detail t0
    shift 3
    local starts0 starts1 kids0 kids1 told0 told1 prop_version0 prop_version1 reexecs0 reexecs1
    local events0 events1 answered strays exe said
    starts0=$(unit_starts)
    before=$(sed -n 's/^MainPID=//p' <<<"$starts0")
    old_version=$(running_version || echo "?")
    kids0=$(children "$before")
    told0=$(reported_pids)
    prop_version0=$(bus_property Version)
    reexecs0=$(bus_property Reexecs)
    events0=$(reexec_lines | wc -l)
    rm -f "$work/stop-load"
    node "$repo/tests/systemd/load.js" "$url" 4 "$work/stop-load" 120 "$work/load-$pkg.txt" &
    load_pid=$!
    # Requests are flowing before the upgrade starts.
    flowing() { lines=$(grep -c ' 200 ' "$work/load-$pkg.txt" 2>/dev/null) && ((lines >= 50)); }
    if ! poll 20 flowing; then
        fail "$pkg: the load generator got no answers before the upgrade"
    fi
    t0=$EPOCHREALTIME
    run_logged "$pkg: upgrade $old_version -> $new under load ($*)" ct "$@" || true
    cp "$work/step.log" "$work/upgrade-$pkg.log"
    local took
    took=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    # The scriptlet waits for the move (nodeherd reexec returns once the new
    # program answers; systemctl try-restart once the unit is active again):
    # this only bounds a wait that should be over.
    settled() {
        after=$(main_pid)
        [[ -n $after && $after != 0 ]] || return 1
        [[ $(ct systemctl is-active nodeherd@hello.service) == active ]] || return 1
        if [[ $how == in-place ]]; then
            [[ $(bus_property Reexecs) != "$reexecs0" ]]
        else
            [[ $after != "$before" ]]
        fi
    }
    poll 60 settled || true
    # Let requests run on the new program for a moment, then stop them.
    local seen
    seen=$(wc -l <"$work/load-$pkg.txt")
    more() { (($(wc -l <"$work/load-$pkg.txt") >= seen + 200)); }
    poll 20 more || true
    touch "$work/stop-load"
    stopped() { ! kill -0 "$load_pid" 2>/dev/null; }
    if ! poll 30 stopped; then
        kill "$load_pid" 2>/dev/null || true
    fi
    wait "$load_pid" 2>/dev/null || true
    load_pid=""
    after=$(main_pid)
    new_version=$(running_version || echo "?")
    starts1=$(unit_starts)
    kids1=$(children "$after")
    told1=$(reported_pids)
    prop_version1=$(bus_property Version)
    reexecs1=$(bus_property Reexecs)
    events1=$(reexec_lines | wc -l)
    # The package manager replaced /usr/bin/nodeherd by a new file: a
    # process still running the old one has "(deleted)" after its exe link.
    exe=$(ct readlink "/proc/$after/exe" 2>/dev/null || echo "?")
    check "$pkg: after the upgrade the app runs the new binary (its exe '$exe', which says $old_version -> $new_version)" \
        test "$new_version" = "$new" -a "$exe" = /usr/bin/nodeherd
    check "$pkg: the manager's Version property went from $prop_version0 to $prop_version1 (wanted $new)" \
        test "$prop_version1" = "$new"
    said=$(grep -m1 '^nodeherd: nodeherd@hello.service' "$work/upgrade-$pkg.log" || true)
    if [[ $how == in-place ]]; then
        check "$pkg: the scriptlet re-executed the manager in place (it said: ${said:-nothing})" \
            grep -q '^nodeherd: nodeherd@hello.service re-executed in place: ' <<<"$said"
        check "$pkg: the same main pid before and after ($before -> $after)" \
            test -n "$before" -a "$after" = "$before"
        # Everything but MainPID: NRestarts and the two start times.
        check "$pkg: systemd saw no restart: $(grep -v '^MainPID=' <<<"$starts1" | paste -sd' ') (before: $(grep -v '^MainPID=' <<<"$starts0" | paste -sd' '))" \
            test "$(grep -v '^MainPID=' <<<"$starts0")" = "$(grep -v '^MainPID=' <<<"$starts1")" -a -n "$starts0"
        check "$pkg: the same workers, as the manager's children ($kids0 -> $kids1)" \
            test -n "$kids0" -a "$kids0" = "$kids1"
        check "$pkg: the same workers, as the manager reports them (nodeherd status --json: $told0 -> $told1)" \
            test -n "$told0" -a "$told0" = "$told1" -a "$told0" = "$kids0"
        # Every answer names the worker's pid ("pid N" in the example's body).
        answered=$(awk '$2 == 200 { print $3 }' "$work/load-$pkg.txt" | sort -un | paste -sd' ')
        strays=$(comm -13 <(tr ' ' '\n' <<<"$kids0" | sort) <(tr ' ' '\n' <<<"$answered" | sort) | paste -sd' ')
        check "$pkg: every request of the load was answered by one of the workers from before (answered by: $answered)" \
            test -n "$answered" -a -z "$strays"
        local one_up=none
        [[ $reexecs0 =~ ^[0-9]+$ ]] && one_up=$((reexecs0 + 1))
        check "$pkg: the manager's Reexecs property went one up ($reexecs0 -> $reexecs1)" \
            test "$one_up" != none -a "$reexecs1" = "$one_up"
        check "$pkg: the journal has the manager's NODEHERD_EVENT=reexecuted line ($(reexec_lines | tail -n 1))" \
            test "$events1" = "$((events0 + 1))"
    else
        check "$pkg: the scriptlet said the manager cannot re-exec and restarted it (it said: ${said:-nothing})" \
            grep -q "^nodeherd: nodeherd@hello.service: its manager is a version that cannot re-exec in place; restarting it instead" <<<"$said"
        check "$pkg: the old manager had no Version property (it predates re-exec in place): $prop_version0" \
            test "$prop_version0" = none
        check "$pkg: a new main pid ($before -> $after) with new workers ($kids0 -> $kids1)" bash -c '
            [[ -n $1 && -n $2 && $1 != "$2" && -n $4 ]] || exit 1
            for k in $3; do [[ " $4 " != *" $k "* ]] || exit 1; done' _ "$before" "$after" "$kids0" "$kids1"
    fi
    check "$pkg: it answers after the upgrade" poll 30 answers
    total=$(wc -l <"$work/load-$pkg.txt")
    bad=$(awk '$2 != 200' "$work/load-$pkg.txt" | wc -l)
    detail=$(awk '$2 != 200 { n[$2]++ } END { for (k in n) { printf "%s%s x%d", sep, k, n[k]; sep = ", " } }' "$work/load-$pkg.txt")
    check "$pkg: upgrade under load: $total requests, $bad failed${detail:+ ($detail)}; the install command took $took s" \
        test "$bad" = 0 -a "$total" -gt 0
    upgrade_figures+=("$pkg, $(basename "${*: -1}") over $old_version ($how): $total requests, $bad failed${detail:+ ($detail)}, install took $took s")
}

# removed PKG: after removal nothing of the app is left running or loaded.
removed() {
    local pkg=$1 left active loaded unitfiles
    check "$pkg: after removal nothing answers on $url" poll 10 refused
    left=$(ct pgrep -u nodeherd-hello -a || true)
    check "$pkg: after removal no process of user nodeherd-hello is left${left:+ (left: $left)}" test -z "$left"
    active=$(ct systemctl list-units --no-legend --plain --state=active,activating,deactivating,reloading 'nodeherd@*' || true)
    check "$pkg: after removal no nodeherd@ unit is active${active:+ ($active)}" test -z "$active"
    # A link `enable` made may stay until purge (as for any Debian service),
    # so systemd may still name the unit, as not-found.
    loaded=$(ct systemctl list-units --all --no-legend --plain 'nodeherd@*' | awk '$2 != "not-found"' || true)
    check "$pkg: after removal systemd has no nodeherd@ unit loaded from a file${loaded:+ ($loaded)}" test -z "$loaded"
    check "$pkg: after removal the unit files and the binary are gone" \
        bash -c "! ls /proc/$pid1/root/usr/lib/systemd/system/nodeherd@* /proc/$pid1/root/usr/bin/nodeherd 2>/dev/null | grep -q ."
    unitfiles=$(ct systemctl list-unit-files --no-legend 'nodeherd@*' || true)
    check "$pkg: after removal systemd lists no nodeherd@ unit file${unitfiles:+ ($unitfiles)}" test -z "$unitfiles"
}

# forgotten PKG: after purge (or rpm -e) no configuration is left either.
forgotten() {
    local pkg=$1 links known
    check "$pkg: /etc/nodeherd is gone" test ! -e "/proc/$pid1/root/etc/nodeherd"
    links=$(find "/proc/$pid1/root/etc/systemd/system" -name 'nodeherd@*' 2>/dev/null || true)
    check "$pkg: no nodeherd@ link left in /etc/systemd/system${links:+ ($links)}" test -z "$links"
    known=$(ct systemctl list-units --all --no-legend --plain 'nodeherd@*' || true)
    check "$pkg: systemd knows no nodeherd@ unit${known:+ ($known)}" test -z "$known"
}

# deb_lifecycle PKG FIRST SECOND NEW: install the .deb FIRST (nothing
# runs), use the example, upgrade to SECOND (whose binary says NEW) under
# load, the manager re-executed in place; remove, purge, nothing left.
deb_lifecycle() {
    local pkg=$1 first=$2 second=$3 new=$4
    run_logged "$pkg: dpkg -i $(basename "$first")" ct dpkg -i "/shared/$(basename "$first")" || return 0
    installed_idle "$pkg"
    serves "$pkg"
    upgrades_under_load "$pkg" "$new" in-place dpkg -i "/shared/$(basename "$second")"
    run_logged "$pkg: dpkg -r nodeherd" ct dpkg -r nodeherd
    removed "$pkg"
    check "$pkg: after dpkg -r the conffile /etc/nodeherd/hello.config.js stays (until purge)" \
        test -f "/proc/$pid1/root/etc/nodeherd/hello.config.js"
    run_logged "$pkg: dpkg --purge nodeherd" ct dpkg --purge nodeherd
    forgotten "$pkg"
}

t_deb=$SECONDS
if [[ -f $deb1 && -f $deb2 ]]; then
    note "the .deb: $version, then $version2"
    deb_lifecycle deb "$deb1" "$deb2" "$version2"
    # The fallback: an upgrade from a release whose manager cannot re-exec
    # in place (the .deb of the commit before it came): the scriptlet is to
    # say so and restart the instance.
    if [[ -n $pre_deb ]]; then
        note "the .deb: nodeherd before re-exec in place (${pre_reexec:0:12}), then $version2"
        cp "$pre_deb" "$shared/pre-reexec.deb"
        if run_logged "deb-fallback: dpkg -i $(basename "$pre_deb") (built from ${pre_reexec:0:12})" \
            ct dpkg -i /shared/pre-reexec.deb; then
            serves deb-fallback
            upgrades_under_load deb-fallback "$version2" restart dpkg -i "/shared/$(basename "$deb2")"
            run_logged "deb-fallback: dpkg --purge nodeherd" ct dpkg --purge nodeherd
            removed deb-fallback
            forgotten deb-fallback
        fi
    else
        fail "deb-fallback: no .deb of nodeherd before re-exec in place (see above)"
    fi
fi
timed "container: .deb install, use, upgrade under load, removal"
# Debian keeps system users after purge; the RPM is to create its own.
ct userdel nodeherd >/dev/null 2>&1 || true
ct groupdel nodeherd >/dev/null 2>&1 || true

# The same container serves for the RPMs: Debian's rpm installs them with
# --nodeps (its database knows none of the Debian packages), and runs the
# spec's scriptlets.
if [[ -f $rpm1 && -f $rpm2 ]]; then
    note "the RPM: $version-$rpm_release, then $version-$rpm_release2"
    if run_logged "rpm: rpm -i $(basename "$rpm1")" ct rpm -i --nodeps "/shared/$(basename "$rpm1")"; then
        installed_idle rpm
        serves rpm
        upgrades_under_load rpm "$version" in-place rpm -U --nodeps "/shared/$(basename "$rpm2")"
        # The fallback: no RPM of the release before re-exec in place is
        # built here (one more build of about 5 minutes), so the running
        # manager is made one of that release by hand: the binary of the
        # .deb above (the same code an RPM of it would hold) put in place of
        # /usr/bin/nodeherd, and the unit restarted onto it. Then the RPM is
        # installed again (rpm -U --replacepkgs: its %posttrans runs).
        if [[ -n $pre_deb ]]; then
            mkdir -p "$work/pre-root"
            dpkg-deb -x "$pre_deb" "$work/pre-root"
            cp "$work/pre-root/usr/bin/nodeherd" "/proc/$pid1/root/usr/bin/.nodeherd-pre-reexec"
            if run_logged "rpm-fallback: the manager restarted on nodeherd before re-exec in place (${pre_reexec:0:12}), put in /usr/bin by hand" \
                ct bash -c 'mv -f /usr/bin/.nodeherd-pre-reexec /usr/bin/nodeherd && systemctl restart nodeherd@hello.service'; then
                unit_active() { [[ $(ct systemctl is-active nodeherd@hello.service) == active ]]; }
                check "rpm-fallback: nodeherd@hello.service is active again, on the older manager" poll 30 unit_active
                check "rpm-fallback: it answers" poll 30 answers
                upgrades_under_load rpm-fallback "$version" restart rpm -U --replacepkgs --nodeps "/shared/$(basename "$rpm2")"
            fi
        else
            fail "rpm-fallback: no .deb of nodeherd before re-exec in place (see above)"
        fi
        run_logged "rpm: rpm -e nodeherd" ct rpm -e nodeherd
        removed rpm
        forgotten rpm
    fi
else
    fail "container tests: the two RPMs were not both built"
fi
timed "container: RPM install, use, upgrade under load, removal"

# ---------------------------------------------------------------- Debian 12
# The Debian 12 .debs in a booted Debian 12 (systemd 252, dbus-daemon 1.14
# as the system bus, polkitd 122, Debian's Node.js 18), on the same port:
# the Debian 13 container goes first.
if [[ -n $container ]]; then
    "$container_sh" stop "$container" >/dev/null 2>"$work/container-stop.err" ||
        { fail "stopping container $container"; show "$work/container-stop.err"; }
    container=""
fi
if [[ ! -f $deb12_1 || ! -f $deb12_2 ]]; then
    fail "deb12: container tests: the two Debian 12 .debs were not both built"
elif [[ -z $testroot12 ]]; then
    fail "deb12: container tests: no Debian 12 root to boot"
else
    note "a Debian 12 container under systemd"
    cp "$deb12_1" "$deb12_2" "$shared/"
    name=nhpkg12-$$
    if pid1=$(NODEHERD_CONTAINER_ROOT=$testroot12 "$container_sh" start "$name" "$shared" 2>"$work/container.err"); then
        container=$name
        pass "deb12: container booted: $(ct systemctl --version | head -n1), $(ct cat /etc/debian_version), PID 1 is $pid1"
        bus=$(ct systemctl show -p ExecStart --value dbus.service 2>/dev/null | grep -o 'path=[^ ;]*' | head -n1)
        check "deb12: the system bus is dbus-daemon, Debian 12's default (dbus.service runs ${bus#path=})" \
            grep -q 'dbus-daemon$' <<<"$bus"
        check "deb12: nothing answers on $url before the install" refused
        check "deb12: the container has no policy-rc.d forbidding service actions" test ! -e "/proc/$pid1/root/usr/sbin/policy-rc.d"
        note "the Debian 12 .deb: $version-1$bpo, then $version-2$bpo (Node.js $(ct node --version 2>/dev/null))"
        deb_lifecycle deb12 "$deb12_1" "$deb12_2" "$version"
    else
        show "$work/container.err"
        fail "deb12: booting the Debian 12 container"
    fi
fi
timed "container (Debian 12): .deb install, use, upgrade under load, removal"
