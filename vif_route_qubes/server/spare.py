"""A spare child: forked ahead of the next request, its copy-on-write faults
taken before the request arrives.

A child forked at request time copies each shared page it writes, reference
counts included: about 2,000 faults in an online here, 3 µs each, a third of
its work.  The spare forks while the server is idle, makes its private
writable memory its own at once (madvise MADV_POPULATE_WRITE, Linux 5.14;
without it the spare only saves the fork), says "ready" on its channel and
waits.  A request then goes to it over that channel exactly as the client
sent it (the frame and its six descriptors) and it runs it as a child forked
at that moment would: same checks (intake.read_more), same child.run.

It holds nothing of a request's before one arrives: it is the server as it
was when idle, no netlink socket, thread or event loop.  It prefaults on
idle CPU time only (SCHED_IDLE), then waits at the server's priority (a
SCHED_IDLE task woken on a busy CPU waits for an idle one: 0.36 s for a
trivial request here), named WAITING_NAME for ps; it costs its private
copy of the server's memory while it waits (about 30 MB here), is killed
when the server stops accepting, and dies with the server
(PR_SET_PDEATHSIG).  The server makes one only while at most the request
just started is running, so a burst of events is not slowed by spares
made for it.
"""

import ctypes
import os
import signal
import socket

from vif_route_qubes.server import child, intake

MADV_POPULATE_WRITE = 23
READY = b"r"
WAITING_NAME = "vif-route-spare"  # its comm (ps, top) while it waits; the server's again for the event
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def prefault() -> None:
    """Write-fault every private writable mapping now (a mapping the kernel
    refuses, or a kernel without MADV_POPULATE_WRITE, is left as it is)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[1][:2] != "rw" or fields[1][3] != "p":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            _libc.madvise(start, end - start, MADV_POPULATE_WRITE)


class Spare:
    """The server's side of one spare child."""

    def __init__(self, close_inherited) -> None:
        """Fork the spare; `close_inherited()` closes, in the child, what it
        must not keep of the server's (the listener, other connections)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.report_r, report_w = os.pipe2(os.O_CLOEXEC)
        server_pid = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                ours.close()
                os.close(self.report_r)
                close_inherited()
            except BaseException:  # noqa: BLE001  (never back into the server's loop)
                os._exit(1)
            _wait_and_run(theirs, report_w, server_pid)
        theirs.close()
        os.close(report_w)
        self.channel = ours  # also how its death is seen: the channel closes
        self.ready = False

    def take(self, frame: bytes, fds: list[int]) -> bool:
        """Hand a request over; False when the spare cannot take it (gone)."""
        try:
            sent = socket.send_fds(self.channel, [frame], fds)
            if sent < len(frame):
                self.channel.sendall(frame[sent:])
        except OSError:
            return False
        return True

    def end(self) -> None:
        """An unused spare: killed and reaped (it holds nothing)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        self.close()

    def close(self) -> None:
        self.channel.close()
        if self.report_r is not None:
            os.close(self.report_r)
            self.report_r = None


def _schedule(policy: int) -> None:
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        pass  # a spare at the usual priority is only a little less polite


def _rename(name: str | None) -> str | None:
    """This process's comm set to `name`; the one it had is returned.  Only a
    name for ps: where /proc refuses it, the spare waits and runs unnamed."""
    if name is None:
        return None
    try:
        with open("/proc/self/comm") as comm:
            had = comm.read().rstrip("\n")
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)
    except OSError:
        return None
    return had


def _wait_and_run(channel: socket.socket, report_w: int, server_pid: int) -> None:
    """In the spare; never returns."""
    try:
        child.set_death_signal(server_pid)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        policy = os.sched_getscheduler(0)
        _schedule(os.SCHED_IDLE)  # the prefault on idle CPU time only: a running event goes first
        prefault()
        _schedule(policy)  # waiting takes no CPU; the request, when it comes, must not wait for an idle one
        name = _rename(WAITING_NAME)
        channel.sendall(READY)
        reading = intake.Reading(channel)
        request = None
        while request is None:
            request = intake.read_more(reading)
        _rename(name)
    except BaseException as exc:  # noqa: BLE001  (never back into the server's loop)
        try:  # the hand-over broke: the server answers the client with this
            os.write(report_w, f"failed spare child: {exc}".encode(errors="replace")[:200])
        except OSError:
            pass
        os._exit(1)
    channel.close()
    child.run(request, reading.fds, server_pid, report_w)
