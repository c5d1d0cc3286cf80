"""Logging of both commands, with the standard library: stderr and syslog.

Every module logs through `get_logger(name)` (a plain logging.Logger); each
run of a command calls `setup(verbose)` once, which gives the root logger its
handlers afresh, so a command run again in the same process (tests, the
command server's forked child) logs with its own options and pid.
"""

import logging
import logging.handlers
import os
import sys

NAME = "vif-route-qubes"
# The libraries log every process started and every netlink message at info
# and debug (and pyroute2 resets its logger's level when imported): only their
# warnings belong in our stderr and syslog, even with -v.
LIBRARIES = ("sh", "pyroute2", "asyncio")


def _ours_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".")[0] not in LIBRARIES


class _Printable(logging.Filter):
    """Untrusted text in a message never reaches stderr or syslog raw: control
    characters and undecodable bytes are escaped, so a record is one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        clean = clean.encode("utf-8", "backslashreplace").decode("utf-8")
        if clean != text:
            record.msg, record.args = clean, None
        return True


class _Syslog(logging.handlers.SysLogHandler):
    """Facility daemon, one RFC 3164 datagram a record: `<PRI>IDENT[PID]: message`,
    the message exactly as on stderr (no trailing NUL)."""

    append_nul = False

    def __init__(self, ident: str, path: str) -> None:
        super().__init__(address=path, facility=self.LOG_DAEMON)
        self.ident = f"{ident}[{os.getpid()}]: "

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)  # a bug of ours: shown
        # else no syslog here, or it is gone or full: stderr still has the message


def get_logger(name: str = NAME) -> logging.Logger:
    return logging.getLogger(name)


def setup(verbose: bool, ident: str = NAME) -> logging.Logger:
    """Log as `ident` to stderr (warnings and errors, everything with `verbose`)
    and to syslog (from info on; /dev/log, or the socket VIF_ROUTE_SYSLOG names)."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        if isinstance(handler, _Syslog):
            handler.close()  # our socket of an earlier run in this process
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(f"{ident}: %(message)s"))
    stderr.setLevel(logging.DEBUG if verbose else logging.WARNING)
    # VIF_ROUTE_SYSLOG names another syslog socket (tests, containers).
    syslog = _Syslog(ident, os.environ.get("VIF_ROUTE_SYSLOG") or "/dev/log")
    for handler in (stderr, syslog):
        handler.addFilter(_ours_or_warning)
        handler.addFilter(_Printable())
        root.addHandler(handler)
    return logging.getLogger(ident)
