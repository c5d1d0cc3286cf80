"""The DNS rules, planned from inputs and the current tables (pure).

Per family (iptables for IPv4, ip6tables for IPv6), for the virtual DNS
addresses of that family:

  nat PREROUTING -j PR-QBS      PR-QBS: -j custom-dnat-dns (the user's, never
                                flushed), then DNAT of udp/tcp 53 per virtual
                                address to upstream i mod n
  filter INPUT, FORWARD         QBS-DNS-GUARD: empty while the family has an
    -j QBS-DNS-GUARD (first)    upstream; without one, udp/tcp 53 to a virtual
                                address is refused (port unreachable / reset)

The guard exists only when nothing is translated: a query that this hop's
rules DNAT, even to the same address (the Qubes R4 ProxyVM, whose resolv.conf
names the virtual addresses), is forwarded.  Identity NAT sets no conntrack
DNAT bit, so no rule after nat could tell it from an untranslated query.
Both chains are ours and change in one restore, written in the order that is
safe for the direction of the change (see rules_text).
"""

from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from setup_dnat_to_ns import nft_dns
from vif_route_qubes.plan.ipt_text import EMPTY_TABLE, TableState, delete, ensure_chain, ensure_jump, sync_chain
from vif_route_qubes.plan.batch import Batch, ConntrackPurge, Nft, Restore, Run, Sysctl

DNAT_CHAIN = "PR-QBS"
GUARD_CHAIN = "QBS-DNS-GUARD"
CUSTOM_CHAIN = "custom-dnat-dns"
PLEN = {4: 32, 6: 128}
UNREACHABLE = {4: "icmp-port-unreachable", 6: "icmp6-port-unreachable"}
# The kernel rate-limits ICMP errors per peer (and globally) for the types in
# these masks; every VM behind a masquerading hop is one peer.  Refusals must
# not be limited: destination unreachable (IPv4 type 3, ICMPv6 type 1) is
# taken out of the mask of this VM's namespace when a family is refused.
RATEMASK = {4: "net/ipv4/icmp_ratemask", 6: "net/ipv6/icmp/ratemask"}
DEST_UNREACH = {4: 3, 6: 1}


class DnsInputs(NamedTuple):
    virtual: tuple[IPv4Address | IPv6Address, ...]   # both families
    upstream: tuple[IPv4Address | IPv6Address, ...]  # both families
    dispatcher: bool = False        # run by NetworkManager's dispatcher
    firewall_running: bool = False  # /run/qubes-service/qubes-firewall exists
    ratemask: tuple[str | None, str | None] = (None, None)  # current masks (IPv4, IPv6); None: unknown

    def of(self, version: int) -> tuple[tuple, tuple]:
        """(virtual, upstream) of one family."""
        return (tuple(a for a in self.virtual if a.version == version),
                tuple(a for a in self.upstream if a.version == version))

    def refused(self, version: int) -> bool:
        virtual, upstream = self.of(version)
        return bool(virtual) and not upstream


def dnat_rules(inp: DnsInputs, version: int = 4) -> tuple[str, ...]:
    virtual, upstream = inp.of(version)
    if not virtual:
        return ()
    rules = [f"-A {DNAT_CHAIN} -j {CUSTOM_CHAIN}"]
    for index, addr in enumerate(virtual if upstream else ()):
        target = upstream[index % len(upstream)]
        for proto in ("udp", "tcp"):
            rules.append(f"-A {DNAT_CHAIN} -d {addr}/{PLEN[version]} -p {proto} -m {proto} --dport 53 "
                         f"-j DNAT --to-destination {target}")
    return tuple(rules)


def guard_rules(inp: DnsInputs, version: int = 4) -> tuple[str, ...]:
    if not inp.refused(version):
        return ()
    virtual, _ = inp.of(version)
    return tuple(f"-A {GUARD_CHAIN} -d {addr}/{PLEN[version]} -p {proto} -m {proto} --dport 53 "
                 f"-j REJECT --reject-with {UNREACHABLE[version] if proto == 'udp' else 'tcp-reset'}"
                 for addr in virtual for proto in ("udp", "tcp"))


def _old_guard(mangle: TableState) -> list[str]:
    """The seed's guard (mangle, always present, DROP) dropped identity-DNATed
    queries: remove it and its jumps."""
    if not mangle.has(GUARD_CHAIN):
        return []
    out = [delete(line) for chain in ("FORWARD", "INPUT") for line in mangle.rules_of(chain)
           if line == f"-A {chain} -j {GUARD_CHAIN}"]
    return out + [f"-F {GUARD_CHAIN}", f"-X {GUARD_CHAIN}"]


