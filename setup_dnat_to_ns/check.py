"""`qubes-setup-dnat-to-ns --check`: the DNS chains and jumps against what
the DNS planner installs on empty tables (the shared report types are
vif_route_qubes/check/report.py's)."""

import re
import sys

from setup_dnat_to_ns import facts, nft_dns
from setup_dnat_to_ns import plan as dns_plan
from setup_dnat_to_ns.plan import CUSTOM_CHAIN, DNAT_CHAIN, DnsInputs
from setup_dnat_to_ns.resolvers import upstream_servers
from vif_route_qubes.check.report import Drift, lines_drift, report
from vif_route_qubes.facts.ipt_state import read_tables
from vif_route_qubes.plan import ipt_text, nft
from vif_route_qubes.system.backend import resolve
from vif_route_qubes.system.lock import shared_lock

_DNAT = re.compile(r"-A \S+ -d (\S+)/(?:32|128) -p (udp|tcp) -m \2 --dport 53 -j DNAT --to-destination (\S+)")


def dns_drift(inp, tables: dict, version: int = 4) -> list[Drift]:
    """One family's DNS chains and their jumps, against what the DNS planner installs on empty tables."""
    text = dns_plan.rules_text(inp, {}, version) or ""
    tool = "ip6tables" if version == 6 else "iptables"
    out: list[Drift] = []
    for name, want in ipt_text.parse_save(text).items():
        have = tables.get(name, ipt_text.EMPTY_TABLE)
        for chain in sorted(want.chains):
            if chain not in have.chains:
                out.append(Drift("DNS", "chain-missing", f"chain {_where(name, version)} {chain} missing"))
            elif chain == dns_plan.CUSTOM_CHAIN:
                continue  # the user's: only its existence is ours
            elif chain == dns_plan.DNAT_CHAIN:
                out += _dnat_drift(inp, have.rules_of(chain), want.rules_of(chain), version)
            else:
                out += lines_drift("DNS", f"{_where(name, version)} {chain}", have.rules_of(chain),
                                   want.rules_of(chain))
    table = None
    for line in text.splitlines():  # the planner's check-then-insert jumps: -I BUILTIN POS ...
        table = line[1:] if line.startswith("*") else table
        if line.startswith("-I "):
            _, builtin, _, rest = line.split(" ", 3)
            jump = f"-A {builtin} {rest}"
            count = tables.get(table, ipt_text.EMPTY_TABLE).rules_of(builtin).count(jump)
            if count != 1:
                what = "missing" if not count else f"duplicated {count} times"
                out.append(Drift("DNS", "jump-missing" if not count else "jump-duplicated",
                                 f"jump {what} ({_where(table, version)}): {jump}"))
    if not out and dns_plan.rules_text(inp, tables, version) is not None:
        out.append(Drift("DNS", "rules-differ", f"DNS rules ({tool}) differ from what qubes-setup-dnat-to-ns "
                                                "would install"))
    return out


def _where(table: str, version: int) -> str:
    """The table's name as the messages show it: `nat`, or `ip6 nat` for IPv6."""
    return f"ip6 {table}" if version == 6 else table


def _dnat_drift(inp, current: tuple, wanted: tuple, version: int) -> list[Drift]:
    """Per virtual address: where it is DNATed to, and where it should be."""
    jump = f"-A {DNAT_CHAIN} -j {CUSTOM_CHAIN}"
    out = [d for d in lines_drift("DNS", f"{_where('nat', version)} PR-QBS", current, wanted)
           if d.kind == "rule-duplicated" or jump in d.detail]
    current, wanted = tuple(r for r in current if r != jump), tuple(r for r in wanted if r != jump)
    have: dict = {}
    want: dict = {}
    for lines, into in ((current, have), (wanted, want)):
        for line in lines:
            if match := _DNAT.fullmatch(line):
                into.setdefault(match.group(1), {}).setdefault(match.group(2), set()).add(match.group(3))
            else:
                out.append(Drift("DNS", "rule-unexpected", f"unexpected {_where('nat', version)} PR-QBS rule: {line}"))

    def where(protos: dict) -> str:  # "203.0.113.53", or "203.0.113.53 (tcp only)"
        targets = ", ".join(sorted(set().union(*protos.values())))
        return targets if len(protos) == 2 else f"{targets} ({' and '.join(protos)} only)"

    virtual = [str(v) for v in inp.of(version)[0]]
    for addr in dict.fromkeys([*virtual, *have]):
        h, w = have.get(addr, {}), want.get(addr, {})
        if h != w:
            is_now = f"is DNATed to {where(h)}" if h else "is not DNATed"
            should = ("but it is not a virtual DNS address" if addr not in virtual
                      else f"should be {where(w) if w else 'refused (no upstream resolver)'}")
            out.append(Drift("DNS", "dns-target", f"{addr} {is_now}, {should}"))
    return out


def run_dns_check(read_virtual, resolv_conf: str, as_json: bool, backend: str, lock_file: str,
                  lock_timeout: float, out=sys.stdout) -> int:
    """`qubes-setup-dnat-to-ns --check`; read_virtual() gives the virtual DNS addresses."""
    def collect() -> list[Drift]:
        virtual = read_virtual()
        if not virtual:
            return []  # this VM provides no network: nothing is expected
        inp = DnsInputs(virtual=virtual, upstream=upstream_servers(resolv_conf))
        if resolve(backend) == "nft":
            with shared_lock(lock_file, lock_timeout):
                return nft_dns_drift(inp)
        with shared_lock(lock_file, lock_timeout):
            tables = read_tables()
        return [d for version in (4, 6) for d in dns_drift(inp, tables[version], version)]

    return report("qubes-setup-dnat-to-ns", collect, as_json, out)


def nft_dns_drift(inp) -> list[Drift]:
    """nft backend: each family's `dnat-dns` chain against what the planner installs."""
    out: list[Drift] = []
    for version in (4, 6):
        wanted = nft_dns.dnat_rules(version, *inp.of(version))
        current = facts.current_dnat_rules(version)
        where = f"{nft.FAMILIES[version]} {nft.TABLE} dnat-dns"
        if current is None:
            if wanted:
                out.append(Drift("DNS", "chain-missing", f"chain {where} missing"))
            continue
        out += lines_drift("DNS", where, tuple(current), tuple(wanted))
        if not out and current != wanted:
            out.append(Drift("DNS", "rules-out-of-order", f"{where} rules out of order"))
    return out
