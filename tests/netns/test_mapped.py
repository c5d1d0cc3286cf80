"""Mapped addresses (README "Mapped addresses"), proved with namespaces and real packets.

    vm (eth0 10.137.99.30/32, default via 10.137.99.1)
      --vif37.0--> <prefix>vif37.0 (vif37.0 holds 10.137.99.1, uplink holds 10.137.7.30)
      --veth vif37.0--> proxy (gateway 10.137.7.1; eth0 192.0.2.2/24, masquerades after `init`)
      --> upstream (eth0 192.0.2.1/24; host 198.51.100.1 on lo)

vif-route-qubes makes the vif's namespace with `ip netns add`.  Under `ip netns
exec` that bind mount would vanish with the command's private mount namespace,
so the program runs under `nsenter --net=` (our own mount namespace).  Every
test has its own VIF_ROUTE_NETNS_PREFIX, and the `prefixes` fixture deletes
every namespace carrying it, even when the test fails.

Every test runs once per firewall backend (`backend`): `init --backend B` and
QUBES_NET_BACKEND=B for every command in the ProxyVM.  The mapped namespace's
own translation is nftables under both.
"""

import itertools
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from firewall import antispoof_sources
from netns import RUN_PREFIX, Namespace, XenEnv, state_of
from walkthrough import ANSWER, DNS_A, NAME, PROXY_DNS2, PROXY_GW, Walkthrough

PY = sys.executable
VIF, DOMID, VM_MAC = "vif37.0", 37, "00:16:3e:5e:6c:1e"
REAL, VISIBLE, VISIBLE_GW, GW = "10.137.7.30", "10.137.99.30", "10.137.99.1", "10.137.7.1"
HOST, PORT = "198.51.100.1", 7777
ANNOUNCE = f"/mapped-ip/{REAL}"
_serial = itertools.count(1)

# Prints each datagram's payload; stops 0.3 s after "end" or at the time limit.
RECEIVER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
deadline = time.monotonic() + 5
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data = s.recv(200)
    except socket.timeout:
        break
    print(data.decode(), flush=True)
    if data == b"end":
        deadline = min(deadline, time.monotonic() + 0.3)
