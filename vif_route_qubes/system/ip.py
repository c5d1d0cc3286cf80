"""The kernel operations of the project, one small function each, over pyroute2.

In the manner of OpenStack Neutron's privileged ip_lib: plain values in
(names, address strings, integers), pyroute2's NetlinkError mapped once to
OSError (so callers report `strerror`), and "already there" / "already gone"
tolerated here, in the operation, not by each caller.  Additions are
`replace` requests (idempotent); deletions ignore what is already gone.
Requests are those of `ip ...` (proto boot, link scope for an IPv4 device
route), so a dry-run script and a real run leave the same state.

One rtnetlink socket per process (with strict checking: dumps filtered by
the kernel to one interface), opened on first use; close() ends it.
"""

import errno
import functools
import os
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

# Errors that mean "already as asked" for a deletion.
GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENXIO, errno.EINVAL})
RT_TABLE_MAIN, RTPROT_KERNEL, RTN_UNICAST, NUD_PERMANENT = 254, 2, 1, 0x80
FULL = {socket.AF_INET: 32, socket.AF_INET6: 128}

# Opened by the event that needs it.  The command server never opens it (it only
# imports before forking), so each served child starts with none.
_ipr: IPRoute | None = None


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _version(family: int) -> int:
    return 6 if family == socket.AF_INET6 else 4


def _socket() -> IPRoute:
    global _ipr
    if _ipr is None:
        _ipr = IPRoute(strict_check=True)
    return _ipr


def close() -> None:
    global _ipr
    if _ipr is not None:
        _ipr.close()
    _ipr = None


def _oserror(exc: NetlinkError) -> OSError:
    return OSError(exc.code, os.strerror(exc.code) if exc.code else str(exc))


def _netlink(gone_is_success: bool = False):
    """NetlinkError -> OSError, once for every operation; for a deletion
    (`gone_is_success`) what is already gone is success."""
    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except NetlinkError as exc:
                if not (gone_is_success and exc.code in GONE):
                    raise _oserror(exc) from None
        return wrapper
    return decorate


_mapped = _netlink()
_tolerant = _netlink(gone_is_success=True)


# -- links ----------------------------------------------------------------

def link_index(ifname: str) -> int | None:
    """The interface's index, None when there is no such interface."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


@_mapped
def link_set_group(index: int, group: int) -> None:
    _socket().link("set", index=index, group=group)


@_mapped
def link_set_up(index: int, up: bool) -> None:
    _socket().link("set", index=index, state="up" if up else "down")


@_mapped
def link_rename(index: int, name: str) -> None:
    _socket().link("set", index=index, ifname=name)


@_mapped
def links_in_group(group: int) -> list[str]:
    """Names of the interfaces in an interface group (one dump)."""
    return [link.get_attr("IFLA_IFNAME") for link in _socket().link("dump")
            if link.get_attr("IFLA_GROUP") == group]


@_mapped
def link_move_to_netns(index: int, netns: str) -> None:
    """Into the named namespace (/run/netns/NAME, as `ip link set ... netns NAME`)."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _socket().link("set", index=index, net_ns_fd=fd)
    finally:
        os.close(fd)


@_mapped
def link_return_from_netns(netns: str, ifname: str) -> None:
    """Move an interface of the named namespace into ours (over a socket opened there)."""
    with IPRoute(netns=netns, flags=0) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise OSError(errno.ENODEV, f"no {ifname} in namespace {netns}")
        ipr.link("set", index=found[0], net_ns_pid=os.getpid())


@_mapped
def veth_add(ifname: str, address: str, peer: str, peer_address: str | None, netns: str) -> None:
    """A veth pair, its peer created straight in the named namespace."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        far = {"ifname": peer, "net_ns_fd": fd, **({"address": peer_address} if peer_address else {})}
        _socket().link("add", ifname=ifname, address=address, kind="veth", peer=far)
    finally:
        os.close(fd)


@_tolerant
def link_del(index: int) -> None:
    _socket().link("del", index=index)


@_mapped
def link_in_netns(netns: str, ifname: str) -> bool:
    """Whether the named namespace holds the interface (the namespace must exist)."""
    # flags=0: never create the namespace (pyroute2 would by default).
    with IPRoute(netns=netns, flags=0) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


# -- addresses, routes, neighbours ------------------------------------------

@_mapped
def addr_replace(index: int, address: str, prefixlen: int) -> None:
    _socket().addr("replace", index=index, address=address, prefixlen=prefixlen, family=_family(address))


@_tolerant
def addr_del(index: int, address: str, prefixlen: int) -> None:
    _socket().addr("del", index=index, address=address, prefixlen=prefixlen, family=_family(address))


def _route(address: str, index: int, metric: int) -> dict:
    family = _family(address)
    return dict(dst=f"{address}/{FULL[family]}", oif=index, priority=metric, family=family, table=RT_TABLE_MAIN)


@_mapped
def route_replace(index: int, address: str, metric: int) -> None:
    # As `ip route replace ADDR dev IF metric M` asks: proto boot, link scope for IPv4.
    scope = "link" if _family(address) == socket.AF_INET else "universe"
    _socket().route("replace", proto="boot", scope=scope, **_route(address, index, metric))


@_tolerant
def route_del(index: int, address: str, metric: int) -> None:
    # Scope "nowhere": any scope matches (pyroute2's default, universe, would miss a link-scope route).
    _socket().route("del", scope=255, **_route(address, index, metric))


def route_dev(address: str) -> str | None:
    """The interface the kernel routes `address` through now (`ip route get`),
    None when it routes it through none (no route, unreachable)."""
    try:
        found = _socket().route("get", dst=address, family=_family(address))
    except NetlinkError:
        return None
    for msg in found:
        oif = msg.get_attr("RTA_OIF")
        if oif:
            try:
                return socket.if_indextoname(oif)
            except OSError:
                return None
    return None


@_mapped
def neigh_replace(index: int, address: str, mac: str) -> None:
    _socket().neigh("replace", ifindex=index, dst=address, lladdr=mac, state="permanent", family=_family(address))


@_tolerant
def neigh_del(index: int, address: str) -> None:
    _socket().neigh("del", ifindex=index, dst=address, family=_family(address))


@_mapped
def link_addresses(index: int) -> list[tuple[int, str, int]]:
    """(IP version, address, prefix length) of one interface's addresses (a dump
    the kernel filters, see host_routes for dump_filter={})."""
    return [(_version(a["family"]), a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in _socket().addr("dump", index=index, dump_filter={})
            if a["index"] == index and a["family"] in FULL and (a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))]


@_mapped
def host_routes(index: int) -> list[tuple[int, str, int]]:
    """(IP version, address, metric) of the main table's host routes out of one
    interface (a dump the kernel filters), but for the kernel's own."""
    found = []
    # dump_filter={}: pyroute2 then puts oif and table into the request, and the kernel
    # (strict_check) filters; as plain arguments they filter in Python, after a dump
    # of every route (~15 ms with 400 vifs).
    for route in _socket().route("dump", oif=index, table=RT_TABLE_MAIN, dump_filter={}):
        family, dst = route["family"], route.get_attr("RTA_DST")
        if (route["dst_len"] != FULL.get(family) or route["type"] != RTN_UNICAST or dst is None
                or route["proto"] == RTPROT_KERNEL or route.get_attr("RTA_OIF") != index
                or (route.get_attr("RTA_TABLE") or route["table"]) != RT_TABLE_MAIN):
            continue
        found.append((_version(family), dst, route.get_attr("RTA_PRIORITY") or 0))
    return found


