"""What `check` compares: the namespace read once (pyroute2 dumps, the sets
and static rules, /proc/sys) under the events' lock taken shared."""

import fcntl
import ipaddress
import os
import time
from contextlib import contextmanager
from typing import NamedTuple

from vif_route_qubes.check import antispoof as antispoof_drift
from vif_route_qubes.errors import VifError
from vif_route_qubes.inputs.parse import VIF_NAME
from vif_route_qubes.plan import vif as plan_vif

# Read for every vif under the lock; any other sysctl the planner asks for is read when compared.
_SYSCTLS = (("ipv4", ("proxy_arp", *plan_vif.HARDEN_V4)),
            ("ipv6", ("proxy_ndp", "disable_ipv6", *plan_vif.HARDEN_V6)))


class NetState(NamedTuple):
    links: dict      # ifname -> administratively up
    addrs: dict      # ifname -> frozenset of "address/prefixlen"
    routes: tuple    # (dst, dev, metric) of the main table; host routes print without /32, /128
    neighs: dict     # (dev, dst) -> (lladdr, permanent)
    fw: object       # antispoof_drift.AntispoofView: the sets and their static rules
    sysctl: dict     # path under /proc/sys -> value
    netns: frozenset = frozenset()  # names in /run/netns (a mapped vif has its own)
    groups: dict = {}  # ifname -> interface group (the nft backend puts vifs in group 2)

    def read_sysctl(self, path: str) -> str | None:
        return self.sysctl[path] if path in self.sysctl else _read_proc(path)


def norm(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


# -- comparisons (pure) ---------------------------------------------------

def _read_proc(path: str) -> str | None:
    try:
        with open("/proc/sys/" + path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _route_text(version: int, dst_len: int, dst: str | None) -> str:
    """A destination as `ip route` prints it: host routes without /32, /128."""
    if not dst_len or dst is None:
        return "default"
    return norm(dst) if dst_len == (128 if version == 6 else 32) else f"{norm(dst)}/{dst_len}"


def read_state(extra: tuple = (), backend: str = "iptables") -> NetState:
    from vif_route_qubes.system import ip_dumps

    try:
        by_index = ip_dumps.link_states()
        found_addrs = ip_dumps.addresses()
        found_routes = ip_dumps.main_routes()
        found_neighs = ip_dumps.neighbours()
    except OSError as exc:
        raise VifError(f"reading links, addresses, routes and neighbours failed: {exc.strerror or exc}") from None
    links = {name: up for name, up, _ in by_index.values()}
    groups = {name: group for name, _, group in by_index.values()}
    addrs = {name: set() for name in links}
    for index, address, prefixlen in found_addrs:
        if index in by_index:
            addrs[by_index[index][0]].add(f"{norm(address)}/{prefixlen}")
    addrs = {name: frozenset(found) for name, found in addrs.items()}
    name_of = {index: name for index, (name, _, _) in by_index.items()}
    routes = tuple((_route_text(version, dst_len, dst), name_of.get(oif), metric)
                   for version, dst_len, dst, oif, metric in found_routes)
    neighs = {(name_of[index], norm(dst)): (lladdr, permanent)
              for index, dst, lladdr, permanent in found_neighs if index in name_of}
    fw = antispoof_drift.read(backend)
    names = [n for n in links if VIF_NAME.fullmatch(n)] + [n for n in extra if n]
    sysctl = {path: _read_proc(path) for name in names for family, keys in _SYSCTLS for key in keys
              for path in [f"net/{family}/conf/{name}/{key}"]}
    netns = frozenset(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else frozenset()
    return NetState(links, addrs, routes, neighs, fw, sysctl, netns, groups)


@contextmanager
def shared_lock(path: str, timeout: float):
    """The events' lock, shared: a check never reads half an event, and checks
    never wait for each other.  No lock file: no event ever ran."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = None
    try:
        deadline = time.monotonic() + timeout
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise VifError(f"lock {path} still held after {timeout:g} s") from None
                time.sleep(0.02)
        yield
    finally:
        if fd is not None:
            os.close(fd)
