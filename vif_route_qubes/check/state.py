"""What `check` compares: the namespace read once (pyroute2 dumps, the sets
and static rules, /proc/sys) under the events' lock taken shared."""

import ipaddress
import os
from typing import NamedTuple

from vif_route_qubes.check import antispoof as antispoof_drift
from vif_route_qubes.check.antispoof import AntispoofView
from vif_route_qubes.errors import VifError
from vif_route_qubes.model import VIF_NAME
from vif_route_qubes.plan import vif as plan_vif
from vif_route_qubes.system import ip_dumps
from vif_route_qubes.system.procfs import read_sysctl

# Read for every vif under the lock; any other sysctl the planner asks for is read when compared.
_SYSCTLS = (("ipv4", ("proxy_arp", *plan_vif.HARDEN_V4)),
            ("ipv6", ("proxy_ndp", "disable_ipv6", *plan_vif.HARDEN_V6)))


class NetState(NamedTuple):
    links: dict      # ifname -> administratively up
    addrs: dict      # ifname -> frozenset of "address/prefixlen"
    routes: tuple    # (dst, dev, metric) of the main table; host routes print without /32, /128
    neighs: dict     # (dev, dst) -> (lladdr, permanent)
    fw: AntispoofView  # the sets and their static rules
    sysctl: dict     # path under /proc/sys -> value
    netns: frozenset = frozenset()  # names in /run/netns (a mapped vif has its own)
    groups: dict = {}  # ifname -> interface group (the nft backend puts vifs in group 2)

    def read_sysctl(self, path: str) -> str | None:
        return self.sysctl[path] if path in self.sysctl else read_sysctl(path)


def norm(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


# -- reading ----------------------------------------------------------------

def _route_text(version: int, dst_len: int, dst: str | None) -> str:
    """A destination as `ip route` prints it: host routes without /32, /128."""
    if not dst_len or dst is None:
        return "default"
    return norm(dst) if dst_len == (128 if version == 6 else 32) else f"{norm(dst)}/{dst_len}"


def read_state(extra: tuple = (), backend: str = "iptables") -> NetState:
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
    sysctl = {path: read_sysctl(path) for name in names for family, keys in _SYSCTLS for key in keys
              for path in [f"net/{family}/conf/{name}/{key}"]}
    netns = frozenset(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else frozenset()
    return NetState(links, addrs, routes, neighs, fw, sysctl, netns, groups)
