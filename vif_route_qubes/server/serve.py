"""`vif-route-qubes serve`: the engine imported once, a child per event.

Single-threaded: one poll loop over the listening socket, the connections
of running children (readable = the client is gone), the pipe each child
writes its exit status to just before it exits (then the status is sent),
the children's pidfds (readable = exited; then reaped, and the status sent
if the child could not report it) and the spare child's channel (ready, or
gone).  Nothing opens a netlink socket, a thread or an event loop before a
fork: the warm-up only imports.  Each request: SO_PEERCRED uid 0, the
installed code unchanged (else refuse and exit once the running children
are done), hello, the request with its descriptors (read with a short
timeout: a stuck client delays the loop by at most that), then it runs in
the spare or in a child forked for it (jobs.py, spare.py).
"""

import os
import selectors
import signal
import socket
import struct
import time

from vif_route_qubes.server import intake, listen, protocol, reaper, warm
from vif_route_qubes.server.jobs import Job, Jobs

_CRED = struct.Struct("3i")  # pid, uid, gid


class Server(Jobs):
    def __init__(self, listener: socket.socket, idle: float, path: str | None, early: bool = False,
                 spares: bool = False) -> None:
        self.listener, self.idle, self.path = listener, idle, path
        self.spares, self.spare = spares, None
        self.path_ino = os.stat(path).st_ino if path else None
        self.listener.setblocking(False)
        self.selector = selectors.PollSelector()  # no descriptor of its own for the children to inherit
        self.selector.register(listener, selectors.EVENT_READ, ("accept", None))
        self.jobs: dict[int, Job] = {}
        self.readings: list[intake.Reading] = []
        self.endings: list[reaper.Ending] = []
        self.accepting = True
        self.last_request = time.monotonic()
        self.files = warm.loaded_files()
        self.fingerprint = warm.fingerprint(self.files)
        self.log_fd = 2 if early else os.dup(2)
        os.set_inheritable(self.log_fd, False)
        self.served = 0
        self.turn, self.checked_turn, self.changed = 0, -1, False
        self.stopping = False
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, ("signal", None))

    def log(self, text: str) -> None:
        try:
            os.write(self.log_fd, f"vif-route-qubes serve[{os.getpid()}]: {text}\n".encode(errors="replace"))
        except OSError:
            pass

    def run(self) -> None:
        self.log(f"listening on {self.listener.getsockname() or 'fd 3'}, idle timeout {self.idle:g} s")
        signal.set_wakeup_fd(self.wakeup_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self._make_spare()
        while self.accepting or self.jobs or self.endings or self.readings:
            events = self.selector.select(self._timeout())
            self.turn += 1
            if self.stopping and self.accepting:
                self.log("stopping: no new requests; waiting for the running ones")
                self._stop_accepting()
            for key, _ in events:
                kind, job = key.data
                if kind == "signal":
                    self._drain_wakeup()
                elif kind == "accept":
                    if self.accepting:
                        self._accept()
                elif kind == "request":
                    self._read_request(job)
                elif kind == "report":
                    self._read_report(job)
                elif kind == "spare":
                    self._spare_says(job)
                elif kind == "exit":
                    self._reap(job)
                else:
                    self._client_readable(job)
            self._end_overdue()
            if self.accepting and not self.jobs and not self.readings and time.monotonic() - self.last_request >= self.idle:
                self.log(f"idle for {self.idle:g} s: exiting")
                self._stop_accepting()
        self.log(f"exit after {self.served} events")

    def adopt(self, early: "Server") -> None:
        """The connections greeted before the warm-up: their requests are read now."""
        for reading in early.readings:
            reading.deadline = time.monotonic() + intake.REQUEST_TIMEOUT
            self.readings.append(reading)
            self.selector.register(reading.conn, selectors.EVENT_READ, ("request", reading))
        early.selector.close()
        os.close(early.wakeup_r)
        os.close(early.wakeup_w)

    def _code_changed(self) -> bool:
        """Compared for every request; one comparison serves the requests of one loop turn."""
        if self.checked_turn != self.turn:
            self.checked_turn, self.changed = self.turn, warm.fingerprint(self.files) != self.fingerprint
        return self.changed

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 256):
                pass
        except BlockingIOError:
            pass

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [e.deadline - now for e in self.endings] + [r.deadline - now for r in self.readings]
        if self.accepting and not self.jobs and not self.readings:
            due.append(self.last_request + self.idle - now)
        return max(0.0, min(due)) if due else None

    def _stop_accepting(self) -> None:
        if not self.accepting:
            return
        self.accepting = False
        self._drop_spare()
        self.selector.unregister(self.listener)
        if self.path:  # our own socket: later clients find none and run in-process
            try:
                if os.stat(self.path).st_ino == self.path_ino:  # not a later server's
                    os.unlink(self.path)
            except OSError:
                pass
        self.listener.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.greet(conn)
        for _ in range(64):  # a burst (a host starting many VMs): greet it before anything else
            if not self.accepting:
                return
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.greet(conn)

    def greet(self, conn: socket.socket) -> None:
        """Peer check, code check, hello; then the request is read as it comes."""
        try:
            pid, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            if uid != 0:
                raise protocol.ProtocolError(f"peer pid {pid} uid {uid} is not root")
            if self._code_changed():
                self.log("installed code changed since the start: refusing, exiting")
                intake.refuse(conn, "installed code changed since the server started")
                self._stop_accepting()
                return
            conn.settimeout(0.2)
            intake.send(conn, {"hello": protocol.NAME, "version": protocol.VERSION, "pid": os.getpid()})
        except (protocol.ProtocolError, OSError) as exc:
            self.log(f"refused a connection: {exc}")
            intake.refuse(conn, str(exc))
            return
        conn.setblocking(False)
        reading = intake.Reading(conn)
        self.readings.append(reading)
        self.selector.register(conn, selectors.EVENT_READ, ("request", reading))

    def _read_request(self, reading: intake.Reading) -> None:
        """More of a request (non-blocking: a slow client never stalls the loop)."""
        try:
            request = intake.read_more(reading)
        except BlockingIOError:
            return
        except (protocol.ProtocolError, OSError) as exc:
            self._drop_reading(reading, str(exc))
            return
        if request is None:
            return
        self._forget_reading(reading)
        self.last_request = time.monotonic()
        reading.conn.setblocking(True)
        self._start(reading.conn, request, reading.fds, reading.buffer)

    def _forget_reading(self, reading: intake.Reading) -> None:
        self.selector.unregister(reading.conn)
        self.readings.remove(reading)

    def _drop_reading(self, reading: intake.Reading, why: str) -> None:
        self._forget_reading(reading)
        for fd in reading.fds:
            os.close(fd)
        self.log(f"refused a connection: {why}")
        intake.refuse(reading.conn, why)

    def _end_overdue(self) -> None:
        now = time.monotonic()
        for reading in [r for r in self.readings if r.deadline <= now]:
            self._drop_reading(reading, f"no whole request within {intake.REQUEST_TIMEOUT:g} s")
        for ending in [e for e in self.endings if e.deadline <= now]:
            ending.finish()
            self.endings.remove(ending)

def serve(socket_path: str, idle: float, spares: bool = True) -> None:
    listener = listen.systemd_listener()
    path = None
    if listener is None:
        listener, path = listen.bound_listener(socket_path), socket_path
    # Socket activation: the client that started us waits about a second for
    # its hello, and the warm-up may take longer; greet those waiting now.
    early = Server(listener, idle, path, early=True)
    for conn in listen.waiting(listener):
        early.greet(conn)
    warm.load()
    server = Server(listener, idle, path, spares=spares)
    server.adopt(early)
    server.run()
