"""Reading iptables: `iptables-save` of both families, split into tables
(plan/ipt_text.py parses it)."""

from vif_route_qubes.plan.ipt_text import EMPTY_TABLE, parse_save
from vif_route_qubes.system import tools


def save(family: int, table_name: str | None = None) -> str:
    """`iptables-save [-t TABLE]` (ip6tables-save for family 6)."""
    return tools.run(["ip6tables-save" if family == 6 else "iptables-save",
                      *(["-t", table_name] if table_name else [])]).stdout


def save_both(table_name: str | None = None) -> tuple[str, str]:
    """One table (or all) of both families, one after the other: sh's start of
    a program is Python under the GIL, and two at once from threads took about
    2 ms longer here than one after the other (tests/tools/bench.py, DNS unchanged)."""
    return save(4, table_name), save(6, table_name)


def read_tables(names: tuple[str, ...] = ("filter", "nat", "mangle")) -> dict:
    """Those tables of both families (4, 6 -> name -> TableState), as the DNS planner wants them."""
    # One iptables-save of every table per family: a program run costs more than the listing.
    tables: dict = {4: {}, 6: {}}
    for version, text in zip((4, 6), save_both()):
        parsed = parse_save(text)
        for name in names:
            tables[version][name] = parsed.get(name, EMPTY_TABLE)
    return tables
