"""The requests a Server is running, in the manner of socketserver's
ForkingMixIn: each started in the ready spare child or in a child forked
then, answered from the status the child reports as it exits (or from its
wait status when it could not), and ended with its programs when its
client goes away.  A plain object the server owns and calls; what it needs
of the server is passed in (see Jobs)."""

import functools
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable

from vif_route_qubes.server import child, intake, reaper, spare


class Job:
    def __init__(self, pid: int, conn: socket.socket, entry: str, report_fd: int, from_spare: bool,
                 unwarmed: bool) -> None:
        self.pid, self.conn, self.entry, self.from_spare = pid, conn, entry, from_spare
        self.unwarmed = unwarmed  # forked in the warm-up: it imports what its event needs
        self.pidfd = os.pidfd_open(pid)
        self.report_fd: int | None = report_fd
        self.started = time.monotonic()
        self.client_gone = False
        self.reported: int | None = None  # the exit status the child reported
        self.answered = False


class Jobs:
    """The running requests (`running`, by child pid), the spare, the trees
    being ended (`endings`: the loop's end_overdue() finishes them when
    due) and the count of requests answered (`served`).

    Of the server it needs what is passed in: the `selector` of its loop
    (each descriptor registered with its handler, which the loop calls),
    `log`, `close_inherited()` (run in every new child or spare: what it must
    not keep of the server's, close_in_child() below included) and
    `spare_wanted()` (the server's side of the spare policy); `warming`: the
    server in the warm-up, whose children are not yet warm."""

    def __init__(self, selector: selectors.BaseSelector, log: Callable[[str], None],
                 close_inherited: Callable[[], None], spare_wanted: Callable[[], bool], warming: bool = False) -> None:
        self.selector, self.log, self.warming = selector, log, warming
        self.close_inherited, self.spare_wanted = close_inherited, spare_wanted
        self.running: dict[int, Job] = {}
        self.spare: spare.Spare | None = None
        self.endings: list[reaper.Ending] = []
        self.served = 0

    def _watch(self, fileobj, handler: Callable, about) -> None:
        self.selector.register(fileobj, selectors.EVENT_READ, functools.partial(handler, about))

    def start(self, conn: socket.socket, request: dict, fds: list[int], frame: bytes) -> None:
        """The request to the ready spare, else to a child forked now; then "accepted"."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        started = self._to_spare(frame, fds) if self.spare is not None and self.spare.ready else None
        if started is None:
            started = self._fork(conn, request, fds)
        pid, report_r, from_spare = started
        for fd in fds:
            os.close(fd)
        job = Job(pid, conn, request["entry"], report_r, from_spare, self.warming)
        self.running[pid] = job
        self._watch(job.pidfd, self._reap, job)
        self._watch(report_r, self._read_report, job)
        try:
            intake.send(conn, {"accepted": pid})
            self._watch(conn, self._client_readable, job)
        except OSError:
            self._client_gone(job)
        self.make_spare()

    def adopt(self, early: "Jobs") -> None:
        """What the server in the warm-up started (it made no spare): its
        running requests, the trees it is ending, its count."""
        for pid, job in early.running.items():
            self.running[pid] = job
            self._watch(job.pidfd, self._reap, job)
            if job.report_fd is not None:
                self._watch(job.report_fd, self._read_report, job)
            if not job.client_gone and not job.answered:
                self._watch(job.conn, self._client_readable, job)
        self.endings += early.endings
        self.served += early.served

    def end_overdue(self, now: float) -> None:
        for ending in [e for e in self.endings if e.deadline <= now]:
            ending.finish()
            self.endings.remove(ending)

    def _fork(self, conn: socket.socket, request: dict, fds: list[int]) -> tuple[int, int, bool]:
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(report_r)
                conn.close()
                self.close_inherited()
            except BaseException:  # noqa: BLE001  (never back into the server's loop)
                os._exit(1)
            child.run(request, fds, os.getppid(), report_w)
        os.close(report_w)
        return pid, report_r, False

    def _to_spare(self, frame: bytes, fds: list[int]) -> tuple[int, int, bool] | None:
        ready, self.spare = self.spare, None
        self.selector.unregister(ready.channel)
        if not ready.take(frame, fds):
            ready.end()
            return None
        report_r, ready.report_r = ready.report_r, None  # the job's now
        ready.close()
        return ready.pid, report_r, True

    def make_spare(self) -> None:
        """A spare for the next request, while no request is running beside
        the one just started (a burst gets none) and the server wants one."""
        if self.spare is not None or len(self.running) > 1 or not self.spare_wanted():
            return
        self.spare = spare.Spare(self.close_inherited)
        self._watch(self.spare.channel, self._spare_says, self.spare)

    def _spare_says(self, ready: spare.Spare) -> None:
        try:
            said = ready.channel.recv(16)
        except OSError:
            said = b""
        if said == spare.READY:
            ready.ready = True
            return
        self.log(f"spare child {ready.pid} ended unused")
        self.drop_spare()

    def drop_spare(self) -> None:
        if self.spare is not None:
            self.selector.unregister(self.spare.channel)
            self.spare.end()
            self.spare = None

    def close_in_child(self) -> None:
        """In a new child or spare: its copies of the running requests' and the spare's descriptors."""
        for job in self.running.values():
            job.conn.close()
            os.close(job.pidfd)
            if job.report_fd is not None:
                os.close(job.report_fd)
        if self.spare is not None:
            self.spare.close()

    def _client_readable(self, job: Job) -> None:
        try:
            if job.conn.recv(4096):
                return  # nothing is expected; not a close
        except OSError:
            pass
        self._client_gone(job)

    def _client_gone(self, job: Job) -> None:
        if job.client_gone or job.answered:  # an event of this turn, from before the answer
            return
        job.client_gone = True
        try:
            self.selector.unregister(job.conn)
        except (KeyError, ValueError):
            pass
        self.log(f"client of child {job.pid} is gone: ending the child and its programs")
        self.endings.append(reaper.Ending(job.pid))

    def _read_report(self, job: Job) -> None:
        """The status and peak size the child wrote as it exits (nothing when
        it died first: its wait status tells then)."""
        if job.report_fd is None:  # read already, by _reap in this loop turn
            return
        try:
            data = os.read(job.report_fd, 64)
        except OSError:
            data = b""
        self.selector.unregister(job.report_fd)
        os.close(job.report_fd)
        job.report_fd = None
        if data.startswith(b"failed "):  # a spare that could not take the request
            job.reported = 1
            self._answer(job, {"failed": data[7:].decode(errors="replace")}, "failed", 0)
            return
        try:
            status, peak = (int(field) for field in data.split())
        except ValueError:
            return
        job.reported = status
        self._answer(job, {"status": status}, f"status {status}", peak)

    def _reap(self, job: Job) -> None:
        _, status, usage = os.wait4(job.pid, 0)
        self.selector.unregister(job.pidfd)
        os.close(job.pidfd)
        del self.running[job.pid]
        if job.report_fd is not None:  # its report and its exit seen in one turn
            self._read_report(job)
        if job.reported is None:
            self._answer(job, *reaper.outcome(job.pid, status), usage.ru_maxrss)
        elif not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == job.reported):
            self.log(f"child {job.pid} ended with {reaper.outcome(job.pid, status)[1]} "
                     f"after reporting status {job.reported}")
        self.make_spare()

    def _answer(self, job: Job, reply: dict, outcome: str, peak: int) -> None:
        job.answered = True
        took = (time.monotonic() - job.started) * 1000
        self.served += 1
        by = "spare child" if job.from_spare else "child"
        self.log(f"served {job.entry} by {by} {job.pid}: {outcome}, {took:.1f} ms, peak {peak} kB"
                 + (" (forked in the warm-up)" if job.unwarmed else "")
                 + (" (client gone)" if job.client_gone else ""))  # before the reply: tests count it
        if not job.client_gone:
            try:
                job.conn.settimeout(1.0)
                intake.send(job.conn, reply)
            except OSError:
                pass
            self.selector.unregister(job.conn)
        job.conn.close()
