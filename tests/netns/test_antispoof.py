"""Anti-spoofing, proved with real UDP datagrams between namespaces (CONTRACT section 1).

Topology:  app (10.137.7.27) --vif37.0--+
                                        proxy --eth0 192.0.2.2 -- 192.0.2.1 eth0-- upstream
           sib (10.137.7.28) --vif38.0--+
A receiver in the destination namespace prints what arrives.  Every exchange
ends with a legitimate "end" datagram over the same path: once it is there, an
earlier datagram that is missing was dropped, not late.  The control test builds
the same wiring by hand without `online` and shows the kernel alone delivers
every spoof, so the drops below are the rules' doing.
"""

import subprocess
import sys

import pytest

from netns import run_cmd

PY = sys.executable
PORT = 5353
GW = "10.137.7.1"
VM_IP, SIB_IP = "10.137.7.27", "10.137.7.28"
VM_MAC, SIB_MAC = "00:16:3e:5e:6c:19", "00:16:3e:5e:6c:1a"

# Dual-stack receiver: prints "SOURCE PAYLOAD" per datagram; stops 0.3 s after
# "end" (a cross-family straggler still gets in) or after the time limit.
RECEIVER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data, src = s.recvfrom(200)
    except socket.timeout:
        break
    print(src[0].removeprefix("::ffff:"), data.decode(), flush=True)
    if data == b"end":
        deadline = min(deadline, time.monotonic() + 0.3)
"""

SENDER = r"""
import socket, sys
src, dst, port, payload = sys.argv[1:]
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
s.sendto(payload.encode(), (dst, int(port)))
"""


def send(ns, src, dst, payload):
    result = subprocess.run(["ip", "netns", "exec", ns.name, PY, "-c", SENDER, src, dst, str(PORT), payload],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, f"sending from {src} to {dst}: {result.stderr}"


def exchange(receiver, sends, end):
    """Start a receiver, send each (ns, src, dst, payload), then the `end`
    datagram (ns, src, dst); return the set of (source, payload) that arrived."""
    proc = receiver.popen([PY, "-c", RECEIVER, str(PORT), "5"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for ns, src, dst, payload in sends:
            send(ns, src, dst, payload)
        send(*end, "end")
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    got = {tuple(line.split(" ", 1)) for line in out.splitlines()}
    # The legitimate datagram must arrive, or the wiring (not the rules) is broken.
    assert (end[1], "end") in got, f"the control datagram from {end[1]} did not arrive: {got}"
    return got


def no_rp_filter(ns):
    """Reverse-path filtering off everywhere, so only iptables rules can drop."""
    ns.sh("for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done")


def hotplug_online(proxy, xen, vifcmd, vif, path, backend):
    env = xen.env(vif=vif, XENBUS_PATH=path, QUBES_NET_BACKEND=backend)
    result = run_cmd(proxy, [vifcmd, "online", "type_if=vif"], env)
    assert result.returncode == 0, result.stderr


def build(netns, xen, vifcmd, backend=None, vm_ips=(VM_IP,)):
    """The topology above; `online` with `backend` for both vifs, or (no backend)
    the same routes by hand with no rules."""
    proxy, app, sib, up = (netns.make(role) for role in ("proxy", "app", "sib", "upstream"))
    netns.vif(proxy, app, "vif37.0", vm_mac=VM_MAC, vm_addrs=vm_ips, gateway=GW)
    netns.vif(proxy, sib, "vif38.0", vm_mac=SIB_MAC, vm_addrs=(SIB_IP,), gateway=GW)
    netns.link(proxy, "eth0", up, "eth0")
    proxy.sh("ip addr add 192.0.2.2/24 dev eth0 && sysctl -qw net.ipv4.ip_forward=1")
    up.sh("ip addr add 192.0.2.1/24 dev eth0 && ip route add 10.137.7.0/24 via 192.0.2.2")
    for ns in (proxy, app, sib, up):
        no_rp_filter(ns)
    xen.qdb_write("/qubes-netvm-gateway", GW)
    vifs = (("vif37.0", 37, vm_ips, VM_MAC), ("vif38.0", 38, (SIB_IP,), SIB_MAC))
    for vif, domid, ips, mac in vifs:
        if backend:
            hotplug_online(proxy, xen, vifcmd, vif, xen.backend(domid, ip=" ".join(ips), mac=mac), backend)
        else:
            proxy.sh(f"echo 1 > /proc/sys/net/ipv4/conf/{vif}/proxy_arp && ip link set {vif} up"
                     f" && ip addr add {GW}/32 dev {vif}")
            for ip in ips:
                proxy.sh(f"ip route add {ip} dev {vif} metric {32752 - domid}")
    return proxy, app, sib, up


def test_own_address_gets_through(netns, xen, vifcmd, backend):
    _, app, sib, up = build(netns, xen, vifcmd, backend)
    got = exchange(up, [(app, VM_IP, "192.0.2.1", "own"), (sib, SIB_IP, "192.0.2.1", "sibling-own")],
                   end=(app, VM_IP, "192.0.2.1"))
    assert {(VM_IP, "own"), (SIB_IP, "sibling-own")} <= got


@pytest.mark.parametrize("spoof", [SIB_IP, "10.137.7.99"], ids=["sibling-address", "unassigned-address"])
def test_spoofed_source_from_vm_is_dropped(netns, xen, vifcmd, backend, spoof):
    _, app, _, up = build(netns, xen, vifcmd, backend)
    app.sh(f"ip addr add {spoof}/32 dev eth0")  # the VM claims an address it does not own
    got = exchange(up, [(app, spoof, "192.0.2.1", "spoof")], end=(app, VM_IP, "192.0.2.1"))
    assert (spoof, "spoof") not in got


def test_vm_address_from_upstream_is_dropped(netns, xen, vifcmd, backend):
    """An upstream host forging the VM's address must not reach a sibling through the proxy."""
    _, _, sib, up = build(netns, xen, vifcmd, backend)
    up.sh(f"ip addr add {VM_IP}/32 dev lo")
    got = exchange(sib, [(up, VM_IP, SIB_IP, "forged")], end=(up, "192.0.2.1", SIB_IP))
    assert (VM_IP, "forged") not in got


