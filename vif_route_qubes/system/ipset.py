"""Thin wrappers of pyroute2's IPSet: plain values in (names, 4/6, tuples of
strings), errors mapped once to VifError, "already there" and "already gone"
tolerated.  One socket per event (`Ipsets`, a context manager), opened by
its first request and shared by the event's reading and its applier."""

import errno
import os
import socket
from typing import NamedTuple

from vif_route_qubes.errors import VifError

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
IPSET_FLAG_LIST_HEADER = 1 << 2  # uapi linux/netfilter/ipset/ip_set.h: list the header only


class SetInfo(NamedTuple):
    exists: bool = False
    elements: int = 0
    references: int = 0   # rules that match on the set


def _fail(what: str, exc: Exception) -> VifError:
    """One line naming the operation and the kernel's reason (pyroute2 gives ipset's own text)."""
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    reason = getattr(exc, "strerror", None) or (exc.args[1] if len(exc.args) > 1 else str(exc))
    if not reason:
        reason = os.strerror(code) if isinstance(code, int) and code < 4096 else f"error {code}"
    return VifError(f"ipset {what}: {reason}")


class Ipsets:
    """One netlink socket to the kernel's ipset subsystem."""

    def __init__(self) -> None:
        self._socket = None

    @property
    def _ipset(self):
        if self._socket is None:
            from pyroute2.ipset import IPSet  # start-up: this part of pyroute2 only when used

            try:
                self._socket = IPSet()
            except OSError as exc:
                raise _fail("open", exc) from None
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> "Ipsets":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, func, *args, **kwargs):
        from pyroute2.netlink.exceptions import NetlinkError  # start-up: this part of pyroute2 only when used

        try:
            return func(*args, **kwargs)
        except (NetlinkError, OSError) as exc:
            raise _fail(what, exc) from None

    def info(self, name: str) -> SetInfo:
        """Whether the set exists, how many elements it has and how many rules use it (no element read)."""
        return self.infos((name,))[name]

    def infos(self, names: tuple[str, ...]) -> dict[str, SetInfo]:
        """info() of several sets from one header-only dump of every set (one request)."""
        found = self._call("list", lambda: list(self._ipset.list(None, flags=IPSET_FLAG_LIST_HEADER)))
        out = dict.fromkeys(names, SetInfo())
        for msg in found:
            name, data = msg.get_attr("IPSET_ATTR_SETNAME"), msg.get_attr("IPSET_ATTR_DATA")
            if name in out and data is not None:
                out[name] = SetInfo(True, data.get_attr("IPSET_ATTR_ELEMENTS") or 0,
                                    data.get_attr("IPSET_ATTR_REFERENCES") or 0)
        return out

    def create(self, name: str, stype: str, family: int) -> None:
        self._call(f"create {name}", self._ipset.create, name, stype=stype, family=AF[family], exclusive=False)

    def destroy(self, name: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError  # start-up: this part of pyroute2 only when used

        try:
            self._ipset.destroy(name)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise _fail(f"destroy {name}", exc) from None

    def add(self, name: str, family: int, entry: tuple[str, ...]) -> None:
        self._call(f"add {name} {','.join(entry)}", self._ipset.add, name, entry, family=AF[family],
                   exclusive=False, etype=_etype(entry))

    def delete(self, name: str, family: int, entry: tuple[str, ...]) -> None:
        self._call(f"del {name} {','.join(entry)}", self._ipset.delete, name, entry, family=AF[family],
                   exclusive=False, etype=_etype(entry))

    def test(self, name: str, family: int, entry: tuple[str, ...]) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError  # start-up: this part of pyroute2 only when used

        try:
            return self._ipset.test(name, entry, family=AF[family], etype=_etype(entry))
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:  # no such set
                return False
            raise _fail(f"test {name} {','.join(entry)}", exc) from None

    def members(self, name: str) -> list[tuple[str, ...]] | None:
        """Every element (address[, interface]) of a set; None when it does not exist.
        Only for `check` and the migration: an event reads its own elements with test()."""
        from pyroute2.netlink.exceptions import NetlinkError  # start-up: this part of pyroute2 only when used

        try:
            found = list(self._ipset.list(name))
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise _fail(f"list {name}", exc) from None
        out = []
        for msg in found:
            adt = msg.get_attr("IPSET_ATTR_ADT")
            for data in adt.get_attrs("IPSET_ATTR_DATA") if adt is not None else ():
                ip = data.get_attr("IPSET_ATTR_IP_FROM")
                address = ip.get_attr("IPSET_ATTR_IPADDR_IPV4") or ip.get_attr("IPSET_ATTR_IPADDR_IPV6")
                iface = data.get_attr("IPSET_ATTR_IFACE")
                out.append((address, iface) if iface else (address,))
        return out


def _etype(entry: tuple[str, ...]) -> str:
    return "net,iface" if len(entry) == 2 else "ip"
