#!/usr/bin/env bash
# Build nodeherd's .deb and .rpm from a clean copy of the tree, check that
# each holds every file it should, lint the .deb, then install the .deb into
# a throwaway systemd container and run the example app from it:
#
#   1. install the build tools (apt-get update once, only if one is missing)
#   2. copy the tree: `git archive HEAD` (committed files only), or
#      NODEHERD_TREE=DIR to take a working tree as it is
#   3. dpkg-buildpackage -us -uc -b; list the .deb; lintian (any E: fails)
#   4. rpmbuild -bb from a tarball of the same copy; list the .rpm
#   5. in a container booted by tests/systemd/container.sh: dpkg -i, nothing
#      runs; `systemctl enable --now nodeherd@hello.socket`; the app answers
#      on 127.0.0.1:8000, on both workers, over the bus, across a reload and
#      an upgrade in place; `dpkg -r` stops it and removes the units;
#      `dpkg --purge` removes /etc/nodeherd. Then the same with the .rpm
#      (rpm -i, rpm -U, rpm -e).
#
# Every check prints PASS or FAIL with what it saw; the last line is
# "N passed, N failed", and the exit status is non-zero when anything
# failed. Whatever the script started (the container, the work directory) is
# cleaned up on exit, however it ends.
#
# Environment:
#   NODEHERD_TREE=DIR      build from DIR instead of `git archive HEAD`
#   NODEHERD_PKG_OUT=DIR   copy the built packages and lintian's report there
#   CARGO_TARGET_DIR=DIR   build in this cargo target directory, for example
#                          the tree's own target/ to reuse its compiled
#                          crates (default: a fresh one in the work
#                          directory, shared by both builds)
#   NODEHERD_SKIP_SMOKE=1  build and check the packages only
# Needs root (apt-get, the container); uses rustup's cargo from ~/.cargo/bin.

set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d /tmp/nodeherd-packages.XXXXXX)
container=""
container_sh=""
passed=0
failed=0

pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
note() { echo "--- $*"; }
# check DESCRIPTION COMMAND...: PASS when the command succeeds.
check() {
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
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
    if [[ -n $container ]]; then
        "$container_sh" stop "$container" >/dev/null 2>"$work/container-stop.err" ||
            { fail "stopping container $container"; sed 's/^/    /' "$work/container-stop.err"; }
    fi
    rm -rf "$work"
    if ((rc != 0 && failed == 0)); then
        fail "the script stopped early (exit status $rc); see the output above"
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
    fail "needs root (apt-get, dpkg in a systemd container)"
    exit 1
fi
note "build tools"
need_debs=(build-essential debhelper dpkg-dev fakeroot lintian rpm git curl systemd-container)
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
command -v cargo >/dev/null || { fail "no cargo (rustup's, in ~/.cargo/bin)"; exit 1; }

# ---------------------------------------------------------------- source
tree=$work/src/tree
mkdir -p "$tree"
if [[ -n ${NODEHERD_TREE:-} ]]; then
    note "source: $NODEHERD_TREE as it is"
    if git -C "$NODEHERD_TREE" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # Tracked and untracked files, as they are on disk; not what
        # .gitignore names (target/, benchmark scratch).
        git -C "$NODEHERD_TREE" ls-files -z -co --exclude-standard |
            tar -C "$NODEHERD_TREE" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$tree" -xf -
    else
        tar -C "$NODEHERD_TREE" --exclude=./target --exclude=./.git -cf - . | tar -C "$tree" -xf -
    fi
else
    note "source: git archive HEAD ($(git -C "$repo" rev-parse --short HEAD))"
    git -C "$repo" archive --format=tar HEAD | tar -C "$tree" -xf -
fi
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$tree/Cargo.toml" | head -n1)
src=$work/src/nodeherd-$version
mv "$tree" "$src"
# cargo decides what to rebuild by mtime, and `git archive` stamps files
# with the commit's time: a shared CARGO_TARGET_DIR holding a newer build of
# other sources would be reused as is. Fresh mtimes make cargo rebuild
# nodeherd itself (crates from the registry are still reused).
find "$src" -exec touch -h {} +
arch=$(dpkg --print-architecture)

# Fetch the crates once, online; both builds then run offline from the cache.
note "cargo fetch"
if ! (cd "$src" && cargo fetch --locked >"$work/fetch.log" 2>&1) &&
    ! (cd "$src" && cargo fetch --locked --offline >>"$work/fetch.log" 2>&1); then
    tail -20 "$work/fetch.log"
    fail "cargo fetch --locked"
    exit 1
fi
export CARGO_NET_OFFLINE=true
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$work/target}

