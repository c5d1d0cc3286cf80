"""Reading /proc/sys, where a missing file (an interface gone, no IPv6 stack) is no error."""


def read_sysctl(path: str) -> str | None:
    """The value of /proc/sys/`path`, stripped; None when it cannot be read."""
    try:
        with open("/proc/sys/" + path) as handle:
            return handle.read().strip()
    except OSError:
        return None
