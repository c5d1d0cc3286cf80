"""A small netlink client: the rtnetlink and ctnetlink requests the applier makes.

Why not pyroute2: importing it costs 60-150 ms here (it loads asyncio and its
whole API), more than the whole budget of a hotplug event; the dozen requests
below cost well under a millisecond to build with `struct`.  Requests follow
the kernel's uapi headers (linux/netlink.h, rtnetlink.h, neighbour.h,
netfilter/nfnetlink_conntrack.h) and are built the way iproute2 builds them,
so a dry-run script of `ip` commands and a real run leave the same state.
"""

import errno
import os
import socket
import struct

NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12

RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_DELADDR = 16, 18, 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE, RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 24, 25, 26, 28, 29, 30
IFF_UP = 0x1
IFLA_IFNAME, IFLA_GROUP = 3, 27
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_PRIORITY, RTA_TABLE = 1, 4, 6, 15
RT_TABLE_MAIN, RTPROT_KERNEL, RTPROT_BOOT, RTN_UNICAST = 254, 2, 3, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NUD_PERMANENT = 0x80

NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_NFTABLES = 1, 10
NFT_MSG_GETTABLE, NFTA_TABLE_NAME, NFT_MSG_GETGEN, NFTA_GEN_ID = 1, 1, 16, 1
NFPROTO = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ID, CTA_ZONE = 1, 2, 12, 18
CTA_TUPLE_IP = 1
CTA_IP_SOURCES = {1, 3}          # CTA_IP_V4_SRC, CTA_IP_V6_SRC
CTA_IP_ADDRS = {1, 2, 3, 4}      # ... and CTA_IP_V4_DST, CTA_IP_V6_DST

# Errors that mean "already as asked" for a tolerant delete.
GONE = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENXIO}


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _attrs(data: bytes):
    """(type without flags, payload) of each attribute in `data`."""
    offset = 0
    while offset + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4:
            break
        yield kind & 0x3FFF, data[offset + 4 : offset + size]
        offset += (size + 3) & ~3


def _raise_error(payload: bytes) -> None:
    """An NLMSG_ERROR answer: nothing for an acknowledgement, OSError for an error."""
    code = -struct.unpack_from("=i", payload)[0]
    if code:
        raise OSError(code, os.strerror(code))


def nft_msg(kind: int) -> int:
    """The netlink message type of an nf_tables message."""
    return (NFNL_SUBSYS_NFTABLES << 8) | kind


def nfgen(version: int) -> bytes:
    """The nfgenmsg header of an nf_tables request for IPv4 or IPv6."""
    return struct.pack("=BBH", NFPROTO[version], 0, 0)


def _family(version: int) -> int:
    return socket.AF_INET6 if version == 6 else socket.AF_INET


