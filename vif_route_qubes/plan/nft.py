"""The nftables backend: the `ip qubes` / `ip6 qubes` tables of Qubes R4.2.

Layout, per family (F = ip or ip6):
  set allowed      ifname . address pairs a vif may send from (one per VM address)
  set downstream   every VM address (dropped when it arrives on a non-vif)
  chain prerouting (raw)   iifgroup 2 goto antispoof; saddr @downstream drop
  chain antispoof          iifname . saddr @allowed accept; drop
  chain postrouting (srcnat), input, forward (filter), custom-input,
        custom-forward (the user's), dnat-dns (dstnat, the DNS rules)
Vif links get interface group 2 before they come up.  Per-vif events only
add and delete set elements; `init` only creates what is missing and never
touches a chain that exists (it may hold Qubes' or the user's rules); the DNS
command replaces `dnat-dns` in one transaction (add, delete, recreate).
Every change is one nftables transaction: all of it applies, or none (`nft -f`,
or for element changes alone one netlink batch, system/nft_elements.py).
"""

import json
from typing import NamedTuple

from vif_route_qubes.model import ALLOWED, DOWNSTREAM, NFT_TABLE as TABLE
from vif_route_qubes.plan import elements
from vif_route_qubes.plan.batch import Nft, NftElements

VIF_GROUP = 2
FAMILIES = elements.NFT_FAMILIES
ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
SADDR = {4: "ip saddr", 6: "ip6 saddr"}


class NftTable(NamedTuple):
    chains: frozenset[str] = frozenset()
    allowed: frozenset[tuple[str, str]] = frozenset()   # (ifname, address)
    downstream: frozenset[str] = frozenset()
    has_sets: bool = False


class NftState(NamedTuple):
    tables: dict  # family (4/6) -> NftTable, only for tables that exist
    vif_links: frozenset[str] = frozenset()  # interfaces in the vif group (2)
    # A vif event's reading keeps in `allowed` only the pairs it may touch;
    # this says whether other vifs have pairs at all.
    other_vifs: bool = False

    def table(self, family: int) -> NftTable | None:
        return self.tables.get(family)


def parse_ruleset(text: str) -> NftState:
    """Our two tables out of `nft -j list ruleset` (the golden tests' facts,
    and the reference the netlink reader is tested against)."""
    chains: dict[int, set] = {}
    sets: dict[int, dict] = {}
    families = {name: version for version, name in FAMILIES.items()}
    for item in json.loads(text or '{"nftables": []}').get("nftables", []):
        kind, body = next(iter(item.items()))
        if not isinstance(body, dict) or body.get("family") not in families:
            continue
        version = families[body["family"]]
        if kind == "table" and body.get("name") == TABLE:
            chains.setdefault(version, set())
            sets.setdefault(version, {})
        elif body.get("table") != TABLE:
            continue
        elif kind == "chain":
            chains.setdefault(version, set()).add(body["name"])
        elif kind == "set":
            sets.setdefault(version, {})[body["name"]] = body.get("elem", [])
    tables = {}
    for version in chains:
        found = sets.get(version, {})
        allowed = frozenset(tuple(e["concat"]) for e in found.get(ALLOWED, [])
                            if isinstance(e, dict) and "concat" in e)
        downstream = frozenset(e for e in found.get(DOWNSTREAM, []) if isinstance(e, str))
        tables[version] = NftTable(frozenset(chains[version]), allowed, downstream,
                                   ALLOWED in found and DOWNSTREAM in found)
    return NftState(tables)


# -- the objects of the base ---------------------------------------------

def base_chain(f: str, name: str, spec: str, rules: list[str]) -> list[str]:
    return [f"add chain {f} {TABLE} {name} {{ {spec} }}" if spec else f"add chain {f} {TABLE} {name}",
            *(f"add rule {f} {TABLE} {name} {rule}" for rule in rules)]


def antispoof_objects(version: int, table: NftTable | None) -> list[str]:
    """What a per-vif event needs when `init` has not run: sets, antispoof, prerouting."""
    f = FAMILIES[version]
    have = table.chains if table else frozenset()
    out = [] if table else [f"add table {f} {TABLE}"]
    if not (table and table.has_sets):
        out += [f"add set {f} {TABLE} downstream {{ type {ADDR_TYPE[version]}; }}",
                f"add set {f} {TABLE} allowed {{ type ifname . {ADDR_TYPE[version]}; }}"]
    rules = antispoof_chain_rules(version)
    if "antispoof" not in have:
        out += base_chain(f, "antispoof", "", list(rules["antispoof"]))
    if "prerouting" not in have:
        out += base_chain(f, "prerouting", PREROUTING_SPEC, list(rules["prerouting"]))
    return out


PREROUTING_SPEC = "type filter hook prerouting priority raw; policy accept;"