@_mapped
def permanent_neighbours(index: int) -> list[tuple[int, str]]:
    """(IP version, address) of the permanent neighbour entries of one interface."""
    # The kernel filters by NDA_IFINDEX (see host_routes for dump_filter={}).
    return [(_version(n["family"]), n.get_attr("NDA_DST")) for n in _socket().neigh("dump", NDA_IFINDEX=index,
                                                                                     dump_filter={})
            if n["ifindex"] == index and n["state"] & NUD_PERMANENT and n.get_attr("NDA_DST")
            and n["family"] in FULL]


# -- nftables and connection tracking -----------------------------------------

def nft_table_exists(name: str, version: int) -> bool:
    """Whether the nftables table `ip NAME` (or `ip6 NAME`) exists (False when
    nftables cannot be asked at all)."""
    from pyroute2.nftables.main import NFTables  # start-up: this part of pyroute2 only when used

    try:
        # A dump of the family's tables (few): table("get") of pyroute2 0.9.7 fails (a coroutine not awaited).
        with NFTables(nfgen_family=10 if version == 6 else 2) as nft:  # NFPROTO_IPV6, NFPROTO_IPV4
            return any(table.get_attr("NFTA_TABLE_NAME") == name for table in nft.get_tables())
    except (NetlinkError, OSError):
        return False


def _conntrack_count() -> int | None:
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def _ct_addresses(entry, family: int) -> set[str]:
    """Original source and destination, reply source of a dumped entry."""
    key = "CTA_IP_V6" if family == socket.AF_INET6 else "CTA_IP_V4"
    found = set()
    for tuple_name, ends in (("CTA_TUPLE_ORIG", ("_SRC", "_DST")), ("CTA_TUPLE_REPLY", ("_SRC",))):
        ip = (entry.get_attr(tuple_name) or {}).get_attr("CTA_TUPLE_IP") if entry.get_attr(tuple_name) else None
        if ip is not None:
            found.update(ip.get_attr(key + end) for end in ends)
    return found


def _nested(nla) -> dict:
    """A decoded nested attribute in the form pyroute2 encodes again."""
    return {"attrs": [[name, _nested(value) if hasattr(value, "get_attr") else value]
                      for name, value in nla["attrs"]]}


@_mapped
def conntrack_purge(addresses) -> int:
    """Delete every conntrack entry whose original source or destination, or
    reply source, is one of `addresses` (IPv4 or IPv6).  One dump per family;
    each entry is deleted by its own original tuple, id and zone as the kernel
    gave them, so nothing else can be hit.  Returns how many were deleted."""
    if _conntrack_count() == 0:
        return 0  # the namespace's table is empty: skip the walk
    from pyroute2 import Conntrack  # start-up: this part of pyroute2 only when used

    deleted = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        wanted = {a for a in addresses if _family(a) == family}
        if not wanted:
            continue
        try:
            ct = Conntrack(nfgen_family=family)
        except OSError as exc:
            if exc.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
                return deleted  # no netfilter netlink in this kernel
            raise
        with ct:
            try:
                entries = [e for e in ct.dump() if _ct_addresses(e, family) & wanted]
            except NetlinkError as exc:
                if exc.code in GONE | {errno.EOPNOTSUPP}:
                    return deleted  # no connection tracking here
                raise
            for entry in entries:
                which = {"tuple_orig": _nested(entry.get_attr("CTA_TUPLE_ORIG")),
                         "id": entry.get_attr("CTA_ID"), "zone": entry.get_attr("CTA_ZONE")}
                try:
                    ct.entry("del", **{k: v for k, v in which.items() if v is not None})
                    deleted += 1
                except NetlinkError as exc:
                    if exc.code not in GONE:
                        raise
    return deleted
