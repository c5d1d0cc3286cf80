"""Where the real (upstream) resolvers come from: resolv.conf, or systemd-resolved.

IPv4 and IPv6 servers, each family for the virtual DNS addresses of its own
family.  Text from either source is untrusted: anything that is not a plain
unicast address is skipped, never passed on.  A link-local IPv6 server
(fe80::/10) means something only with its interface, which a DNAT target
cannot carry: it is skipped, with a log line.
"""

import ipaddress
import json

from vif_route_qubes import logsetup
from vif_route_qubes.system import tools

log = logsetup.get_logger("qubes-setup-dnat-to-ns")
RESOLVED_STUB = ipaddress.IPv4Address("127.0.0.53")
MAX_SERVERS = 16
MAX_REPLY = 64 * 1024  # bytes of busctl JSON; far more than any real server list


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
RAW_SIZE = {2: 4, 10: 16}  # resolved's family (AF_INET, AF_INET6) -> address bytes


def _unicast(text: str) -> Address | None:
    if "%" in text:  # a zone index ("fe80::1%eth0"): ipaddress would keep it in the address
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.is_multicast or addr.is_unspecified or (addr.version == 4 and addr.is_reserved):
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return None
    return addr


def parse_resolv_conf(text: str) -> tuple[Address, ...]:
    """`nameserver` addresses in order, duplicates dropped."""
    found: dict[Address, None] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) != 2 or words[0] != "nameserver":
            continue
        text, zoned, _ = words[1].partition("%")
        addr = _unicast(text)
        if zoned and not (addr is not None and _link_local6(addr)):
            continue  # a zone index means something only on a link-local address
        if addr is not None and len(found) < MAX_SERVERS:
            found.setdefault(addr, None)
    return tuple(found)


def read_resolv_conf(path: str) -> tuple[Address, ...]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_resolv_conf(handle.read(1 << 20))
    except FileNotFoundError:
        return ()
    except OSError as exc:
        log.error("cannot read %s: %s", path, exc.strerror)
        return ()


def parse_resolved_dns(reply: str) -> tuple[Address, ...]:
    """The `DNS` property of org.freedesktop.resolve1.Manager, as busctl --json=short
    prints it (a(iiay): ifindex, family, address bytes).  Per family: its global
    servers (ifindex 0) when there are any, else its per-link ones."""
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
        if type(family) is not int or family not in RAW_SIZE or not isinstance(raw, list) \
                or len(raw) != RAW_SIZE[family]:
            continue
        if not isinstance(ifindex, int) or not all(isinstance(b, int) and 0 <= b <= 255 for b in raw):
            continue
        addr = _unicast(str(ipaddress.ip_address(bytes(raw))))
        if addr is None or addr == RESOLVED_STUB:
            continue
        (global_servers if ifindex == 0 else link_servers).setdefault(addr, None)
    chosen: list[Address] = []
    for version in (4, 6):
        of_family = [a for a in global_servers if a.version == version]
        chosen += (of_family or [a for a in link_servers if a.version == version])[:MAX_SERVERS]
    return tuple(chosen)


def read_resolved() -> tuple[Address, ...]:
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


def upstream_servers(resolv_conf: str) -> tuple[Address, ...]:
    servers = read_resolv_conf(resolv_conf)
    if RESOLVED_STUB in servers:
        servers = read_resolved()
    # A forwarded query cannot be DNATed to a loopback address, nor to a
    # link-local one (the target would need an interface).
    for what, test in (("loopback", lambda a: a.is_loopback), ("link-local", _link_local6)):
        skipped = [str(a) for a in servers if test(a)]
        if skipped:
            log.warning("skipping %s resolvers %s", what, ", ".join(skipped))
    return tuple(a for a in servers if not (a.is_loopback or _link_local6(a)))


def _link_local6(addr: Address) -> bool:
    return addr.version == 6 and addr.is_link_local
