"""`init`: the base ruleset of a network-providing VM (CONTRACT section 3), iptables.

Ours, flushed and refilled:  nat QBS-POSTROUTING, filter QBS-BASE-INPUT and
QBS-BASE-FORWARD.  Made when missing and never flushed (others fill them):
raw QBS-ANTISPOOF (the static anti-spoofing rules, on ipsets), nat PR-QBS (DNS DNAT, owned by
qubes-setup-dnat-to-ns), nat PR-QBS-SERVICES, filter QBS-INPUT and QBS-FORWARD
(the firewall daemon's and the user's).  Built-in chains only get jumps,
check-then-insert.
"""

from vif_route_qubes import antispoof_ipt
from vif_route_qubes.ipt_state import EMPTY_TABLE, TableState, ensure_chain, ensure_jump, sync_chain

HOOK_CHAINS = {"nat": ("PR-QBS", "PR-QBS-SERVICES"), "filter": ("QBS-INPUT", "QBS-FORWARD")}


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


def _nat(state: TableState, family: int) -> list[str]:
    out = sync_chain(state, "QBS-POSTROUTING", postrouting(family))
    out += [line for chain in HOOK_CHAINS["nat"] for line in ensure_chain(state, chain)]
    out += ensure_jump(state, "POSTROUTING", "-A POSTROUTING -j QBS-POSTROUTING")
    if family == 4:
        out += ensure_jump(state, "PREROUTING", "-A PREROUTING -j PR-QBS-SERVICES")
        out += ensure_jump(state, "PREROUTING", "-A PREROUTING -j PR-QBS")
    return out


def _filter(state: TableState, family: int, routed: bool) -> list[str]:
    out = [line for chain in HOOK_CHAINS["filter"] for line in ensure_chain(state, chain)]
    out += sync_chain(state, "QBS-BASE-INPUT", base_input(family, routed))
    out += sync_chain(state, "QBS-BASE-FORWARD", base_forward(family, routed))
    out += ensure_jump(state, "INPUT", "-A INPUT -j QBS-BASE-INPUT")
    out += ensure_jump(state, "FORWARD", "-A FORWARD -j QBS-BASE-FORWARD")
    return out


def plan_base(tables: dict[str, TableState], family: int, routed: bool) -> str | None:
    """iptables-restore input for one family's base, or None when it is in place.

    `routed` is whether this family is forwarded for the VMs (always for IPv4;
    for IPv6 when qubesdb has /qubes-netvm-gateway6).
    """
    sections = [("raw", _raw(tables.get("raw", EMPTY_TABLE), family)),
                ("filter", _filter(tables.get("filter", EMPTY_TABLE), family, routed))]
    if family == 4 or routed:
        sections.append(("nat", _nat(tables.get("nat", EMPTY_TABLE), family)))
    out = []
    for name, lines in sections:
        if lines:
            out += [f"*{name}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else None
