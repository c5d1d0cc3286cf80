"""Phase timings for the benchmark: printed as one JSON line on stderr when
VIF_ROUTE_TIMING is set, nothing otherwise."""

import os
import sys
import time

_START = time.perf_counter()  # first import of this package's code on the path


class Clock:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("VIF_ROUTE_TIMING"))
        self.last = time.perf_counter()
        self.phases: dict[str, float] = {"imports": self.last - _START}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def report(self, steps: list[tuple[str, float]] = ()) -> None:
        if not self.enabled:
            return
        import json  # start-up: the light client loads json only when timing is asked for

        record = {"phases_ms": {k: round(v * 1000, 3) for k, v in self.phases.items()},
                  "steps_ms": [[kind, round(sec * 1000, 3)] for kind, sec in steps]}
        sys.stderr.write("timing " + json.dumps(record) + "\n")
