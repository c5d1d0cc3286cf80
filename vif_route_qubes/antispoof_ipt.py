"""Anti-spoofing in the iptables raw table: parse what is there, plan the change.

Layout (all ours, by name):
  raw PREROUTING  -j QBS-ANTISPOOF                       (inserted once, first)
  QBS-ANTISPOOF   -i vifD.N  -j QBS-AS-vifD.N             (one per vif)
                  -s ADDR ! -i vif+ -j DROP               (one per VM address)
  QBS-AS-vifD.N   -s ADDR -j RETURN ... -j DROP           (flushed and refilled)
Rules in QBS-ANTISPOOF carry the vif's name as a comment: that is how a vif's
rules are found again.  Lines are written exactly as iptables-save prints them,
so "what is there" and "what should be there" compare as text.
"""

from ipaddress import IPv4Address, IPv6Address

from vif_route_qubes.ipt_state import TableState, delete, table

DISPATCH = "QBS-ANTISPOOF"
PREFIX = "QBS-AS-"
JUMP = f"-A PREROUTING -j {DISPATCH}"
# The same jump made by `init`: it marks the chain as part of the base ruleset,
# which the offline of the last vif leaves in place.
BASE_JUMP = f'-A PREROUTING -m comment --comment "qubes base" -j {DISPATCH}'


def vif_chain(vif: str) -> str:
    return PREFIX + vif


def parse_save(text: str) -> TableState:
    """The raw table of `iptables-save` (or `iptables-save -t raw`) output."""
    return table(text, "raw")


def has_jump(state: TableState) -> bool:
    prerouting = state.rules_of("PREROUTING")
    return JUMP in prerouting or BASE_JUMP in prerouting


def extra_jumps(state: TableState) -> list[str]:
    """Deletions that leave exactly one jump to the dispatch chain (the base one
    when `init` made it), whatever copies were added by hand."""
    prerouting = state.rules_of("PREROUTING")
    keep = BASE_JUMP if BASE_JUMP in prerouting else JUMP
    out, kept = [], False
    for line in prerouting:
        if line == keep and not kept:
            kept = True
        elif line in (JUMP, BASE_JUMP):
            out.append(delete(line))
    return out


def is_base(state: TableState) -> bool:
    return BASE_JUMP in state.rules_of("PREROUTING")


def dispatch_rules_of(state: TableState, vif: str) -> tuple[str, ...]:
    tag = f'--comment "{vif}" '
    return tuple(line for line in state.rules_of(DISPATCH) if tag in line)


def _host(addr: IPv4Address | IPv6Address) -> str:
    return f"{addr}/{addr.max_prefixlen}"


def desired_rules(vif: str, family: int, addrs: tuple) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(dispatch lines, per-vif chain lines) for a vif online with these addresses."""
    chain = vif_chain(vif)
    own = [a for a in addrs if a.version == family]
    dispatch = [f'-A {DISPATCH} -i {vif} -m comment --comment "{vif}" -j {chain}']
    dispatch += [f'-A {DISPATCH} -s {_host(a)} ! -i vif+ -m comment --comment "{vif}" -j DROP' for a in own]
    # Only the VM's own addresses, as with nft: not even link-local neighbour
    # discovery (the VM solicits its global gateway from its global address).
    body = [f"-A {chain} -s {_host(a)} -j RETURN" for a in own]
    body.append(f"-A {chain} -j DROP")
    return tuple(dispatch), tuple(body)


def plan_online(state: TableState, vif: str, family: int, addrs: tuple) -> str | None:
    """iptables-restore input that puts this vif's rules in place, or None if they are."""
    dispatch, body = desired_rules(vif, family, addrs)
    chain = vif_chain(vif)
    current = dispatch_rules_of(state, vif)
    extra = extra_jumps(state)
    if (has_jump(state) and not extra and chain in state.chains
            and sorted(current) == sorted(dispatch) and state.rules_of(chain) == body):
        return None
    out = ["*raw"]
    if DISPATCH not in state.chains:
        out.append(f":{DISPATCH} - [0:0]")
    out.append(f":{chain} - [0:0]")  # declaring a chain in --noflush mode flushes it
    if not has_jump(state):
        out.append(f"-I PREROUTING 1 -j {DISPATCH}")
    out += extra
    out += [delete(line) for line in current]
    out += list(body)
    out += list(dispatch)
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def offline_ops(state: TableState, vif: str) -> list[tuple[str, str, str | None, int | None]]:
    """What offline removes, in order, as (kind, chain, saved line, rule handle):
    kind "rule" deletes one rule, "flush" every rule of the chain, "chain" the
    chain.  The handle is known when the state was read over netlink.

    When no vif is left in the dispatch chain and `init` did not make it part
    of the base, it goes too, so that online+offline leaves the table exactly
    as it was.
    """
    chain = vif_chain(vif)
    tag = f'--comment "{vif}" '
    lines = state.rules_of(DISPATCH)
    dispatch = list(zip(lines, state.handles_of(DISPATCH) or (None,) * len(lines)))
    current = [(line, handle) for line, handle in dispatch if tag in line]
    ops = [("rule", DISPATCH, line, handle) for line, handle in current]
    if chain in state.chains:
        ops += [("flush", chain, None, None), ("chain", chain, None, None)]
    if not is_base(state) and len(dispatch) == len(current) and DISPATCH in state.chains:
        prerouting = state.rules_of("PREROUTING")
        numbers = state.handles_of("PREROUTING") or (None,) * len(prerouting)
        ops += [("rule", "PREROUTING", line, handle) for line, handle in zip(prerouting, numbers) if line == JUMP]
        ops += [("flush", DISPATCH, None, None), ("chain", DISPATCH, None, None)]
    return ops


def render_ops(ops: list) -> str | None:
    """iptables-restore input doing `ops`, or None if there is nothing to do."""
    if not ops:
        return None
    out = ["*raw"]
    for kind, chain, line, _ in ops:
        # declaring a chain in --noflush mode flushes it
        out.append(delete(line) if kind == "rule" else f":{chain} - [0:0]" if kind == "flush" else f"-X {chain}")
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def plan_offline(state: TableState, vif: str) -> str | None:
    """iptables-restore input that removes every rule of this vif, or None if none is left."""
    return render_ops(offline_ops(state, vif))