class Netlink:
    """One netlink socket; every request waits for its ACK (or its dump's end)."""

    def __init__(self, protocol: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        self.sock.bind((0, 0))
        self.seq = 0
        self.strict = False
        if protocol == NETLINK_ROUTE:
            # Dumps filtered by the kernel (one interface's routes and neighbours,
            # not every VM's); kernels before 4.20 refuse it and we filter alone.
            try:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
                self.strict = True
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()

    def _replies(self):
        """(type, sequence number, payload) of each message received, for as long as asked."""
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                size, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
                yield kind, seq, data[offset + 16 : offset + size]
                offset += (size + 3) & ~3

    def request(self, msg_type: int, flags: int, body: bytes) -> list[bytes]:
        """Send one request; return the payloads of the answers (dumps), raise OSError on error."""
        self.seq += 1
        header = struct.pack("=IHHII", 16 + len(body), msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, self.seq, 0)
        self.sock.send(header + body)
        answers = []
        for kind, seq, payload in self._replies():
            if seq != self.seq:
                continue
            if kind == NLMSG_ERROR:
                _raise_error(payload)
                return answers
            if kind == NLMSG_DONE:
                return answers
            answers.append(payload)

    def batch(self, head: bytes, begin: int, end: int, messages: list[tuple[int, bytes]]) -> None:
        """One nfnetlink batch (a transaction): every message is acknowledged;
        the first error is raised (the kernel then applied none of them)."""
        first = self.seq + 1
        parts = []
        for kind, body in [(begin, head), *messages, (end, head)]:
            self.seq += 1
            flags = NLM_F_REQUEST | (NLM_F_ACK if kind not in (begin, end) else 0)
            parts.append(struct.pack("=IHHII", 16 + len(body), kind, flags, self.seq, 0) + body)
        self.sock.send(b"".join(parts))
        waiting = set(range(first + 1, self.seq))
        self.sock.settimeout(10)
        replies = self._replies()
        while waiting:
            kind, seq, payload = next(replies)
            if kind == NLMSG_ERROR:
                _raise_error(payload)
                waiting.discard(seq)

    def has_table(self, name: str, version: int) -> bool:
        """Whether the nftables table `ip NAME` (or `ip6 NAME`) exists."""
        try:
            self.request(nft_msg(NFT_MSG_GETTABLE), 0, nfgen(version) + _attr(NFTA_TABLE_NAME, name.encode() + b"\0"))
            return True
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise

    def generation(self) -> int:
        """The nftables ruleset's generation: every committed change bumps it."""
        answer = self.request(nft_msg(NFT_MSG_GETGEN), 0, struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
        return struct.unpack(">I", dict(_attrs(answer[0][4:]))[NFTA_GEN_ID][:4])[0]

    # -- rtnetlink ----------------------------------------------------------

    def links_in_group(self, group: int) -> list[str]:
        """Names of the interfaces in an interface group (one dump)."""
        names = []
        for payload in self.request(RTM_GETLINK, NLM_F_DUMP, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)):
            attrs = dict(_attrs(payload[16:]))
            if IFLA_GROUP in attrs and struct.unpack("=I", attrs[IFLA_GROUP][:4])[0] == group:
                names.append(attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"))
        return names

    def host_routes(self, index: int) -> list[tuple[int, str, int]]:
        """(IP version, address, metric) of the main table's host routes out of one
        interface, but for those the kernel made for the interface's own addresses."""
        found = []
        only = _attr(RTA_OIF, struct.pack("=i", index)) if self.strict else b""
        for payload in self.request(RTM_GETROUTE, NLM_F_DUMP, struct.pack("=BBBBBBBBI", socket.AF_UNSPEC,
                                                                         0, 0, 0, 0, 0, 0, 0, 0) + only):
            family, dst_len, _, _, table, proto, _, kind, _ = struct.unpack_from("=BBBBBBBBI", payload)
            attrs = dict(_attrs(payload[12:]))
            table = struct.unpack("=I", attrs[RTA_TABLE][:4])[0] if RTA_TABLE in attrs else table
            full = {socket.AF_INET: 32, socket.AF_INET6: 128}.get(family)
            if (dst_len != full or table != RT_TABLE_MAIN or kind != RTN_UNICAST or RTA_DST not in attrs
                    or proto == RTPROT_KERNEL
                    or struct.unpack("=i", attrs.get(RTA_OIF, b"\0\0\0\0")[:4])[0] != index):
                continue
            metric = struct.unpack("=I", attrs[RTA_PRIORITY][:4])[0] if RTA_PRIORITY in attrs else 0
            found.append((6 if family == socket.AF_INET6 else 4, socket.inet_ntop(family, attrs[RTA_DST]), metric))
        return found

    def permanent_neighbours(self, index: int) -> list[tuple[int, str]]:
        """(IP version, address) of the permanent neighbour entries of one interface."""
        found = []
        only = _attr(NDA_IFINDEX, struct.pack("=I", index)) if self.strict else b""
        for payload in self.request(RTM_GETNEIGH, NLM_F_DUMP, struct.pack("=BxxxiHBB", socket.AF_UNSPEC,
                                                                          0, 0, 0, 0) + only):
            family, ifindex, state = struct.unpack_from("=BxxxiH", payload)
            attrs = dict(_attrs(payload[12:]))
            if ifindex == index and state & NUD_PERMANENT and NDA_DST in attrs and family in (socket.AF_INET,
                                                                                             socket.AF_INET6):
                found.append((6 if family == socket.AF_INET6 else 4, socket.inet_ntop(family, attrs[NDA_DST])))
        return found

    def link_set(self, index: int, *, up: bool | None = None, name: str | None = None,
                 group: int | None = None) -> None:
        flags = IFF_UP if up else 0
        change = IFF_UP if up is not None else 0
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)
        if name is not None:
            body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        if group is not None:
            body += _attr(IFLA_GROUP, struct.pack("=I", group))
        self.request(RTM_NEWLINK, 0, body)

    def addr(self, add: bool, index: int, version: int, address: str, prefixlen: int) -> None:
        family = _family(version)
        raw = socket.inet_pton(family, address)
        body = struct.pack("=BBBBI", family, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
        body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        if add:
            self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body)
        else:
            self.request(RTM_DELADDR, 0, body)

    def route(self, add: bool, index: int, version: int, address: str, metric: int) -> None:
        family = _family(version)
        plen = 128 if version == 6 else 32
        # As `ip route replace ADDR dev IF metric M`: link scope for an IPv4 device route.
        scope = (RT_SCOPE_LINK if version == 4 else RT_SCOPE_UNIVERSE) if add else RT_SCOPE_NOWHERE
        proto = RTPROT_BOOT if add else 0
        body = struct.pack("=BBBBBBBBI", family, plen, 0, 0, RT_TABLE_MAIN, proto, scope, RTN_UNICAST, 0)
        body += _attr(RTA_DST, socket.inet_pton(family, address))
        body += _attr(RTA_OIF, struct.pack("=i", index)) + _attr(RTA_PRIORITY, struct.pack("=I", metric))
        if add:
            self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)
        else:
            self.request(RTM_DELROUTE, 0, body)

    def neigh(self, add: bool, index: int, version: int, address: str, mac: str | None = None) -> None:
        family = _family(version)
        state = NUD_PERMANENT if add else 0
        body = struct.pack("=BxxxiHBB", family, index, state, 0, 0)
        body += _attr(NDA_DST, socket.inet_pton(family, address))
        if add:
            body += _attr(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))
            self.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)
        else:
            self.request(RTM_DELNEIGH, 0, body)


