"""What the iptables backend's facts read of the sets for one vif's offline
(facts/ipsets.py), on an in-memory stand-in for the kernel's sets: the
`allowed` set is listed whole only when the kernel cannot name all the vif's
addresses (killed events, no MAC, a family it does not route), so an
IPv4-only vif's offline does not list the other VMs' IPv6 pairs."""

from ipaddress import ip_address

import pytest

from vif_route_qubes.facts import ipsets as facts
from vif_route_qubes.plan import antispoof_ipt, elements
from vif_route_qubes.system import ip
from vif_route_qubes.system.ipset import SetInfo

VIF = "vif37.0"
A4, B4, A6 = "10.137.0.37", "10.137.0.38", "fd09:24ef:4179::a89:25"
ALLOWED4, ALLOWED6 = (antispoof_ipt.set_name(elements.ALLOWED, v) for v in (4, 6))
DOWN4, DOWN6 = (antispoof_ipt.set_name(elements.DOWNSTREAM, v) for v in (4, 6))


class FakeIpsets:
    """The sets' headers, tests and listings of system/ipset.Ipsets, from dicts;
    records which sets were listed whole."""

    def __init__(self, members: dict[str, set]) -> None:
        self.members_of = {name: set() for name in (*antispoof_ipt.SET_NAMES, antispoof_ipt.BASE_SET)}
        for name, entries in members.items():
            self.members_of[name] |= entries
        self.listed = []

    def infos(self, names):
        return {n: SetInfo(n in self.members_of, len(self.members_of.get(n, ())), 1) for n in names}

    def test(self, name, family, entry):
        return tuple(entry) in self.members_of.get(name, set())

    def members(self, name):
        self.listed.append(name)
        return sorted(self.members_of[name])


def _sets(own: dict[int, tuple], other_v6_vms: int = 50) -> FakeIpsets:
    """The vif's pairs (`own`, by family) and `other_v6_vms` other vifs' IPv6 pairs."""
    others = {(f"fd09:24ef:4179::a89:{100 + i:x}", f"vif{100 + i}.0") for i in range(other_v6_vms)}
    return FakeIpsets({
        ALLOWED4: {(a, VIF) for a in own.get(4, ())}, DOWN4: {(a,) for a in own.get(4, ())},
        ALLOWED6: {(a, VIF) for a in own.get(6, ())} | others,
        DOWN6: {(a,) for a in own.get(6, ())} | {(a,) for a, _ in others}})


@pytest.fixture(autouse=True)
def no_route_lookups(monkeypatch):
    monkeypatch.setattr(ip, "route_dev", lambda addr: None)  # no other vif holds an address


def _offline(sets, routes=(), neighbours=(), routed=frozenset({4, 6})):
    host_routes = tuple((ip_address(a).version, a, 1000) for a in routes)
    neigh = tuple((ip_address(a).version, a) for a in neighbours)
    return facts.read_facts(sets, VIF, (), host_routes, False, routed, neigh).held


def test_an_ipv4_vif_offline_does_not_list_the_other_vms_ipv6_pairs():
    sets = _sets({4: (A4,)})
    held = _offline(sets, routes=(A4,), neighbours=(A4,))
    assert held[4].mine == {A4} and held[6].mine == set()
    assert sets.listed == []


def test_ipv6_off_on_the_vif_lists_its_ipv6_pairs():
    sets = _sets({4: (A4,), 6: (A6,)})
    held = _offline(sets, routes=(A4,), neighbours=(A4,), routed=frozenset({4}))
    assert held[6].mine == {A6}
    assert sets.listed == [ALLOWED6]


@pytest.mark.parametrize("routes, neighbours", [
    ((), (A4,)),        # killed in its neighbours step: B4 has neither
    ((A4,), ()),        # no MAC (no neighbours), killed in its routes step
    ((), ()),           # killed after both
], ids=["no route left", "no neighbour", "neither"])
def test_a_pair_no_route_or_neighbour_names_is_found(routes, neighbours):
    sets = _sets({4: (A4, B4), 6: (A6,)})
    held = _offline(sets, routes, neighbours)
    assert held[4].mine == {A4, B4} and held[6].mine == {A6}
    assert held[4].downstream == {A4, B4}
    assert set(sets.listed) == {ALLOWED4, ALLOWED6}


def test_killed_in_its_routes_step_the_neighbours_name_the_addresses():
    # The IPv4 routes gone, the IPv6 one left: every neighbour is still there.
    sets = _sets({4: (A4, B4), 6: (A6,)})
    held = _offline(sets, routes=(A6,), neighbours=(A4, B4, A6))
    assert held[4].mine == {A4, B4} and held[6].mine == {A6}
    assert sets.listed == []
