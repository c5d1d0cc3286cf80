"""The DNS command's nft plan: the rules of `F qubes dnat-dns` (the table and the
chain's hook are the shared base's, vif_route_qubes.plan.nft) and the lines that
make it exact.  Pure: what nft holds there now is read by facts.py."""

from vif_route_qubes.plan.nft import DNAT_SPEC, FAMILIES, TABLE, base_chain

DADDR = {4: "ip daddr", 6: "ip6 daddr"}
CUSTOM_DNS = "custom-dnat-dns"


def dnat_rules(version: int, virtual: tuple, upstream: tuple) -> list[str]:
    """The user's chain first, then the DNAT of each virtual address (udp and tcp 53)
    to upstream i mod n, or, with no upstream, an immediate refusal (nft may
    reject at prerouting: the query never reaches forwarding)."""
    if not virtual:
        return []
    rules = [f"jump {CUSTOM_DNS}"]
    for index, addr in enumerate(virtual):
        for proto in ("udp", "tcp"):
            if upstream:
                target = f"dnat to {upstream[index % len(upstream)]}"
            else:  # ICMP(v6) port unreachable for UDP, a reset for TCP
                target = "reject" if proto == "udp" else "reject with tcp reset"
            rules.append(f"{DADDR[version]} {addr} {proto} dport 53 {target}")
    return rules


def plan_dns(version: int, current: list[str] | None, table_exists: bool, virtual: tuple,
             upstream: tuple) -> list[str]:
    """Lines of one family that make `dnat-dns` exact (none when it is)."""
    f = FAMILIES[version]
    wanted = dnat_rules(version, virtual, upstream)
    if current == wanted or (current is None and not wanted):
        return []
    out = [] if table_exists else [f"add table {f} {TABLE}"]
    if wanted:  # `add` leaves an existing chain and its rules alone
        out.append(f"add chain {f} {TABLE} {CUSTOM_DNS}")
    # add (so that delete cannot fail), delete, recreate: one atomic replacement.
    out += [f"add chain {f} {TABLE} dnat-dns {{ {DNAT_SPEC} }}", f"delete chain {f} {TABLE} dnat-dns"]
    out += base_chain(f, "dnat-dns", DNAT_SPEC, wanted)
    return out