def nft_table_exists(name: str, version: int) -> bool:
    """Whether the nftables table `ip NAME` (or `ip6 NAME`) exists, without forking nft."""
    try:
        nl = Netlink(NETLINK_NETFILTER)
    except OSError:
        return False
    try:
        return nl.has_table(name, version)
    except OSError:
        return False
    finally:
        nl.close()


def _conntrack_addresses(payload: bytes) -> tuple[set[bytes], dict[int, bytes]]:
    """(original source and destination and reply source, raw attributes naming the entry)."""
    found: set[bytes] = set()
    keep: dict[int, bytes] = {}
    for kind, value in _attrs(payload[4:]):
        if kind in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
            wanted = CTA_IP_ADDRS if kind == CTA_TUPLE_ORIG else CTA_IP_SOURCES
            for sub, inner in _attrs(value):
                if sub == CTA_TUPLE_IP:
                    found.update(addr for ip_kind, addr in _attrs(inner) if ip_kind in wanted)
        if kind in (CTA_TUPLE_ORIG, CTA_ID, CTA_ZONE):
            keep[kind] = value
    return found, keep


def _conntrack_count() -> int | None:
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def conntrack_purge(addresses: tuple[str, ...]) -> int:
    """Delete every conntrack entry whose original source or destination, or
    reply source, is one of `addresses` (IPv4 or IPv6).  One dump of the whole
    table (it costs the same as a filtered one: the kernel walks every bucket);
    each entry is deleted by its own tuple, id and zone as the kernel gave
    them, so nothing else can be hit.  Returns how many were deleted."""
    if _conntrack_count() == 0:
        return 0  # the namespace's table is empty: skip the walk
    wanted = {socket.inet_pton(_family(6 if ":" in a else 4), a) for a in addresses}
    msg_get = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    msg_del = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    try:
        nl = Netlink(NETLINK_NETFILTER)
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
            return 0  # no netfilter netlink in this kernel
        raise
    deleted = 0
    try:
        try:
            entries = nl.request(msg_get, NLM_F_DUMP, struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
        except OSError as exc:
            if exc.errno in GONE | {errno.EOPNOTSUPP}:
                return 0  # no connection tracking here
            raise
        for payload in entries:
            found, keep = _conntrack_addresses(payload)
            if not found & wanted or CTA_TUPLE_ORIG not in keep:
                continue
            body = payload[:4] + b"".join(
                _attr(kind | (NLA_F_NESTED if kind == CTA_TUPLE_ORIG else 0), value)
                for kind, value in sorted(keep.items()))
            try:
                nl.request(msg_del, 0, body)
                deleted += 1
            except OSError as exc:
                if exc.errno not in GONE:
                    raise
    finally:
        nl.close()
    return deleted
