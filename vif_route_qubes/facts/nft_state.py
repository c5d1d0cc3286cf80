"""What the nft backend's planner needs: our two tables as `nft -j list ruleset`
prints them, parsed by nft.parse_ruleset; the links of
the vif group only when they can matter."""

from vif_route_qubes.plan.nft import VIF_GROUP, NftState, is_base, parse_ruleset
from vif_route_qubes.system import tools


def run_nft(args: list[str]) -> str:
    return tools.run(["nft", *args], timeout=30).stdout


def vif_group_links() -> frozenset[str]:
    """Interfaces in the vif group (2), over netlink (pyroute2)."""
    from vif_route_qubes.system import ip

    return frozenset(ip.links_in_group(VIF_GROUP))


def read_state(vif: str | None = None, addresses: tuple = ()) -> NftState:
    """Our tables of both families; the vif-group links only when they can
    matter (a table `init` did not make, which offline of the last vif
    removes, and no other vif's element), so an event does not list every link."""
    state = parse_ruleset(run_nft(["-j", "list", "ruleset"]))
    others = any(name != vif for table in state.tables.values() for name, _ in table.allowed)
    if vif is not None and not others and any(not is_base(t) for t in state.tables.values()):
        state = state._replace(vif_links=vif_group_links())
    return state


def chain_rules(version: int, chain: str) -> list[str]:
    """The rules of one of our chains as `nft -s list chain` prints them (its `type ...` line apart)."""
    from vif_route_qubes.plan.nft import FAMILIES, TABLE

    lines = [line.strip() for line in run_nft(["-s", "list", "chain", FAMILIES[version], TABLE, chain]).splitlines()]
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("chain ")) + 1:]
    return [line for line in body if line and line != "}" and not line.startswith("type ")]
