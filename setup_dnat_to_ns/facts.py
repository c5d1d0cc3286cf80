"""What the DNS command reads of the system besides iptables
(vif_route_qubes.facts.ipt_state.read_tables): the nft chain `F qubes
dnat-dns` and the ICMP rate masks."""

from setup_dnat_to_ns.plan import RATEMASK
from vif_route_qubes.plan.nft import FAMILIES, TABLE
from vif_route_qubes.system import tools


def ratemask() -> tuple:
    """The ICMP rate masks of this namespace (IPv4, IPv6); None where unreadable."""
    out = []
    for version in (4, 6):
        try:
            with open(f"/proc/sys/{RATEMASK[version]}", encoding="ascii") as handle:
                out.append(handle.read(4096).strip())
        except (OSError, UnicodeDecodeError):
            out.append(None)
    return tuple(out)


def _chain_rules(text: str) -> list[str]:
    """The rules of one listed chain: the lines after its `type nat hook ...` line."""
    lines = [line.strip() for line in text.splitlines()]
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("type nat")), len(lines))
    return [line for line in lines[start:] if line and line != "}"]


def current_dnat_rules(version: int = 4) -> list[str] | None:
    """The rules of `F qubes dnat-dns` as nft prints them; None when the chain is missing."""
    result = tools.run(["nft", "list", "chain", FAMILIES[version], TABLE, "dnat-dns"], check=False)
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
    for line in tools.run(["nft", "-t", "list", "ruleset"]).stdout.splitlines():
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
