"""Anti-spoofing of the iptables backend: ipsets read by a few static rules.

Layout (all ours, by name), per family N = 4 or 6:
  ipset qbs-allowedN     hash:net,iface   (VM address, vif) pairs
  ipset qbs-downstreamN  hash:ip          every VM address
  raw PREROUTING  -j QBS-ANTISPOOF        (inserted first; commented "qubes base" when `init` made it)
  QBS-ANTISPOOF   -i vif+ -m set ! --match-set qbs-allowedN src,src -j DROP
                  ! -i vif+ -m set --match-set qbs-downstreamN src -j DROP
A vif event only adds and deletes its own elements (plan/elements.py), over
netlink.  The static parts are made by `init`, or by an `online` that finds a
set missing or unused by any rule (the sets' headers say so, without reading
a rule); what an online made goes with the last offline.

Until now each vif had a chain QBS-AS-vifD.N and rules in QBS-ANTISPOOF
(the "old layout"); whoever makes the static parts migrates it: the sets are
filled from the old rules first, then one iptables-restore per family swaps
the rules, so a vif is protected by one layout or the other at every moment.
"""

import re
from typing import NamedTuple

from vif_route_qubes.plan import elements
from vif_route_qubes.plan.ipt_text import TableState, delete, table
from vif_route_qubes.plan.batch import IpsetCreate, IpsetDestroy, IpsetElements, Restore

DISPATCH = "QBS-ANTISPOOF"
PREFIX = "QBS-AS-"  # the old layout's per-vif chains
JUMP = f"-A PREROUTING -j {DISPATCH}"
# The same jump made by `init`: it marks the static parts as the base, which
# the offline of the last vif leaves in place.
BASE_JUMP = f'-A PREROUTING -m comment --comment "qubes base" -j {DISPATCH}'
SET_TYPES = {elements.ALLOWED: "hash:net,iface", elements.DOWNSTREAM: "hash:ip"}


set_name = elements.ipset_name


SET_NAMES = tuple(set_name(kind, v) for v in (4, 6) for kind in (elements.ALLOWED, elements.DOWNSTREAM))
# An empty set, never used by a rule, that `init` makes beside the base jump: it
# tells the offline of the last vif that the static parts are the base's (to be
# kept) from the sets' headers, without reading the raw tables.  Without it (a
# base from before the marker) the raw table's BASE_JUMP still says so.
BASE_SET = "qbs-base"


class IptFacts(NamedTuple):
    """What an event reads: the sets' headers, its own elements, and the raw
    tables only when static parts are to be made, migrated or removed."""

    sets: dict            # set name -> system.ipset.SetInfo
    held: dict            # 4, 6 -> elements.Held
    raw: dict | None = None  # 4, 6 -> TableState


def parse_save(text: str) -> TableState:
    """The raw table of `iptables-save` (or `iptables-save -t raw`) output."""
    return table(text, "raw")


def static_rules(version: int) -> tuple[str, ...]:
    return (f"-A {DISPATCH} -i vif+ -m set ! --match-set {set_name(elements.ALLOWED, version)} src,src -j DROP",
            f"-A {DISPATCH} ! -i vif+ -m set --match-set {set_name(elements.DOWNSTREAM, version)} src -j DROP")


def static_ok(sets: dict) -> bool:
    """Every set exists and some rule uses it (the static rules were made)."""
    return all(sets[name].exists and sets[name].references > 0 for name in SET_NAMES)


def is_base(state: TableState) -> bool:
    return BASE_JUMP in state.rules_of("PREROUTING")


def old_chains(state: TableState) -> list[str]:
    return sorted(c for c in state.chains if c.startswith(PREFIX))


_OLD_RETURN = re.compile(r"-A QBS-AS-(\S+) -s (\S+)/\d+ -j RETURN")
_OLD_DOWNSTREAM = re.compile(r'-A QBS-ANTISPOOF -s (\S+)/\d+ ! -i vif\+ -m comment --comment "(\S+)" -j DROP')


def old_elements(version: int, state: TableState, skip: str | None = None) -> list[elements.Change]:
    """The old layout's rules as elements: a chain's RETURNs are its vif's pairs,
    the dispatch chain's drops the downstream addresses (`skip`: a vif whose
    offline this is)."""
    out = []
    for chain in old_chains(state):
        for line in state.rules_of(chain):
            if (m := _OLD_RETURN.fullmatch(line)) and m.group(1) != skip:
                out.append(elements.Change(True, elements.ALLOWED, version, m.group(2), m.group(1)))
    for line in state.rules_of(DISPATCH):
        if (m := _OLD_DOWNSTREAM.fullmatch(line)) and m.group(2) != skip:
            out.append(elements.Change(True, elements.DOWNSTREAM, version, m.group(1)))
    return out


