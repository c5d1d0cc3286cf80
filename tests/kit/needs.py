"""What the namespace and booted-system tests need of the machine (the unit tests need none of it)."""

import os
import shutil
import sys

from netns import BIN


def missing() -> str | None:
    """Why these tests cannot run here, or None: root, the kernel-side tools, our programs installed."""
    if os.geteuid() != 0:
        return "the tests build network namespaces and must run as root (tests/unit runs as any user)"
    for tool in ("ip", "iptables-restore", "ip6tables-restore", "nft"):
        if not shutil.which(tool):
            return f"{tool} is missing: install iproute2, iptables and nftables"
    if not (BIN / "vif-route-qubes").exists():
        return f"vif-route-qubes is not installed beside {sys.executable}"
    return None
