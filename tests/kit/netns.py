"""Network namespaces joined like Xen vifs, for tests (CONTRACT section 6).

Every namespace made here is recorded and deleted by the fixture's finalizer,
even when the test fails.  Names carry a per-run prefix so that runs never
collide and leftovers are recognisable.
"""

import itertools
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from server_mode import mode_env

FAKEBIN = Path(__file__).parent / "fakebin"
BIN = Path(sys.executable).parent
RUN_PREFIX = "vrq" + uuid.uuid4().hex[:5]
_counter = itertools.count(1)
VIF_MAC = "fe:ff:ff:ff:ff:ff"
# A system service's PATH (systemd's default, as xl devd gets it), the stand-ins first.
SERVICE_PATH = f"{FAKEBIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sh(cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, shell=True, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd!r} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def pids_in(ns) -> list[str]:
    """Processes in a namespace (asked from outside it)."""
    return subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout.split()


def wait_for(predicate, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@dataclass
class Namespace:
    name: str

    def sh(self, cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return sh(f"ip netns exec {self.name} sh -c {shlex.quote(cmd)}", check=check, **kwargs)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)

    def out(self, cmd: str) -> str:
        return self.sh(cmd).stdout


@dataclass
class Namespaces:
    """Factory and registry: make namespaces, join them, delete them all."""

    made: list[Namespace] = field(default_factory=list)

    def make(self, role: str) -> Namespace:
        ns = Namespace(f"{RUN_PREFIX}-{next(_counter)}{role[:4]}")
        sh(f"ip netns add {ns.name}")
        self.made.append(ns)
        ns.sh("ip link set lo up")
        return ns

    def vif(self, provider: Namespace, vm: Namespace, vif: str, vm_mac: str = "00:16:3e:5e:6c:19",
            vm_addrs: tuple[str, ...] = (), gateway: str | None = None) -> None:
        """A veth pair standing in for a Xen vif: `vif` in provider (down, MAC
        fe:ff:ff:ff:ff:ff, as Xen creates it), eth0 in the VM, configured the
        way a Qubes VM configures itself (address /32, default route via the
        gateway on the link)."""
        tmp = f"v{uuid.uuid4().hex[:10]}"
        sh(f"ip link add {tmp} type veth peer name {tmp}p")
        sh(f"ip link set {tmp} netns {provider.name}")
        sh(f"ip link set {tmp}p netns {vm.name}")
        provider.sh(f"ip link set {tmp} name {vif} && ip link set {vif} address {VIF_MAC}")
        vm.sh(f"ip link set {tmp}p name eth0 && ip link set eth0 address {vm_mac} && ip link set eth0 up")
        for addr in vm_addrs:
            if ":" in addr:
                vm.sh(f"ip -6 addr add {addr}/128 dev eth0 nodad")
            else:
                vm.sh(f"ip addr add {addr}/32 dev eth0")
        if gateway:
            if ":" in gateway:
                vm.sh(f"ip -6 route add {gateway} dev eth0 && ip -6 route add default via {gateway} dev eth0")
            else:
                vm.sh(f"ip route add {gateway} dev eth0 && ip route add default via {gateway} dev eth0")

    def link(self, a: Namespace, a_if: str, b: Namespace, b_if: str) -> None:
        tmp = f"l{uuid.uuid4().hex[:10]}"
        sh(f"ip link add {tmp} type veth peer name {tmp}p")
        sh(f"ip link set {tmp} netns {a.name}")
        sh(f"ip link set {tmp}p netns {b.name}")
        a.sh(f"ip link set {tmp} name {a_if} && ip link set {a_if} up")
        b.sh(f"ip link set {tmp}p name {b_if} && ip link set {b_if} up")

    def cleanup(self) -> None:
        for ns in reversed(self.made):
            for pid in pids_in(ns):
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        self.made.clear()


class XenEnv:
    """File-backed xenstore and qubesdb, a lock file and a hooks folder of one test.

    Keys are stored by absolute path; a relative one (what xl devd and the kernel
    give as XENBUS_PATH) is resolved against this domain's home, as xenstored
    does: /local/domain/<own_domid>/ (the stand-ins get it as FAKE_XENSTORE_DOMID)."""

    def __init__(self, root: Path, own_domid: int = 0) -> None:
        self.root = root
        self.own_domid = own_domid
        self.xenstore = root / "xenstore"
        self.qubesdb = root / "qubesdb"
        self.hooks = root / "hooks"
        for folder in (self.xenstore, self.qubesdb, self.hooks):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock = root / "vif-route-qubes.lock"

    def _file(self, folder: Path, key: str) -> Path:
        from urllib.parse import quote

        return folder / quote(key, safe="")

    def xs_key(self, key: str) -> str:
        return key if key.startswith("/") else f"/local/domain/{self.own_domid}/{key}"

    def xs_write(self, key: str, value: str) -> None:
        self._file(self.xenstore, self.xs_key(key)).write_text(value)

    def xs_read(self, key: str) -> str | None:
        path = self._file(self.xenstore, self.xs_key(key))
        return path.read_text() if path.exists() else None

    def xs_rm(self, key: str) -> None:
        self._file(self.xenstore, self.xs_key(key)).unlink(missing_ok=True)

    def qdb_write(self, key: str, value: str) -> None:
        self._file(self.qubesdb, key).write_text(value)

    def qdb_rm(self, key: str) -> None:
        self._file(self.qubesdb, key).unlink(missing_ok=True)

    def backend(self, domid: int, devid: int = 0, ip: str | None = None, mac: str | None = None,
                dev_type: str = "vif", absolute: bool = False) -> str:
        """Write a vif's backend keys the way Xen's toolstack does; return XENBUS_PATH as
        xl devd and the kernel give it (relative), or `absolute`."""
        path = f"backend/vif/{domid}/{devid}"
        if absolute:
            path = self.xs_key(path)
        if ip is not None:
            self.xs_write(f"{path}/ip", ip)
        if mac is not None:
            self.xs_write(f"{path}/mac", mac)
        self.xs_write(f"{path}/type", dev_type)
        return path

    def env(self, **extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("VIF_ROUTE_", "QUBES_", "XENBUS", "FAKE_")) and key not in ("vif", "ip", "type_if")}
        env.update({
            "PATH": f"{FAKEBIN}:{BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            "FAKE_XENSTORE_DIR": str(self.xenstore),
            "FAKE_XENSTORE_DOMID": str(self.own_domid),
            "FAKE_QUBESDB_DIR": str(self.qubesdb),
            "VIF_ROUTE_LOCK_FILE": str(self.lock),
            "VIF_ROUTE_HOOKS_DIR": str(self.hooks),
        })
        env.update(mode_env())  # the server's socket, or VIF_ROUTE_SERVER=off
        env.update(extra)
        return env


    def libxl(self, vif: str, path: str, **extra: str) -> list[str]:
        """`env -i` and the environment libxl gives a vif script (libxl_linux.c,
        get_hotplug_env) on top of a service's PATH, plus this test's stand-ins
        (files instead of xenstore and qubesdb, its own lock and hooks folder)."""
        env = {"PATH": SERVICE_PATH, "XENBUS_PATH": path, "XENBUS_TYPE": "vif", "XENBUS_BASE_PATH": "backend",
               "netdev": "", "script": "/etc/xen/scripts/vif-route-qubes", "vif": vif, **self.stand_ins(), **extra}
        return ["env", "-i", *(f"{key}={value}" for key, value in env.items())]

    def stand_ins(self) -> dict[str, str]:
        """The variables of this test's stand-ins only: where the files behind xenstore and
        qubesdb are, this domain's id, the test's own lock file and hooks folder."""
        return {"FAKE_XENSTORE_DIR": str(self.xenstore), "FAKE_XENSTORE_DOMID": str(self.own_domid),
                "FAKE_QUBESDB_DIR": str(self.qubesdb), "VIF_ROUTE_LOCK_FILE": str(self.lock),
                "VIF_ROUTE_HOOKS_DIR": str(self.hooks),
                **mode_env()}  # the test server's socket in server mode (as systemd's would be), else off


