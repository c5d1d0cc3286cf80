"""Ending a fast-path run without the interpreter's teardown.

Tearing down every imported module costs about 6 ms of an event that lasts
50; nothing of ours needs it: stdout and stderr are flushed here, syslog
datagrams were sent when logged, and the kernel releases the lock, the
sockets and the files when the process ends.
"""

import os
import sys

_exit = os._exit  # the in-process fuzz tests replace it with SystemExit


def run_then_exit(func, *args) -> None:
    """Call func(*args); end the process with its status (an int it returns,
    or the code of the SystemExit it raises).  Any other exception propagates
    as usual (a traceback, exit 1)."""
    try:
        result = func(*args)
        status = result if isinstance(result, int) else 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            sys.stderr.write(f"{exc.code}\n")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120  # as the interpreter does when stdout cannot be flushed
    _exit(status)
