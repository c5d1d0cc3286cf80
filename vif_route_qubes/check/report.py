"""What both `check`s report: one Drift a difference, the lines of a chain
compared, and the report printed with its exit status."""

import json
from collections import Counter
from typing import NamedTuple

from vif_route_qubes import logsetup
from vif_route_qubes.errors import InputError, VifError
from vif_route_qubes.model import VIF_NAME

# A check that cannot read the system fails like any command (1, one line on
# stderr, no report on stdout); drift is 1 with the report on stdout.
EXIT_CLEAN, EXIT_DRIFT, EXIT_USAGE, EXIT_UNKNOWN = 0, 1, 2, 1


class Drift(NamedTuple):
    scope: str    # a vif, "DNS", or QBS-ANTISPOOF / qubes (the static anti-spoofing parts all vifs rely on)
    kind: str     # a stable word for monitoring: rule-missing, route-missing, stale, ...
    detail: str

    def line(self) -> str:
        return f"{self.scope}: {self.detail}"

    def record(self) -> dict:
        return {"vif" if VIF_NAME.fullmatch(self.scope) else "scope": self.scope, "kind": self.kind,
                "detail": self.detail}


def lines_drift(scope: str, what: str, current: tuple, wanted: tuple, ordered: bool = False) -> list[Drift]:
    """Missing, unexpected and duplicated lines of one of our chains (and their order, if it matters)."""
    have = Counter(current)
    out = [Drift(scope, "rule-missing", f"{what} rule missing: {line}") for line in wanted if not have[line]]
    for line, count in have.items():
        if line not in wanted:
            out.append(Drift(scope, "rule-unexpected", f"unexpected {what} rule: {line}"))
        if count > 1:
            out.append(Drift(scope, "rule-duplicated", f"rule duplicated {count} times: {line}"))
    if ordered and not out and tuple(current) != tuple(wanted):
        out.append(Drift(scope, "rules-out-of-order", f"{what} rules out of order (the final DROP must come last)"))
    return out


def report(logger: str, collect, as_json: bool, out) -> int:
    """Print what collect() found: one line each, or JSON; a failure to collect is one line on stderr."""
    try:
        drifts = collect()
    except VifError as exc:
        logsetup.get_logger(logger).error("check: %s", exc)
        return EXIT_USAGE if isinstance(exc, InputError) else EXIT_UNKNOWN
    if as_json:
        out.write(json.dumps([d.record() for d in drifts], indent=1) + "\n")
    else:
        out.write("".join(d.line() + "\n" for d in drifts))
    return EXIT_DRIFT if drifts else EXIT_CLEAN
