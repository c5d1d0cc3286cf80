"""Frozen inputs of one vif event, and the facts read from the system under the lock."""

from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple


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
    mapped: object = None             # mapped.Mapped(real, visible, visible_gateway) or None
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
    ipt: object = None                  # iptables backend: antispoof_ipt.IptFacts
    backend: str = "iptables"          # or "nft"
    nft: object = None                  # nft backend: nft.NftState of the qubes tables
    mapped: object = None               # mapped.MappedFacts: the vif's own namespace, if any
    host_routes: tuple = ()             # (version, address, metric) of host routes out of the vif
    neighbours: tuple = ()              # (version, address) of its permanent neighbour entries
    harden_defaults: tuple = ()         # offline, hardened: (vif sysctl path, conf/default's value)