# What both packages must hold (zsh's directory differs by distribution).
common_paths=(
    /usr/bin/nodeherd
    /usr/lib/systemd/system/nodeherd@.socket
    /usr/lib/systemd/system/nodeherd@.service
    /usr/lib/systemd/system/nodeherd@hello.socket.d/listen-8000.conf
    /usr/share/dbus-1/system.d/org.nodeherd.conf
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
)
deb_paths=(
    "${common_paths[@]}"
    /usr/share/zsh/vendor-completions/_nodeherd
    /usr/share/man/man1/nodeherd.1.gz
    /usr/share/doc/nodeherd/changelog.gz
    /usr/share/doc/nodeherd/copyright
)
rpm_paths=(
    "${common_paths[@]}"
    /usr/share/zsh/site-functions/_nodeherd
    # Compressed or not, as the distribution's rpm macros decide.
    '/usr/share/man/man1/nodeherd.1*'
)

# has_paths LISTING PATH...: every PATH is a line of LISTING (a PATH
# ending in * names a prefix).
has_paths() {
    local listing=$1 p missing=()
    shift
    for p in "$@"; do
        if [[ $p == *'*' ]]; then
            awk -v p="${p%'*'}" 'index($0, p) == 1 { f = 1 } END { exit !f }' "$listing" || missing+=("$p")
        else
            grep -qxF "$p" "$listing" || missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    printf '    missing: %s\n' "${missing[@]}"
    return 1
}

# ---------------------------------------------------------------- .deb
note "dpkg-buildpackage -us -uc -b"
debdir=$work/deb
mkdir -p "$debdir"
cp -a "$src" "$debdir/"
deb=$debdir/nodeherd_${version}_${arch}.deb
if (cd "$debdir/nodeherd-$version" && dpkg-buildpackage -us -uc -b) >"$work/deb-build.log" 2>&1 && [[ -f $deb ]]; then
    pass "dpkg-buildpackage built $(basename "$deb")"
else
    tail -40 "$work/deb-build.log" | sed 's/^/    /'
    fail "dpkg-buildpackage (log above)"
    deb=""
fi

