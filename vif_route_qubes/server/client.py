"""The console entry points of both commands: offer the event to the server,
run it in-process when no server takes it.

Imports nothing heavy (no click, pyroute2, sh: tests/netns/test_server.py proves it
with `python -X importtime`), and of the standard library only what a served
event needs.  The event runs exactly once: the client falls back to the
in-process entry only when the server cannot have started it
(no socket, refused connection, no hello within HELLO_TIMEOUT, another
protocol version, an explicit refusal such as "installed code changed", a
stdio descriptor missing, VIF_ROUTE_SERVER=off).  Once the server has the
request, its failure is the event's failure: exit 1 and one line on stderr.
VIF_ROUTE_SERVER=require (for tests) makes "no server" a failure too.
`vif-route-qubes serve` is never offered: it runs here at once (systemd
starts it for a connection to the very socket it would be offered to).
Events that hooks start are offered as any other: the server's loop never
waits for a child, so they are greeted at once (also during its warm-up).
"""

from vif_route_qubes import timing  # noqa: F401  (first: the benchmark's clock starts here)

# The C modules behind `socket` and `signal`: those two build their enum
# classes at import (socket.py also imports selectors), a few ms of every
# event here, for names this client does not need.
import _signal
import _socket
import os
import sys

from vif_route_qubes.server import protocol

HELLO_TIMEOUT = 1.0


class Unserved(Exception):
    """No server took the event (before acceptance): the reason, in one line."""


def vif_route_qubes() -> None:
    run("vif-route-qubes", "vif_route_qubes.cli.main")


def _prog() -> str:
    return os.path.basename(sys.argv[0]) or "vif-route-qubes"


def run(entry: str, module: str) -> None:
    """Offer the event of command `entry` (a name of the served-commands entry
    point group, see server/commands.py) to the server, else run `module`.main()."""
    if protocol.never_served(entry, sys.argv):
        # `serve` runs here at once: systemd starts it for a connection to the
        # very socket it would be offered to, and that event is its first.
        import importlib  # start-up: the light client imports only what its path needs

        importlib.import_module(module).main()
        sys.exit(0)
    mode = os.environ.get("VIF_ROUTE_SERVER", "")
    if mode == "off":
        in_process(module, "VIF_ROUTE_SERVER=off")
    try:
        status = offer(entry)
    except Unserved as exc:
        if mode == "require":
            sys.stderr.write(f"{_prog()}: no server took the event ({exc}) and VIF_ROUTE_SERVER=require\n")
            sys.exit(1)
        in_process(module, str(exc))
    except KeyboardInterrupt:
        status = 130
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120
    os._exit(status)  # nothing to tear down: the event ran in the server's child


def in_process(module: str, reason: str) -> None:
    """Run the event here, as the in-process entry does; never returns."""
    import importlib  # start-up: the light client imports only what its path needs

    note_mode(f"run in-process ({reason})")
    importlib.import_module(module).main()
    sys.exit(0)


def note_mode(text: str) -> None:
    """Say in the verbose log which mode runs the event: the first logger
    set up for it (logsetup.setup) gets `text` as a debug record."""
    from vif_route_qubes import logsetup  # start-up: logging, only on the paths that log

    original = logsetup.setup

    def setup(*args, **kwargs):
        log = original(*args, **kwargs)
        if logsetup.setup is setup:
            logsetup.setup = original
            log.debug("%s", text)
        return log

    logsetup.setup = setup


def socket_path() -> str:
    return os.environ.get("VIF_ROUTE_SERVER_SOCKET") or protocol.DEFAULT_SOCKET


def _read_exact(sock: _socket.socket, count: int) -> bytes:
    got = b""
    while len(got) < count:
        chunk = sock.recv(count - len(got))
        if not chunk:
            raise protocol.ProtocolError(f"connection closed after {len(got)} of {count} bytes")
        got += chunk
    return got


def receive(sock: _socket.socket) -> dict:
    """One message from the server (ProtocolError: closed, too long, not JSON)."""
    size = protocol.body_size(_read_exact(sock, protocol.HEAD), protocol.REPLY_CAP)
    return protocol.decode(_read_exact(sock, size))


def send_with_fds(sock: _socket.socket, data: bytes, fds: list[int]) -> None:
    """`data` with `fds` as SCM_RIGHTS on its first bytes (socket.send_fds, then the rest)."""
    rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)  # an array of C ints
    sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    if sent < len(data):
        sock.sendall(data[sent:])