def run_libxl(ns: Namespace, xen: "XenEnv", argv: list[str], vif: str, path: str, timeout: float = 60,
              popen: bool = False, **extra: str):
    """Run a vif script as xl devd does (`argv`: PROGRAM online type_if=vif): libxl's
    environment only, stdin /dev/null, no controlling terminal (a new session).
    With `popen`, the running process (its pid is the program's: ip netns exec and
    env exec it), stderr piped, for a test to kill it as libxl's 40 s timeout does."""
    full = ["ip", "netns", "exec", ns.name, *xen.libxl(vif, path, **extra), *argv]
    if popen:
        return subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    return subprocess.run(full, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def run_cmd(ns: Namespace, argv: list[str], env: dict[str, str], timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
    """Run one of our programs (by its installed entry point) inside a namespace."""
    return subprocess.run(["ip", "netns", "exec", ns.name, *argv], env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def state_of(ns: Namespace) -> str:
    """Everything online may change, as text: rules without counters, routes, addresses, neighbours."""
    parts = []
    for cmd in ("iptables-save", "ip6tables-save"):
        text = ns.out(cmd)
        parts.append("\n".join(line for line in text.splitlines() if not line.startswith("#")))
    # The ipsets (iptables backend), in a stable order; a set's hash seed is random.
    members = ns.sh("ipset save", check=False).stdout
    parts.append("$ ipset save\n" + "\n".join(sorted(re.sub(r" initval 0x[0-9a-f]+", "", line)
                                                  for line in members.splitlines())))
    # The nft backend's tables, stateless (no counters).  Only ours: the nft
    # view of iptables-nft's own tables shows artefacts iptables-save hides.
    for family in ("ip", "ip6"):
        listing = ns.sh(f"nft -s list table {family} qubes", check=False).stdout
        parts.append(f"$ nft -s list table {family} qubes\n" + listing)
    for cmd in ("ip -4 route show table all", "ip -6 route show table all", "ip -4 addr", "ip -6 addr",
                "ip neigh show nud permanent", "ip -6 neigh show nud permanent"):
        parts.append(f"$ {cmd}\n" + ns.out(cmd))
    return "\n".join(parts)


# Per interface: its carrier and whether IPv6 is off; then every IPv6 address with its flags.
_IPV6_PROBE = r"""
for dev in /sys/class/net/*; do
  name=${dev##*/}
  [ "$name" = lo ] && continue
  echo "dev $name $(cat $dev/carrier 2>/dev/null || echo 0) $(cat /proc/sys/net/ipv6/conf/$name/disable_ipv6 2>/dev/null || echo 1)"
done
ip -6 -o addr show
"""


def _ipv6_unsettled(ns: Namespace) -> bool:
    """Some address still in duplicate address detection, or an interface with
    carrier and IPv6 on that has no link-local address yet (the kernel adds it
    only once the carrier event went through its link watch, up to a second)."""
    out = ns.out(_IPV6_PROBE)
    if "tentative" in out:
        return True
    with_ll = {line.split()[1] for line in out.splitlines()
               if not line.startswith("dev ") and " scope link " in line}
    waiting = [line.split()[1] for line in out.splitlines()
               if line.startswith("dev ") and line.split()[2:] == ["1", "0"]]
    return any(name not in with_ll for name in waiting)


def settled(ns: Namespace, timeout: float = 5.0) -> str:
    """state_of once IPv6 addresses are settled (kernel timing): every address's
    duplicate address detection over and every link-local address made."""
    deadline = time.monotonic() + timeout
    while _ipv6_unsettled(ns) and time.monotonic() < deadline:
        time.sleep(0.1)
    return state_of(ns)


def comparable(state: str, sort_ipv6_routes: bool = False) -> str:
    """What two namespaces built alike can share: interface indexes and the
    peer namespace's name necessarily differ between them, and neighbours are
    listed in the order of a hash table that is seeded at random.  With
    `sort_ipv6_routes`, IPv6 routes too (many vifs' identical link-local
    routes come in the order their duplicate address detection ended)."""
    import re

    state = re.sub(r"^\d+: ", "N: ", state, flags=re.M)
    state = re.sub(r"@if\d+", "@ifN", state)
    state = re.sub(r" link-netns \S+", "", state)
    sections = []
    for section in state.split("\n$ "):
        head, *lines = section.split("\n")
        unordered = " neigh " in head or (sort_ipv6_routes and "-6 route" in head)
        sections.append("\n".join([head, *(sorted(lines) if unordered else lines)]))
    return "\n$ ".join(sections)
