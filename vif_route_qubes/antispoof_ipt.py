"""Anti-spoofing in the iptables raw table: parse what is there, plan the change.

Layout (all ours, by name):
  raw PREROUTING  -j QBS-ANTISPOOF                       (inserted once, first)
  QBS-ANTISPOOF   -i vifD.N  -j QBS-AS-vifD.N             (one per vif)
                  -s ADDR ! -i vif+ -j DROP               (one per VM address)
  QBS-AS-vifD.N   -s ADDR -j RETURN ... -j DROP           (flushed and refilled)
Rules in QBS-ANTISPOOF carry the vif's name as a comment: that is how a vif's
rules are found again.  Lines are written exactly as iptables-save prints them,
so "what is there" and "what should be there" compare as text.
"""

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

DISPATCH = "QBS-ANTISPOOF"
PREFIX = "QBS-AS-"
JUMP = f"-A PREROUTING -j {DISPATCH}"
# The same jump made by `init`: it marks the chain as part of the base ruleset,
# which the offline of the last vif leaves in place.
BASE_JUMP = f'-A PREROUTING -m comment --comment "qubes base" -j {DISPATCH}'
# Neighbour discovery from link-local addresses (RS, NS, NA) stays on the link.
_NDP_TYPES = (133, 135, 136)


def vif_chain(vif: str) -> str:
    return PREFIX + vif


@dataclass(frozen=True)
class RawState:
    """Our part of one family's raw table, as iptables-save printed it."""

    chains: frozenset[str]                       # QBS-* chains that exist
    rules: tuple[tuple[str, tuple[str, ...]], ...]  # (chain, its -A lines)
    prerouting: tuple[str, ...]                  # -A PREROUTING lines

    @property
    def has_jump(self) -> bool:
        return JUMP in self.prerouting or BASE_JUMP in self.prerouting

    @property
    def is_base(self) -> bool:
        return BASE_JUMP in self.prerouting

    def rules_of(self, chain: str) -> tuple[str, ...]:
        return dict(self.rules).get(chain, ())

    def dispatch_rules_of(self, vif: str) -> tuple[str, ...]:
        tag = f'--comment "{vif}" '
        return tuple(line for line in self.rules_of(DISPATCH) if tag in line)


EMPTY = RawState(frozenset(), (), ())


def parse_save(text: str) -> RawState:
    """Read `iptables-save -t raw` output; only what concerns us is kept."""
    chains: set[str] = set()
    rules: dict[str, list[str]] = {}
    prerouting: list[str] = []
    for line in text.splitlines():
        if line.startswith(":QBS-"):
            chains.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A PREROUTING "):
            prerouting.append(line)
        elif line.startswith("-A QBS-"):
            chain = line.split(" ", 2)[1]
            rules.setdefault(chain, []).append(line)
    return RawState(frozenset(chains), tuple((c, tuple(r)) for c, r in sorted(rules.items())), tuple(prerouting))


def _host(addr: IPv4Address | IPv6Address) -> str:
    return f"{addr}/{addr.max_prefixlen}"


def desired_rules(vif: str, family: int, addrs: tuple) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(dispatch lines, per-vif chain lines) for a vif online with these addresses."""
    chain = vif_chain(vif)
    own = [a for a in addrs if a.version == family]
    dispatch = [f'-A {DISPATCH} -i {vif} -m comment --comment "{vif}" -j {chain}']
    dispatch += [f'-A {DISPATCH} -s {_host(a)} ! -i vif+ -m comment --comment "{vif}" -j DROP' for a in own]
    body = []
    if family == 6 and own:
        body += [f"-A {chain} -s fe80::/10 -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN" for t in _NDP_TYPES]
    body += [f"-A {chain} -s {_host(a)} -j RETURN" for a in own]
    body.append(f"-A {chain} -j DROP")
    return tuple(dispatch), tuple(body)


def _delete(line: str) -> str:
    return "-D" + line[2:]


def plan_online(state: RawState, vif: str, family: int, addrs: tuple) -> str | None:
    """iptables-restore input that puts this vif's rules in place, or None if they are."""
    dispatch, body = desired_rules(vif, family, addrs)
    chain = vif_chain(vif)
    current = state.dispatch_rules_of(vif)
    if (state.has_jump and chain in state.chains
            and sorted(current) == sorted(dispatch) and state.rules_of(chain) == body):
        return None
    out = ["*raw"]
    if DISPATCH not in state.chains:
        out.append(f":{DISPATCH} - [0:0]")
    out.append(f":{chain} - [0:0]")  # declaring a chain in --noflush mode flushes it
    if not state.has_jump:
        out.append(f"-I PREROUTING 1 -j {DISPATCH}")
    out += [_delete(line) for line in current]
    out += list(body)
    out += list(dispatch)
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def plan_offline(state: RawState, vif: str) -> str | None:
    """iptables-restore input that removes every rule of this vif, or None if none is left.

    When no vif is left in the dispatch chain and `init` did not make it part
    of the base, it goes too, so that online+offline leaves the table exactly
    as it was.
    """
    chain = vif_chain(vif)
    current = state.dispatch_rules_of(vif)
    out = ["*raw"]
    out += [_delete(line) for line in current]
    if chain in state.chains:
        out += [f":{chain} - [0:0]", f"-X {chain}"]
    left = len(state.rules_of(DISPATCH)) - len(current)
    if not state.is_base and left == 0 and DISPATCH in state.chains:
        out += [_delete(line) for line in state.prerouting if line == JUMP]
        out += [f":{DISPATCH} - [0:0]", f"-X {DISPATCH}"]
    if len(out) == 1:
        return None
    out.append("COMMIT")
    return "\n".join(out) + "\n"
