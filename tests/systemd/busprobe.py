#!/usr/bin/python3
"""Small D-Bus client and name owner for testing the org.nodeherd bus policy.

    busprobe.py ADDRESS own NAME
        Own NAME and serve /org/nodeherd with the method and property names of
        org.nodeherd.Manager1, until SIGTERM. Prints "ready" once the name is
        owned; prints the D-Bus error name and exits 1 if owning it is refused.
    busprobe.py ADDRESS try-own NAME
        Ask for NAME and give it back; prints OK or the D-Bus error name.
    busprobe.py ADDRESS call NAME PATH INTERFACE METHOD [ARG...]
        One method call. INTERFACE "-" sends no interface field. ARGs are
        passed as strings, or as int32 with an "i:" prefix. Prints "OK <reply>"
        or the D-Bus error name; exit 0 either way, 2 for a transport error.

The owner is a stand-in for the real daemon: the bus policy decides on the
message header (destination, interface, member) before the owner sees it,
so what is exercised here is dbus-daemon and the policy file, not this code.
Uses /usr/bin/python3 on purpose: python3-dbus is a Debian package.
"""

import signal
import sys

import dbus
import dbus.service

IFACE = "org.nodeherd.Manager1"
PROPS = "org.freedesktop.DBus.Properties"


def connect(address):
    return dbus.bus.BusConnection(address)


def plain(v):
    """dbus-python values as plain Python ones, for printing."""
    if isinstance(v, dbus.Dictionary):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (dbus.Array, dbus.Struct, list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (dbus.String, dbus.ObjectPath, dbus.Signature)):
        return str(v)
    if isinstance(v, dbus.Boolean):
        return bool(v)
    if isinstance(v, (int, dbus.Byte)):
        return int(v)
    return v


def error_name(exc):
    return exc.get_dbus_name() or "UnknownError"


class Manager(dbus.service.Object):
    def __init__(self, conn):
        super().__init__(conn, "/org/nodeherd")
        self.instances = 2

    @dbus.service.method(IFACE, in_signature="", out_signature="")
    def Reload(self):
        pass

    @dbus.service.method(IFACE, in_signature="", out_signature="")
    def Restart(self):
        pass

    @dbus.service.method(IFACE, in_signature="i", out_signature="i")
    def Scale(self, n):
        self.instances = int(n)
        return self.instances

    @dbus.service.method(IFACE, in_signature="i", out_signature="i")
    def ScaleBy(self, d):
        self.instances += int(d)
        return self.instances

    def _all(self):
        return {"Name": dbus.String("probe"), "Instances": dbus.Int32(self.instances)}

    @dbus.service.method(PROPS, in_signature="ss", out_signature="v")
    def Get(self, iface, prop):
        return self._all()[prop]

    @dbus.service.method(PROPS, in_signature="s", out_signature="a{sv}")
    def GetAll(self, iface):
        return self._all()

    @dbus.service.method(PROPS, in_signature="ssv", out_signature="")
    def Set(self, iface, prop, value):
        raise dbus.exceptions.DBusException("read-only", name="org.nodeherd.Error.InvalidArgument")


def own(address, name):
    import dbus.mainloop.glib
    from gi.repository import GLib

    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    conn = dbus.bus.BusConnection(address)
    try:
        reply = conn.request_name(name, dbus.bus.NAME_FLAG_DO_NOT_QUEUE)
    except dbus.exceptions.DBusException as e:
        print(error_name(e))
        return 1
    if reply != dbus.bus.REQUEST_NAME_REPLY_PRIMARY_OWNER:
        print("NotPrimaryOwner")
        return 1
    Manager(conn)
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    print("ready", flush=True)
    loop.run()
    return 0


def try_own(address, name):
    conn = connect(address)
    try:
        conn.request_name(name, dbus.bus.NAME_FLAG_DO_NOT_QUEUE)
        conn.release_name(name)
        print("OK")
    except dbus.exceptions.DBusException as e:
        print(error_name(e))
    return 0


def call(address, name, path, iface, method, args):
    conn = connect(address)
    vals = []
    for a in args:
        vals.append(dbus.Int32(int(a[2:])) if a.startswith("i:") else dbus.String(a))
    sig = "".join("i" if isinstance(v, dbus.Int32) else "s" for v in vals)
    try:
        reply = conn.call_blocking(name, path, None if iface == "-" else iface, method,
                                   sig, vals, timeout=10)
        print("OK" if reply is None else f"OK {plain(reply)}")
    except dbus.exceptions.DBusException as e:
        print(error_name(e))
    return 0


def main(argv):
    if len(argv) == 4 and argv[2] == "own":
        return own(argv[1], argv[3])
    if len(argv) == 4 and argv[2] == "try-own":
        return try_own(argv[1], argv[3])
    if len(argv) >= 7 and argv[2] == "call":
        return call(argv[1], argv[3], argv[4], argv[5], argv[6], argv[7:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except dbus.exceptions.DBusException as e:
        print("transport error:", e, file=sys.stderr)
        sys.exit(2)