def static_lines(state: TableState, version: int, base: bool) -> list[str]:
    """iptables-restore lines (raw table) that leave QBS-ANTISPOOF holding exactly
    the static rules, one jump to it first in PREROUTING (the base one for
    `init`, or whichever is there), and no chain of the old layout."""
    out = []
    wanted = static_rules(version)
    if not state.has(DISPATCH) or state.rules_of(DISPATCH) != wanted:
        out += [f":{DISPATCH} - [0:0]", *wanted]  # declaring a chain in --noflush mode flushes it
    for chain in old_chains(state):
        out += [f":{chain} - [0:0]", f"-X {chain}"]
    prerouting = state.rules_of("PREROUTING")
    keep = BASE_JUMP if base or BASE_JUMP in prerouting else JUMP
    if keep not in prerouting:
        out.append("-I PREROUTING 1" + keep[len("-A PREROUTING"):])
    kept = False
    for line in prerouting:
        if line == keep and not kept:
            kept = True
        elif line in (JUMP, BASE_JUMP):
            out.append(delete(line))
    return out


def plan_static(raw: dict, sets: dict, base: bool, skip: str | None = None) -> list:
    """Steps that make the static parts (and migrate the old layout): sets
    first, filled from the old rules, then the rules in one restore per family."""
    steps = [IpsetCreate(name, SET_TYPES[name[4:-1]], int(name[-1])) for name in SET_NAMES if not sets[name].exists]
    if base and not (BASE_SET in sets and sets[BASE_SET].exists):
        steps.append(IpsetCreate(BASE_SET, SET_TYPES[elements.DOWNSTREAM], 4))
    fill = [change for v in (4, 6) for change in old_elements(v, raw[v], skip)]
    if fill:
        steps.append(IpsetElements(tuple(fill)))
    for version in (4, 6):
        lines = static_lines(raw[version], version, base)
        if lines:
            steps.append(Restore(version, "\n".join(["*raw", *lines, "COMMIT"]) + "\n"))
    return steps


def teardown(raw: dict, sets: dict, held: dict) -> list:
    """Offline of the last vif, when an online (not `init`) made the static
    parts: rules, then sets, so that online+offline leaves the state from before."""
    if any(is_base(raw[v]) or sets[set_name(elements.ALLOWED, v)].elements != len(held[v].mine) for v in (4, 6)):
        return []
    steps = []
    for version in (4, 6):
        state = raw[version]
        lines = [delete(line) for line in state.rules_of("PREROUTING") if line == JUMP]
        if state.has(DISPATCH):
            lines += [f":{DISPATCH} - [0:0]", f"-X {DISPATCH}"]
        if lines:
            steps.append(Restore(version, "\n".join(["*raw", *lines, "COMMIT"]) + "\n"))
    return steps + [IpsetDestroy(name) for name in SET_NAMES if sets[name].exists]


def plan_vif(facts: IptFacts, vif: str, addrs: tuple, enable: bool) -> list:
    """This vif's steps: its element changes, and the static parts when an
    online finds them missing (or the old layout), or the last offline goes."""
    steps = []
    raw, made = facts.raw, static_ok(facts.sets)
    old = raw is not None and any(old_chains(raw[v]) for v in (4, 6))
    # Offline: the static parts go with the last vif (when an online made them),
    # also half made or half removed by a killed event; otherwise, and online,
    # missing parts are made and the old layout is migrated.
    last = not enable and raw is not None and not old and bool(teardown(raw, facts.sets, facts.held))
    if not made and raw is not None and not last and (enable or old or any(raw[v].has(DISPATCH) for v in (4, 6))):
        steps += plan_static(raw, facts.sets, base=False, skip=None if enable else vif)
    changes = [c for v in (4, 6) for c in elements.changes(vif, v, addrs, enable, facts.held[v])]
    if changes:
        steps.append(IpsetElements(tuple(changes)))
    if last:
        steps += teardown(raw, facts.sets, facts.held)
    return steps


render_change = elements.ipset_command
