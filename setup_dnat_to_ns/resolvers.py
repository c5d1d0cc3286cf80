"""Where the real (upstream) resolvers come from: resolv.conf, or systemd-resolved.

Only IPv4 servers are used (the VMs' virtual DNS addresses are IPv4).  Text
from either source is untrusted: anything that is not a plain IPv4 unicast
address is skipped, never passed on.
"""

import ipaddress
import json

from vif_route_qubes import logsetup
from vif_route_qubes.system import tools

log = logsetup.get_logger("qubes-setup-dnat-to-ns")
RESOLVED_STUB = ipaddress.IPv4Address("127.0.0.53")
MAX_SERVERS = 16
MAX_REPLY = 64 * 1024  # bytes of busctl JSON; far more than any real server list


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        return None
    if addr.is_multicast or addr.is_unspecified or addr.is_reserved:
        return None
    return addr


def parse_resolv_conf(text: str) -> tuple[ipaddress.IPv4Address, ...]:
    """IPv4 `nameserver` addresses in order, duplicates dropped."""
    found: dict[ipaddress.IPv4Address, None] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) != 2 or words[0] != "nameserver":
            continue
        addr = _ipv4(words[1])
        if addr is not None and len(found) < MAX_SERVERS:
            found.setdefault(addr, None)
    return tuple(found)


def read_resolv_conf(path: str) -> tuple[ipaddress.IPv4Address, ...]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_resolv_conf(handle.read(1 << 20))
    except FileNotFoundError:
        return ()
    except OSError as exc:
        log.error("cannot read %s: %s", path, exc.strerror)
        return ()


def parse_resolved_dns(reply: str) -> tuple[ipaddress.IPv4Address, ...]:
    """The `DNS` property of org.freedesktop.resolve1.Manager, as busctl --json=short
    prints it (a(iiay): ifindex, family, address bytes).  Global servers
    (ifindex 0) when there are any, else the per-link ones."""
    if len(reply) > MAX_REPLY:
        log.error("systemd-resolved: DNS property reply too large (%d bytes)", len(reply))
        return ()
    try:
        data = json.loads(reply)["data"]
    except (ValueError, KeyError, TypeError, RecursionError):
        log.error("systemd-resolved: unreadable DNS property")
        return ()
    global_servers: dict = {}
    link_servers: dict = {}
    for entry in data if isinstance(data, list) else []:
        if not (isinstance(entry, list) and len(entry) == 3):
            continue
        ifindex, family, raw = entry
        if family != 2 or not isinstance(raw, list) or len(raw) != 4 or not isinstance(ifindex, int):
            continue
        if not all(isinstance(b, int) and 0 <= b <= 255 for b in raw):
            continue
        addr = _ipv4(".".join(str(b) for b in raw))
        if addr is None or addr == RESOLVED_STUB:
            continue
        (global_servers if ifindex == 0 else link_servers).setdefault(addr, None)
    chosen = global_servers or link_servers
    return tuple(chosen)[:MAX_SERVERS]


def read_resolved() -> tuple[ipaddress.IPv4Address, ...]:
    argv = ["busctl", "--system", "--json=short", "get-property", "org.freedesktop.resolve1",
            "/org/freedesktop/resolve1", "org.freedesktop.resolve1.Manager", "DNS"]
    try:
        result = tools.run(argv, timeout=10, check=False)
    except tools.ToolMissing:
        log.error("resolv.conf points at systemd-resolved, but busctl is not installed")
        return ()
    except tools.ToolTimeout:
        log.error("systemd-resolved did not answer within 10 s")
        return ()
    if result.exit_code != 0:
        log.error("systemd-resolved: %s", tools.one_line(result.stderr, 200))
        return ()
    return parse_resolved_dns(result.stdout)


def upstream_servers(resolv_conf: str) -> tuple[ipaddress.IPv4Address, ...]:
    servers = read_resolv_conf(resolv_conf)
    if RESOLVED_STUB in servers:
        servers = read_resolved()
    # A forwarded query cannot be DNATed to a loopback address.
    skipped = [str(a) for a in servers if a.is_loopback]
    if skipped:
        log.warning("skipping loopback resolvers %s", ", ".join(skipped))
    return tuple(a for a in servers if not a.is_loopback)
