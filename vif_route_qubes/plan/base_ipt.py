"""`init`: the base ruleset of a network-providing VM (CONTRACT section 3), iptables.

Ours, flushed and refilled:  nat QBS-POSTROUTING, filter QBS-BASE-INPUT and
QBS-BASE-FORWARD.  Made when missing and never flushed (others fill them):
raw QBS-ANTISPOOF (the static anti-spoofing rules, on ipsets), nat PR-QBS (DNS DNAT, owned by
qubes-setup-dnat-to-ns), nat PR-QBS-SERVICES, filter QBS-INPUT; the chains
Qubes R4.1's firewall daemon flushes and fills (filter QBS-FORWARD, raw
QBS-PREROUTING, mangle QBS-POSTROUTING); the user's filter custom-input and
custom-forward.  Built-in chains only get jumps, check-then-insert.

Order in the built-in chains: INPUT and FORWARD jump to the user's chain
first, then to ours (so a user can let one VM reach another on purpose);
QBS-FORWARD is consulted after the vif-to-vif drop, so the daemon's per-VM
rules never open traffic between VMs.  raw PREROUTING jumps to QBS-PREROUTING
last, after the anti-spoofing (which always goes first).
"""

from vif_route_qubes.plan.ipt_text import EMPTY_TABLE, TableState, delete, ensure_chain, ensure_jump, sync_chain
from vif_route_qubes.plan import antispoof_ipt

HOOK_CHAINS = {"nat": ("PR-QBS", "PR-QBS-SERVICES"), "filter": ("QBS-INPUT", "QBS-FORWARD")}
USER_CHAINS = {"INPUT": "custom-input", "FORWARD": "custom-forward"}


def ensure_jumps(state: TableState, builtin: str, jumps: tuple[str, ...]) -> list[str]:
    """Each of `jumps` (as saved) exactly once in `builtin`, in that order: a
    missing first one goes to the top, a missing or misplaced later one right
    after the one before it; extra copies (made by hand) are deleted.  Rules
    of others stay where they are."""
    rules = list(state.rules_of(builtin))  # as they will be, line by line of `out`
    out, before = [], None

    def slot() -> int:  # how many rules precede the place of the next jump
        return rules.index(before) + 1 if before else 0

    for jump in jumps:
        while rules.count(jump) > 1 or (jump in rules and rules.index(jump) < slot()):
            out.append(delete(jump))  # -D deletes the first copy
            rules.remove(jump)
        if jump not in rules:
            out.append(f"-I {builtin} {slot() + 1}" + jump[len(f"-A {builtin}"):])
            rules.insert(slot(), jump)
        before = jump
    return out


def ensure_last_jump(state: TableState, builtin: str, jump: str) -> list[str]:
    """Exactly one `jump` in `builtin`, appended when missing (so that whatever
    is inserted at the top, anti-spoofing, stays before it)."""
    count = state.rules_of(builtin).count(jump)
    return [jump] if count == 0 else [delete(jump)] * (count - 1)


def postrouting(family: int) -> tuple[str, ...]:
    c = "QBS-POSTROUTING"
    return (f"-A {c} -o vif+ -j RETURN", f"-A {c} -o lo -j RETURN", f"-A {c} -j MASQUERADE")


def base_input(family: int, routed: bool) -> tuple[str, ...]:
    c = "QBS-BASE-INPUT"
    if not routed:  # IPv6 not offered to the VMs: nothing of it from them
        return (f"-A {c} -i vif+ -j DROP",)
    dhcp, icmp, reject = ((67, "icmp", "icmp-host-prohibited") if family == 4
                          else (547, "ipv6-icmp", "icmp6-adm-prohibited"))
    return (f"-A {c} -i vif+ -p udp -m udp --dport {dhcp} -j DROP",
            f"-A {c} -i vif+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A {c} -i vif+ -p {icmp} -j ACCEPT",
            f"-A {c} -i vif+ -j QBS-INPUT",
            f"-A {c} -i vif+ -j REJECT --reject-with {reject}")


