"""Mapped addresses: a VM that sees a visible address and gateway while
everything upstream of its vif sees only its real address.

The Xen vif moves into a network namespace of its own (named after the vif,
with an optional prefix); a veth pair joins that namespace (`uplink`, which
holds the real address) to the main namespace, where the veth end takes the
vif's name and gets the ordinary section-1 configuration for the real
address.  Inside the namespace, nftables translates visible <-> real,
anti-spoofs (only the visible address from the VM, ARP only for it and only
towards the visible gateway) and drops all IPv6.
"""

from ipaddress import IPv4Address
from typing import NamedTuple

from vif_route_qubes.model import VifInputs
from vif_route_qubes.plan.batch import Exec, LinkDel, MoveLink, ReturnLink, VethAdd

UPLINK = "uplink"
VIF_MAC = "fe:ff:ff:ff:ff:ff"


class Mapped(NamedTuple):
    real: IPv4Address
    visible: IPv4Address
    visible_gateway: IPv4Address


class MappedFacts(NamedTuple):
    netns_exists: bool
    vif_in_netns: bool   # the Xen vif is already inside the namespace
    private_mounts: bool = False  # we run in a mount namespace of our own (udevd's PrivateMounts)


def netns_name(inp: VifInputs) -> str:
    return inp.netns_prefix + inp.vif


def _netns(facts: MappedFacts, *argv: str) -> Exec:
    """`ip netns add|del`, in the host's mount namespace when ours is private:
    udevd runs hotplug programs with PrivateMounts, and a namespace mounted
    there would be invisible to the rest of the system and lost with udevd."""
    host = ("nsenter", "--mount=/proc/1/ns/mnt", "--") if facts.private_mounts else ()
    return Exec((*host, "ip", "netns", *argv))


def main_side(inp: VifInputs) -> VifInputs:
    """What the main namespace configures: the veth end, with the real address
    only (the first IPv4 one; IPv6 of a mapped VM is dropped in its namespace)."""
    return inp._replace(addresses=inp.addrs(4)[:1], gateway6=None)


def inside_script(inp: VifInputs) -> str:
    m, vif = inp.mapped, inp.vif
    nft = f"""add table ip qubes-mapped
delete table ip qubes-mapped
add table ip6 qubes-mapped
delete table ip6 qubes-mapped
add table arp qubes-mapped
delete table arp qubes-mapped
table ip qubes-mapped {{
	chain antispoof {{
		type filter hook prerouting priority raw; policy accept;
		iifname "{vif}" ip saddr != {m.visible} drop
		iifname != "{vif}" ip saddr {m.visible} drop
	}}
	chain to-vm {{
		type nat hook prerouting priority dstnat; policy accept;
		iifname "{UPLINK}" ip daddr {m.real} dnat to {m.visible}
	}}
	chain from-vm {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname "{UPLINK}" ip saddr {m.visible} snat to {m.real}
	}}
}}
table ip6 qubes-mapped {{
	chain in {{
		type filter hook prerouting priority raw; policy drop;
	}}
	chain out {{
		type filter hook output priority raw; policy drop;
	}}
}}
table arp qubes-mapped {{
	chain in {{
		type filter hook input priority filter; policy accept;
		iifname "{vif}" arp saddr ip != {m.visible} drop
		iifname "{vif}" arp daddr ip != {m.visible_gateway} drop
	}}
}}
"""
    lines = ["ip link set dev lo up",
             "sysctl -q -w net.ipv4.ip_forward=1",
             "sysctl -q -w net.ipv6.conf.all.disable_ipv6=1",
             "sysctl -q -w net.ipv6.conf.default.disable_ipv6=1",
             f"nft -f - <<'NFT'\n{nft}NFT",
             f"ip link set dev {vif} up",
             f"ip link set dev {UPLINK} up",
             f"ip addr replace {m.visible_gateway}/32 dev {vif}",
             f"ip addr replace {m.real}/32 dev {UPLINK}",
             f"ip route replace {m.visible}/32 dev {vif}"]
    if inp.mac:
        lines.append(f"ip neigh replace {m.visible} lladdr {inp.mac} dev {vif} nud permanent")
    lines += [f"ip route replace {inp.gateway}/32 dev {UPLINK}",
              f"ip route replace default via {inp.gateway} dev {UPLINK}"]
    return "\n".join(lines) + "\n"


def plan_online(inp: VifInputs, facts: MappedFacts, vif_in_main: bool) -> list:
    """Steps before the main namespace's own configuration of the veth end."""
    name = netns_name(inp)
    steps = []
    if not facts.netns_exists:
        steps.append(_netns(facts, "add", name))
    if not facts.vif_in_netns:
        steps.append(MoveLink(inp.vif, name))
    if not (facts.vif_in_netns and vif_in_main):
        steps.append(VethAdd(inp.vif, VIF_MAC, UPLINK, inp.mac or None, name))
    steps.append(Exec(("ip", "netns", "exec", name, "sh", "-e"), inside_script(inp)))
    return steps


def plan_offline(inp: VifInputs, facts: MappedFacts, vif_in_main: bool) -> list:
    """Steps after the main namespace's teardown: the vif goes back, the namespace goes."""
    name = netns_name(inp)
    if not facts.netns_exists:
        return []
    steps = []
    if facts.vif_in_netns:
        if vif_in_main:  # the main end of our veth pair (its peer goes with it)
            steps.append(LinkDel(inp.vif))
        steps.append(ReturnLink(name, inp.vif))
    steps.append(_netns(facts, "del", name))
    return steps
