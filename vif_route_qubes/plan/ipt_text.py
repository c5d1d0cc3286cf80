"""iptables-save text, per table: the chains and each chain's rules, and the
restore lines that change them.  Pure: facts/ipt_state.py runs iptables-save.

Rules are kept exactly as iptables-save prints them (`-A CHAIN ...`), so that
planners can write their rules in the same form and compare them as text.
"""

from typing import NamedTuple


class TableState(NamedTuple):
    chains: frozenset[str]
    rules: tuple[tuple[str, tuple[str, ...]], ...]

    def rules_of(self, chain: str) -> tuple[str, ...]:
        for name, lines in self.rules:
            if name == chain:
                return lines
        return ()

    def has(self, chain: str) -> bool:
        return chain in self.chains


EMPTY_TABLE = TableState(frozenset(), ())


def parse_save(text: str) -> dict[str, TableState]:
    """Split `iptables-save` output into tables."""
    tables: dict[str, TableState] = {}
    name = None
    chains: set[str] = set()
    rules: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            name, chains, rules = line[1:].strip(), set(), {}
        elif line == "COMMIT" and name:
            tables[name] = TableState(frozenset(chains), tuple((c, tuple(r)) for c, r in rules.items()))
            name = None
        elif line.startswith(":"):
            chains.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            rules.setdefault(line.split(" ", 2)[1], []).append(line)
    return tables


def table(text: str, name: str) -> TableState:
    return parse_save(text).get(name, EMPTY_TABLE)


def delete(line: str) -> str:
    """The -D form of a saved -A line."""
    return "-D" + line[2:]


def sync_chain(state: TableState, chain: str, wanted: tuple[str, ...]) -> list[str]:
    """Restore lines that make an owned chain hold exactly `wanted` (flush and refill)."""
    if state.has(chain) and state.rules_of(chain) == wanted:
        return []
    return [f":{chain} - [0:0]", *wanted]


def ensure_chain(state: TableState, chain: str) -> list[str]:
    """Create a chain somebody else fills, without flushing it when it exists."""
    return [] if state.has(chain) else [f":{chain} - [0:0]"]


def ensure_jump(state: TableState, builtin: str, jump: str, position: int = 1) -> list[str]:
    """Exactly one jump rule (`jump` as saved, `-A BUILTIN ...`) in a built-in
    chain: inserted when missing, extra copies (made by hand) deleted."""
    count = state.rules_of(builtin).count(jump)
    if count == 0:
        return [f"-I {builtin} {position}" + jump[len(f"-A {builtin}"):]]
    return [delete(jump)] * (count - 1)