def _connect(path: str) -> tuple[_socket.socket, dict]:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(HELLO_TIMEOUT)
    try:
        sock.connect(path)
        hello = receive(sock)
    except (OSError, protocol.ProtocolError) as exc:
        sock.close()
        raise Unserved(f"server at {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if "refused" in hello:
        sock.close()
        raise Unserved(f"server at {path} refused: {hello['refused']}")
    if hello.get("hello") != protocol.NAME or hello.get("version") != protocol.VERSION:
        sock.close()
        raise Unserved(f"server at {path} speaks another protocol ({hello.get('version')!r})")
    return sock, hello


def request_of(entry: str) -> dict:
    ignored = [s for s in _signal.valid_signals() if s not in (_signal.SIGPIPE, _signal.SIGXFSZ)
               and _ignored(s)]
    return {"version": protocol.VERSION, "entry": entry,
            "argv": [protocol.b64(os.fsencode(a)) for a in sys.argv],
            "env": [[protocol.b64(k), protocol.b64(v)] for k, v in os.environb.items()],
            "umask": _umask(), "nice": os.getpriority(os.PRIO_PROCESS, 0), "started": timing._START, "ignored": ignored,
            "blocked": sorted(_signal.pthread_sigmask(_signal.SIG_BLOCK, [])),
            "stdio": [[s.encoding, s.errors] for s in (sys.stdin, sys.stdout, sys.stderr)]}


def _ignored(signum) -> bool:
    try:
        return _signal.getsignal(signum) == _signal.SIG_IGN
    except (ValueError, OSError):
        return False


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _namespace_fds() -> list[int]:
    fds = []
    try:
        for name in ("/proc/self/ns/net", "/proc/self/ns/mnt", "."):
            fds.append(os.open(name, (os.O_PATH if name == "." else os.O_RDONLY) | os.O_CLOEXEC))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise Unserved(f"cannot open {exc.filename}: {exc.strerror}") from None
    return fds


def offer(entry: str) -> int:
    """The event's exit status from the server; Unserved when no server took it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            raise Unserved(f"descriptor {fd} is not open") from None
    if sys.stdin is None or sys.stdout is None or sys.stderr is None:
        raise Unserved("a standard stream is missing")
    path = socket_path()
    marks = [("client_start", timing.time.perf_counter())]
    sock, hello = _connect(path)
    marks.append(("connect_hello", timing.time.perf_counter()))
    try:
        data = protocol.frame(request_of(entry))
        if len(data) > protocol.REQUEST_CAP:
            raise Unserved(f"request of {len(data)} bytes is over the limit")
        fds = _namespace_fds()
        try:
            send_with_fds(sock, data, [0, 1, 2, *fds])
            sock.settimeout(None)
        except OSError as exc:  # the request did not arrive whole: the server refuses it
            raise Unserved(f"server at {path}: {exc.strerror or exc}") from None
        finally:
            for fd in fds:
                os.close(fd)
        return _outcome(sock, hello, marks)
    finally:
        sock.close()


def _report(marks: list) -> None:
    """With VIF_ROUTE_TIMING (the benchmark): the client's split of a served
    event, one JSON line on stderr (client_start: from its first import)."""
    if not os.environ.get("VIF_ROUTE_TIMING"):
        return
    last, split = timing._START, {}
    for name, when in marks:
        split[name] = round((when - last) * 1000, 3)
        last = when
    sys.stderr.write("client-timing " + protocol.dumps(split) + "\n")


def _outcome(sock: _socket.socket, hello: dict, marks: list) -> int:
    """After the request: every failure from here on is the event's failure."""
    server = f"vif-route-qubes server pid {hello.get('pid')}"
    try:
        reply = receive(sock)
        if "refused" in reply:  # the server forks nothing after a refusal
            raise Unserved(f"server refused the request: {reply['refused']}")
        if "accepted" not in reply:
            raise protocol.ProtocolError(f"unexpected reply {sorted(reply)}")
        marks.append(("fork", timing.time.perf_counter()))
        reply = receive(sock)
        marks.append(("child", timing.time.perf_counter()))
        _report(marks)
    except (OSError, protocol.ProtocolError) as exc:
        sys.stderr.write(f"{_prog()}: the event failed: {server}: {getattr(exc, 'strerror', None) or exc}\n")
        return 1
    if isinstance(reply.get("status"), int):
        return reply["status"]
    sys.stderr.write(f"{_prog()}: the event failed: {server}: {reply.get('failed', 'no exit status')}\n")
    return 1