def antispoof_chain_rules(version: int) -> dict[str, tuple[str, ...]]:
    """The static anti-spoofing rules, as `nft -s list chain` prints them."""
    return {"antispoof": (f"iifname . {SADDR[version]} @allowed accept", "counter drop"),
            "prerouting": (f"iifgroup {VIF_GROUP} goto antispoof", f"{SADDR[version]} @downstream counter drop")}


def repair_antispoof(version: int, current: dict) -> list[str]:
    """`init`: refill an anti-spoofing chain whose rules differ from ours
    (`current`: (version, chain) -> rules as listed), in the same transaction."""
    f, out = FAMILIES[version], []
    for chain, wanted in antispoof_chain_rules(version).items():
        have = current.get((version, chain))
        if have is not None and tuple(have) != wanted:
            out += [f"flush chain {f} {TABLE} {chain}", *(f"add rule {f} {TABLE} {chain} {rule}" for rule in wanted)]
    return out


def base_objects(version: int, table: NftTable | None, routed: bool) -> list[str]:
    """`init`: every missing object of the base; existing chains are left as they are."""
    f = FAMILIES[version]
    have = table.chains if table else frozenset()
    out = antispoof_objects(version, table)
    g = VIF_GROUP
    if routed:
        dhcp, icmp, reject = ((67, "icmp", "icmp type host-prohibited") if version == 4
                              else (547, "ipv6-icmp", "icmpv6 type admin-prohibited"))
        input_rules = ["jump custom-input", f"iifgroup {g} udp dport {dhcp} drop",
                       "ct state established,related accept", f"iifgroup {g} meta l4proto {icmp} accept",
                       f"iifgroup {g} reject with {reject}"]
        forward_rules = ["jump custom-forward", "ct state established,related accept",
                         f"iifgroup {g} oifgroup {g} drop", f"iifgroup {g} accept", f"oifgroup {g} drop"]
    else:  # IPv6 not offered to the VMs: nothing of it from them, nothing to them
        input_rules = ["jump custom-input", f"iifgroup {g} drop"]
        forward_rules = ["jump custom-forward", f"iifgroup {g} drop", f"oifgroup {g} drop"]
    wanted = [
        ("custom-input", "", []),
        ("custom-forward", "", []),
        ("postrouting", "type nat hook postrouting priority srcnat; policy accept;",
         [f"oifgroup {g} accept", 'oifname "lo" accept', "masquerade"]),
        ("input", "type filter hook input priority filter; policy accept;", input_rules),
        ("forward", "type filter hook forward priority filter; policy accept;", forward_rules),
    ]
    if version == 4:
        wanted.append(("dnat-dns", DNAT_SPEC, []))
    for name, spec, rules in wanted:
        if name not in have:
            out += base_chain(f, name, spec, rules)
    return out


DNAT_SPEC = "type nat hook prerouting priority dstnat; policy accept;"


def vif_elements(version: int, table: NftTable | None, vif: str, addrs: tuple, enable: bool) -> list:
    """The element changes that make this vif's pairs exactly `addrs` (online) or
    none (offline): the shared planner's (plan/elements.py)."""
    held = elements.of_pairs(vif, table.allowed if table else (), table.downstream if table else ())
    return elements.changes(vif, version, addrs, enable, held)


def render_element(change: elements.Change) -> str:
    return elements.nft_command(change, TABLE)


def is_base(table: NftTable) -> bool:
    """`init` (or Qubes) made this table, not just a per-vif event."""
    return bool(table.chains - {"antispoof", "prerouting"})


def another_vif(state: NftState, vif: str) -> bool:
    """Another vif has a pair in `allowed` (of either family)."""
    return state.other_vifs or any(name != vif for table in state.tables.values() for name, _ in table.allowed)


def plan_vif(state: NftState, vif: str, addrs: tuple, enable: bool):
    """One transaction for both families: this vif's elements (and, online, the
    anti-spoofing objects that are missing); offline also removes a table that
    only a per-vif event made once its sets are empty.  An NftElements step when
    it only changes elements (every event after `init`), else an Nft step; None
    when there is nothing to change."""
    out, changes = [], []  # out: the whole transaction; changes: its element lines
    # Another vif still relies on both tables, whatever its address families
    # (with no IPv6 address, the ip6 table is what drops its IPv6).
    others = another_vif(state, vif) or bool(state.vif_links - {vif})
    for version in (4, 6):
        table = state.table(version)
        if enable:
            out += antispoof_objects(version, table)
        elif table is None:
            continue
        drop_table = not enable and not is_base(table) and not others
        mine = [] if drop_table else vif_elements(version, table, vif, addrs, enable)  # the deletion takes them
        out += [render_element(change) for change in mine]
        changes += mine
        if drop_table:
            out.append(f"delete table {FAMILIES[version]} {TABLE}")
    if not out:
        return None
    if len(out) == len(changes):
        return NftElements(TABLE, tuple(changes))
    return Nft("\n".join(out) + "\n")
