"""The handlers behind logsetup's loggers: stderr and, when there is one,
syslog (facility daemon).  Imported on the first record actually emitted.

The syslog handler is a few lines of our own: logging.handlers costs ~8 ms
of start-up, a tenth of an event's budget, for one datagram to /dev/log.
"""

import logging
import os
import socket

LOG_DAEMON = 3
_SEVERITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


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


class _Syslog(logging.Handler):
    """RFC 3164 datagrams to /dev/log: `<PRI>IDENT[PID]: message`."""

    def __init__(self, ident: str, path: str) -> None:
        super().__init__()
        self.prefix = f"{ident}[{os.getpid()}]: "
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise

    def emit(self, record: logging.LogRecord) -> None:
        priority = LOG_DAEMON * 8 + _SEVERITY.get(record.levelno, 6)
        try:
            self.sock.send(f"<{priority}>{self.prefix}{record.getMessage()}".encode("utf-8", "replace"))
        except OSError:
            pass  # syslog gone or full: stderr still has the message

    def close(self) -> None:
        self.sock.close()
        super().close()


def configure(verbose: bool, ident: str) -> None:
    """The root logger's handlers: stderr (warnings and errors, everything
    when verbose) and syslog (from info on)."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter(f"{ident}: %(message)s"))
    stderr.setLevel(logging.DEBUG if verbose else logging.WARNING)
    stderr.addFilter(_Printable())
    root.addHandler(stderr)
    try:
        # VIF_ROUTE_SYSLOG names another syslog socket (tests, containers).
        handler = _Syslog(ident, os.environ.get("VIF_ROUTE_SYSLOG") or "/dev/log")
    except OSError:
        pass  # no syslog here
    else:
        handler.addFilter(_Printable())
        root.addHandler(handler)
