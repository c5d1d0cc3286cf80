"""What the nft backend's planner needs.

A vif event (read_vif_state) reads over netlink, with no `nft` fork: per
family the table's chain and set names, the keys of `allowed` (ifname .
address pairs: this vif's own, and which addresses other vifs hold), and its
own and wanted addresses looked up in `downstream` one by one, the only
addresses of it the planner asks about.  `downstream`, which grows with the
VMs, is never listed.  The links of the vif group are read only when they can
matter (a table `init` did not make, which the last vif's offline removes).

`init` and `check` read everything with `nft -j list ruleset` (read_state
without a vif, parsed by nft.parse_ruleset): they need the rules too.
"""

from vif_route_qubes.model import ALLOWED, DOWNSTREAM
from vif_route_qubes.plan.nft import (FAMILIES, TABLE, VIF_GROUP, NftState, NftTable, another_vif, is_base,
                                      parse_ruleset)
from vif_route_qubes.system import ip, nftables, tools


def run_nft(args: list[str]) -> str:
    return tools.run(["nft", *args]).stdout


def vif_group_links() -> frozenset[str]:
    """Interfaces in the vif group (2), over netlink (pyroute2)."""
    return frozenset(ip.links_in_group(VIF_GROUP))


def _with_links(state: NftState, vif: str) -> NftState:
    """The vif-group links, when no other vif's element already says that a
    table `init` did not make must stay (so an event does not list every link)."""
    if not another_vif(state, vif) and any(not is_base(t) for t in state.tables.values()):
        return state._replace(vif_links=vif_group_links())
    return state


def read_state(vif: str | None = None, addresses: tuple = ()) -> NftState:
    """Our tables of both families: whole for `init` and `check` (no vif),
    what the event needs for a vif event (read_vif_state)."""
    if vif is not None:
        return read_vif_state(vif, addresses)
    return parse_ruleset(run_nft(["-j", "list", "ruleset"]))


def read_listed(vif: str) -> NftState:
    """A vif event's state from the whole listing: the reference read_vif_state is tested against."""
    return _with_links(parse_ruleset(run_nft(["-j", "list", "ruleset"])), vif)


def read_vif_state(vif: str, addresses: tuple) -> NftState:
    """What one event of `vif` needs: the NftState the planner gets from the
    whole listing, but `allowed` holds only this vif's pairs and the pairs of
    the addresses it asks about (its own and `addresses`), `downstream` only
    those addresses, and `other_vifs` says whether any other vif has a pair."""
    tables, other_vifs = {}, False
    mine = nftables.ifname_field(vif)
    with nftables.Reader() as reader:
        for version in (4, 6):
            found = reader.table(version, TABLE)
            if found is None:
                continue
            chains, sets = found
            keys = [key for key in (reader.set_keys(version, TABLE, ALLOWED) if ALLOWED in sets else ())
                    if nftables.is_pair_key(key, version)]
            # Compared as the kernel's bytes: only the few pairs that matter are decoded.
            own = {key[nftables.IFNAMSIZ:] for key in keys if key[:nftables.IFNAMSIZ] == mine}
            asked = own | {nftables.address_key(str(a)) for a in addresses if a.version == version}
            other_vifs = other_vifs or len(own) < len(keys)
            pairs = frozenset(nftables.decode_pair(key, version) for key in keys if key[nftables.IFNAMSIZ:] in asked)
            down = frozenset(nftables.decode_address(key) for key in sorted(asked) if DOWNSTREAM in sets
                             and reader.has_key(version, TABLE, DOWNSTREAM, key))
            tables[version] = NftTable(chains, pairs, down, ALLOWED in sets and DOWNSTREAM in sets)
    return _with_links(NftState(tables, other_vifs=other_vifs), vif)


def chain_rules(version: int, chain: str) -> list[str]:
    """The rules of one of our chains as `nft -s list chain` prints them (its `type ...` line apart)."""
    lines = [line.strip() for line in run_nft(["-s", "list", "chain", FAMILIES[version], TABLE, chain]).splitlines()]
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("chain ")) + 1:]
    return [line for line in body if line and line != "}" and not line.startswith("type ")]
