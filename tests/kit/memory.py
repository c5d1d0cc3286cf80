"""Memory of processes as the kernel counts it: the proportional set size (PSS),
each shared page split among the processes that map it, so the PSS of a server
and its spare child add up to what the two cost together.  For the server tests
and tests/tools/bench.py.  Linux 4.14+ (/proc/PID/smaps_rollup)."""

from pathlib import Path


def pss_kb(pid: int) -> int:
    """The PSS of process `pid` in kB (FileNotFoundError once it is gone)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise ValueError(f"no Pss line in /proc/{pid}/smaps_rollup")


def children(pid: int) -> list[int]:
    """The direct children of `pid` (e.g. a server's spare and the children running events)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def tree_pss_kb(pid: int) -> dict[int, int]:
    """PSS in kB of `pid` and of each of its direct children, by pid (a child
    gone while it is read is left out); sum(...values()) is what they cost together."""
    found = {pid: pss_kb(pid)}
    for child in children(pid):
        try:
            found[child] = pss_kb(child)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found
