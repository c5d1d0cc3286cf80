"""IPv6 on a vif: state after `online`, reachability, anti-spoofing (CONTRACT section 1).

Topology:  app (10.137.7.27, V6) --vif37.0-- proxy --eth0 2001:db8::2 -- 2001:db8::1 eth0-- upstream
Datagrams are checked with the receiver of test_antispoof; the control test
builds the same wiring by hand without rules and shows every spoof arrives.
"""

import time

import pytest

from firewall import antispoof_sources
from netns import VIF_MAC, run_cmd
from test_antispoof import VM_MAC, exchange, no_rp_filter

GW, GW6 = "10.137.7.1", "fd09:24ef:4179::a89:1"
V6 = "fd09:24ef:4179::a89:71b"
SPOOF6 = "fd09:24ef:4179::a89:99"
UP6 = "2001:db8::1"


def wait_dad(ns, dev, limit=5.0):
    """Wait until the gateway address has passed duplicate address detection: until
    then the proxy answers no neighbour solicitation for it."""
    deadline = time.monotonic() + limit
    while ns.out(f"ip -6 addr show dev {dev} tentative to {GW6}").strip():
        assert time.monotonic() < deadline, ns.out(f"ip -6 addr show dev {dev}")
        time.sleep(0.05)


def build(netns, xen, vm_ips=("10.137.7.27", V6), disable_ipv6=False):
    """The topology above, before `online`; returns (proxy, app, upstream, XENBUS_PATH)."""
    proxy, app, up = (netns.make(role) for role in ("proxy", "app", "upstream"))
    netns.vif(proxy, app, "vif37.0", vm_mac=VM_MAC, vm_addrs=vm_ips, gateway=GW)
    # The VM's IPv6 default route, as Qubes sets it from its gateway6.
    app.sh(f"ip -6 route add {GW6} dev eth0 && ip -6 route add default via {GW6} dev eth0")
    netns.link(proxy, "eth0", up, "eth0")
    proxy.sh("ip addr add 192.0.2.2/24 dev eth0 && ip -6 addr add 2001:db8::2/64 dev eth0 nodad"
             " && sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
    up.sh("ip addr add 192.0.2.1/24 dev eth0 && ip route add 10.137.7.0/24 via 192.0.2.2"
          f" && ip -6 addr add {UP6}/64 dev eth0 nodad"
          " && ip -6 route add fd09:24ef:4179::/48 via 2001:db8::2")
    for ns in (proxy, app, up):
        no_rp_filter(ns)
    if disable_ipv6:
        proxy.sh("sysctl -qw net.ipv6.conf.vif37/0.disable_ipv6=1")
    # Neighbours of the proxy's uplink resolved now, so no datagram waits in a queue.
    proxy.sh(f"ping -c 1 -W 2 192.0.2.1 >/dev/null && ping -6 -c 1 -W 2 {UP6} >/dev/null")
    xen.qdb_write("/qubes-netvm-gateway", GW)
    xen.qdb_write("/qubes-netvm-gateway6", GW6)
    return proxy, app, up, xen.backend(37, ip=" ".join(vm_ips), mac=VM_MAC)


def online(proxy, xen, vifcmd, path, backend):
    env = xen.env(vif="vif37.0", XENBUS_PATH=path, QUBES_NET_BACKEND=backend)
    return run_cmd(proxy, [vifcmd, "online", "type_if=vif"], env)


def test_online_ipv6_state_and_ping6(netns, xen, vifcmd, backend):
    proxy, app, _, path = build(netns, xen)
    result = online(proxy, xen, vifcmd, path, backend)
    assert result.returncode == 0, result.stderr

    assert proxy.out(f"ip -6 route show {V6}/128").split() == [V6, "dev", "vif37.0", "metric", "32715",
                                                              "pref", "medium"]
    assert f"inet6 {GW6}/128 scope global" in proxy.out("ip -6 addr show dev vif37.0")
    assert proxy.out("cat /proc/sys/net/ipv6/conf/vif37.0/proxy_ndp").strip() == "1"
    assert antispoof_sources(proxy, backend, "vif37.0") == {"10.137.7.27", V6}
    wait_dad(proxy, "vif37.0")
    app.sh(f"ping -6 -c 1 -W 3 {GW6}")
    assert f"lladdr {VIF_MAC}" in app.out(f"ip -6 neigh show {GW6}")
    app.sh(f"ping -c 1 -W 2 {GW}")  # dual stack: IPv4 still works


def test_spoofed_ipv6_source_is_dropped(netns, xen, vifcmd, backend):
    proxy, app, up, path = build(netns, xen)
    assert online(proxy, xen, vifcmd, path, backend).returncode == 0
    wait_dad(proxy, "vif37.0")
    app.sh(f"ip -6 addr add {SPOOF6}/128 dev eth0 nodad")
    got = exchange(up, [(app, SPOOF6, UP6, "spoof")], end=(app, V6, UP6))
    assert (SPOOF6, "spoof") not in got


def test_vm_without_ipv6_has_all_ipv6_dropped(netns, xen, vifcmd, backend):
    proxy, app, up, path = build(netns, xen, vm_ips=("10.137.7.27",))
    assert online(proxy, xen, vifcmd, path, backend).returncode == 0
    wait_dad(proxy, "vif37.0")
    own6 = "fd09:24ef:4179::5"
    # The VM gives itself an address; a fixed neighbour entry sends its packets
    # straight onto the vif, and a route back lets only the rules stop a reply.
    app.sh(f"ip -6 addr add {own6}/128 dev eth0 nodad"
           f" && ip -6 neigh replace {GW6} lladdr {VIF_MAC} dev eth0 nud permanent")
    proxy.sh(f"ip -6 route add {own6} dev vif37.0")
    assert app.sh(f"ping -6 -c 1 -W 1 {GW6}", check=False).returncode != 0
    got = exchange(up, [(app, own6, UP6, "v6")], end=(app, "10.137.7.27", "192.0.2.1"))
    assert (own6, "v6") not in got


@pytest.mark.no_event  # a control: runs none of our commands (server mode counts them)
def test_control_without_rules_ipv6_spoofs_arrive(netns, xen, vifcmd):
    """Same wiring, no `online`, state set by hand: both cases above would get through."""
    proxy, app, up, _ = build(netns, xen)
    proxy.sh(f"ip link set vif37.0 up && ip addr add {GW}/32 dev vif37.0"
             f" && ip -6 addr add {GW6}/128 dev vif37.0 nodad && ip route add 10.137.7.27 dev vif37.0"
             f" && ip -6 route add {V6} dev vif37.0 && ip -6 route add fd09:24ef:4179::5 dev vif37.0"
             " && sysctl -qw net.ipv6.conf.vif37/0.proxy_ndp=1")
    assert "QBS" not in proxy.out("ip6tables-save -t raw") and not proxy.out("nft list tables").strip()
    wait_dad(proxy, "vif37.0")
    app.sh(f"ip -6 addr add {SPOOF6}/128 dev eth0 nodad && ip -6 addr add fd09:24ef:4179::5/128 dev eth0 nodad"
           f" && ip -6 neigh replace {GW6} lladdr {VIF_MAC} dev eth0 nud permanent")
    app.sh(f"ping -6 -c 1 -W 2 -I fd09:24ef:4179::5 {GW6}")
    got = exchange(up, [(app, SPOOF6, UP6, "spoof"), (app, "fd09:24ef:4179::5", UP6, "v6")], end=(app, V6, UP6))
    assert {(SPOOF6, "spoof"), ("fd09:24ef:4179::5", "v6")} <= got


def test_ipv6_disabled_on_vif_ipv4_still_works(netns, xen, vifcmd, backend):
    proxy, app, _, path = build(netns, xen, disable_ipv6=True)
    result = online(proxy, xen, vifcmd, path, backend)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if "IPv6" in line and "vif37.0" in line]
    assert errors, f"no error about IPv6 on stderr: {result.stderr!r}"
    assert xen.xs_read(f"{path}/hotplug-status") == "connected"
    assert proxy.out("ip route show dev vif37.0").strip() == "10.137.7.27 scope link metric 32715"
    app.sh(f"ping -c 1 -W 2 {GW}")
