#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this script).
#
# Installs what the tests need (Debian packages, npm packages, oha), then:
# format and lint checks, unit and integration tests (real node workers,
# real dbus-daemon, real sockets via systemd-socket-activate), the reload
# and scale load test under oha, and the suites under a booted systemd and
# for the distro packages when their scripts are present.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

need_apt=()
command -v dbus-daemon >/dev/null || need_apt+=(dbus)
command -v busctl >/dev/null || need_apt+=(systemd)
command -v systemd-socket-activate >/dev/null || need_apt+=(systemd)
command -v node >/dev/null || need_apt+=(nodejs npm)
command -v python3 >/dev/null || need_apt+=(python3)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need_apt[*]} (install them, or run as root)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
(cd tests/apps && npm install --no-audit --no-fund --loglevel=error)
# A real Prometheus text parser checks the metrics endpoint.
python3 -c 'import prometheus_client' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check prometheus_client

passed=0
failed=0

times=()
step() {
  local name=$1; shift
  local t0=$SECONDS result=ok
  echo "==> $name"
  if "$@"; then
    passed=$((passed + 1))
  else
    echo "FAILED: $name"
    failed=$((failed + 1))
    result=FAILED
  fi
  times+=("$(printf '%5d s  %-6s %s' $((SECONDS - t0)) "$result" "$name")")
}

step "cargo fmt --check" cargo fmt --check
step "cargo clippy" cargo clippy --all-targets --quiet -- -D warnings
step "cargo test" scripts/cargo-test.sh
step "release build" cargo build --release --quiet
# oha (the load generator) is built once per machine and kept in the cache.
CACHE=${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}
export PATH="$CACHE/oha/bin:$PATH"
if ! command -v oha >/dev/null; then
  echo "==> installing oha (load generator) into $CACHE/oha"
  mkdir -p "$CACHE/oha"
  cargo install oha --locked --quiet --root "$CACHE/oha"
fi
step "reload and scale under load" tests/load/reload-under-load.sh target/release/nodeherd
step "reload and scale under load, an app with its own SIGINT handler" \
  env LOAD_APP=tests/apps/slow.js tests/load/reload-under-load.sh target/release/nodeherd
step "reload and scale under load, balance queue" \
  env LOAD_BALANCE=queue tests/load/reload-under-load.sh target/release/nodeherd
step "reload and scale under load, balance reuseport (a socket per slot)" \
  env LOAD_BALANCE=reuseport tests/load/reload-under-load.sh target/release/nodeherd
step "ten re-execs in place under load, the same workers" tests/load/reexec-under-load.sh target/release/nodeherd
step "soak: 500 reloads and 500 crashes, fds/threads/RSS flat" tests/soak/soak.py target/release/nodeherd
step "compatibility suite (real npm apps, Node 20/22/24)" tests/compat/run.sh target/release/nodeherd
if [ "$(id -u)" -eq 0 ]; then
  step "systemd-analyze verify and security of the units" tests/systemd/verify-units.sh target/release/nodeherd
  step "D-Bus policy and authorization against a real dbus-daemon" tests/systemd/dbus-policy.sh target/release/nodeherd
  step "end to end under a booted systemd, Debian 12 (systemd 252, dbus-daemon, polkit)" tests/systemd/e2e.sh target/release/nodeherd
  step "end to end under a booted systemd, Debian 13 (systemd 257, dbus-broker, polkit)" tests/systemd/e2e.sh --root trixie target/release/nodeherd
  step "per-worker cgroups under a booted systemd, Debian 12 (systemd 252)" tests/systemd/cgroups.sh target/release/nodeherd
  step "per-worker cgroups under a booted systemd, Debian 13 (systemd 257, DelegateSubgroup=)" tests/systemd/cgroups.sh --root trixie target/release/nodeherd
  step "PM2's verbs under a booted systemd (ls, logs, start, stop, delete)" tests/systemd/pm2-verbs.sh target/release/nodeherd
  step "a fleet of three booted hosts behind HAProxy: roll, restart, stop with 0 failed requests" tests/systemd/fleet.sh target/release/nodeherd
  step "the app's counters survive workers, as a real Prometheus reads them (rate within 5 % across kill -9, reload, scale)" \
    tests/metrics/prometheus.sh target/release/nodeherd
else
  echo "==> skipping the systemd and D-Bus policy suites: they need root"
fi
if [ -x packaging/test-packages.sh ] && [ "$(id -u)" -eq 0 ]; then
  step "distro packages" packaging/test-packages.sh
fi

echo
printf '%s\n' "${times[@]}"
echo "suites: $passed passed, $failed failed, in $((SECONDS / 60)) min $((SECONDS % 60)) s (installs included)"
[ "$failed" -eq 0 ]
