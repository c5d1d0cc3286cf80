"""What the nft backend's planner needs, read over nftables netlink.

Forking `nft -j list ruleset` costs ~7 ms and grows with every element of
every set (+15 ms with 400 vifs); here a few requests on one socket read our
two tables' chain names, sets and the elements of `allowed` and `downstream`,
decoded from their raw keys (uapi linux/netfilter/nf_tables.h).  The result
is what nft.parse_ruleset() makes of nft's JSON, but for `downstream`, which
is only looked up for the addresses an event may change (tested).
"""

import errno
import socket
import struct

from vif_route_qubes.netlink import (NETLINK_NETFILTER, NETLINK_ROUTE, NLA_F_NESTED, NLM_F_DUMP, Netlink, _attr,
                                     _attrs, nfgen, nft_msg)
from vif_route_qubes.nft import FAMILIES, TABLE, VIF_GROUP, NftState, NftTable, is_base

NFT_MSG_GETCHAIN, NFT_MSG_GETSET, NFT_MSG_GETSETELEM = 4, 10, 13
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_SET_TABLE, NFTA_SET_NAME = 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE = 1, 1, 1
IFNAMSIZ = 16


def _set_query(version: int, name: str) -> bytes:
    """The head of a request about the elements of set `name` of our table."""
    return (nfgen(version) + _attr(NFTA_SET_ELEM_LIST_TABLE, TABLE.encode() + b"\0")
            + _attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"))


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def _keys(payloads: list[bytes]):
    """The raw key of every element in a GETSETELEM dump (a flat loop: a
    busy VM's set has hundreds of elements)."""
    unpack = struct.unpack_from
    for payload in payloads:
        for kind, value in _attrs(payload[4:]):
            if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
                continue
            offset, end = 0, len(value)
            while offset + 4 <= end:  # each NFTA_LIST_ELEM
                size = unpack("=H", value, offset)[0]
                if size < 4:
                    break
                inner, stop = offset + 4, offset + size
                while inner + 4 <= stop:  # its attributes: find NFTA_SET_ELEM_KEY
                    attr_size, attr_kind = unpack("=HH", value, inner)
                    if attr_size < 4:
                        break
                    if attr_kind & 0x3FFF == NFTA_SET_ELEM_KEY and attr_size >= 8:
                        data_size = unpack("=H", value, inner + 4)[0]  # NFTA_DATA_VALUE inside
                        yield value[inner + 8: inner + 4 + data_size]
                        break
                    inner += (attr_size + 3) & ~3
                offset += (size + 3) & ~3


def _named(payloads: list[bytes], table_attr: int, name_attr: int) -> set[str]:
    """Names of the objects (chains or sets) of our table in a dump."""
    names = set()
    for payload in payloads:
        attrs = dict(_attrs(payload[4:]))
        if _text(attrs.get(table_attr, b"")) == TABLE and name_attr in attrs:
            names.add(_text(attrs[name_attr]))
    return names


def _has_element(nl: Netlink, version: int, name: str, key: bytes) -> bool:
    """One element looked up by its key (no dump)."""
    elem = _attr(NFTA_LIST_ELEM | NLA_F_NESTED, _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, key)))
    body = _set_query(version, name) + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elem)
    try:
        nl.request(nft_msg(NFT_MSG_GETSETELEM), 0, body)
        return True
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise


def _read_table(nl: Netlink, version: int, vif: str | None, addresses: tuple) -> NftTable | None:
    if not nl.has_table(TABLE, version):
        return None
    chains = _named(nl.request(nft_msg(NFT_MSG_GETCHAIN), NLM_F_DUMP, nfgen(version)), NFTA_CHAIN_TABLE,
                    NFTA_CHAIN_NAME)
    sets = _named(nl.request(nft_msg(NFT_MSG_GETSET), NLM_F_DUMP, nfgen(version)), NFTA_SET_TABLE, NFTA_SET_NAME)
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    size = 16 if version == 6 else 4
    allowed: frozenset = frozenset()
    if "allowed" in sets:
        # Every vif's pairs, not only this one's: an offline keeps a
        # `downstream` address that another vif still holds (nft.vif_elements).
        # Keys: the interface name in 16 bytes, then the address.
        dump = nl.request(nft_msg(NFT_MSG_GETSETELEM), NLM_F_DUMP, _set_query(version, "allowed"))
        allowed = frozenset((_text(key[:IFNAMSIZ]), socket.inet_ntop(family, key[IFNAMSIZ:IFNAMSIZ + size]))
                            for key in _keys(dump)
                            if len(key) >= IFNAMSIZ + size)
    # `downstream` only matters for the addresses this vif's event may add
    # or delete: those are looked up one by one instead of dumping the set.
    downstream: set[str] = set()
    if "downstream" in sets:
        candidates = {a for name, a in allowed if name == vif} | {str(a) for a in addresses if a.version == version}
        downstream = {a for a in candidates if _has_element(nl, version, "downstream", socket.inet_pton(family, a))}
    return NftTable(frozenset(chains), allowed, frozenset(downstream), {"allowed", "downstream"} <= sets)


def read_state(vif: str | None = None, addresses: tuple = ()) -> NftState:
    """Our tables of both families (`downstream` only as far as it holds the
    vif's addresses in `allowed` and `addresses`); the vif-group links only when they can
    matter (a table `init` did not make, which offline of the last vif
    removes, and no other vif's element), so an event does not dump every link."""
    nl = Netlink(NETLINK_NETFILTER)
    try:
        tables = {version: table for version in FAMILIES
                  if (table := _read_table(nl, version, vif, addresses)) is not None}
    finally:
        nl.close()
    state = NftState(tables)
    # The links only tell whether another vif relies on a table `init` did not
    # make; another vif's element in `allowed` already says so.
    others = any(name != vif for table in tables.values() for name, _ in table.allowed)
    if not others and any(not is_base(t) for t in tables.values()):
        route = Netlink(NETLINK_ROUTE)
        try:
            state = state._replace(vif_links=frozenset(route.links_in_group(VIF_GROUP)))
        finally:
            route.close()
    return state
