"""Frozen inputs of one vif event, and the facts read from the system under the lock."""

import re
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # for the reader and type checkers only: at run time model imports nothing of ours
    from vif_route_qubes.plan.antispoof_ipt import IptFacts
    from vif_route_qubes.plan.mapped import Mapped, MappedFacts
    from vif_route_qubes.plan.nft import NftState

# Qubes' nftables base (R4.2+) as both the planner and the system readers name it: its
# table, and the two anti-spoofing sets a vif event fills (plan/elements.py says how).
NFT_TABLE = "qubes"
ALLOWED, DOWNSTREAM = "allowed", "downstream"

# A vif's interface name, vifD.N (inputs/parse.py adds the -emu suffix where a name from Xen is parsed).
VIF_NAME = re.compile(r"vif(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")


class VifInputs(NamedTuple):
    command: str                      # "online" or "offline"
    vif: str                          # name after any `vifname` rename
    domid: int
    addresses: tuple[IPv4Address | IPv6Address, ...]
    mac: str | None
    dev_type: str                     # passed to hooks
    gateway: IPv4Address | None
    gateway6: IPv6Address | None
    dns: tuple[IPv4Address, ...]
    harden: bool
    hooks: tuple[str, ...]            # executable hook files, in run order
    hook_timeout: float
    xenbus_path: str | None
    rename_from: str | None = None    # the kernel's name when xenstore `vifname` renames it
    mapped: "Mapped | None" = None    # a mapped VM: (real, visible, visible_gateway)
    netns_prefix: str = ""            # prefix of a mapped vif's namespace name

    @property
    def metric(self) -> int:
        return 32752 - self.domid

    def addrs(self, family: int) -> tuple:
        return tuple(a for a in self.addresses if a.version == family)


class VifFacts(NamedTuple):
    """What the system has now, read once under the lock."""

    exists: bool                      # the interface (by its final name) is there
    rename_pending: bool              # the old name still exists and must be renamed
    ipv6_enabled: bool                # IPv6 is on for the interface
    ipt: "IptFacts | None" = None       # iptables backend
    backend: str = "iptables"          # or "nft"
    nft: "NftState | None" = None       # nft backend: the qubes tables
    mapped: "MappedFacts | None" = None  # the vif's own namespace, if any
    host_routes: tuple = ()             # (version, address, metric) of host routes out of the vif
    neighbours: tuple = ()              # (version, address) of its permanent neighbour entries
    harden_defaults: tuple = ()         # offline, hardened: (vif sysctl path, conf/default's value)
