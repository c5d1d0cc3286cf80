"""An offline learns what to undo from the kernel (app/offline.py).  An offline
killed part way leaves a state its rerun must still undo completely: the steps
run routes, neighbours, gateways, link, sysctls, then the set elements, so a
kill between them leaves a vif whose pairs no route (or no route and no
neighbour) tells of.  The half-done states are made here by hand, the way the
killed run would have left them (test_faults kills at random; these are its
windows, every time)."""

import pytest

from netns import BIN, run_libxl, state_of

VIF, MAC, GATEWAY = "vif37.0", "00:16:3e:5e:6c:19", "10.137.7.1"
ADDRS = ("10.137.7.27", "10.137.7.28")


@pytest.fixture
def vif(netns, xen, backend):
    proxy, vm = netns.make("proxy"), netns.make("app")
    netns.vif(proxy, vm, VIF, vm_mac=MAC, vm_addrs=ADDRS, gateway=GATEWAY)
    path = xen.backend(37, ip=" ".join(ADDRS), mac=MAC)
    xen.qdb_write("/qubes-netvm-gateway", GATEWAY)
    return proxy, path


def event(proxy, xen, path, backend, action):
    result = run_libxl(proxy, xen, [str(BIN / "vif-route-qubes"), action, "type_if=vif"], VIF, path,
                       QUBES_NET_BACKEND=backend)
    assert result.returncode == 0, result.stderr
    return result


def elements(proxy) -> str:
    """The set elements that name the VM's addresses, both backends."""
    text = proxy.sh("ipset save", check=False).stdout + proxy.sh("nft list ruleset", check=False).stdout
    return "\n".join(line for line in text.splitlines() if any(a in line for a in ADDRS))


@pytest.mark.parametrize("killed_after", ["all routes", "one route", "routes and neighbours", "link down"])
def test_the_rerun_of_a_killed_offline_undoes_everything(vif, xen, backend, killed_after):
    proxy, path = vif
    # What a whole offline leaves (iptables keeps its tables, emptied, once made).
    event(proxy, xen, path, backend, "online")
    event(proxy, xen, path, backend, "offline")
    before = state_of(proxy)
    event(proxy, xen, path, backend, "online")
    assert elements(proxy)  # the VM's pairs and downstream addresses are there
    steps = {"one route": [f"ip route del {ADDRS[0]} dev {VIF}"],
             "all routes": [f"ip route del {a} dev {VIF}" for a in ADDRS],
             "routes and neighbours": [f"ip route del {a} dev {VIF}" for a in ADDRS]
             + [f"ip neigh flush dev {VIF} nud permanent"],
             "link down": [f"ip route del {a} dev {VIF}" for a in ADDRS]
             + [f"ip neigh flush dev {VIF} nud permanent", f"ip addr flush dev {VIF}", f"ip link set {VIF} down"]}
    for command in steps[killed_after]:
        proxy.sh(command)
    event(proxy, xen, path, backend, "offline")
    assert elements(proxy) == "", f"killed after {killed_after}: the rerun left these"
    assert state_of(proxy) == before
