# The tools every side-by-side benchmark needs, found or installed once:
# node and npm, dbus-daemon, PM2 (pinned, into $WORK/pm2), oha, and
# wrk (a second load generator, from the distribution's archive), and
# nodeherd's release build. Sourced by bench/run.sh and bench/reexec.sh
# after they define ROOT, WORK, PM2_VERSION, log and die; sets PM2,
# PM2_VERSION_SEEN, OHA, WRK and NH; bench_bus (after RUN is made) starts a
# private bus.
bench_tools() {
  mkdir -p "$WORK"
  command -v node >/dev/null || die "node is needed (Node.js 18 or later)"
  command -v npm >/dev/null || die "npm is needed"
  if ! command -v dbus-daemon >/dev/null; then
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
      log "installing dbus from apt"
      apt-get install -y -q dbus >/dev/null
    else
      die "dbus-daemon is needed (apt-get install dbus)"
    fi
  fi

  PM2=$WORK/pm2/node_modules/.bin/pm2
  if [[ ! -x $PM2 ]] || [[ $(node -p "require('$WORK/pm2/node_modules/pm2/package.json').version") != "$PM2_VERSION" ]]; then
    log "installing pm2@$PM2_VERSION into $WORK/pm2"
    timeout 600 npm install --prefix "$WORK/pm2" --no-audit --no-fund --loglevel=error "pm2@$PM2_VERSION" >&2
  fi
  PM2_VERSION_SEEN=$(node -p "require('$WORK/pm2/node_modules/pm2/package.json').version")

  OHA=$(command -v oha || true)
  [[ -z $OHA && -x $HOME/.cargo/bin/oha ]] && OHA=$HOME/.cargo/bin/oha
  if [[ -z $OHA ]]; then
    log "installing oha (cargo install oha --locked, several minutes)"
    timeout 1800 cargo install oha --locked >&2
    OHA=$HOME/.cargo/bin/oha
  fi

  WRK=$(command -v wrk || true)
  if [[ -z $WRK ]] && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    log "installing wrk from apt"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null || true
    WRK=$(command -v wrk || true)
  fi
  [[ -n $WRK ]] || log "wrk not found (apt-get install wrk): the throughput phase measures with oha only"

  log "building nodeherd (cargo build --release)"
  (cd "$ROOT" && timeout 1800 cargo build --release --quiet >&2)
  NH=$ROOT/target/release/nodeherd
}

# bench_bus: a private system-type bus with an allow-all policy in $RUN, for
# nodeherd's control plane; sets BUS (its address) and DBUS_PID.
bench_bus() {
  cat >"$RUN/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$RUN/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
EOF
  { read -r BUS; read -r DBUS_PID; } < <(timeout 10 dbus-daemon --config-file="$RUN/bus.conf" --fork --print-address=1 --print-pid=1)
  [[ -n $BUS && -n $DBUS_PID ]] || die "dbus-daemon did not start"
}
