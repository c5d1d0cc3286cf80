"""The one wrapper of sh: every external program the project runs goes through run().

Each tool starts in a session (process group) of its own, and a timeout ends
the whole group (a hook's or a stand-in's children must not outlive the
event).  The timer is ours, not sh's `_timeout`: that one kills only the
process it started, and its watcher thread polls every 0.1 s, which the
measurements here showed as ~100 ms added to EVERY call (tests/tools/bench.py).
Errors come out as one-line VifErrors: a missing program is ToolMissing
(sh.CommandNotFound, not a matched message), a timeout ToolTimeout, and an
unexpected exit status ToolFailed with the tool's own stderr in the message.
"""

import os
import signal
import threading
import time
from typing import NamedTuple

import sh

from vif_route_qubes.errors import VifError

DEFAULT_TIMEOUT = 30.0  # seconds
# (program, seconds) of each run() of this process, for the benchmark's split (VIF_ROUTE_TIMING).
TIMINGS: list[tuple[str, float]] = []


class ToolError(VifError):
    # `status`, not `exit_code`: that one is VifError's, the exit status of our own command.
    def __init__(self, message: str, program: str, status: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.program, self.status, self.stderr = program, status, stderr


class ToolMissing(ToolError):
    """The program is not on PATH (or not executable)."""


class ToolTimeout(ToolError):
    """The program (and its process group) was killed after the timeout."""


class ToolFailed(ToolError):
    """The program exited with a status the caller did not accept."""


class Result(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str


def one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def _end_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group is gone already


def _in_child(fds: set[int], nice: int | None) -> None:
    for fd in fds:
        os.set_inheritable(fd, True)
    if nice is not None:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def run(argv, *, stdin: str | None = None, timeout: float | None = DEFAULT_TIMEOUT, pass_fds=(),
        check: bool = True, what: str | None = None, discard_stdout: bool = False,
        nice: int | None = None) -> Result:
    """Run argv[0] with argv[1:]; stdin text (or none: EOF at once); stdout and
    stderr captured as text.  `check`: an exit status other than 0 raises
    ToolFailed.  `pass_fds`: descriptors the child inherits (the event lock).
    `what`: how messages name the command (default: the program).  `nice`:
    the program's niceness, when not ours (the lock holder's, see lock.py)."""
    argv = [str(arg) for arg in argv]
    started = time.perf_counter()
    try:
        return _run(argv, stdin, timeout, pass_fds, check, what or argv[0], discard_stdout, nice)
    finally:
        TIMINGS.append((f"program {os.path.basename(argv[0])}", time.perf_counter() - started))


def _run(argv, stdin, timeout, pass_fds, check, what, discard_stdout, nice) -> Result:
    try:
        command = sh.Command(argv[0])
    except sh.CommandNotFound:
        raise ToolMissing(f"{argv[0]} is not installed", argv[0]) from None
    options = dict(_in=stdin if stdin is not None else "", _tty_out=False, _new_session=True,
                   _env=os.environ.copy(), _encoding="utf-8", _decode_errors="replace",
                   _ok_code=range(256), _bg=True, _bg_exc=False, _return_cmd=True)
    fds = set(pass_fds)
    if fds:
        # sh keeps these open in the child, but ours are close-on-exec: clear the flag there.
        options["_pass_fds"] = fds
    if fds or nice is not None:
        options["_preexec_fn"] = lambda: _in_child(fds, nice)
    if discard_stdout:
        options["_out"] = os.devnull
    try:
        proc = command(*argv[1:], **options)
    except OSError as exc:  # exec failed in the child (sh reports it here)
        raise ToolMissing(f"{what}: {exc.strerror or exc}", argv[0]) from None
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        _end_group(proc.pid)

    timer = threading.Timer(timeout, expire) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        proc.wait()
    except (sh.TimeoutException, sh.ErrorReturnCode) as exc:  # killed by a signal (SignalException)
        _end_group(proc.pid)
        if fired.is_set() or isinstance(exc, sh.TimeoutException):
            raise ToolTimeout(f"{what} did not finish within {timeout:g} s", argv[0]) from None
        err = exc.stderr.decode(errors="replace")
        raise ToolFailed(f"{what} failed: {one_line(err) or f'killed by signal {-exc.exit_code}'}", argv[0],
                         exc.exit_code, err) from None
    finally:
        if timer:
            timer.cancel()
    result = Result(proc.exit_code, "" if discard_stdout else str(proc), proc.stderr.decode(errors="replace"))
    if check and result.exit_code != 0:
        raise ToolFailed(f"{what} failed: {one_line(result.stderr) or f'exit {result.exit_code}'}", argv[0],
                         result.exit_code, result.stderr)
    return result
