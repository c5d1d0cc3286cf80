"""The Debian 12 root the booted-system tests boot: built once by mmdebstrap,
kept as a tarball keyed by its package list, unpacked fresh for each container.

    tarball(scratch) -> Path     the cached tarball, built when missing
    unpack(tarball, dest)        a fresh root folder from it

The cache (/var/cache/vif-route-qubes-tests, or $VRQ_SYSTEM_CACHE) only saves
time: when it cannot be written, the root is built into `scratch` instead.
"""

import fcntl
import hashlib
import os
import subprocess
from pathlib import Path

SUITE = "bookworm"
# What the tests need inside: systemd as PID 1, the tools our commands run, a
# Python to make the virtualenv with, udev for `udevadm test`, ping for the vif.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "udev", "iproute2", "nftables", "iptables", "ipset",
            "conntrack", "python3", "python3-venv", "iputils-ping", "procps")
CACHE = Path(os.environ.get("VRQ_SYSTEM_CACHE", "/var/cache/vif-route-qubes-tests"))


def _key(packages: tuple[str, ...]) -> str:
    text = "\n".join([SUITE, "minbase", *sorted(packages)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build(out: Path, packages: tuple[str, ...], log: Path) -> None:
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    with open(log, "ab") as handle:
        result = subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}",
                                 "--format=tar", SUITE, str(tmp)],
                                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"mmdebstrap failed ({result.returncode}); its log: {log}")
    os.replace(tmp, out)


def tarball(scratch: Path, packages: tuple[str, ...] = PACKAGES) -> Path:
    """The root's tarball: from the cache, else built (into the cache when it is
    writable, under a lock so that two runs build it once)."""
    name = f"debian12-minbase-{_key(packages)}.tar"
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        lock = open(CACHE / ".lock", "w")
    except OSError:
        out = scratch / name
        if not out.exists():
            _build(out, packages, scratch / "mmdebstrap.log")
        return out
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = CACHE / name
        if not out.exists():
            _build(out, packages, scratch / "mmdebstrap.log")
        return out


def unpack(tar: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(tar), "-C", str(dest), "--numeric-owner"], check=True,
                   capture_output=True)
    return dest
