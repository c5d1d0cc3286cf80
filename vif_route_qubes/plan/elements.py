"""One planner of a vif's set elements, for both backends.

Per family, two sets: `allowed` holds (vif, address) pairs, the sources a vif
may send from; `downstream` holds every VM address, dropped when it arrives
on any other interface than a vif.  A vif event changes only its own pairs,
and a downstream address only when no other vif holds it (CONTRACT section 1:
a restarted VM's new vif keeps its protection when the old vif's offline is
late).  The changes render themselves here, as ipset commands (the iptables
backend's IpsetElements step) or as nft `add/delete element` lines (the nft
backend's NftElements step): batch.py's steps use these, and import no planner.
"""

from typing import NamedTuple

from vif_route_qubes.model import ALLOWED, DOWNSTREAM
NFT_FAMILIES = {4: "ip", 6: "ip6"}  # nft's family of each IP version


class Held(NamedTuple):
    """What the kernel has of the addresses one event may touch (one family)."""

    mine: frozenset[str] = frozenset()        # addresses in `allowed` with this vif
    downstream: frozenset[str] = frozenset()  # ... of those and the wanted ones, in `downstream`
    others: frozenset[str] = frozenset()      # ... held in `allowed` by another vif


class Change(NamedTuple):
    add: bool
    set: str            # ALLOWED or DOWNSTREAM
    version: int        # 4 or 6
    address: str
    vif: str | None = None  # the pair's interface (ALLOWED only)


def changes(vif: str, version: int, addrs: tuple, enable: bool, held: Held) -> list[Change]:
    """The element changes that leave this vif's pairs exactly `addrs` (online) or none (offline)."""
    want = {str(a) for a in addrs if a.version == version} if enable else set()
    out = []
    for addr in sorted(held.mine - want):
        # downstream first: an offline learns its addresses from the kernel (its
        # pairs, app/offline.py), so a run killed between the two deletions
        # (ipsets: one request each) leaves the pair that tells its rerun the address.
        if addr in held.downstream and addr not in held.others:
            out.append(Change(False, DOWNSTREAM, version, addr))
        out.append(Change(False, ALLOWED, version, addr, vif))
    for addr in sorted(want):
        if addr not in held.mine:
            out.append(Change(True, ALLOWED, version, addr, vif))
        if addr not in held.downstream:
            out.append(Change(True, DOWNSTREAM, version, addr))
    return out


def of_pairs(vif: str, pairs, downstream) -> Held:
    """Held from a full read of the sets ((vif, address) pairs and downstream addresses)."""
    pairs = tuple(pairs)
    mine = frozenset(a for name, a in pairs if name == vif)
    return Held(mine, frozenset(downstream), frozenset(a for name, a in pairs if name != vif))


def ipset_name(kind: str, version: int) -> str:
    """The iptables backend's ipset of `kind` (ALLOWED or DOWNSTREAM) for IPv`version`."""
    return f"qbs-{kind}{version}"


def ipset_command(change: Change) -> str:
    """One element change as the ipset command line that makes it."""
    key = f"{change.address},{change.vif}" if change.vif else change.address
    return f"ipset {'add' if change.add else 'del'} -exist {ipset_name(change.set, change.version)} {key}"


def nft_command(change: Change, table: str) -> str:
    """One element change as the `nft -f` line that makes it, in `table` of the change's family."""
    verb = "add" if change.add else "delete"
    key = f'"{change.vif}" . {change.address}' if change.vif else change.address
    return f"{verb} element {NFT_FAMILIES[change.version]} {table} {change.set} {{ {key} }}"
