#!/usr/bin/env python3
"""Soak: many reloads and many worker crashes against one manager.

Shows that the manager's open fds, threads and RSS stay flat: measured after
a warm-up, and again at the end. Reloads go through the D-Bus client (each
waits for its swap); crashes are kill -9 of a ready worker, each waited on
until its slot serves again.

Usage: tests/soak/soak.py [path/to/nodeherd] [--reloads N] [--crashes N]
Prints a plain closing line `N passed, N failed`.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(what, timeout, f):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = f()
        if v:
            return v
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def sample(pid):
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = open(f"/proc/{pid}/status").read()
    field = lambda k: int(next(l for l in status.splitlines() if l.startswith(k)).split()[1])
    return {"fds": fds, "threads": field("Threads:"), "rss_kib": field("VmRSS:")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin", nargs="?", default=os.path.join(ROOT, "target/release/nodeherd"))
    ap.add_argument("--reloads", type=int, default=500)
    ap.add_argument("--crashes", type=int, default=500)
    ap.add_argument("--rss-bound-kib", type=int, default=1024)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="nodeherd-soak.")
    started = []
    try:
        conf = os.path.join(work, "bus.conf")
        with open(conf, "w") as f:
            f.write(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={work}/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy>
</busconfig>""")
        out = subprocess.run(["dbus-daemon", f"--config-file={conf}", "--fork", "--print-address=1", "--print-pid=1"],
                             capture_output=True, text=True, check=True).stdout.split()
        bus, bus_pid = out[0].split(",guid=")[0], int(out[1])
        started.append(bus_pid)

        port = free_port()
        eco = os.path.join(work, "soak.json")
        with open(eco, "w") as f:
            json.dump({"apps": [{"name": "soak", "script": os.path.join(ROOT, "examples/hello/app.js"),
                                  "instances": 2, "min_uptime": 0, "kill_timeout": 1000}]}, f)
        log = open(os.path.join(work, "manager.log"), "w")
        m = subprocess.Popen([args.bin, "run", eco, "--listen", f"127.0.0.1:{port}", "--bus", bus],
                             stdout=log, stderr=subprocess.STDOUT)
        started.append(m.pid)

        def status():
            r = subprocess.run([args.bin, "status", "soak", "--json", "--bus", bus], capture_output=True, text=True)
            return json.loads(r.stdout) if r.returncode == 0 else None

        def all_ready():
            s = status()
            return s if s and s["ready_workers"] == 2 and s["state"] == "ready" and len(s["workers"]) == 2 else None

        wait_until("2 ready workers", 30, all_ready)
        for _ in range(10):  # warm-up: allocator and runtime reach their steady size
            subprocess.run([args.bin, "reload", "soak", "--bus", bus], check=True, capture_output=True)
        wait_until("2 ready workers", 30, all_ready)
        before = sample(m.pid)
        t0 = time.monotonic()
        for i in range(args.reloads):
            r = subprocess.run([args.bin, "reload", "soak", "--bus", bus], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"reload {i} failed: {r.stderr}")
        t_reload = time.monotonic() - t0
        t0 = time.monotonic()
        for i in range(args.crashes):
            s = wait_until("2 ready workers", 30, all_ready)
            victim = s["workers"][i % 2]["pid"]
            os.kill(victim, signal.SIGKILL)
            wait_until(f"slot {i % 2} refilled", 30,
                       lambda: (lambda s: s and all(w["pid"] != victim for w in s["workers"]) and s["ready_workers"] == 2)(status()))
        t_crash = time.monotonic() - t0
        wait_until("2 ready workers", 30, all_ready)
        time.sleep(0.5)
        after = sample(m.pid)
        print(f"{args.reloads} reloads in {t_reload:.1f} s, {args.crashes} crashes in {t_crash:.1f} s")
        print(f"before: {before}")
        print(f"after:  {after}")
        checks = {
            "open fds flat": after["fds"] == before["fds"],
            # No growth: the main thread, the log writer, and tokio's blocking
            # pool (reloads read the configuration there; idle threads leave
            # after 10 s), so fewer after than before is fine.
            "threads not growing (at most 1 more)": after["threads"] <= before["threads"] + 1 and after["threads"] <= 6,
            f"RSS within {args.rss_bound_kib} KiB": after["rss_kib"] - before["rss_kib"] <= args.rss_bound_kib,
        }
        for name, ok in checks.items():
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
        failed = sum(1 for ok in checks.values() if not ok)
        print(f"{len(checks) - failed} passed, {failed} failed")
        return 1 if failed else 0
    finally:
        for pid in reversed(started):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    sys.exit(main())
