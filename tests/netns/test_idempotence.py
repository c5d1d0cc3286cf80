"""Idempotence of online/offline, seen through `state_of` (CONTRACT section 1,
"Idempotence and concurrency" and "offline")."""


import pytest

from firewall import antispoof_sources, antispoof_text, has_shared_objects
from netns import run_cmd, settled, state_of

VM_MAC = "00:16:3e:5e:6c:19"
GW = "10.137.7.1"
GW6 = "fd09:24ef:4179::a89:1"



def make_provider(netns):
    """A network-providing VM's namespace whose raw tables exist already, as on
    a real ProxyVM (iptables-nft makes a table on first use and never drops
    it, so a table born during the test would differ from "before")."""
    proxy = netns.make("proxy")
    proxy.sh("for t in iptables ip6tables; do $t -t raw -N PRIME && $t -t raw -X PRIME; done")
    return proxy


def add_vm(netns, xen, proxy, domid, addrs=("10.137.7.27",), gateway6=None):
    """One VM behind `proxy` on vif<domid>.0; returns (vif, XENBUS_PATH)."""
    vm = netns.make("app")
    vif = f"vif{domid}.0"
    netns.vif(proxy, vm, vif, vm_mac=VM_MAC, vm_addrs=addrs, gateway=GW)
    path = xen.backend(domid, ip=" ".join(addrs), mac=VM_MAC)
    xen.qdb_write("/qubes-netvm-gateway", GW)
    if gateway6:
        xen.qdb_write("/qubes-netvm-gateway6", gateway6)
    return vif, path


def hotplug(proxy, xen, vifcmd, command, vif, path, backend):
    env = xen.env(vif=vif, XENBUS_PATH=path, QUBES_NET_BACKEND=backend)
    return run_cmd(proxy, [vifcmd, command, "type_if=vif"], env)


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


VM_SHAPES = {
    "one-address": dict(addrs=("10.137.7.27",)),
    "two-addresses": dict(addrs=("10.137.7.27", "10.137.7.28")),
    "ipv6-and-gateway6": dict(addrs=("10.137.7.27", "fd09:24ef:4179::a89:71b"), gateway6=GW6),
}


@pytest.mark.parametrize("shape", VM_SHAPES.values(), ids=VM_SHAPES.keys())
def test_online_twice_is_online_once(netns, xen, vifcmd, backend, shape):
    proxy = make_provider(netns)
    vif, path = add_vm(netns, xen, proxy, 37, **shape)
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, backend))
    once = settled(proxy)
    # The run did something (otherwise the comparison below proves nothing).
    assert antispoof_sources(proxy, backend, vif) == set(shape["addrs"])
    assert f"{shape['addrs'][0]} dev vif37.0" in once
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, backend))
    assert settled(proxy) == once


@pytest.mark.parametrize("shape", VM_SHAPES.values(), ids=VM_SHAPES.keys())
def test_online_then_offline_restores_state(netns, xen, vifcmd, backend, shape):
    proxy = make_provider(netns)
    vif, path = add_vm(netns, xen, proxy, 37, **shape)
    before = settled(proxy)
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, backend))
    assert state_of(proxy) != before
    ok(hotplug(proxy, xen, vifcmd, "offline", vif, path, backend))
    assert settled(proxy) == before


def test_offline_keeps_the_other_vifs_rules(netns, xen, vifcmd, backend):
    proxy = make_provider(netns)
    other, other_path = add_vm(netns, xen, proxy, 38, addrs=("10.137.7.38",))
    vif, path = add_vm(netns, xen, proxy, 37, addrs=("10.137.7.27", "10.137.7.28"))
    ok(hotplug(proxy, xen, vifcmd, "online", other, other_path, backend))
    before = settled(proxy)
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, backend))
    ok(hotplug(proxy, xen, vifcmd, "offline", vif, path, backend))
    assert settled(proxy) == before
    assert antispoof_sources(proxy, backend, "vif38.0") == {"10.137.7.38"}
    assert "vif37.0" not in antispoof_text(proxy, backend)
    assert proxy.out("ip route show dev vif38.0").strip() == "10.137.7.38 scope link metric 32714"


def test_offline_twice_exits_0(netns, xen, vifcmd, backend):
    proxy = make_provider(netns)
    vif, path = add_vm(netns, xen, proxy, 37)
    before = settled(proxy)
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, backend))
    ok(hotplug(proxy, xen, vifcmd, "offline", vif, path, backend))
    second = hotplug(proxy, xen, vifcmd, "offline", vif, path, backend)
    assert second.returncode == 0, second.stderr
    assert settled(proxy) == before


