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


def dnat_state() -> tuple[dict[int, bool], dict[int, list[str] | None]]:
    """Whether `ip qubes` / `ip6 qubes` exist and their `dnat-dns` rules (None: no
    such chain), from one `nft -t list ruleset` (terse: no set elements).  One run
    for both families: nft 1.0.6 lists only one family's objects in one `-f`
    script, and a program run costs more than the listing."""
    heads = {f"table {FAMILIES[v]} {TABLE} {{": v for v in (4, 6)}
    tables = {4: False, 6: False}
    rules: dict[int, list[str] | None] = {4: None, 6: None}
    version = None
    in_chain = False
    for line in tools.run(["nft", "-t", "list", "ruleset"], timeout=30).stdout.splitlines():
        if not line:
            continue  # between two objects of a table
        if not line.startswith("\t"):  # a table's head or end
            version = heads.get(line)
            if version is not None:
                tables[version] = True
            in_chain = False
        elif version is not None and line == "\tchain dnat-dns {":
            in_chain, rules[version] = True, []
        elif in_chain and line == "\t}":
            in_chain = False
        elif in_chain:
            rules[version].append(line)
    return tables, {v: None if found is None else _chain_rules("\n".join(found)) for v, found in rules.items()}


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
