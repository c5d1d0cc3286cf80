"""Which programs one vif event starts (issue 28): a folder of wrappers put first
on PATH, one per program an event may run, each appending its name and arguments
to a log before it runs the real one (the stand-in in tests/kit/fakebin, or the
system's tool).  A served event's child takes the client's environment, so the
wrappers count in both modes."""

import os
import shlex
import shutil
from pathlib import Path

WATCHED = ("xenstore-read", "xenstore-write", "qubesdb-read", "nft", "iptables", "ip6tables", "iptables-restore",
           "ip6tables-restore", "iptables-save", "ip6tables-save", "ipset", "ip", "conntrack", "sysctl", "nsenter",
           "systemctl")
WRAPPER = """#!/bin/sh
printf '%s\\n' "{name} $*" >> {log}
exec {real} "$@"
"""


class Counter:
    """Wrappers in `folder` of every WATCHED program found on `path`; calls() reads the log."""

    def __init__(self, folder: Path, path: str) -> None:
        self.folder, self.log = folder, folder / "calls.log"
        folder.mkdir(parents=True, exist_ok=True)
        for name in WATCHED:
            real = shutil.which(name, path=path)
            if real is None:
                continue
            wrapper = folder / name
            wrapper.write_text(WRAPPER.format(name=name, log=shlex.quote(str(self.log)), real=shlex.quote(real)))
            wrapper.chmod(0o755)
        self.path = f"{folder}:{path}"
        self.reset()

    def reset(self) -> None:
        self.log.write_text("")

    def calls(self) -> list[str]:
        """Each call as `NAME ARGS`, in order."""
        return self.log.read_text().splitlines()

    def names(self) -> list[str]:
        return [line.split(" ", 1)[0] for line in self.calls()]

    def count(self, name: str) -> int:
        return self.names().count(name)


def service_path(bin_dir: Path, fakebin: Path) -> str:
    """The stand-ins, then our programs, then the system's (what XenEnv.env puts on PATH)."""
    return f"{fakebin}:{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
