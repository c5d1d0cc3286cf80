"""Loggers that import logging only when a record is actually emitted.

A quiet event that succeeds logs nothing but debug records, which are
dropped here unless -v; importing logging (with traceback, string and
weakref) would cost ~5 ms of an event's ~45.  The first record that is
emitted configures the handlers of loghandlers.py, as setup() asked.
"""

NAME = "vif-route-qubes"
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40  # logging's levels

_config: tuple[bool, str] | None = None  # (verbose, ident) of the last setup()
_configured = False


class LazyLogger:
    def __init__(self, name: str) -> None:
        self.name = name

    def _log(self, level: int, msg: str, args: tuple) -> None:
        global _configured
        verbose = bool(_config and _config[0])
        if level < (DEBUG if verbose else INFO):
            return  # what the configured loggers would drop: no import
        import logging

        if not _configured and _config is not None:
            from vif_route_qubes.loghandlers import configure

            configure(*_config)
            _configured = True
        logging.getLogger(self.name).log(level, msg, *args)

    def debug(self, msg: str, *args) -> None:
        self._log(DEBUG, msg, args)

    def info(self, msg: str, *args) -> None:
        self._log(INFO, msg, args)

    def warning(self, msg: str, *args) -> None:
        self._log(WARNING, msg, args)

    def error(self, msg: str, *args) -> None:
        self._log(ERROR, msg, args)


def get_logger(name: str = NAME) -> LazyLogger:
    return LazyLogger(name)


def setup(verbose: bool, ident: str = NAME) -> LazyLogger:
    """Log as `ident`, to stderr (everything with `verbose`, else warnings
    and errors) and syslog; the handlers are made at the first record."""
    global _config, _configured
    _config, _configured = (verbose, ident), False
    return LazyLogger(ident)
