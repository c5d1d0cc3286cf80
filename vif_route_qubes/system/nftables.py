"""Thin reads of nf_tables over netlink (pyroute2's NFTSocket), for one vif event.

What an event needs of a `qubes` table, without forking `nft` and without
listing every element of every set:
  - the table's chains and sets (names only: dumps of the family's tables,
    chains and sets, a handful of objects whatever the number of VMs);
  - the keys of one set (`allowed`), as the kernel stores them: pyroute2
    decodes each element into nested objects (about 7 us each, 2.8 ms for
    400), so the reply's element list is declared `binary` and only the keys
    are taken out of it (about 1 us each);
  - whether one key is in a set (`downstream`): a GETSETELEM request by key.
One socket per family (pyroute2's request_get puts the socket's family into
every request), opened when first used and closed with the reader.  Errors
are mapped once to VifError; ENOENT (no such table, set or element) is an
answer, not an error.
"""

import errno
import functools
import ipaddress
import os
import struct

from vif_route_qubes.errors import VifError

NFPROTO = {4: 2, 6: 10}          # NFPROTO_IPV4, NFPROTO_IPV6
IFNAMSIZ = 16                    # an `ifname` key field: the name, NUL-padded
ADDR_LEN = {4: 4, 6: 16}
NFTA_SET_ELEM_KEY = NFTA_DATA_VALUE = 1


def _fail(what: str, exc: Exception) -> VifError:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) and 0 < code < 4096 else str(exc)
    return VifError(f"nftables {what}: {reason}")


@functools.cache
def _raw_elements_class():
    """nft_set_elem_list_msg with the element list left undecoded."""
    from pyroute2.netlink.nfnetlink import nfgen_msg  # start-up: this part of pyroute2 only when used

    class raw_elem_list_msg(nfgen_msg):
        prefix = "NFTA_SET_ELEM_LIST_"
        nla_map = (("NFTA_SET_ELEM_LIST_UNSPEC", "none"),
                   ("NFTA_SET_ELEM_LIST_TABLE", "asciiz"),
                   ("NFTA_SET_ELEM_LIST_SET", "asciiz"),
                   ("NFTA_SET_ELEM_LIST_ELEMENTS", "binary"),
                   ("NFTA_SET_ELEM_LIST_SET_ID", "be32"))

    return raw_elem_list_msg


def _attrs(buf: bytes, start: int, end: int):
    """(type, payload start, payload end) of each netlink attribute in buf[start:end]."""
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", buf, start)
        if length < 4 or start + length > end:
            return
        yield kind & 0x3FFF, start + 4, start + length  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
        start += (length + 3) & ~3


def element_keys(buf: bytes) -> list[bytes]:
    """The key of each element of an undecoded NFTA_SET_ELEM_LIST_ELEMENTS."""
    keys = []
    for _, elem_start, elem_end in _attrs(buf, 0, len(buf)):
        for kind, key_start, key_end in _attrs(buf, elem_start, elem_end):
            if kind == NFTA_SET_ELEM_KEY:
                keys += [buf[s:e] for k, s, e in _attrs(buf, key_start, key_end) if k == NFTA_DATA_VALUE]
                break
    return keys