if [[ -n $deb ]]; then
    note "contents of $(basename "$deb")"
    dpkg-deb -c "$deb" | tee "$work/deb-contents.txt" | awk '{print "    " $1, $6, $7, $8}'
    awk '{print $6}' "$work/deb-contents.txt" | sed 's|^\./|/|; s|/$||' >"$work/deb-paths.txt"
    check ".deb holds every expected file" has_paths "$work/deb-paths.txt" "${deb_paths[@]}"
    dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles >"$work/deb-conffiles" 2>/dev/null || true
    check ".deb has /etc/nodeherd/hello.config.js as a conffile" \
        grep -qxF /etc/nodeherd/hello.config.js "$work/deb-conffiles"
    dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./postinst >"$work/deb-postinst"
    check ".deb postinst creates the user with systemd-sysusers" grep -q 'systemd-sysusers.*nodeherd.conf' "$work/deb-postinst"
    check ".deb installs and starts no unit (no enable/start in postinst)" \
        bash -c "! grep -Eq 'deb-systemd-helper (enable|unmask)|deb-systemd-invoke (start|restart) ' '$work/deb-postinst'"
    check ".deb binary reports version $version" \
        bash -c "dpkg-deb --fsys-tarfile '$deb' | tar -xOf - ./usr/bin/nodeherd >'$work/nodeherd.bin' && chmod +x '$work/nodeherd.bin' && '$work/nodeherd.bin' --version | grep -qF '$version'"

    note "lintian"
    changes=$debdir/nodeherd_${version}_${arch}.changes
    lintian --info --display-info --pedantic --tag-display-limit 0 "$changes" >"$work/lintian.txt" 2>&1 || true
    sed 's/^/    /' "$work/lintian.txt"
    errors=$(grep -c '^E:' "$work/lintian.txt" || true)
    warnings=$(grep -c '^W:' "$work/lintian.txt" || true)
    if ((errors == 0)); then
        pass "lintian: no errors ($warnings warnings)"
    else
        fail "lintian: $errors errors"
    fi
    if [[ -n ${NODEHERD_PKG_OUT:-} ]]; then
        mkdir -p "$NODEHERD_PKG_OUT"
        cp "$debdir"/*.deb "$work/lintian.txt" "$NODEHERD_PKG_OUT/"
    fi
fi

# ---------------------------------------------------------------- .rpm
note "rpmbuild -bb"
top=$work/rpmbuild
mkdir -p "$top/SOURCES"
tar -C "$work/src" -czf "$top/SOURCES/nodeherd-$version.tar.gz" "nodeherd-$version"
rpm_arch=$(rpm --eval '%{_arch}')
rpmfile=$top/RPMS/$rpm_arch/nodeherd-$version-1.$rpm_arch.rpm
# --nodeps: Debian's rpm database is empty, so no BuildRequires would be met.
if rpmbuild -bb --nodeps --define "_topdir $top" "$src/rpm/nodeherd.spec" >"$work/rpm-build.log" 2>&1 &&
    [[ -f $rpmfile ]]; then
    pass "rpmbuild built $(basename "$rpmfile")"
else
    tail -40 "$work/rpm-build.log" | sed 's/^/    /'
    fail "rpmbuild (log above)"
    rpmfile=""
fi
if [[ -n $rpmfile ]]; then
    note "contents of $(basename "$rpmfile")"
    rpm -qlvp "$rpmfile" 2>/dev/null | awk '{print "    " $1, $3, $9, $10, $11}'
    rpm -qlp "$rpmfile" 2>/dev/null >"$work/rpm-paths.txt"
    check ".rpm holds every expected file" has_paths "$work/rpm-paths.txt" "${rpm_paths[@]}"
    check ".rpm has /etc/nodeherd/hello.config.js as %config(noreplace)" \
        bash -c "rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' '$rpmfile' 2>/dev/null | grep -qx 'cn /etc/nodeherd/hello.config.js'"
    rpm -qp --scripts "$rpmfile" >"$work/rpm-scripts.txt" 2>/dev/null
    check ".rpm %post creates the user with systemd-sysusers" grep -q 'systemd-sysusers nodeherd.conf' "$work/rpm-scripts.txt"
    check ".rpm scriptlets stop instances on erase and restart them on upgrade" \
        bash -c "grep -qF \"stop 'nodeherd@*.socket' 'nodeherd@*.service'\" '$work/rpm-scripts.txt' && grep -qF \"try-restart 'nodeherd@*.service'\" '$work/rpm-scripts.txt'"
    check ".rpm has a %changelog for $version" bash -c "rpm -qp --changelog '$rpmfile' 2>/dev/null | grep -q -- '- $version-1\$'"
    [[ -n ${NODEHERD_PKG_OUT:-} ]] && cp "$rpmfile" "$NODEHERD_PKG_OUT/"
fi

# ---------------------------------------------------------------- smoke test
if [[ -n ${NODEHERD_SKIP_SMOKE:-} ]]; then
    note "smoke test skipped (NODEHERD_SKIP_SMOKE)"
    exit 0
fi
container_sh=$src/tests/systemd/container.sh
[[ -x $container_sh ]] || container_sh=$repo/tests/systemd/container.sh
if [[ ! -x $container_sh ]]; then
    fail "smoke test: tests/systemd/container.sh is missing, cannot boot a systemd container"
    exit 1
fi
if [[ -z $deb ]]; then
    fail "smoke test: no .deb to install"
    exit 1
fi

note "smoke test in a systemd container"
shared=$work/shared
mkdir -p "$shared"
cp "$deb" "$shared/nodeherd.deb"
[[ -n $rpmfile ]] && cp "$rpmfile" "$shared/nodeherd.rpm"
name=nhpkg$$
if ! pid1=$("$container_sh" start "$name" "$shared" 2>"$work/container.err"); then
    sed 's/^/    /' "$work/container.err"
    fail "booting the systemd container"
    exit 1
fi
container=$name
pass "container booted (PID 1 is $pid1)"

# ct CMD...: run CMD inside the container, bounded.
ct() { timeout 60 nsenter -t "$pid1" -a "$@"; }
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
show() { sed 's/^/    | /' "$@"; }
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
    fail "something already answers on $url before the install; the smoke test cannot tell it apart"
    exit 1
fi

# A policy-rc.d that forbids service actions (Docker images ship one that
# exits 101) would make the maintainer scripts skip stopping the app, as
# they should there. The container is to behave like a real host: its copy
# goes (the container's root is an overlay; the host's file stays).
if [[ -e /proc/$pid1/root/usr/sbin/policy-rc.d ]]; then
    note "removing /usr/sbin/policy-rc.d inside the container"
    ct rm -f /usr/sbin/policy-rc.d
fi

# installed_idle PKG: after installing, the user exists and nothing runs.
installed_idle() {
    local pkg=$1 running enabled
    check "$pkg: user nodeherd exists after install" ct getent passwd nodeherd
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

# upgrades PKG CMD...: installing over the running app (CMD) restarts it
# into the new binary, and it answers again.
upgrades() {
    local pkg=$1 before after
    shift
    before=$(ct systemctl show -p MainPID --value nodeherd@hello.service || true)
    run_logged "$pkg: upgrade in place ($*)" ct "$@" || return 0
    after=$(ct systemctl show -p MainPID --value nodeherd@hello.service || true)
    check "$pkg: the upgrade restarted the running app (manager pid $before -> $after)" \
        test -n "$after" -a "$after" != 0 -a "$after" != "$before"
    check "$pkg: it answers after the upgrade" poll 30 answers
}

# removed PKG: after removal nothing of the app is left running or loaded.
removed() {
    local pkg=$1 left active loaded unitfiles
    check "$pkg: after removal nothing answers on $url" poll 10 refused
    left=$(ct pgrep -u nodeherd -a || true)
    check "$pkg: after removal no process of user nodeherd is left${left:+ (left: $left)}" test -z "$left"
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

note "the .deb"
if run_logged "deb: dpkg -i nodeherd.deb" ct dpkg -i /shared/nodeherd.deb; then
    installed_idle deb
    serves deb
    upgrades deb dpkg -i /shared/nodeherd.deb
    run_logged "deb: dpkg -r nodeherd" ct dpkg -r nodeherd
    removed deb
    check "deb: after dpkg -r the conffile /etc/nodeherd/hello.config.js stays (until purge)" \
        test -f "/proc/$pid1/root/etc/nodeherd/hello.config.js"
    run_logged "deb: dpkg --purge nodeherd" ct dpkg --purge nodeherd
    forgotten deb
fi
# Debian keeps system users after purge; the .rpm is to create its own.
ct userdel nodeherd >/dev/null 2>&1 || true
ct groupdel nodeherd >/dev/null 2>&1 || true

# The same container serves for the .rpm: Debian's rpm installs it with
# --nodeps (its database knows none of the Debian packages), and runs the
# spec's scriptlets, here with the fallback systemd macros.
if [[ -n $rpmfile ]]; then
    note "the .rpm"
    if run_logged "rpm: rpm -i nodeherd.rpm" ct rpm -i --nodeps /shared/nodeherd.rpm; then
        installed_idle rpm
        serves rpm
        upgrades rpm rpm -U --replacepkgs --nodeps /shared/nodeherd.rpm
        run_logged "rpm: rpm -e nodeherd" ct rpm -e nodeherd
        removed rpm
        forgotten rpm
    fi
fi