def base_forward(family: int, routed: bool) -> tuple[str, ...]:
    c = "QBS-BASE-FORWARD"
    if not routed:
        return (f"-A {c} -i vif+ -j DROP", f"-A {c} -o vif+ -j DROP")
    return (f"-A {c} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A {c} -i vif+ -o vif+ -j DROP",
            f"-A {c} -i vif+ -j QBS-FORWARD",
            f"-A {c} -i vif+ -j ACCEPT",
            f"-A {c} -o vif+ -j DROP")


def _raw(state: TableState, family: int) -> list[str]:
    # The static anti-spoofing rules (the sets are made before this restore runs).
    return antispoof_ipt.static_lines(state, family, base=True)


def _daemon_raw(state: TableState) -> list[str]:
    """The firewall daemon's raw chain, jumped to after the anti-spoofing
    (whatever its layout: this only ever appends)."""
    out = ensure_chain(state, "QBS-PREROUTING")
    return out + ensure_last_jump(state, "PREROUTING", "-A PREROUTING -j QBS-PREROUTING")


def _mangle(state: TableState) -> list[str]:
    out = ensure_chain(state, "QBS-POSTROUTING")
    return out + ensure_jump(state, "POSTROUTING", "-A POSTROUTING -j QBS-POSTROUTING")


def _nat(state: TableState, family: int) -> list[str]:
    out = sync_chain(state, "QBS-POSTROUTING", postrouting(family))
    out += [line for chain in HOOK_CHAINS["nat"] for line in ensure_chain(state, chain)]
    out += ensure_jump(state, "POSTROUTING", "-A POSTROUTING -j QBS-POSTROUTING")
    if family == 4:
        out += ensure_jump(state, "PREROUTING", "-A PREROUTING -j PR-QBS-SERVICES")
        out += ensure_jump(state, "PREROUTING", "-A PREROUTING -j PR-QBS")
    return out


def _filter(state: TableState, family: int, routed: bool) -> list[str]:
    chains = HOOK_CHAINS["filter"] + tuple(USER_CHAINS.values())
    out = [line for chain in chains for line in ensure_chain(state, chain)]
    out += sync_chain(state, "QBS-BASE-INPUT", base_input(family, routed))
    out += sync_chain(state, "QBS-BASE-FORWARD", base_forward(family, routed))
    for builtin, ours in (("INPUT", "QBS-BASE-INPUT"), ("FORWARD", "QBS-BASE-FORWARD")):
        jumps = (f"-A {builtin} -j {USER_CHAINS[builtin]}", f"-A {builtin} -j {ours}")
        out += ensure_jumps(state, builtin, _dns_guard_jump(state, builtin) + jumps)
    return out


def _dns_guard_jump(state: TableState, builtin: str) -> tuple[str, ...]:
    """qubes-setup-dnat-to-ns's refusal of DNS with no upstream (filter
    QBS-DNS-GUARD), when it is there: it must see queries before any accept,
    so the user's and our jumps go after it."""
    jump = f"-A {builtin} -j QBS-DNS-GUARD"
    return (jump,) if jump in state.rules_of(builtin) else ()


def plan_base(tables: dict[str, TableState], family: int, routed: bool) -> str | None:
    """iptables-restore input for one family's base, or None when it is in place.

    `routed` is whether this family is forwarded for the VMs (always for IPv4;
    for IPv6 when qubesdb has /qubes-netvm-gateway6).
    """
    raw = tables.get("raw", EMPTY_TABLE)
    sections = [("raw", _raw(raw, family) + _daemon_raw(raw)),
                ("mangle", _mangle(tables.get("mangle", EMPTY_TABLE))),
                ("filter", _filter(tables.get("filter", EMPTY_TABLE), family, routed))]
    if family == 4 or routed:
        sections.append(("nat", _nat(tables.get("nat", EMPTY_TABLE), family)))
    out = []
    for name, lines in sections:
        if lines:
            out += [f"*{name}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else None
