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
the spare or in a child forked for it (jobs.Jobs, an object the server owns
and calls; spare.py).  The loop turns during the warm-up too, between its
imports (serve() below), and tells systemd it is ready after them.
Resident unless --idle-timeout; the spare is dropped after --spare-idle
without a request.
"""

import functools
import os
import selectors
import signal
import socket
import struct
import time

from vif_route_qubes.server import intake, listen, protocol, warm
from vif_route_qubes.server.jobs import Jobs

_CRED = struct.Struct("3i")  # pid, uid, gid
EARLY_CHILDREN = os.cpu_count() or 1  # requests run unwarmed at once, during the warm-up


class Server:
    def __init__(self, listener: socket.socket, idle: float | None, path: str | None, early: bool = False,
                 spares: bool = False, spare_idle: float = 0.0) -> None:
        self.listener, self.idle, self.path, self.early = listener, idle, path, early  # idle None: resident
        self.spares, self.spare_idle = spares, spare_idle
        self.path_ino = os.stat(path).st_ino if path else None
        self.listener.setblocking(False)
        self.selector = selectors.PollSelector()  # no descriptor of its own for the children to inherit
        self.selector.register(listener, selectors.EVENT_READ, self._accept)
        self.jobs = Jobs(self.selector, self.log, self._close_inherited, self._spare_wanted, warming=early)
        self.readings: list[intake.Reading] = []
        self.accepting = True
        self.last_request = time.monotonic()
        self.files = warm.loaded_files(early)
        self.fingerprint = warm.fingerprint(self.files)
        self.log_fd = 2 if early else os.dup(2)
        os.set_inheritable(self.log_fd, False)
        self.turn, self.checked_turn, self.changed = 0, -1, False
        self.stopping = False
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, self._drain_wakeup)

    def log(self, text: str) -> None:
        try:
            os.write(self.log_fd, f"vif-route-qubes serve[{os.getpid()}]: {text}\n".encode(errors="replace"))
        except OSError:
            pass

    def run(self) -> None:
        idle = "none" if self.idle is None else f"{self.idle:g} s"
        self.log(f"listening on {self.listener.getsockname() or 'fd 3'}, idle timeout {idle}, "
                 + (f"spare dropped after {self.spare_idle:g} s without a request" if self.spares else "no spare"))
        self.catch_signals()
        self.jobs.make_spare()
        while self.accepting or self.jobs.running or self.jobs.endings or self.readings:
            events = self.selector.select(self._timeout())
            self.turn += 1
            if self.stopping and self.accepting:
                self.log("stopping: no new requests; waiting for the running ones")
                self._stop_accepting()
            self._dispatch(events)
            self._end_overdue()
            quiet = self.accepting and not self.jobs.running and not self.readings
            if quiet and self.jobs.spare is not None and time.monotonic() - self.last_request >= self.spare_idle:
                self.log(f"no request for {self.spare_idle:g} s: spare child {self.jobs.spare.pid} dropped")
                self.jobs.drop_spare()
            if quiet and self.idle is not None and time.monotonic() - self.last_request >= self.idle:
                self.log(f"idle for {self.idle:g} s: exiting")
                self._stop_accepting()
        self.log(f"exit after {self.jobs.served} events")

    def _dispatch(self, events) -> None:
        # Each descriptor is registered with its handler, bound to what it is
        # about, as in the selectors docs' own example: where a descriptor is
        # registered says what its readiness means, so Jobs registers its own
        # (a child's exit, report and client, the spare) and this loop needs
        # no table of kinds that would have to know them.
        for key, _ in events:
            key.data()

    def catch_signals(self) -> None:
        signal.set_wakeup_fd(self.wakeup_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def early_turn(self) -> None:
        """One turn of the loop between two imports of the warm-up: clients are
        greeted at once, and up to EARLY_CHILDREN requests run in children not
        yet warm (they import what their event needs, as an in-process run
        does); the others wait, greeted, for the warm-up.  While such children
        run and no request waits, the warm-up waits: the CPU is theirs."""
        self.turn += 1
        self._dispatch(self.selector.select(self._timeout() if self.jobs.running and not self.readings else 0))
        self._end_overdue()

    def _hold(self, reading: intake.Reading) -> bool:
        """In the warm-up, with EARLY_CHILDREN running: the request stays unread until then."""
        if not self.early or len(self.jobs.running) < EARLY_CHILDREN:
            return False
        reading.deadline = time.monotonic() + intake.REQUEST_TIMEOUT
        return True

    def adopt(self, early: "Server") -> None:
        """What the server in the warm-up left: requests still arriving or
        held, the events it started, the children it is ending, a signal."""
        self.catch_signals()  # before the early wakeup pipe is closed
        self.stopping = self.stopping or early.stopping
        for reading in early.readings:
            reading.deadline = time.monotonic() + intake.REQUEST_TIMEOUT
            self.readings.append(reading)
            self._watch_reading(reading)
        self.jobs.adopt(early.jobs)
        self.last_request = max(self.last_request, early.last_request)
        early.selector.close()
        os.close(early.wakeup_r)
        os.close(early.wakeup_w)

    def _code_changed(self) -> bool:
        """Compared for every request; one comparison serves the requests of one loop turn."""
        if self.checked_turn != self.turn:
            self.checked_turn, self.changed = self.turn, warm.fingerprint(self.files) != self.fingerprint
        return self.changed

    def _spare_wanted(self) -> bool:
        """The server's side of the spare policy (Jobs.make_spare has the
        rest): spares on, accepting, no request arriving, and requests
        coming (the last within spare_idle: a quiet server keeps only its
        own memory)."""
        return (self.spares and self.accepting and not self.readings
                and time.monotonic() - self.last_request < self.spare_idle)

    def _close_inherited(self) -> None:
        """In a new child or spare: what it must not keep of the server's."""
        for signum in (signal.SIGTERM, signal.SIGINT):  # the server's handlers: a TERM must end a child
            signal.signal(signum, signal.SIG_DFL)
        if self.accepting:
            self.listener.close()
        self.jobs.close_in_child()
        for reading in self.readings:
            reading.conn.close()
            for fd in reading.fds:
                os.close(fd)
        os.close(self.log_fd)
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        signal.set_wakeup_fd(-1)

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
        due = [e.deadline - now for e in self.jobs.endings] + [r.deadline - now for r in self.readings]
        if self.accepting and not self.jobs.running and not self.readings:
            if self.idle is not None:
                due.append(self.last_request + self.idle - now)
            if self.jobs.spare is not None:
                due.append(self.last_request + self.spare_idle - now)
        return max(0.0, min(due)) if due else None

    def _stop_accepting(self) -> None:
        if not self.accepting:
            return
        self.accepting = False
        self.jobs.drop_spare()
        self.selector.unregister(self.listener)
        if self.path:  # our own socket: later clients find none and run in-process
            try:
                if os.stat(self.path).st_ino == self.path_ino:  # not a later server's
                    os.unlink(self.path)
            except OSError:
                pass
        self.listener.close()

    def _accept(self) -> None:
        if not self.accepting:  # stopped earlier in this loop turn
            return
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
        self._watch_reading(reading)

    def _watch_reading(self, reading: intake.Reading) -> None:
        self.selector.register(reading.conn, selectors.EVENT_READ, functools.partial(self._read_request, reading))

    def _read_request(self, reading: intake.Reading) -> None:
        """More of a request (non-blocking: a slow client never stalls the loop)."""
        if self._hold(reading):
            return
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
        self.jobs.start(reading.conn, request, reading.fds, reading.buffer)

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
        self.jobs.end_overdue(now)


def serve(socket_path: str, idle: float | None, spares: bool = True, spare_idle: float = 30.0) -> None:
    listener, notify_to = listen.systemd_listener(), listen.notify_socket()
    path = None
    if listener is None:
        listener, path = listen.bound_listener(socket_path), socket_path
    # The warm-up takes a few hundred ms (seconds on a cold boot), so the loop
    # turns between its imports: the client whose connection made systemd start
    # us is greeted at once and its event run (at about the cost of an
    # in-process run), and nobody waits out the one-second hello, not even an
    # event that a hook of that event starts.
    early = Server(listener, idle, path, early=True)
    early.catch_signals()
    for _ in warm.load():
        early.early_turn()
    server = Server(listener, idle, path, spares=spares, spare_idle=spare_idle)
    server.adopt(early)
    # Type=notify: started only now for systemd, so xl devd (ordered after us)
    # sends its first event to a warm server.
    try:
        listen.notify(notify_to, "READY=1\nSTATUS=warm: each event runs in a child of the loaded engine")
    except OSError as exc:
        server.log(f"could not tell systemd the server is ready: {exc}")
    server.run()
