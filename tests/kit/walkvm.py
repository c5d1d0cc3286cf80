"""The pieces of the walk-through (tests/kit/walkthrough.py): a network-providing VM
with its own qubesdb, resolv.conf, lock, hooks and systemctl log, and one
parsed `conntrack -L` entry."""

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from firewall import nft_tables
from netns import BIN, FAKEBIN, Namespace, XenEnv

HERE = Path(__file__).resolve().parent
_VENV_BIN = HERE.parents[1] / ".venv" / "bin"
PROG_BIN = _VENV_BIN if (_VENV_BIN / "vif-route-qubes").exists() else BIN


class BringUpError(AssertionError):
    """A step of the bring-up did not end as the system expects."""


@dataclass
class VM:
    """A network-providing VM: its namespace and its own qubesdb, resolv.conf, lock, hooks."""

    label: str
    ns: Namespace
    xen: XenEnv  # .xenstore points at the host's shared folder
    domid: int
    firewall: str = "iptables"  # the backend its commands use

    @property
    def resolv(self) -> Path:
        return self.xen.root / "resolv.conf"

    @property
    def systemctl_log(self) -> Path:
        return self.xen.root / "systemctl.log"

    def env(self, **extra: str) -> dict[str, str]:
        base = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        return self.xen.env(PATH=f"{FAKEBIN}:{PROG_BIN}:{base}", QUBES_RESOLV_CONF=str(self.resolv),
                            FAKE_SYSTEMCTL_LOG=str(self.systemctl_log),
                            # no firewall daemon here: only the dispatcher's restart is expected
                            QUBES_FIREWALL_FLAG=str(self.xen.root / "no-qubes-firewall"),
                            QUBES_NET_BACKEND=self.firewall, **extra)

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns.name, *args]

    def run(self, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), env=self.env(**extra), capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, *args: str, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), env=self.env(**extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def init(self) -> subprocess.CompletedProcess:
        return self.run("vif-route-qubes", "init", "--backend", self.firewall)

    def hotplug(self, command: str, vif: str, xenbus: str) -> subprocess.CompletedProcess:
        """As udev runs it on a Xen vif event."""
        return self.run("vif-route-qubes", command, "type_if=vif", vif=vif, XENBUS_PATH=xenbus)

    def dnat(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("qubes-setup-dnat-to-ns", *args)

    def set_resolv(self, *lines: str) -> None:
        self.resolv.write_text("\n".join(lines) + "\n")

    def rules(self) -> str:
        """iptables-save without comments and counters, and the nft qubes tables
        without counters, to compare states."""
        text = self.ns.out("iptables-save")
        saved = "\n".join(re.sub(r" \[\d+:\d+\]$", "", line) for line in text.splitlines()
                          if not line.startswith("#"))
        return saved + "\n" + nft_tables(self.ns)


@dataclass(frozen=True)
class Flow:
    """One `conntrack -L` entry: the packet as it arrived (orig) and as its answer will (reply)."""

    proto: str
    src: str
    dst: str
    sport: str  # "" for ICMP
    dport: str
    reply_src: str
    reply_dst: str
    reply_sport: str
    reply_dport: str
    line: str

    @staticmethod
    def parse(line: str) -> "Flow | None":
        pairs = re.findall(r"(\w+)=(\S+)", line)
        values = {key: [v for k, v in pairs if k == key] or ["", ""] for key in ("src", "dst", "sport", "dport")}
        if any(len(v) != 2 for v in values.values()) or not values["src"][0]:
            return None
        (src, rsrc), (dst, rdst), (sport, rsport), (dport, rdport) = values.values()
        return Flow(line.split()[0], src, dst, sport, dport, rsrc, rdst, rsport, rdport, line.strip())
