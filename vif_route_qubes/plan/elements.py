"""One planner of a vif's set elements, for both backends.

Per family, two sets: `allowed` holds (vif, address) pairs, the sources a vif
may send from; `downstream` holds every VM address, dropped when it arrives
on any other interface than a vif.  A vif event changes only its own pairs,
and a downstream address only when no other vif holds it (CONTRACT section 1:
a restarted VM's new vif keeps its protection when the old vif's offline is
late).  nft.py renders the changes as `add/delete element`, antispoof_ipt.py
as ipset commands.
"""

from typing import NamedTuple

ALLOWED, DOWNSTREAM = "allowed", "downstream"


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
        out.append(Change(False, ALLOWED, version, addr, vif))
        if addr in held.downstream and addr not in held.others:
            out.append(Change(False, DOWNSTREAM, version, addr))
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
