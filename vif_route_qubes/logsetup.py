"""Logging to stderr and, when there is one, to syslog (facility daemon)."""

import logging
import os

NAME = "vif-route-qubes"


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


def setup(verbose: bool, ident: str = NAME) -> logging.Logger:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter(f"{ident}: %(message)s"))
    stderr.setLevel(logging.DEBUG if verbose else logging.WARNING)
    stderr.addFilter(_Printable())
    root.addHandler(stderr)
    if os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler

        try:
            handler = SysLogHandler("/dev/log", facility=SysLogHandler.LOG_DAEMON)
        except OSError:
            pass
        else:
            handler.setFormatter(logging.Formatter(f"{ident}[{os.getpid()}]: %(message)s"))
            handler.addFilter(_Printable())
            root.addHandler(handler)
    return logging.getLogger(ident)
