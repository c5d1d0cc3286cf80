"""The requests a Server is running, in the manner of socketserver's
ForkingMixIn: each started in the ready spare child or in a child forked
then, answered from the status the child reports as it exits (or from its
wait status when it could not), and ended with its programs when its
client goes away.  Mixed into serve.Server, whose state it shares."""

import os
import selectors
import signal
import socket
import sys
import time

from vif_route_qubes.server import child, intake, reaper, spare


class Job:
    def __init__(self, pid: int, conn: socket.socket, entry: str, report_fd: int, from_spare: bool) -> None:
        self.pid, self.conn, self.entry, self.from_spare = pid, conn, entry, from_spare
        self.pidfd = os.pidfd_open(pid)
        self.report_fd: int | None = report_fd
        self.started = time.monotonic()
        self.client_gone = False
        self.reported: int | None = None  # the exit status the child reported
        self.answered = False


class Jobs:
    """Server's part that starts, answers and ends requests (see the module)."""

    def _start(self, conn: socket.socket, request: dict, fds: list[int], frame: bytes) -> None:
        """The request to the ready spare, else to a child forked now; then "accepted"."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        started = self._to_spare(frame, fds) if self.spare is not None and self.spare.ready else None
        if started is None:
            started = self._fork(conn, request, fds)
        pid, report_r, from_spare = started
        for fd in fds:
            os.close(fd)
        job = Job(pid, conn, request["entry"], report_r, from_spare)
        self.jobs[pid] = job
        self.selector.register(job.pidfd, selectors.EVENT_READ, ("exit", job))
        self.selector.register(report_r, selectors.EVENT_READ, ("report", job))
        try:
            intake.send(conn, {"accepted": pid})
            self.selector.register(conn, selectors.EVENT_READ, ("client", job))
        except OSError:
            self._client_gone(job)
        self._make_spare()

    def _fork(self, conn: socket.socket, request: dict, fds: list[int]) -> tuple[int, int, bool]:
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(report_r)
                conn.close()
                self._close_inherited()
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

    def _make_spare(self) -> None:
        """A spare for the next request, while no request is running or
        arriving beside the one just started (a burst gets none), and while
        requests come (the last one within spare_idle: a quiet server keeps
        only its own memory)."""
        if not self.spares or self.spare is not None or not self.accepting or len(self.jobs) > 1 or self.readings:
            return
        if time.monotonic() - self.last_request >= self.spare_idle:
            return
        self.spare = spare.Spare(self._close_inherited)
        self.selector.register(self.spare.channel, selectors.EVENT_READ, ("spare", self.spare))

    def _spare_says(self, ready: spare.Spare) -> None:
        try:
            said = ready.channel.recv(16)
        except OSError:
            said = b""
        if said == spare.READY:
            ready.ready = True
            return
        self.log(f"spare child {ready.pid} ended unused")
        self._drop_spare()

    def _drop_spare(self) -> None:
        if self.spare is not None:
            self.selector.unregister(self.spare.channel)
            self.spare.end()
            self.spare = None

    def _close_inherited(self) -> None:
        """In a new child or spare: what it must not keep of the server's."""
        for signum in (signal.SIGTERM, signal.SIGINT):  # the server's handlers: a TERM must end a child
            signal.signal(signum, signal.SIG_DFL)
        if self.accepting:
            self.listener.close()
        for job in self.jobs.values():
            job.conn.close()
            os.close(job.pidfd)
            if job.report_fd is not None:
                os.close(job.report_fd)
        for reading in self.readings:
            reading.conn.close()
            for fd in reading.fds:
                os.close(fd)
        if self.spare is not None:
            self.spare.close()
        os.close(self.log_fd)
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        signal.set_wakeup_fd(-1)

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
        del self.jobs[job.pid]
        if job.report_fd is not None:  # its report and its exit seen in one turn
            self._read_report(job)
        if job.reported is None:
            self._answer(job, *reaper.outcome(job.pid, status), usage.ru_maxrss)
        elif not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == job.reported):
            self.log(f"child {job.pid} ended with {reaper.outcome(job.pid, status)[1]} "
                     f"after reporting status {job.reported}")
        self._make_spare()

    def _answer(self, job: Job, reply: dict, outcome: str, peak: int) -> None:
        job.answered = True
        took = (time.monotonic() - job.started) * 1000
        self.served += 1
        by = "spare child" if job.from_spare else "child"
        self.log(f"served {job.entry} by {by} {job.pid}: {outcome}, {took:.1f} ms, peak {peak} kB"
                 + (" (client gone)" if job.client_gone else ""))  # before the reply: tests count it
        if not job.client_gone:
            try:
                job.conn.settimeout(1.0)
                intake.send(job.conn, reply)
            except OSError:
                pass
            self.selector.unregister(job.conn)
        job.conn.close()