def address_key(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def ifname_field(ifname: str) -> bytes:
    """The first field of an `ifname . address` key (IFNAMSIZ bytes)."""
    return ifname.encode().ljust(IFNAMSIZ, b"\0")


def pair_key(ifname: str, address: str) -> bytes:
    """The key of an `ifname . address` element."""
    return ifname_field(ifname) + address_key(address)


def one_element_message(table: str, name: str, key: bytes):
    """An element list message naming one element of set `name` by its key
    (a probe's GETSETELEM, an event's NEWSETELEM or DELSETELEM)."""
    from pyroute2.netlink.nfnetlink import nftsocket as nfts  # start-up: this part of pyroute2 only when used

    msg = nfts.nft_set_elem_list_msg()
    msg["attrs"] = [["NFTA_SET_ELEM_LIST_TABLE", table], ["NFTA_SET_ELEM_LIST_SET", name],
                    ["NFTA_SET_ELEM_LIST_ELEMENTS",
                     [{"attrs": [["NFTA_SET_ELEM_KEY", {"attrs": [["NFTA_DATA_VALUE", key]]}]]}]]]
    return msg


def decode_address(key: bytes) -> str:
    return str(ipaddress.ip_address(key))


def is_pair_key(key: bytes, version: int) -> bool:
    """The key has the shape of an `ifname . ipvN_addr` element."""
    return len(key) == IFNAMSIZ + ADDR_LEN[version]


def decode_pair(key: bytes, version: int) -> tuple[str, str] | None:
    """(ifname, address) of an `ifname . ipvN_addr` key; None for any other shape."""
    if not is_pair_key(key, version):
        return None
    name = key[:IFNAMSIZ].split(b"\0", 1)[0].decode(errors="replace")
    return name, str(ipaddress.ip_address(key[IFNAMSIZ:]))


class Reader:
    """Reads of the nf_tables objects of both families (a context manager)."""

    def __init__(self) -> None:
        self._socks = {}

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    def _sock(self, version: int):
        if version not in self._socks:
            from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES  # start-up: this part of pyroute2 only when used
            from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_NEWSETELEM, NFTSocket  # start-up: this part of pyroute2 only when used

            try:
                sock = NFTSocket(nfgen_family=NFPROTO[version])
            except OSError as exc:
                raise _fail("open", exc) from None
            sock.register_policy({NFT_MSG_NEWSETELEM | (NFNL_SUBSYS_NFTABLES << 8): _raw_elements_class()})
            self._socks[version] = sock
        return self._socks[version]

    def _get(self, version: int, what: str, msg, msg_type: int, dump: bool = True) -> list | None:
        """The replies of one request; None when the kernel answers ENOENT."""
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST  # start-up: this part of pyroute2 only when used
        from pyroute2.netlink.exceptions import NetlinkError  # start-up: this part of pyroute2 only when used

        try:
            return list(self._sock(version).request_get(msg, msg_type, NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)))
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise _fail(what, exc) from None
        except OSError as exc:
            raise _fail(what, exc) from None

    def _dump_names(self, version: int, kind: str, table: str) -> frozenset[str]:
        from pyroute2.netlink.nfnetlink import nftsocket as nfts  # start-up: this part of pyroute2 only when used

        msg_class, msg_type = {"chain": (nfts.nft_chain_msg, nfts.NFT_MSG_GETCHAIN),
                               "set": (nfts.nft_set_msg, nfts.NFT_MSG_GETSET)}[kind]
        msg = msg_class()
        msg["attrs"] = []
        prefix = msg_class.prefix
        return frozenset(m.get_attr(prefix + "NAME") for m in self._get(version, f"list {kind}s", msg, msg_type) or ()
                         if m.get_attr(prefix + "TABLE") == table)

    def table(self, version: int, name: str) -> tuple[frozenset[str], frozenset[str]] | None:
        """(chain names, set names) of table `name` of the family, or None when
        it does not exist (the tables are dumped only when it has neither)."""
        from pyroute2.netlink.nfnetlink import nftsocket as nfts  # start-up: this part of pyroute2 only when used

        chains, sets = self._dump_names(version, "chain", name), self._dump_names(version, "set", name)
        if chains or sets:
            return chains, sets
        msg = nfts.nft_table_msg()
        msg["attrs"] = []
        if any(m.get_attr("NFTA_TABLE_NAME") == name
               for m in self._get(version, "list tables", msg, nfts.NFT_MSG_GETTABLE) or ()):
            return chains, sets
        return None

    def set_keys(self, version: int, table: str, name: str) -> list[bytes]:
        """Every element's key of a set ([] when it does not exist)."""
        from pyroute2.netlink.nfnetlink import nftsocket as nfts  # start-up: this part of pyroute2 only when used

        msg = nfts.nft_set_elem_list_msg()
        msg["attrs"] = [["NFTA_SET_ELEM_LIST_TABLE", table], ["NFTA_SET_ELEM_LIST_SET", name]]
        keys = []
        for reply in self._get(version, f"list set {name}", msg, nfts.NFT_MSG_GETSETELEM) or ():
            keys += element_keys(reply.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS") or b"")
        return keys

    def has_key(self, version: int, table: str, name: str, key: bytes) -> bool:
        """Whether the set has an element with this key (False when the set does not exist)."""
        from pyroute2.netlink.nfnetlink import nftsocket as nfts  # start-up: this part of pyroute2 only when used

        msg = one_element_message(table, name, key)
        return bool(self._get(version, f"get element {name}", msg, nfts.NFT_MSG_GETSETELEM, dump=False))