def test_vm_address_from_upstream_to_gateway_is_dropped(netns, xen, vifcmd, backend):
    """The same forgery aimed at the proxy itself (its gateway address)."""
    proxy, _, _, up = build(netns, xen, vifcmd, backend)
    up.sh(f"ip addr add {VM_IP}/32 dev lo")
    got = exchange(proxy, [(up, VM_IP, GW, "forged")], end=(up, "192.0.2.1", GW))
    assert (VM_IP, "forged") not in got


def test_vm_with_two_addresses_uses_both(netns, xen, vifcmd, backend):
    _, app, _, up = build(netns, xen, vifcmd, backend, vm_ips=(VM_IP, "10.137.7.30"))
    got = exchange(up, [(app, "10.137.7.30", "192.0.2.1", "second")], end=(app, VM_IP, "192.0.2.1"))
    assert ("10.137.7.30", "second") in got


@pytest.mark.no_event  # a control: runs none of our commands (server mode counts them)
def test_control_without_rules_kernel_delivers_spoofs(netns, xen, vifcmd):
    """Same wiring, no `online`: every spoof above arrives, so the tests above can fail."""
    proxy, app, sib, up = build(netns, xen, vifcmd)
    assert "QBS" not in proxy.out("iptables-save -t raw") and not proxy.out("nft list tables").strip()
    app.sh(f"ip addr add {SIB_IP}/32 dev eth0 && ip addr add 10.137.7.99/32 dev eth0")
    got = exchange(up, [(app, SIB_IP, "192.0.2.1", "spoof"), (app, "10.137.7.99", "192.0.2.1", "spoof")],
                   end=(app, VM_IP, "192.0.2.1"))
    assert {(SIB_IP, "spoof"), ("10.137.7.99", "spoof")} <= got

    up.sh(f"ip addr add {VM_IP}/32 dev lo")
    got = exchange(sib, [(up, VM_IP, SIB_IP, "forged")], end=(up, "192.0.2.1", SIB_IP))
    assert (VM_IP, "forged") in got
    got = exchange(proxy, [(up, VM_IP, GW, "forged")], end=(up, "192.0.2.1", GW))
    assert (VM_IP, "forged") in got
