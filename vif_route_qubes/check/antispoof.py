"""`check` of the anti-spoofing sets and their static rules, both backends alike.

What is read (once, under the shared lock): per family the whole `allowed`
and `downstream` sets (a check may read every vif's data; an event never
does), and the static parts: for iptables the raw tables and the ipsets'
existence, for nft our tables' chains and the rules of `antispoof` and
`prerouting`.  What should be there is said once, by the planners:
antispoof_ipt.static_rules / nft.antispoof_rules and plan/elements.py.
Each finding is (scope, kind, detail), made a report.Drift by check/drift.py.
"""

from typing import NamedTuple

from vif_route_qubes.check.report import lines_drift
from vif_route_qubes.facts import ipt_state, nft_state
from vif_route_qubes.model import NFT_TABLE, VIF_NAME
from vif_route_qubes.plan import antispoof_ipt, elements, nft
from vif_route_qubes.system.ipset import Ipsets

NFT_CHAINS = ("antispoof", "prerouting")


class SetView(NamedTuple):
    exists: bool = False
    allowed: frozenset = frozenset()      # (vif, address)
    downstream: frozenset = frozenset()   # addresses


class AntispoofView(NamedTuple):
    backend: str
    sets: dict                # 4, 6 -> SetView
    raw: dict | None = None   # iptables: 4, 6 -> TableState of the raw table
    missing: tuple = ()       # iptables: names of missing ipsets; nft: missing tables, sets, chains
    rules: dict | None = None  # nft: (version, chain) -> its rules as `nft -s list` prints them
    nft_state: object = None  # nft: the nft.NftState the planner reads

    def where(self, kind: str, version: int) -> str:
        if self.backend == "nft":
            return f"{'ip6' if version == 6 else 'ip'} qubes {kind}"
        return antispoof_ipt.set_name(kind, version)

    def key(self, version: int, addr: str, vif: str | None) -> str:
        if vif is None:
            return addr
        return f'"{vif}" . {addr}' if self.backend == "nft" else f"{addr},{vif}"


# -- reading ----------------------------------------------------------------

def read(backend: str) -> AntispoofView:
    if backend == "nft":
        return _read_nft()
    sets, missing = {}, []
    with Ipsets() as ipsets:
        for version in (4, 6):
            found = {}
            for kind in (elements.ALLOWED, elements.DOWNSTREAM):
                name = antispoof_ipt.set_name(kind, version)
                found[kind] = ipsets.members(name)
                if found[kind] is None:
                    missing.append(name)
            allowed = frozenset((e[1], e[0]) for e in found[elements.ALLOWED] or () if len(e) == 2)
            downstream = frozenset(e[0] for e in found[elements.DOWNSTREAM] or ())
            sets[version] = SetView(None not in found.values(), allowed, downstream)
    save4, save6 = ipt_state.save_both("raw")
    raw = {4: antispoof_ipt.parse_save(save4), 6: antispoof_ipt.parse_save(save6)}
    return AntispoofView("iptables", sets, raw, tuple(missing))


def _read_nft() -> AntispoofView:
    state = nft_state.read_state()
    sets, missing, rules = {}, [], {}
    for version in (4, 6):
        f, table = nft.FAMILIES[version], state.table(version)
        if table is None:
            missing.append(f"table {f} qubes")
            sets[version] = SetView()
            continue
        if not table.has_sets:
            missing.append(f"set {f} qubes allowed or downstream")
        sets[version] = SetView(table.has_sets, table.allowed, table.downstream)
        for chain in NFT_CHAINS:
            if chain in table.chains:
                rules[(version, chain)] = tuple(nft_state.chain_rules(version, chain))
            else:
                missing.append(f"chain {f} qubes {chain}")
    return AntispoofView("nft", sets, None, tuple(missing), rules, state)


# -- comparisons (pure) ---------------------------------------------------------

