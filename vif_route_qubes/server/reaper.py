"""Ending a request's child and every program it started, when its client is
gone (libxl's SIGKILL after 40 s, udev's timeout).

Tools and hooks run in process groups and sessions of their own, so a group
kill is not enough: the tree is found from /proc by parent pid.  The child
is a subreaper, so programs orphaned inside the tree stay in it, as long as
the child lives: it is stopped first and killed last.  The tree is stopped
first (a stopped process cannot fork), then every program in it is sent
SIGTERM and SIGCONT; after the grace period whatever is left, the child
and the orphans it adopted meanwhile among it, gets SIGKILL.
"""

import os
import signal
import time

GRACE = 0.5  # seconds between SIGTERM and SIGKILL


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process we can see."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found[int(name)] = (int(fields[1]), fields[19].decode())
    return found


def _tree(roots: set[int], procs: dict) -> set[int]:
    members, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier} - members
        members |= frontier
    return members


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _freeze(roots: set[int], known: dict[int, str]) -> dict[int, str]:
    """Stop `roots` and their descendants, again until the stopped tree has no
    new member (a process stopped between two scans cannot fork after them)."""
    stopped = dict(known)
    for _ in range(20):
        procs = _processes()
        new = {pid for pid in _tree(roots | set(stopped), procs) if pid in procs} - set(stopped)
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
            stopped[pid] = procs[pid][1]
    return stopped


class Ending:
    """One tree being ended: SIGTERM sent, SIGKILL due at `deadline`."""

    def __init__(self, root: int, grace: float = GRACE) -> None:
        self.root = root
        self.members = _freeze({root}, {})
        for pid in self.members:
            if pid != root:  # the child stays stopped: what its programs leave is reparented to it
                _signal(pid, signal.SIGTERM)
                _signal(pid, signal.SIGCONT)
        self.deadline = time.monotonic() + grace

    def alive(self) -> list[int]:
        procs = _processes()
        return [pid for pid, start in self.members.items() if pid in procs and procs[pid][1] == start]

    def finish(self) -> None:
        """SIGKILL for every member still there and whatever it started since."""
        alive = self.alive()
        if alive:
            # The child last: killed first, its adopted orphans would go to init, out of reach.
            for pid in sorted(_freeze(set(alive), {}), key=lambda pid: pid == self.root):
                _signal(pid, signal.SIGKILL)


def outcome(pid: int, status: int) -> tuple[dict, str]:
    """The reply to the client for a reaped child's wait status, and its log text."""
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return {"status": code}, f"status {code}"
    signum = os.WTERMSIG(status)
    return {"failed": f"child {pid} killed by signal {signum}"}, f"killed by signal {signum}"
