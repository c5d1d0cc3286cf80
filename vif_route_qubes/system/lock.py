"""One lock around each read-plan-apply cycle, so concurrent events cannot interleave.

flock() locks belong to the open file, so a killed holder releases the lock
with its last descriptor: a stale lock file never blocks anyone.  The
descriptor is yielded so that the programs that change the system
(iptables-restore, nft, ip) can inherit it: killed in the middle, we leave
them holding the lock until they are done, and the next event waits.  Waiting is a
blocking flock() cut short by a timer, so the next waiter wakes at once.
"""

import fcntl
import os
import signal
from contextlib import contextmanager

from vif_route_qubes.errors import VifError

DEFAULT_LOCK = "/run/vif-route-qubes.lock"


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
        yield fd
    finally:
        os.close(fd)
