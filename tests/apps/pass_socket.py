#!/usr/bin/env python3
"""Hand a listening socket over the way systemd does, then exec a command.

    pass_socket.py [--reuseport] [--as-uid UID] HOST:PORT -- COMMAND...

Binds and listens on HOST:PORT (with SO_REUSEPORT when asked; created
while running as UID when asked, so its owner is that user, as a socket
systemd makes belongs to root), puts it at fd 3 and execs COMMAND in this
same process with LISTEN_FDS=1, LISTEN_PID=<this pid>, LISTEN_FDNAMES=main.
Prints the port on stderr first: `port N`.
"""
import os
import socket
import sys

args = sys.argv[1:]
reuseport = False
as_uid = None
while args and args[0].startswith("--"):
    if args[0] == "--reuseport":
        reuseport = True
        args = args[1:]
    elif args[0] == "--as-uid":
        as_uid = int(args[1])
        args = args[2:]
    else:
        break
addr, sep, command = args[0], args[1], args[2:]
assert sep == "--" and command, __doc__
host, port = addr.rsplit(":", 1)

if as_uid is not None:
    os.setresuid(as_uid, as_uid, 0)  # keep root as the saved uid to come back
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
if reuseport:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind((host, int(port)))
s.listen(128)
if as_uid is not None:
    os.setresuid(0, 0, 0)
print(f"port {s.getsockname()[1]}", file=sys.stderr, flush=True)
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="main")
os.execvp(command[0], command)
