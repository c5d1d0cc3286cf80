"""Netlink through pyroute2, imported only when a batch needs it.

`import pyroute2` loads every API it has (NDB, IPDB, conntrack, ...), about
0.15 s here; the two classes we use cost half that on their own.  So the
package's __init__ is skipped: a bare package module is registered and only
the submodules we need are imported from it.
"""

import errno
import importlib.util
import socket
import sys
import types

# Errors that mean "already as asked" for a tolerant add or delete.
GONE = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENXIO}


def _bare_package() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or not spec.submodule_search_locations:
        return
    module = types.ModuleType("pyroute2")
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__file__ = spec.origin
    sys.modules["pyroute2"] = module


def iproute():
    _bare_package()
    from pyroute2.iproute.linux import IPRoute

    return IPRoute()


def nfct_socket(family: int):
    _bare_package()
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket

    return NFCTSocket(nfgen_family=socket.AF_INET6 if family == 6 else socket.AF_INET)


def conntrack_purge(address: str, family: int) -> int:
    """Delete every conntrack entry whose original source or destination, or
    reply source, is `address`; returns how many were deleted."""
    _bare_package()
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    deleted = 0
    with nfct_socket(family) as sock:
        filters = (("tuple_orig", NFCTAttrTuple(family=af, saddr=address)),
                   ("tuple_orig", NFCTAttrTuple(family=af, daddr=address)),
                   ("tuple_reply", NFCTAttrTuple(family=af, saddr=address)))
        for side, match in filters:
            try:
                entries = list(sock.dump(**{side: match}))
            except NetlinkError as exc:
                if exc.code in GONE or exc.code == errno.EOPNOTSUPP:
                    continue  # no conntrack in this kernel or namespace
                raise
            for msg in entries:
                orig = msg.get_attr("CTA_TUPLE_ORIG")
                # Check again: a kernel without CTA_FILTER support dumps everything.
                if orig is None or address not in _addresses(msg):
                    continue
                try:
                    sock.entry("del", tuple_orig=NFCTAttrTuple.from_netlink(af, orig))
                    deleted += 1
                except NetlinkError as exc:
                    if exc.code not in GONE:
                        raise
    return deleted


def _addresses(msg) -> set[str]:
    """Original source and destination and reply source of a conntrack entry."""
    found = set()
    for name, keys in (("CTA_TUPLE_ORIG", ("SRC", "DST")), ("CTA_TUPLE_REPLY", ("SRC",))):
        tup = msg.get_attr(name)
        ip = tup.get_attr("CTA_TUPLE_IP") if tup is not None else None
        if ip is None:
            continue
        for key, value in ip["attrs"]:
            if key.rsplit("_", 1)[-1] in keys:
                found.add(value)
    return found