def test_offline_of_a_vanished_interface(netns, xen, vifcmd, backend):
    proxy = make_provider(netns)
    vif, path = add_vm(netns, xen, proxy, 37, addrs=("10.137.7.27", "fd09:24ef:4179::a89:71b"),
                       gateway6=GW6)
    before = settled(proxy)
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, backend))
    # Xen removes the backend device before (or while) udev runs offline.
    proxy.sh("ip link del vif37.0")
    assert "vif37.0" in antispoof_text(proxy, backend)
    result = hotplug(proxy, xen, vifcmd, "offline", vif, path, backend)
    assert result.returncode == 0, result.stderr
    assert "vif37.0" not in antispoof_text(proxy, backend)
    assert not has_shared_objects(proxy, backend)  # the last vif took the shared chain (table) with it
    assert "vif37.0" not in settled(proxy)
    # The link itself is gone, so "before" differs only by it: compare the rules.
    assert state_of(proxy).split("$ ip")[0] == before.split("$ ip")[0]


def test_xenstore_vifname_renames_the_interface(netns, xen, vifcmd, backend):
    proxy = make_provider(netns)
    vif, path = add_vm(netns, xen, proxy, 37)
    xen.xs_write(f"{path}/vifname", "vif37.5")
    before = settled(proxy)
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, backend))

    assert proxy.sh("ip link show vif37.0", check=False).returncode != 0
    assert "state UP" in proxy.out("ip link show vif37.5")
    assert proxy.out("ip route show dev vif37.5").strip() == "10.137.7.27 scope link metric 32715"
    assert f"inet {GW}/32 scope global vif37.5" in proxy.out("ip -4 addr show dev vif37.5")
    assert proxy.out("cat /proc/sys/net/ipv4/conf/vif37.5/proxy_arp").strip() == "1"
    assert antispoof_sources(proxy, backend, "vif37.5") == {"10.137.7.27"}
    assert "vif37.0" not in antispoof_text(proxy, backend)
    assert xen.xs_read(f"{path}/hotplug-status") == "connected"

    # Online again finds the renamed interface; offline with Xen's env cleans it.
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, backend))
    ok(hotplug(proxy, xen, vifcmd, "offline", vif, path, backend))
    assert "vif37.5" not in antispoof_text(proxy, backend)
    assert settled(proxy) == before


# The system-wide hardening settings, which offline leaves (other vifs rely on them).
SYSTEM_WIDE = ("net.ipv6.max_dst_opts_length", "net.ipv6.conf.all.accept_dad", "net.ipv4.conf.all.accept_redirects")


def sysctls(proxy) -> dict[str, str]:
    """Every per-interface and IPv6 option setting of the namespace (one line each)."""
    shown = proxy.sh(r"sysctl -a --pattern '^net\.ipv[46]\.(conf\.|max_)'", check=False).stdout
    return dict(line.split(" = ", 1) for line in shown.splitlines() if " = " in line)


def test_hardened_online_twice_and_offline(netns, xen, vifcmd, backend):
    """With hardening on: online twice is online once, sysctls included; online then
    offline leaves the state from before except the system-wide hardening settings."""
    proxy = make_provider(netns)
    vif, path = add_vm(netns, xen, proxy, 37, addrs=("10.137.7.27", "fd09:24ef:4179::a89:71b"), gateway6=GW6)
    xen.qdb_write("/qubes-service/harden-network-interfaces", "1")
    proxy.sh("sysctl -qw net.ipv4.conf.all.accept_redirects=1 net.ipv6.conf.all.accept_dad=1")
    before, before_sysctls = settled(proxy), sysctls(proxy)
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, backend))
    once, once_sysctls = settled(proxy), sysctls(proxy)
    assert once_sysctls["net.ipv6.conf.vif37/0.accept_source_route"] == "-1"  # hardened, so it can tell
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, backend))
    assert (settled(proxy), sysctls(proxy)) == (once, once_sysctls)

    ok(hotplug(proxy, xen, vifcmd, "offline", vif, path, backend))
    assert settled(proxy) == before
    after = sysctls(proxy)
    assert {k: v for k, v in after.items() if k not in SYSTEM_WIDE} == \
        {k: v for k, v in before_sysctls.items() if k not in SYSTEM_WIDE}
    assert {k: after[k] for k in SYSTEM_WIDE} == {k: "0" for k in SYSTEM_WIDE} != \
        {k: before_sysctls[k] for k in SYSTEM_WIDE}
