"""The forked child of one request: it becomes the client's process (its
namespaces, environment, cwd, umask, stdio, signal dispositions, argv) and
runs the same click entry the in-process run would, then os._exit.

A fresh fork of the single-threaded server is single-threaded, which
setns(CLONE_NEWNS) requires.  Python 3.11 has no os.setns: libc's, by ctypes.
"""

import codecs
import ctypes
import importlib
import io
import os
import resource
import signal
import sys
import traceback

from vif_route_qubes import timing
from vif_route_qubes.server import protocol
from vif_route_qubes.server.client import note_mode
from vif_route_qubes.server.commands import module_of

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def setns(fd: int, nstype: int, what: str) -> None:
    """Join the namespace of `fd` unless we are in it already (a no-op then:
    joining our own mount namespace would still reset cwd and root)."""
    own = "/proc/self/ns/net" if nstype == CLONE_NEWNET else "/proc/self/ns/mnt"
    if os.fstat(fd).st_ino == os.stat(own).st_ino:
        return
    _check(_libc.setns(fd, nstype), f"setns {what}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), "prctl")


def _signals(ignored: list, blocked: list) -> None:
    """The dispositions a fresh interpreter started by the client would have."""
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # glibc's reserved real-time signals
    if signal.SIGINT not in ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python's start-up does
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _stdio(fds: list[int], stdio: list) -> None:
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    streams = []
    for target, (encoding, errors) in enumerate(stdio):
        raw = io.FileIO(target, "r" if target == 0 else "w", closefd=False)
        tty = raw.isatty()
        buffered = io.BufferedReader(raw) if target == 0 else io.BufferedWriter(raw)
        streams.append(io.TextIOWrapper(buffered, encoding=encoding, errors=errors,
                                        line_buffering=tty or target == 2, write_through=target == 2))
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams


def _environment(pairs: list) -> None:
    os.environ.clear()
    for key, value in pairs:
        try:
            os.environb[key] = value
        except ValueError:  # a name exec() can pass but putenv() cannot take ('=' in it)
            pass


def set_death_signal(server_pid: int) -> None:
    """The server killed: this process dies too (the event fails, no orphan)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:
        os._exit(1)


def become_client(request: dict, fds: list[int], server_pid: int) -> None:
    """Everything before the entry runs; raises OSError on a failure."""
    set_death_signal(server_pid)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of our programs stay in our tree
    os.setpgid(0, 0)
    _stdio(fds, request["stdio"])
    setns(fds[3], CLONE_NEWNET, "net")
    setns(fds[4], CLONE_NEWNS, "mnt")
    os.fchdir(fds[5])
    for fd in fds:
        os.close(fd)
    os.umask(request["umask"])
    os.setpriority(os.PRIO_PROCESS, 0, request["nice"])  # the server may run at a higher priority
    _environment(request["env"])
    _signals(request["ignored"], request["blocked"])
    sys.argv = [os.fsdecode(a) for a in request["argv"]]
    try:
        timing._START = request["started"]  # the client's clock: imports = start to here
    except (ImportError, AttributeError):
        pass


def exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xff
    sys.stderr.write(f"{exc.code}\n")
    return 1


def _release_stdio() -> None:
    """Let go of the client's stdio before exiting.  At exit the kernel runs
    the files' final releases last-closed first, highest descriptor first, so
    a socket whose release waits (an nf_tables one after deletes, see
    system/nft_elements) would hold back the EOF that udev or a shell reads on
    our output pipes by 6-15 ms after the event is done."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
    except OSError:
        pass  # the exit closes them anyway


def run(request: dict, fds: list[int], server_pid: int, report_fd: int) -> None:
    """In the forked child; never returns.  Its last act before os._exit is to
    write its exit status and peak size to `report_fd`: the server answers the
    client then, not after the kernel has torn this process down (~2 ms here)."""
    status = 1
    try:
        try:
            become_client(request, fds, server_pid)
        except OSError as exc:
            sys.stderr.write(f"{os.path.basename(sys.argv[0] or 'vif-route-qubes')}: the event failed: "
                             f"vif-route-qubes server child: {exc}\n")
            raise SystemExit(1) from None
        note_mode(f"served by vif-route-qubes server pid {server_pid}, child {os.getpid()}")
        importlib.import_module(module_of(request["entry"])).main()
        status = 0
    except SystemExit as exc:
        status = exit_status(exc)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                status = status or 120
        _release_stdio()
        try:
            os.write(report_fd, f"{status} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}".encode())
        except OSError:
            pass  # the server learns the status from the exit instead
        os._exit(status)


def decode(request: dict) -> dict:
    """The request's fields checked and decoded; ProtocolError when one is wrong."""
    def ints(value, what):
        if not (isinstance(value, list) and all(isinstance(v, int) and 0 < v < 65 for v in value)):
            raise protocol.ProtocolError(f"bad {what}")
        return value

    if request.get("version") != protocol.VERSION:
        raise protocol.ProtocolError(f"protocol version {request.get('version')!r}, not {protocol.VERSION}")
    if module_of(request.get("entry")) is None:
        raise protocol.ProtocolError("unknown entry")
    argv, env = request.get("argv"), request.get("env")
    if not isinstance(argv, list) or not argv or not isinstance(env, list):
        raise protocol.ProtocolError("argv or env missing")
    decoded_argv = [protocol.unb64(a) for a in argv]
    argv_text = [os.fsdecode(a) for a in decoded_argv]
    if protocol.never_served(request["entry"], argv_text):  # `serve`: a child must not become a server
        raise protocol.ProtocolError(f"`{protocol.command_of(argv_text)}` runs only in a process of its own")
    if not all(isinstance(pair, list) and len(pair) == 2 for pair in env):
        raise protocol.ProtocolError("env is not a list of pairs")
    umask, started, stdio = request.get("umask"), request.get("started"), request.get("stdio")
    nice = request.get("nice")
    if not (isinstance(umask, int) and 0 <= umask <= 0o777 and isinstance(started, (int, float))
            and isinstance(nice, int) and -20 <= nice <= 19):
        raise protocol.ProtocolError("bad umask, nice or start time")
    if not (isinstance(stdio, list) and len(stdio) == 3
            and all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s) for s in stdio)):
        raise protocol.ProtocolError("bad stdio")
    for encoding, errors in stdio:
        try:
            codecs.lookup(encoding)
            codecs.lookup_error(errors)
        except LookupError:
            raise protocol.ProtocolError("unknown stdio encoding") from None
    return {"entry": request["entry"], "argv": decoded_argv,
            "env": [(protocol.unb64(k), protocol.unb64(v)) for k, v in env], "umask": umask, "nice": nice,
            "started": float(started), "stdio": stdio, "ignored": ints(request.get("ignored"), "ignored"),
            "blocked": ints(request.get("blocked"), "blocked")}