def rules_text(inp: DnsInputs, tables: dict[str, TableState], version: int = 4) -> str | None:
    """ip(6)tables-restore input that makes one family's DNS rules exact, or None when they are."""
    filt = tables.get("filter", EMPTY_TABLE)
    nat = tables.get("nat", EMPTY_TABLE)
    guard, dnat = guard_rules(inp, version), dnat_rules(inp, version)
    filter_lines: list[str] = []
    nat_lines: list[str] = []
    if inp.of(version)[0]:
        filter_lines = sync_chain(filt, GUARD_CHAIN, guard)
        for builtin in ("FORWARD", "INPUT"):  # before any accept of the base ruleset
            filter_lines += ensure_jump(filt, builtin, f"-A {builtin} -j {GUARD_CHAIN}")
        nat_lines = ensure_chain(nat, CUSTOM_CHAIN) + sync_chain(nat, DNAT_CHAIN, dnat)
        nat_lines += ensure_jump(nat, "PREROUTING", f"-A PREROUTING -j {DNAT_CHAIN}")
    else:  # no virtual address of this family (any more): empty what exists
        filter_lines = sync_chain(filt, GUARD_CHAIN, ()) if filt.has(GUARD_CHAIN) else []
        nat_lines = sync_chain(nat, DNAT_CHAIN, ()) if nat.has(DNAT_CHAIN) else []
    # Whatever order the tables are committed in, no query is ever forwarded
    # untranslated: a guard that appears is in place before the DNAT rules go,
    # DNAT rules that appear are in place before the guard goes.
    sections = [("filter", filter_lines), ("nat", nat_lines)]
    if not guard:
        sections.reverse()
    sections.append(("mangle", _old_guard(tables.get("mangle", EMPTY_TABLE))))
    out = []
    for name, lines in sections:
        if lines:
            out += [f"*{name}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else None


def unlimited_mask(version: int, current: str | None) -> str | None:
    """The ratemask without destination unreachable, or None when it is already out (or unknown)."""
    if current is None:
        return None
    bit = DEST_UNREACH[version]
    try:
        if version == 4:
            mask = int(current.strip())
            return str(mask & ~(1 << bit)) if mask & (1 << bit) else None
        types = set()
        for part in filter(None, current.strip().split(",")):
            low, _, high = part.partition("-")
            types.update(range(int(low), int(high or low) + 1))
    except ValueError:
        return None
    if bit not in types:
        return None
    types.discard(bit)
    runs: list[list[int]] = []
    for t in sorted(types):
        if runs and runs[-1][1] == t - 1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def ratemask_steps(inp: DnsInputs) -> list[Sysctl]:
    steps = []
    for version in (4, 6):
        value = unlimited_mask(version, inp.ratemask[version == 6]) if inp.refused(version) else None
        if value is not None:
            steps.append(Sysctl(RATEMASK[version], value))
    return steps


def plan_dns(inp: DnsInputs, tables: dict[int, dict[str, TableState]]) -> Batch:
    """iptables backend; `tables` per family (4, 6): {"filter", "nat", "mangle"}."""
    steps = [Restore(version, text) for version in (4, 6)
             if (text := rules_text(inp, tables.get(version, {}), version))]
    return _batch(inp, steps)


def plan_dns_nft(inp: DnsInputs, current: dict, table_exists: dict) -> Batch:
    """nft backend: `F qubes dnat-dns` replaced in one transaction for both
    families; with no upstream it refuses the queries itself at prerouting."""
    lines = [line for version in (4, 6)
             for line in nft_dns.plan_dns(version, current.get(version), table_exists.get(version, False),
                                      *inp.of(version))]
    return _batch(inp, [Nft("\n".join(lines) + "\n")] if lines else [])


def _batch(inp: DnsInputs, changes: list) -> Batch:
    steps = list(changes) + ratemask_steps(inp)
    if steps:
        # Flows already translated to the old resolver would keep using it.
        steps.append(ConntrackPurge(tuple(str(v) for v in inp.virtual)))
        if inp.firewall_running:
            steps.append(Run(("systemctl", "--no-block", "try-reload-or-restart", "qubes-firewall.service")))
        if inp.dispatcher:
            steps.append(Run(("systemctl", "--no-block", "try-restart", "qubes-updates-proxy.service")))
    return Batch("qubes-setup-dnat-to-ns", tuple(steps))
