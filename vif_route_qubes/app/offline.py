"""What an offline undoes, learned from the kernel (issue 28; CONTRACT section 1).

Online put on the vif its VM's addresses (set pairs, routes at the VM's metric),
the gateways (/32, /128) and, when hardened, the settings of
81-qubes.conf.optional; the kernel still holds all of it, so an offline reads it
there and asks neither qubesdb nor xenstore (a hook's device type and a renamed
vif's name apart, see inputs/read.py).  What the command line gives is undone too.
"""

from ipaddress import ip_address

from vif_route_qubes.errors import VifError
from vif_route_qubes.model import VifFacts, VifInputs
from vif_route_qubes.plan import vif as plan_vif
from vif_route_qubes.system import ip
from vif_route_qubes.system.procfs import read_sysctl


def harden_defaults(inp: VifInputs) -> tuple:
    """(vif sysctl path, conf/default's value) of what offline puts back of the
    vif's hardening: every key when hardening was asked for (--harden); when
    nothing says (None), the keys that hold the hardened value and differ from
    conf/default, which only a hardened online (or a hand) left there."""
    if inp.harden is False:
        return ()
    pairs = []
    for family, keys in (("ipv4", plan_vif.HARDEN_V4), ("ipv6", plan_vif.HARDEN_V6)):
        for key, hardened in keys.items():
            default = read_sysctl(f"net/{family}/conf/default/{key}")
            if default is None:
                continue
            if inp.harden or (default != hardened
                              and read_sysctl(f"net/{family}/conf/{inp.vif}/{key}") == hardened):
                pairs.append((f"net/{family}/conf/{inp.vif}/{key}", default))
    return tuple(pairs)


def routed_families(exists: bool, ipv6_enabled: bool) -> frozenset:
    """The families in which every address online gave the vif has a route now."""
    if not exists:
        return frozenset()
    return frozenset({4, 6}) if ipv6_enabled else frozenset({4})


def _own_pairs(inp: VifInputs, facts: VifFacts) -> set[str]:
    if facts.backend == "nft":
        tables = facts.nft.tables.values() if facts.nft is not None else ()
        return {addr for table in tables for name, addr in table.allowed if name == inp.vif}
    if facts.ipt is None:
        return set()
    return {addr for held in facts.ipt.held.values() for addr in held.mine}


def learn(inp: VifInputs, facts: VifFacts, vif_addresses: tuple = ()) -> VifInputs:
    """`inp` with what online gave the vif, from the kernel: its VM's addresses
    (the given ones, then its set pairs and routes at the VM's metric, in address
    order), the gateways on it (`vif_addresses`: (version, address, prefix
    length)) and whether it was hardened."""
    given = {str(a) for a in inp.addresses}
    found = _own_pairs(inp, facts) | {addr for _, addr, metric in facts.host_routes if metric == inp.metric}
    more = sorted((ip_address(a) for a in found - given), key=lambda a: (a.version, int(a)))
    gateway, gateway6 = inp.gateway, inp.gateway6
    for version, text, prefixlen in vif_addresses:
        addr = ip_address(text)
        if gateway is None and version == 4 and prefixlen == 32:
            gateway = addr
        elif gateway6 is None and version == 6 and prefixlen == 128 and not addr.is_link_local:
            gateway6 = addr
    return inp._replace(addresses=(*inp.addresses, *more), gateway=gateway, gateway6=gateway6,
                        harden=bool(inp.harden or facts.harden_defaults))


def vif_addresses(vif: str) -> tuple:
    """(version, address, prefix length) of the addresses on the vif, () when it is gone."""
    index = ip.link_index(vif)
    if index is None:
        return ()
    try:
        return tuple(ip.link_addresses(index))
    except OSError as exc:
        raise VifError(f"{vif}: reading its addresses failed: {exc.strerror or exc}") from None
