"""`qubes-setup-dnat-to-ns --check`: the DNS chains and jumps against what
the DNS planner installs on empty tables (the shared parts are in check.py)."""

import re
import sys

from vif_route_qubes import ipt_state
from vif_route_qubes.check import Drift, lines_drift, refuse_nft, report, shared_lock

_DNAT = re.compile(r"-A \S+ -d (\S+)/32 -p (udp|tcp) -m \2 --dport 53 -j DNAT --to-destination (\S+)")


def dns_drift(inp, tables: dict) -> list[Drift]:
    """Our DNS chains and their jumps, against what the DNS planner installs on empty tables."""
    from setup_dnat_to_ns import plan as dns_plan

    text = dns_plan.rules_text(inp, {}) or ""
    out: list[Drift] = []
    for name, want in ipt_state.parse_save(text).items():
        have = tables.get(name, ipt_state.EMPTY_TABLE)
        for chain in sorted(want.chains):
            if chain not in have.chains:
                out.append(Drift("DNS", "chain-missing", f"chain {name} {chain} missing"))
            elif chain == dns_plan.DNAT_CHAIN:
                out += _dnat_drift(inp, have.rules_of(chain), want.rules_of(chain))
            else:
                out += lines_drift("DNS", f"{name} {chain}", have.rules_of(chain), want.rules_of(chain))
    table = None
    for line in text.splitlines():  # the planner's check-then-insert jumps: -I BUILTIN POS ...
        table = line[1:] if line.startswith("*") else table
        if line.startswith("-I "):
            _, builtin, _, rest = line.split(" ", 3)
            jump = f"-A {builtin} {rest}"
            count = tables.get(table, ipt_state.EMPTY_TABLE).rules_of(builtin).count(jump)
            if count != 1:
                what = "missing" if not count else f"duplicated {count} times"
                out.append(Drift("DNS", "jump-missing" if not count else "jump-duplicated",
                                 f"jump {what} ({table}): {jump}"))
    if not out and dns_plan.rules_text(inp, tables) is not None:
        out.append(Drift("DNS", "rules-differ", "DNS rules differ from what qubes-setup-dnat-to-ns would install"))
    return out


def _dnat_drift(inp, current: tuple, wanted: tuple) -> list[Drift]:
    """Per virtual address: where it is DNATed to, and where it should be."""
    out = [d for d in lines_drift("DNS", "nat PR-QBS", current, wanted) if d.kind == "rule-duplicated"]
    have: dict = {}
    want: dict = {}
    for lines, into in ((current, have), (wanted, want)):
        for line in lines:
            if match := _DNAT.fullmatch(line):
                into.setdefault(match.group(1), {}).setdefault(match.group(2), set()).add(match.group(3))
            else:
                out.append(Drift("DNS", "rule-unexpected", f"unexpected nat PR-QBS rule: {line}"))

    def where(protos: dict) -> str:  # "203.0.113.53", or "203.0.113.53 (tcp only)"
        targets = ", ".join(sorted(set().union(*protos.values())))
        return targets if len(protos) == 2 else f"{targets} ({' and '.join(protos)} only)"

    virtual = [str(v) for v in inp.virtual]
    for addr in dict.fromkeys([*virtual, *have]):
        h, w = have.get(addr, {}), want.get(addr, {})
        if h != w:
            is_now = f"is DNATed to {where(h)}" if h else "is not DNATed"
            should = ("but it is not a virtual DNS address" if addr not in virtual
                      else f"should be {where(w) if w else 'dropped (no upstream resolver)'}")
            out.append(Drift("DNS", "dns-target", f"{addr} {is_now}, {should}"))
    return out


def run_dns_check(read_virtual, resolv_conf: str, as_json: bool, backend: str, lock_file: str,
                  lock_timeout: float, out=sys.stdout) -> int:
    """`qubes-setup-dnat-to-ns --check`; read_virtual() gives the virtual DNS addresses."""
    from setup_dnat_to_ns.plan import DnsInputs
    from setup_dnat_to_ns.resolvers import upstream_servers

    def collect() -> list[Drift]:
        refuse_nft(backend)
        virtual = read_virtual()
        if not virtual:
            return []  # this VM provides no network: nothing is expected
        inp = DnsInputs(virtual=virtual, upstream=upstream_servers(resolv_conf))
        with shared_lock(lock_file, lock_timeout):
            mangle, nat = ipt_state.save([(4, "mangle"), (4, "nat")])
        return dns_drift(inp, {"mangle": ipt_state.table(mangle, "mangle"), "nat": ipt_state.table(nat, "nat")})

    return report("qubes-setup-dnat-to-ns", collect, as_json, out)
