"""State after `online`, and a ping from the VM to its gateway (issue 2, test 1)."""

from firewall import antispoof_sources
from netns import VIF_MAC, run_cmd

VM_MAC = "00:16:3e:5e:6c:19"


def setup_vm(netns, xen, addrs=("10.137.7.27",), domid=37):
    proxy = netns.make("proxy")
    vm = netns.make("app")
    vif = f"vif{domid}.0"
    netns.vif(proxy, vm, vif, vm_mac=VM_MAC, vm_addrs=addrs, gateway="10.137.7.1")
    path = xen.backend(domid, ip=" ".join(addrs), mac=VM_MAC)
    xen.qdb_write("/qubes-netvm-gateway", "10.137.7.1")
    return proxy, vm, vif, path


def hotplug(proxy, xen, vifcmd, command, vif, path, *extra, backend):
    env = xen.env(vif=vif, XENBUS_PATH=path, QUBES_NET_BACKEND=backend)
    return run_cmd(proxy, [vifcmd, command, "type_if=vif", *extra], env)


def test_online_state_and_ping(netns, xen, vifcmd, backend):
    proxy, vm, vif, path = setup_vm(netns, xen)
    result = hotplug(proxy, xen, vifcmd, "online", vif, path, backend=backend)
    assert result.returncode == 0, result.stderr

    assert antispoof_sources(proxy, backend, vif) == {"10.137.7.27"}
    assert proxy.out("ip route show dev vif37.0").strip() == "10.137.7.27 scope link metric 32715"
    assert "inet 10.137.7.1/32 scope global vif37.0" in proxy.out("ip -4 addr show dev vif37.0")
    assert proxy.out("cat /proc/sys/net/ipv4/conf/vif37.0/proxy_arp").strip() == "1"
    assert proxy.out("ip neigh show dev vif37.0").strip() == f"10.137.7.27 lladdr {VM_MAC} PERMANENT"
    assert "state UP" in proxy.out("ip link show vif37.0")
    assert xen.xs_read(f"{path}/hotplug-status") == "connected"
    vm.sh("ping -c 1 -W 2 10.137.7.1")
    assert f"lladdr {VIF_MAC}" in vm.out("ip neigh show 10.137.7.1")
