"""One lock around each read-plan-apply cycle, so concurrent events cannot interleave.

flock() locks belong to the open file, so a killed holder releases the lock
with its last descriptor: a stale lock file never blocks anyone.  The
descriptor is yielded so that the programs that change the system
(iptables-restore, nft, ip) can inherit it: killed in the middle, we leave
them holding the lock until they are done, and the next event waits.  Waiting is a
blocking flock() cut short by a timer, so the next waiter wakes at once.  The
holder runs at the highest priority until it lets go (see _ahead_of_waiters).
"""

import fcntl
import os
import signal
import time
from contextlib import contextmanager

from vif_route_qubes.errors import VifError

HOLDER_NICE = -20  # the holder's priority: see _ahead_of_waiters
_waited_at: int | None = None


class _Expired(Exception):
    pass


def _expire(signum, frame):
    raise _Expired


@contextmanager
def locked(path: str, timeout: float, what: str):
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            previous = signal.signal(signal.SIGALRM, _expire)
            signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.001))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except _Expired:
                raise VifError(f"{what}: lock {path} still held after {timeout:g} s") from None
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        with _ahead_of_waiters():
            yield fd
    finally:
        os.close(fd)


@contextmanager
def _ahead_of_waiters():
    """The holder runs at the highest priority (nice -20) while it holds the
    lock.  In a burst of events every other event waits for it, and a holder
    that shares the CPUs evenly with the rest of the burst (interpreters
    starting, children forking) makes them all wait longer: 100 served
    onlines at once here held the lock 25-99 ms each early in the burst
    instead of ~11, and took as long as 100 in a row (1.9 s; 1.6 s
    with the holder first, tests/tools/bench.py, iptables).  Our own programs
    inherit it (they are the held work too); hooks and service reloads, not
    ours, run at the priority the event had (waited_nice).  A process that
    may not raise its priority runs as it is."""
    global _waited_at
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, HOLDER_NICE)
    except PermissionError:
        yield
        return
    outer, _waited_at = _waited_at, nice
    try:
        yield
    finally:
        _waited_at = outer
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def waited_nice() -> int | None:
    """The niceness the lock's holder had before it took the lock (None when
    it holds none, or was not raised)."""
    return _waited_at


@contextmanager
def shared_lock(path: str, timeout: float):
    """The events' lock, shared: a check never reads half an event, and checks
    never wait for each other.  No lock file: no event ever ran."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = None
    try:
        deadline = time.monotonic() + timeout
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise VifError(f"lock {path} still held after {timeout:g} s") from None
                time.sleep(0.02)
        yield
    finally:
        if fd is not None:
            os.close(fd)