"""
SENDER = r"""
import socket, sys
src, dst, port, payload = sys.argv[1:]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
s.sendto(payload.encode(), (dst, int(port)))
"""


@pytest.fixture
def prefixes():
    """A factory of per-test namespace prefixes; deletes every namespace made with them."""
    made = []

    def new() -> str:
        made.append(f"{RUN_PREFIX}-m{next(_serial)}-")
        return made[-1]

    yield new
    for name in our_namespaces(*made):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    assert not our_namespaces(*made), "namespaces of this test were left behind"


@dataclass
class Topo:
    """One test's namespaces and Xen stand-ins; runs vif-route-qubes in the ProxyVM."""

    proxy: Namespace
    vm: Namespace
    up: Namespace
    xen: XenEnv
    prefix: str
    path: str
    vifcmd: str
    backend: str

    @property
    def vifns(self) -> Namespace:
        return Namespace(self.prefix + VIF)

    def env(self, **extra: str) -> dict[str, str]:
        return self.xen.env(vif=VIF, XENBUS_PATH=self.path, VIF_ROUTE_NETNS_PREFIX=self.prefix,
                            QUBES_NET_BACKEND=self.backend, **extra)

    def run(self, *args: str, timeout: float = 30, **extra: str) -> subprocess.CompletedProcess:
        return nsenter(self.proxy, [self.vifcmd, *args], self.env(**extra), timeout)

    def ok(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        result = self.run(*args, **extra)
        assert result.returncode == 0, result.stderr
        return result


def nsenter(ns: Namespace, argv: list[str], env: dict[str, str], timeout: float = 30,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns.name}", *argv], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def write_entries(xen: XenEnv, real: str = REAL, visible: str = VISIBLE) -> None:
    # Atomically (rename), as the fake qubesdb's own writer: a poll must never see half a value.
    for key, value in (("visible-gateway", VISIBLE_GW), ("visible-ip", visible)):
        path = xen.qubesdb / quote(f"/mapped-ip/{real}/{key}", safe="")
        Path(f"{path}.tmp").write_text(value)
        os.replace(f"{path}.tmp", path)


def build(netns, xen, vifcmd, prefix, backend, entries=True) -> Topo:
    proxy, vm, up = (netns.make(role) for role in ("proxy", "mapd", "upstream"))
    # No duplicate address detection on the ProxyVM's links (set before they arrive): a
    # link-local address still "tentative" would make two states differ by timing.
    proxy.sh("sysctl -qw net.ipv6.conf.default.accept_dad=0")
    netns.vif(proxy, vm, VIF, vm_mac=VM_MAC, vm_addrs=(VISIBLE,), gateway=VISIBLE_GW)
    netns.link(proxy, "eth0", up, "eth0")
    proxy.sh("ip addr add 192.0.2.2/24 dev eth0 && ip route add default via 192.0.2.1")
    up.sh(f"ip addr add 192.0.2.1/24 dev eth0 && ip addr add {HOST}/32 dev lo")
    path = xen.backend(DOMID, ip=REAL, mac=VM_MAC)
    xen.qdb_write("/qubes-netvm-gateway", GW)
    if entries:
        write_entries(xen)
    topo = Topo(proxy, vm, up, xen, prefix, path, vifcmd, backend)
    topo.ok("init", "--backend", backend)
    return topo


def inside(topo: Topo) -> str:
    """The vif's namespace as text: addresses, routes, permanent neighbours, nftables."""
    return "\n".join(f"$ {cmd}\n" + topo.vifns.out(cmd) for cmd in (
        "ip addr", "ip route show table all", "ip neigh show nud permanent", "nft list ruleset"))


def comparable(text: str) -> str:
    """Twins differ only in interface indexes, namespace names and ids, and in
    the link-local address of eth0 (its MAC is random; the vifs' is fixed)."""
    text = re.sub(r"^\d+: ", "N: ", text, flags=re.M)
    text = re.sub(r"fe80::(?!fcff:ffff:feff:ffff)[0-9a-f:]+", "fe80::X", text)
    text = re.sub(r"@if\d+", "@ifN", text)
    return re.sub(r" link-netns(id)? \S+", "", text)


def our_namespaces(*prefixes: str) -> list[str]:
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    return [name for name in names if name.startswith(prefixes)]


def assert_mapped_ping(topo: Topo) -> None:
    """The VM pings upstream; the ProxyVM's connection tracking knows only the real address."""
    topo.vm.sh(f"ping -c 1 -W 2 {HOST}", timeout=10)
    flows = topo.proxy.sh("conntrack -L", timeout=10).stdout
    assert f"src={REAL} dst={HOST}" in flows, flows
    assert VISIBLE not in flows, flows


def assert_not_configured(topo: Topo, before: str) -> None:
    assert our_namespaces(topo.prefix) == []
    assert "state DOWN" in topo.proxy.out(f"ip link show {VIF}")
    assert state_of(topo.proxy) == before


def exchange(topo: Topo, sends: list[tuple[str, str]]) -> set[str]:
    """Send each (source, payload) from the VM to HOST:PORT, then a legitimate
    "end": the payloads the upstream receiver got (all earlier ones arrived
    before "end" unless dropped: one path, one order)."""
    proc = topo.up.popen([PY, "-c", RECEIVER, str(PORT)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for src, payload in [*sends, (VISIBLE, "end")]:
            topo.vm.sh(f"{PY} -c {shlex.quote(SENDER)} {src} {HOST} {PORT} {payload}", timeout=10)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    got = set(out.split())
    assert "end" in got, f"the legitimate datagram did not arrive: {got}"
    return got


# ---- 1. the VM sees the visible address, the ProxyVM only the real one ---------

def test_mapped_vm_pings_upstream_as_real_address(netns, xen, vifcmd, prefixes, backend):
    topo = build(netns, xen, vifcmd, prefixes(), backend)
    topo.ok("online", "type_if=vif")
    assert xen.xs_read(f"{topo.path}/hotplug-status") == "connected"
    assert our_namespaces(topo.prefix) == [topo.vifns.name]
    assert f"inet {VISIBLE_GW}/32" in topo.vifns.out(f"ip -4 addr show dev {VIF}")
    assert f"inet {REAL}/32" in topo.vifns.out("ip -4 addr show dev uplink")
    # The ProxyVM's anti-spoofing, on the veth end named after the vif, knows only the real address.
    assert antispoof_sources(topo.proxy, backend, VIF) == {REAL}
    assert_mapped_ping(topo)


# ---- 2. DNS through the ProxyVM's virtual addresses ----------------------------

def test_dns_through_virtual_address(tmp_path, vifcmd, prefixes, backend):
    """A mapped VM (vif38.0, real 10.137.7.31, visible 10.137.99.31) joins the walk-through's ProxyVM."""
    prefix = prefixes()
    with Walkthrough(tmp_path / "walk", firewall=backend) as walk:
        walk.build()
        proxy = walk.proxy
        vm = walk.spaces.make("mapd")
        walk.spaces.vif(proxy.ns, vm, "vif38.0", vm_mac=VM_MAC, vm_addrs=("10.137.99.31",), gateway=VISIBLE_GW)
        xb = walk.backend(proxy, 38, "10.137.7.31", VM_MAC)
        write_entries(proxy.xen, real="10.137.7.31", visible="10.137.99.31")
        env = proxy.env(vif="vif38.0", XENBUS_PATH=xb, VIF_ROUTE_NETNS_PREFIX=prefix)
        result = nsenter(proxy.ns, [vifcmd, "online", "type_if=vif"], env)
        assert result.returncode == 0, result.stderr
        assert our_namespaces(prefix) == [prefix + "vif38.0"]
        for server in (PROXY_GW, PROXY_DNS2):
            assert walk.dns(vm, server) == (ANSWER[DNS_A], ANSWER[DNS_A]), f"{NAME} via {server}"
        flows = [f for f in walk.flows(proxy.ns) if f.dport == "53"]
        assert flows and {f.src for f in flows} == {"10.137.7.31"}, flows


# ---- 3. no other source, no IPv6 -----------------------------------------------

def test_mapped_vm_cannot_spoof(netns, xen, vifcmd, prefixes, backend):
    topo = build(netns, xen, vifcmd, prefixes(), backend)
    topo.ok("online", "type_if=vif")
    # Reverse-path filtering off everywhere, so that only the rules can drop.
    for ns in (topo.proxy, topo.vm, topo.up, topo.vifns):
        ns.sh("for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done")
    # The real address too: outside the namespace it would pass the ProxyVM's
    # anti-spoofing.  (The kernel also refuses a local address as a source.)
    topo.vm.sh(f"ip addr add 10.137.99.77/32 dev eth0 && ip addr add {REAL}/32 dev eth0")
    got = exchange(topo, [("10.137.99.77", "spoof-other"), (REAL, "spoof-real"), (VISIBLE, "own")])
    assert "own" in got
    assert not {"spoof-other", "spoof-real"} & got, got


def test_mapped_vm_ipv6_is_dropped_inside(netns, xen, vifcmd, prefixes, backend):
    topo = build(netns, xen, vifcmd, prefixes(), backend)
    topo.ok("online", "type_if=vif")
    # A permanent neighbour for the gateway, so the VM really sends (no neighbour discovery needed).
    topo.vm.sh("ip -6 addr add fd09:24ef:4179::30/128 dev eth0 nodad"
               " && ip -6 route add fd09:24ef:4179::1 dev eth0"
               " && ip -6 route add default via fd09:24ef:4179::1 dev eth0"
               " && ip -6 neigh replace fd09:24ef:4179::1 lladdr fe:ff:ff:ff:ff:ff dev eth0 nud permanent")
    topo.up.sh("ip -6 addr add 2001:db8:100::1/128 dev lo")

    def v6_in(ns: Namespace, dev: str) -> int:
        return int(re.search(r"^Ip6InReceives\s+(\d+)", ns.out(f"cat /proc/net/dev_snmp6/{dev}"), re.M)[1])

    def rx(ns: Namespace, dev: str) -> int:
        return int(ns.out(f"cat /sys/class/net/{dev}/statistics/rx_packets"))

    arrived, leaked = rx(topo.vifns, VIF), v6_in(topo.proxy, VIF)
    assert topo.vifns.out("ip -6 addr") == "", "IPv6 is on in the mapped vif's namespace"
    # The namespace's own end of the vif (link-local from its fixed MAC) would answer were IPv6
    # not dropped there, once out of duplicate address detection: ping it for 3 s.  The others
    # would need the ProxyVM, which must never see them.  All three at once, to be quick.
    pings = [topo.vm.popen(["ping", "-6", "-w", "3", "-i", "0.2", target], stdout=subprocess.DEVNULL)
             for target in ("fe80::fcff:ffff:feff:ffff%eth0", "fd09:24ef:4179::1", "2001:db8:100::1")]
    assert [ping.wait(timeout=10) for ping in pings] == [1, 1, 1], "an IPv6 ping was answered"
    assert rx(topo.vifns, VIF) >= arrived + 4, "the VM's IPv6 packets did not reach its namespace"
    assert v6_in(topo.proxy, VIF) == leaked, "IPv6 from the mapped VM came out of its namespace"


# ---- 4. idempotence and a clean offline ----------------------------------------

def test_online_twice_changes_nothing(netns, xen, vifcmd, prefixes, backend):
    topo = build(netns, xen, vifcmd, prefixes(), backend)
    topo.ok("online", "type_if=vif")
    before = (state_of(topo.proxy), inside(topo))
    topo.ok("online", "type_if=vif")
    assert (state_of(topo.proxy), inside(topo)) == before
    assert_mapped_ping(topo)


def test_offline_undoes_online(netns, xen, vifcmd, prefixes, backend):
    topo = build(netns, xen, vifcmd, prefixes(), backend)
    before, links = state_of(topo.proxy), topo.proxy.out("ip -o link | cut -d' ' -f2")
    topo.ok("online", "type_if=vif")
    topo.ok("offline", "type_if=vif")
    assert state_of(topo.proxy) == before
    assert our_namespaces(topo.prefix) == []
    # The Xen vif is back (its peer is the VM's eth0), down; no veth or `uplink` is left.
    assert topo.proxy.out("ip -o link | cut -d' ' -f2") == links
    vif = topo.proxy.out(f"ip link show {VIF}")
    assert "state DOWN" in vif and f"link-netns {topo.vm.name}" in vif, vif
    assert "qubes-mapped" not in topo.proxy.out("nft list ruleset")
    topo.ok("offline", "type_if=vif")
    assert state_of(topo.proxy) == before


# ---- 5. entries that come late, or never ---------------------------------------

def test_late_entries_are_waited_for(netns, xen, vifcmd, prefixes, backend):
    topo = build(netns, xen, vifcmd, prefixes(), backend, entries=False)
    xen.qdb_write(ANNOUNCE, "1")
    late = threading.Timer(1.0, write_entries, (xen,))
    late.start()
    try:
        started = time.monotonic()
        topo.ok("online", "type_if=vif")
        assert 0.9 <= time.monotonic() - started < 5  # it waited for the entries
    finally:
        late.cancel()
        late.join()
    assert our_namespaces(topo.prefix) == [topo.vifns.name]
    assert_mapped_ping(topo)


def test_entries_that_never_come_fail_cleanly(netns, xen, vifcmd, prefixes, backend):
    topo = build(netns, xen, vifcmd, prefixes(), backend, entries=False)
    xen.qdb_write(ANNOUNCE, "1")
    before = state_of(topo.proxy)
    started = time.monotonic()
    result = topo.run("online", "type_if=vif", VIF_ROUTE_MAPPED_WAIT="1.5")
    assert 1.5 <= time.monotonic() - started < 3
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and VIF in lines[0] and "qubesdb" in lines[0], result.stderr
    assert xen.xs_read(f"{topo.path}/hotplug-status") == "error"
    assert_not_configured(topo, before)


# ---- 6. --dry-run ---------------------------------------------------------------

def test_dry_run_prints_everything_and_the_script_makes_the_same_state(netns, xen, vifcmd, prefixes, tmp_path,
                                                                     backend):
    real = build(netns, xen, vifcmd, prefixes(), backend)
    # The twin has its own prefix; the script names its namespace, so it is made in the twin's environment.
    twin = build(netns, XenEnv(tmp_path / "twin"), vifcmd, prefixes(), backend)
    before = state_of(twin.proxy)
    script = twin.ok("online", "--dry-run", "type_if=vif").stdout
    assert_not_configured(twin, before)
    assert twin.xen.xs_read(f"{twin.path}/hotplug-status") is None

    name = twin.vifns.name
    # The ProxyVM's anti-spoofing of the veth end: its ipset elements, or the nft transaction (its
    # here-document is EOF; the mapped namespace's is NFT), then the vif's group 2 before it is up.
    firewall = (["ipset add -exist qbs-allowed4 "] if backend == "iptables"
                else ["nft -f - <<'EOF'\n", f"ip link set dev {VIF} group 2\nip link set dev {VIF} up\n"])
    in_order = [f"ip netns add {name}\n", f"ip link set dev {VIF} netns {name}\n",
                f"ip link add {VIF} address fe:ff:ff:ff:ff:ff type veth peer name uplink address {VM_MAC} netns {name}\n",
                f"ip netns exec {name} sh -e <<'EOS'\n", "table ip qubes-mapped {", "table ip6 qubes-mapped {",
                "table arp qubes-mapped {", f"ip route replace default via {GW} dev uplink\nEOS\n",
                *firewall, f"ip route replace {REAL}/32 dev {VIF} metric 32715",
                f"ip neigh replace {REAL} lladdr {VM_MAC} dev {VIF} nud permanent", "xenstore-write"]
    found = [script.find(piece) for piece in in_order]
    assert -1 not in found and found == sorted(found), dict(zip(in_order, found))

    real.ok("online", "type_if=vif")
    result = nsenter(twin.proxy, ["sh", "-e"], twin.env(), stdin=script)
    assert result.returncode == 0, f"{result.stderr}\n--- script ---\n{script}"
    assert comparable(state_of(twin.proxy)) == comparable(state_of(real.proxy))
    assert comparable(inside(twin)) == comparable(inside(real))
    assert twin.xen.xs_read(f"{twin.path}/hotplug-status") == "connected"
    assert_mapped_ping(twin)
