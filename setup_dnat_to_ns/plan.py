"""The DNS rules, planned from inputs and the current tables (pure).

  nat PREROUTING -j PR-QBS          PR-QBS: DNAT of udp/tcp 53 per virtual address
  mangle FORWARD, INPUT             drop udp/tcp 53 still addressed to a virtual
    -j QBS-DNS-GUARD                address after nat: untranslated queries
                                    (no upstream) never leave the VM.
Both chains are ours and are flushed and refilled in one restore.  The guard
runs after DNAT and depends only on the virtual addresses, so at no instant is
a query neither translated nor dropped.
"""

from ipaddress import IPv4Address
from typing import NamedTuple

from vif_route_qubes.batch import Batch, ConntrackPurge, Nft, Restore, Run
from vif_route_qubes.ipt_state import EMPTY_TABLE, TableState, ensure_jump, sync_chain

DNAT_CHAIN = "PR-QBS"
GUARD_CHAIN = "QBS-DNS-GUARD"


class DnsInputs(NamedTuple):
    virtual: tuple[IPv4Address, ...]
    upstream: tuple[IPv4Address, ...]
    dispatcher: bool = False        # run by NetworkManager's dispatcher
    firewall_running: bool = False  # /run/qubes-service/qubes-firewall exists


def dnat_rules(inp: DnsInputs) -> tuple[str, ...]:
    rules = []
    for index, virtual in enumerate(inp.virtual):
        if not inp.upstream:
            break
        target = inp.upstream[index % len(inp.upstream)]
        for proto in ("udp", "tcp"):
            rules.append(f"-A {DNAT_CHAIN} -d {virtual}/32 -p {proto} -m {proto} --dport 53 "
                         f"-j DNAT --to-destination {target}")
    return tuple(rules)


def guard_rules(inp: DnsInputs) -> tuple[str, ...]:
    return tuple(f"-A {GUARD_CHAIN} -d {virtual}/32 -p {proto} -m {proto} --dport 53 -j DROP"
                 for virtual in inp.virtual for proto in ("udp", "tcp"))


def rules_text(inp: DnsInputs, tables: dict[str, TableState]) -> str | None:
    """iptables-restore input that makes our DNS rules exact, or None when they are."""
    mangle = tables.get("mangle", EMPTY_TABLE)
    nat = tables.get("nat", EMPTY_TABLE)
    # The guard first: were the two tables not committed together, queries
    # would still be dropped, never forwarded untranslated.
    mangle_lines = sync_chain(mangle, GUARD_CHAIN, guard_rules(inp))
    mangle_lines += ensure_jump(mangle, "FORWARD", f"-A FORWARD -j {GUARD_CHAIN}")
    # A virtual address that is also one of this VM's own (a gateway) is
    # delivered locally when untranslated: drop it there too, not reject it.
    mangle_lines += ensure_jump(mangle, "INPUT", f"-A INPUT -j {GUARD_CHAIN}")
    nat_lines = sync_chain(nat, DNAT_CHAIN, dnat_rules(inp))
    nat_lines += ensure_jump(nat, "PREROUTING", f"-A PREROUTING -j {DNAT_CHAIN}")
    out = []
    for name, lines in (("mangle", mangle_lines), ("nat", nat_lines)):
        if lines:
            out += [f"*{name}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else None


def plan_dns(inp: DnsInputs, tables: dict[str, TableState]) -> Batch:
    """iptables backend."""
    text = rules_text(inp, tables)
    return _batch(inp, [Restore(4, text)] if text else [])


def plan_dns_nft(inp: DnsInputs, current: list[str] | None, table_exists: bool) -> Batch:
    """nft backend: `ip qubes dnat-dns` replaced in one transaction; with no
    upstream it drops the queries itself (a nat chain may drop in nftables)."""
    from vif_route_qubes import nft

    text = nft.plan_dns(current, table_exists, inp.virtual, inp.upstream)
    return _batch(inp, [Nft(text)] if text else [])


def _batch(inp: DnsInputs, changes: list) -> Batch:
    steps = list(changes)
    if changes:
        # Flows already translated to the old resolver would keep using it.
        steps.append(ConntrackPurge(tuple(str(v) for v in inp.virtual)))
        if inp.firewall_running:
            steps.append(Run(("systemctl", "--no-block", "try-reload-or-restart", "qubes-firewall.service")))
        if inp.dispatcher:
            steps.append(Run(("systemctl", "--no-block", "try-restart", "qubes-updates-proxy.service")))
    return Batch("qubes-setup-dnat-to-ns", tuple(steps))