def static_drift(view: AntispoofView) -> list[tuple[str, str, str]]:
    """What all vifs rely on: the sets, the static rules, the jump to them."""
    scope = NFT_TABLE if view.backend == "nft" else antispoof_ipt.DISPATCH
    out = [(scope, "set-missing" if "set" in m or "qbs-" in m else "chain-missing", f"{m} missing")
           for m in view.missing]
    if view.backend == "nft":
        for (version, chain), current in sorted(view.rules.items()):
            wanted = nft.antispoof_chain_rules(version)[chain]
            what = f"{nft.FAMILIES[version]} qubes {chain}"
            out += [(d.scope, d.kind, d.detail) for d in lines_drift(scope, what, current, wanted, ordered=True)]
        return out
    for version in (4, 6):
        state = view.raw[version]
        what = ("" if version == 4 else "IPv6 ") + "anti-spoofing"
        if state.has(antispoof_ipt.DISPATCH):
            out += [(d.scope, d.kind, d.detail) for d in lines_drift(
                scope, what, state.rules_of(antispoof_ipt.DISPATCH), antispoof_ipt.static_rules(version),
                ordered=True)]
        else:
            out.append((scope, "chain-missing", f"{what} chain {antispoof_ipt.DISPATCH} missing"))
        out += [(scope, "old-layout", f"chain {chain} of the old per-vif layout (init or online migrates it)")
                for chain in antispoof_ipt.old_chains(state)]
    return out


def vif_drift(view: AntispoofView, vif: str, addrs: tuple) -> list[tuple[str, str, str]]:
    """This vif's elements against its addresses: missing, and extra (another address)."""
    out = []
    for version in (4, 6):
        sets = view.sets[version]
        if not sets.exists:
            continue  # named once, as a missing set
        want = {str(a) for a in addrs if a.version == version}
        mine = {a for name, a in sets.allowed if name == vif}
        allowed, downstream = view.where(elements.ALLOWED, version), view.where(elements.DOWNSTREAM, version)
        out += [(vif, "element-missing", f"element missing from {allowed}: {view.key(version, a, vif)}")
                for a in sorted(want - mine)]
        out += [(vif, "element-missing", f"element missing from {downstream}: {a}")
                for a in sorted(want - sets.downstream)]
        out += [(vif, "element-unexpected",
                 f"unexpected element in {allowed}: {view.key(version, a, vif)} (not an address of the VM)")
                for a in sorted(mine - want)]
    return out


def vifs_of(view: AntispoofView) -> set[str]:
    return {name for sets in view.sets.values() for name, _ in sets.allowed}


def addresses_of(view: AntispoofView, vif: str) -> list[str]:
    return [a for version in (4, 6) for name, a in sorted(view.sets[version].allowed) if name == vif]


def stale_drift(view: AntispoofView, vif: str) -> list[tuple[str, str, str]]:
    """The elements of a vif whose interface is gone."""
    addrs = addresses_of(view, vif)
    if not addrs:
        return []
    return [(vif, "stale", f"stale anti-spoofing elements for {' '.join(addrs)} (no such interface)")]


def foreign_drift(view: AntispoofView, expected: frozenset = frozenset()) -> list[tuple[str, str, str]]:
    """Elements no vif event made: a pair for a name that is no vif, a
    downstream address that no pair holds and no vif is expected to have
    (`expected`: those are named as the vif's missing pair)."""
    scope = NFT_TABLE if view.backend == "nft" else antispoof_ipt.DISPATCH
    out = []
    for version in (4, 6):
        sets = view.sets[version]
        allowed, downstream = view.where(elements.ALLOWED, version), view.where(elements.DOWNSTREAM, version)
        out += [(scope, "element-foreign", f"element in {allowed} for {name}, which is no vif name: "
                 f"{view.key(version, a, name)}")
                for name, a in sorted(sets.allowed) if not VIF_NAME.fullmatch(name)]
        held = {a for _, a in sets.allowed}
        out += [(scope, "element-foreign", f"element in {downstream} that no vif holds: {a}")
                for a in sorted(sets.downstream - held - expected)]
    return out
