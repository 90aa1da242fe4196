# Shared by the load tests: a private dbus-daemon, and oha's verdict.
# Source it after setting up `work` (a scratch directory) and `pids` (what
# the script's cleanup kills).

# private_bus: start a dbus-daemon that allows everything on $work/bus.sock;
# sets BUS to its address and adds its pid to pids.
private_bus() {
  cat > "$work/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$work/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
CONF
  local out
  mapfile -t out < <(dbus-daemon --config-file="$work/bus.conf" --fork --print-address=1 --print-pid=1)
  BUS=${out[0]}
  pids+=("${out[1]}")
}

# oha_verdict JSON LABEL [WHILE]: print oha's result and fail (status 1) on
# any failed request or none answered. Failed: every error but "aborted due
# to deadline" (what is open when oha stops), and every non-2xx answer.
oha_verdict() {
  python3 - "$1" "$2" "${3:-}" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
label, during = sys.argv[2], sys.argv[3]
codes = d.get("statusCodeDistribution", {})
errors = {k: v for k, v in d.get("errorDistribution", {}).items() if "aborted due to deadline" not in k}
ok = sum(v for k, v in codes.items() if k.startswith("2"))
bad_status = sum(v for k, v in codes.items() if not k.startswith("2"))
failed = sum(errors.values()) + bad_status
total = ok + failed
print(f"{label}: {total} requests, {ok} ok, {failed} failed (errors {errors or 'none'}, non-2xx {bad_status}), "
      f"{d['summary']['requestsPerSec']:.0f} req/s{', ' + during if during else ''}")
sys.exit(1 if failed or ok == 0 else 0)
PY
}
