#!/bin/sh
# Roll a new release over a fleet of nodeherd hosts, one host at a time,
# without a failed request at the load balancer:
#
#   roll.sh [-a APP] [-p HEALTH_PORT] [-w SECONDS] [-c reload|restart]
#           [-d DEPLOY_COMMAND] [-P APP_PORT -e TEXT] HOST...
#
# For each HOST, in order:
#   1. deploy: run DEPLOY_COMMAND on the host, if given (unpack the
#      release, `apt-get install` the package, ...);
#   2. drain: `nodeherd drain APP`; the host's /health says 503 and the
#      balancer takes it out; wait until /health says so, then SECONDS more
#      (the balancer's check interval times its `fall`, and a margin);
#   3. `systemctl reload nodeherd@APP` (every worker replaced by one of the
#      new release, zero downtime), or with -c restart `systemctl restart`
#      (a new manager too: after a nodeherd upgrade that cannot re-exec, or
#      a host reboot's stand-in);
#   4. check: /health reports every worker ready (after a reload, under a
#      configuration generation one higher); with -P and -e, the app on the
#      host itself answers with TEXT in its body;
#   5. undrain: `nodeherd undrain APP`; wait until /health says 200, then
#      SECONDS more (the balancer's `rise`) before the next host.
# A step that fails stops the roll there, with that host left drained
# (`nodeherd undrain APP` on it puts it back), and exits 1.
#
# HOST is a name or address the balancer uses; /health is read at
# http://HOST:HEALTH_PORT/health from here (curl). Commands run on a host
# through $NODEHERD_REMOTE (default: ssh), called as
# `$NODEHERD_REMOTE HOST COMMAND ARGS...`.
#
# Plain POSIX sh: needs only curl here and nodeherd and systemctl there.

set -eu

app=web
port=9210
wait_s=1
how=reload
deploy=
app_port=
expect=
remote=${NODEHERD_REMOTE:-ssh}
# How long a host may take to drain, reload, restart or come back (s).
limit=${ROLL_TIMEOUT:-60}

usage() {
    sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while getopts a:p:w:c:d:P:e:h opt; do
    case $opt in
        a) app=$OPTARG ;;
        p) port=$OPTARG ;;
        w) wait_s=$OPTARG ;;
        c) how=$OPTARG ;;
        d) deploy=$OPTARG ;;
        P) app_port=$OPTARG ;;
        e) expect=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || usage
case $how in reload | restart) ;; *) echo "roll.sh: -c must be reload or restart, not '$how'" >&2; exit 2 ;; esac
if [ -n "$expect" ] && [ -z "$app_port" ]; then
    echo "roll.sh: -e needs -P (the port the app answers on)" >&2
    exit 2
fi

say() { printf '%s roll: %s\n' "$(date +%T)" "$*"; }
fail() {
    say "FAILED on $host: $*; $host is left drained (nodeherd undrain $app on it puts it back)"
    exit 1
}
on() { h=$1; shift; $remote "$h" "$@"; }

# health HOST: prints "STATUS BODY" of GET /health ("000" when unanswered).
health() {
    curl -s -m 2 -o /tmp/roll-health.$$ -w '%{http_code}' "http://$1:$port/health" 2>/dev/null || true
    printf ' '
    cat /tmp/roll-health.$$ 2>/dev/null || true
    rm -f /tmp/roll-health.$$
}

# field JSON NAME: a number or string field of nodeherd's one-line JSON.
field() {
    printf '%s\n' "$1" | sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p"
}

# await HOST DESCRIPTION TEST: poll until `TEST "$status" "$body"` holds.
await() {
    a_host=$1 a_what=$2 a_test=$3 a_end=$(($(date +%s) + limit))
    while :; do
        got=$(health "$a_host")
        a_status=${got%% *} a_body=${got#* }
        if $a_test "$a_status" "$a_body"; then return 0; fi
        [ "$(date +%s)" -lt "$a_end" ] || fail "$a_what not within ${limit}s (last: $got)"
        sleep 0.2
    done
}

is_503() { [ "$1" = 503 ]; }
is_200() { [ "$1" = 200 ]; }
all_ready() {
    [ -n "$2" ] && [ "$(field "$2" ready)" = "$(field "$2" instances)" ] && [ "$(field "$2" state)" != starting ] || return 1
    [ "$how" = restart ] || [ "$(field "$2" generation)" -gt "$generation" ]
}

for host in "$@"; do
    say "$host: begin ($how)"
    got=$(health "$host")
    generation=$(field "${got#* }" generation)
    [ -n "$generation" ] || fail "no /health answer at http://$host:$port/health (got: $got)"
    if [ -n "$deploy" ]; then
        on "$host" sh -c "$deploy" || fail "deploy command failed"
    fi
    on "$host" nodeherd drain "$app" >/dev/null || fail "nodeherd drain $app failed"
    await "$host" "/health 503 after drain" is_503
    say "$host: drained; waiting ${wait_s}s for the balancer"
    sleep "$wait_s"
    on "$host" systemctl "$how" "nodeherd@$app.service" || fail "systemctl $how nodeherd@$app failed"
    await "$host" "every worker ready after the $how" all_ready
    if [ -n "$expect" ]; then
        body=$(curl -s -m 5 "http://$host:$app_port/" || true)
        case $body in *"$expect"*) ;; *) fail "the app answers '$body', not '$expect'" ;; esac
    fi
    on "$host" nodeherd undrain "$app" >/dev/null || fail "nodeherd undrain $app failed"
    await "$host" "/health 200 after undrain" is_200
    say "$host: serving again; waiting ${wait_s}s for the balancer"
    sleep "$wait_s"
done
say "done: $# host(s)"
