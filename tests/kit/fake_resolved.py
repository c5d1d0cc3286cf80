"""A stand-in for systemd-resolved on a test's private bus: only what
qubes-setup-dnat-to-ns reads, the `DNS` property (a(iiay)) of
org.freedesktop.resolve1.Manager at /org/freedesktop/resolve1.

    fake_resolved.py BUS_ADDRESS [--json FILE] [IFINDEX=ADDRESS ...]

Servers are IFINDEX=ADDRESS words (ifindex 0: global, else per-link) and/or a
JSON file holding [[ifindex, "address"], ...]; IPv4 and IPv6 may be mixed, the
family (2 or 10) follows the address.  No server at all is allowed.

Prints "ready" once it owns the name (the test waits for it), answers until
SIGTERM/SIGINT or until the bus goes away, then exits 0.  With
FAKE_RESOLVED_LOG set, appends one line per call ("Get <iface> <prop>") so a
test can prove the program asked this bus and not another one.
"""

import argparse
import ipaddress
import json
import os
import signal
import sys

from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

NAME = "org.freedesktop.resolve1"
PATH = "/org/freedesktop/resolve1"
MANAGER = "org.freedesktop.resolve1.Manager"
PROPS = "org.freedesktop.DBus.Properties"
ERR = "org.freedesktop.DBus.Error."


def parse_servers(words: list[str], json_file: str | None) -> list[tuple[int, int, bytes]]:
    pairs = [(int(i), a) for i, a in (w.split("=", 1) for w in words)]
    if json_file:
        with open(json_file, encoding="utf-8") as handle:
            pairs += [(int(i), str(a)) for i, a in json.load(handle)]
    out = []
    for ifindex, text in pairs:
        addr = ipaddress.ip_address(text)
        out.append((ifindex, 2 if addr.version == 4 else 10, addr.packed))
    return out


def reply_to(msg, servers):
    """The reply to one method call: the property, or the D-Bus error resolved would give."""
    hdr = msg.header.fields
    iface, member = hdr.get(HeaderFields.interface), hdr.get(HeaderFields.member)
    if hdr.get(HeaderFields.path) != PATH:
        return new_error(msg, ERR + "UnknownObject", "s", (f"no object {hdr.get(HeaderFields.path)}",))
    value = ("a(iiay)", servers)
    if iface == PROPS and member == "Get":
        want_iface, prop = msg.body
        if want_iface != MANAGER or prop != "DNS":
            return new_error(msg, ERR + "UnknownProperty", "s", (f"no property {want_iface}.{prop}",))
        return new_method_return(msg, "v", (value,))
    if iface == PROPS and member == "GetAll":
        props = {"DNS": value} if msg.body[0] in (MANAGER, "") else {}
        return new_method_return(msg, "a{sv}", (props,))
    return new_error(msg, ERR + "UnknownMethod", "s", (f"no method {iface}.{member}",))


def _stop(signum, frame):
    raise SystemExit(0)  # unwinds through `with conn`, which closes the socket


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bus")
    parser.add_argument("--json", dest="json_file")
    parser.add_argument("servers", nargs="*", metavar="IFINDEX=ADDRESS")
    args = parser.parse_args(argv)
    servers = parse_servers(args.servers, args.json_file)
    log_path = os.environ.get("FAKE_RESOLVED_LOG")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    with open_dbus_connection(args.bus) as conn:
        # flags 4: DO_NOT_QUEUE, so a second owner fails here instead of waiting silently
        code, = conn.send_and_get_reply(message_bus.RequestName(NAME, 4), timeout=5).body
        if code != 1:  # 1: primary owner
            print(f"fake_resolved: could not own {NAME} (RequestName -> {code})", file=sys.stderr)
            return 1
        print("ready", flush=True)
        while True:
            try:
                msg = conn.receive()
            except (ConnectionError, EOFError, OSError):
                return 0  # the bus went away: nothing left to serve
            if msg.header.message_type != MessageType.method_call:
                continue  # NameAcquired and other signals
            if log_path:
                with open(log_path, "a", encoding="utf-8") as log:
                    body = " ".join(str(x) for x in msg.body)
                    log.write(f"{msg.header.fields.get(HeaderFields.member)} {body}\n")
            conn.send(reply_to(msg, servers))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
