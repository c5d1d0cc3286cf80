"""An offline learns what to undo from the kernel (app/offline.py).  An offline
killed part way leaves a state its rerun must still undo completely: the steps
run routes, neighbours, gateways, link, sysctls, then the set elements, so a
kill between them leaves a vif whose pairs no route (or no route and no
neighbour) tells of.  The half-done states are made here by hand, the way the
killed run would have left them (test_faults kills at random; these are its
windows, every time), for a VM with two IPv4 addresses, the same without a MAC
in xenstore (online makes no neighbours), and a dual-stack one."""

import pytest

from netns import BIN, run_libxl, state_of

VIF, MAC, GATEWAY, GATEWAY6 = "vif37.0", "00:16:3e:5e:6c:19", "10.137.7.1", "fd09:24ef:4179::a89:1"
ADDRS4 = ("10.137.7.27", "10.137.7.28")
# The VM's addresses and whether xenstore gives its MAC (no MAC: online makes no
# neighbours, so none can name the addresses a killed offline left).
SHAPES = {"ipv4": (ADDRS4, True), "no mac": (ADDRS4, False),
          "dual-stack": ((*ADDRS4, "fd09:24ef:4179::a89:1b"), True)}


@pytest.fixture
def vif(request, netns, xen, backend):
    addrs, has_mac = SHAPES[request.param]
    proxy, vm = netns.make("proxy"), netns.make("app")
    netns.vif(proxy, vm, VIF, vm_mac=MAC, vm_addrs=addrs, gateway=GATEWAY)
    path = xen.backend(37, ip=" ".join(addrs), mac=MAC if has_mac else None)
    xen.qdb_write("/qubes-netvm-gateway", GATEWAY)
    if any(":" in a for a in addrs):
        xen.qdb_write("/qubes-netvm-gateway6", GATEWAY6)
    return proxy, path, addrs


def event(proxy, xen, path, backend, action):
    result = run_libxl(proxy, xen, [str(BIN / "vif-route-qubes"), action, "type_if=vif"], VIF, path,
                       QUBES_NET_BACKEND=backend)
    assert result.returncode == 0, result.stderr
    return result


def elements(proxy, addrs) -> str:
    """The set elements that name the VM's addresses, both backends."""
    text = proxy.sh("ipset save", check=False).stdout + proxy.sh("nft list ruleset", check=False).stdout
    return "\n".join(line for line in text.splitlines() if any(a in line for a in addrs))


def killing(addrs: tuple, killed_after: str) -> list[str]:
    """What the killed offline had done: its steps, up to where it was killed."""
    routes = [f"ip route del {a} dev {VIF}" for a in addrs]
    neighbours = [f"ip neigh flush dev {VIF} nud permanent"]
    return {"one route": routes[:1],
            "the IPv4 routes": [r for r, a in zip(routes, addrs) if ":" not in a],
            "all routes": routes,
            "routes and neighbours": routes + neighbours,
            "link down": routes + neighbours + [f"ip addr flush dev {VIF}", f"ip link set {VIF} down"]}[killed_after]


CASES = [("ipv4", k) for k in ("all routes", "one route", "routes and neighbours", "link down")] + [
    ("no mac", "one route"), ("no mac", "all routes"),
    ("dual-stack", "the IPv4 routes"), ("dual-stack", "one route"), ("dual-stack", "routes and neighbours")]


@pytest.mark.parametrize("vif, killed_after", CASES, indirect=["vif"])
def test_the_rerun_of_a_killed_offline_undoes_everything(vif, xen, backend, killed_after):
    proxy, path, addrs = vif
    # What a whole offline leaves (iptables keeps its tables, emptied, once made).
    event(proxy, xen, path, backend, "online")
    event(proxy, xen, path, backend, "offline")
    before = state_of(proxy)
    event(proxy, xen, path, backend, "online")
    assert all(a in elements(proxy, addrs) for a in addrs)  # the VM's pairs and downstream addresses are there
    for command in killing(addrs, killed_after):
        proxy.sh(command)
    event(proxy, xen, path, backend, "offline")
    assert elements(proxy, addrs) == "", f"killed after {killed_after}: the rerun left these"
    assert state_of(proxy) == before
