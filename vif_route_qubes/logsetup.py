"""Logging to stderr and, when there is one, to syslog (facility daemon)."""

import logging
import os

NAME = "vif-route-qubes"


def setup(verbose: bool, ident: str = NAME) -> logging.Logger:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter(f"{ident}: %(message)s"))
    stderr.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.addHandler(stderr)
    if os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler

        try:
            handler = SysLogHandler("/dev/log", facility=SysLogHandler.LOG_DAEMON)
        except OSError:
            pass
        else:
            handler.setFormatter(logging.Formatter(f"{ident}[{os.getpid()}]: %(message)s"))
            root.addHandler(handler)
    return logging.getLogger(ident)
