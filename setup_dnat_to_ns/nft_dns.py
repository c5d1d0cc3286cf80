"""The DNS command's nft part: the rules of `F qubes dnat-dns` (the table and the
chain's hook are the shared base's, vif_route_qubes.plan.nft), what nft holds
there now, and the lines that make it exact."""

from vif_route_qubes.plan.nft import DNAT_SPEC, FAMILIES, TABLE, base_chain
from vif_route_qubes.system import tools

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


def _chain_rules(text: str) -> list[str]:
    """The rules of one listed chain: the lines after its `type nat hook ...` line."""
    lines = [line.strip() for line in text.splitlines()]
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("type nat")), len(lines))
    return [line for line in lines[start:] if line and line != "}"]


def current_dnat_rules(version: int = 4) -> list[str] | None:
    """The rules of `F qubes dnat-dns` as nft prints them; None when the chain is missing."""
    result = tools.run(["nft", "list", "chain", FAMILIES[version], TABLE, "dnat-dns"], timeout=30, check=False)
    return _chain_rules(result.stdout) if result.exit_code == 0 else None


def current_dnat_rules_of(versions: tuple[int, ...]) -> dict[int, list[str] | None]:
    """current_dnat_rules() of the families whose table exists, with one nft run
    for all of them (a program run costs more than its listing); when a chain is
    missing nft lists nothing, and each family is asked on its own."""
    if len(versions) < 2:
        return {v: current_dnat_rules(v) for v in versions}
    script = "".join(f"list chain {FAMILIES[v]} {TABLE} dnat-dns\n" for v in versions)
    result = tools.run(["nft", "-f", "-"], stdin=script, timeout=30, check=False)
    heads = {f"table {FAMILIES[v]} {TABLE} {{": v for v in versions}
    found: dict[int, list[str]] = {}
    version = None
    for line in result.stdout.splitlines():
        if line in heads:
            version = heads[line]
            found[version] = []
        elif version is not None:
            found[version].append(line)
    if result.exit_code != 0 or sorted(found) != sorted(versions):
        return {v: current_dnat_rules(v) for v in versions}
    return {v: _chain_rules("\n".join(found[v])) for v in versions}


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
