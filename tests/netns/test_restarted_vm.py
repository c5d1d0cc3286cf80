"""A VM restarted with the same address under a new domid (issue 18 part 2,
CONTRACT section 1 "offline"): the old vif's offline, however late, never
takes away the protection the new vif gives the address.

Topology:  old (10.137.7.27) --vif12.0--+   (the VM before its restart)
           new (10.137.7.27) --vif13.0--+   (the same VM, new domid)
           sib (10.137.7.28) --vif38.0--+-- proxy --eth0 192.0.2.2 -- 192.0.2.1 eth0-- upstream
Upstream forges the VM's address towards the sibling: it must be dropped for
as long as a vif holds the address, and arrive once none does (the control:
then nothing of ours names the address, so the drop was the rules' doing).
The new VM's connections survive the old vif's offline too (a UDP flow
through the masquerade of `init`), on both backends.
"""

import subprocess
from ipaddress import ip_address

import pytest

from firewall import antispoof_sources, antispoof_text
from netns import run_cmd
from test_antispoof import PY, exchange, no_rp_filter
from vif_route_qubes.plan import nft

GW = "10.137.7.1"
VM_IP, SIB_IP = "10.137.7.27", "10.137.7.28"
VM_MAC, SIB_MAC = "00:16:3e:5e:6c:19", "00:16:3e:5e:6c:1a"


class Restart:
    def __init__(self, netns, xen, vifcmd, backend):
        self.netns, self.xen, self.vifcmd, self.backend = netns, xen, vifcmd, backend
        self.proxy, self.old, self.new, self.sib, self.up = (netns.make(role)
                                                              for role in ("proxy", "old", "new", "sib", "upst"))
        netns.vif(self.proxy, self.old, "vif12.0", vm_mac=VM_MAC, vm_addrs=(VM_IP,), gateway=GW)
        netns.vif(self.proxy, self.new, "vif13.0", vm_mac=VM_MAC, vm_addrs=(VM_IP,), gateway=GW)
        netns.vif(self.proxy, self.sib, "vif38.0", vm_mac=SIB_MAC, vm_addrs=(SIB_IP,), gateway=GW)
        netns.link(self.proxy, "eth0", self.up, "eth0")
        self.proxy.sh("ip addr add 192.0.2.2/24 dev eth0 && sysctl -qw net.ipv4.ip_forward=1")
        self.up.sh("ip addr add 192.0.2.1/24 dev eth0 && ip route add 10.137.7.0/24 via 192.0.2.2")
        for ns in (self.proxy, self.old, self.new, self.sib, self.up):
            no_rp_filter(ns)
        xen.qdb_write("/qubes-netvm-gateway", GW)
        for domid, ip, mac in ((12, VM_IP, VM_MAC), (13, VM_IP, VM_MAC), (38, SIB_IP, SIB_MAC)):
            xen.backend(domid, ip=ip, mac=mac)

    def hotplug(self, command, domid):
        env = self.xen.env(vif=f"vif{domid}.0", XENBUS_PATH=f"/local/domain/0/backend/vif/{domid}/0",
                           QUBES_NET_BACKEND=self.backend)
        result = run_cmd(self.proxy, [self.vifcmd, command, "type_if=vif"], env)
        assert result.returncode == 0, f"{command} vif{domid}.0: {result.stderr}"

    def old_vif_vanishes(self):
        """Xen removes the old backend device before its offline runs."""
        self.proxy.sh("ip link del vif12.0")

    def forged_arrives(self) -> bool:
        # Upstream holds the VM's address only while it forges (else it would keep the VM's replies).
        self.up.sh(f"ip addr add {VM_IP}/32 dev lo")
        try:
            got = exchange(self.sib, [(self.up, VM_IP, SIB_IP, "forged")], end=(self.up, "192.0.2.1", SIB_IP))
        finally:
            self.up.sh(f"ip addr del {VM_IP}/32 dev lo")
        return (VM_IP, "forged") in got

    def assert_new_vm_works(self):
        ping = self.new.sh("ping -c 1 -W 2 192.0.2.1", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        got = exchange(self.up, [(self.new, VM_IP, "192.0.2.1", "hello")], end=(self.sib, SIB_IP, "192.0.2.1"))
        assert (VM_IP, "hello") in got
        assert antispoof_sources(self.proxy, self.backend, "vif13.0") == {VM_IP}
        assert "vif12.0" not in antispoof_text(self.proxy, self.backend)


@pytest.fixture
def restart(netns, xen, vifcmd, backend):
    r = Restart(netns, xen, vifcmd, backend)
    r.hotplug("online", 38)
    r.hotplug("online", 12)
    assert not r.forged_arrives()
    return r


def test_late_offline_of_the_old_vif_keeps_the_address_protected(restart):
    restart.hotplug("online", 13)
    restart.old_vif_vanishes()
    restart.hotplug("offline", 12)
    assert not restart.forged_arrives()
    restart.assert_new_vm_works()

    # Control: once no vif holds the address, nothing of ours names it and the forgery arrives.
    restart.hotplug("offline", 13)
    assert VM_IP not in antispoof_text(restart.proxy, restart.backend)
    assert restart.forged_arrives()


def test_offline_of_the_old_vif_before_the_new_online(restart):
    restart.old_vif_vanishes()
    restart.hotplug("offline", 12)
    assert VM_IP not in antispoof_text(restart.proxy, restart.backend)
    restart.hotplug("online", 13)
    assert not restart.forged_arrives()
    restart.assert_new_vm_works()


# One UDP flow, VM -> upstream and back through the proxy's masquerade; each
# line on stdin makes the server answer once and the VM print what it got.
FLOW_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5353))
print("ready", flush=True)
_, peer = s.recvfrom(100)
print("hello", flush=True)
for line in sys.stdin:
    s.sendto(line.strip().encode(), peer)
"""
FLOW_VM = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.settimeout(3)
s.sendto(b"hello", (sys.argv[2], 5353))
for line in sys.stdin:
    try:
        print(s.recv(100).decode(), flush=True)
    except socket.timeout:
        print("timeout", flush=True)
"""


@pytest.fixture
def flow(restart):
    """answer(word) -> what the new VM got back, on a flow it opened through
    the masquerade of `init` (upstream sees only the proxy's address: the
    answers find the VM through the connection tracking alone)."""
    result = run_cmd(restart.proxy, [restart.vifcmd, "init"], restart.xen.env(QUBES_NET_BACKEND=restart.backend))
    assert result.returncode == 0, result.stderr
    restart.hotplug("online", 13)
    server = restart.up.popen([PY, "-c", FLOW_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert server.stdout.readline().strip() == "ready"
        client = restart.new.popen([PY, "-c", FLOW_VM, VM_IP, "192.0.2.1"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "hello"

        def answer(word):
            server.stdin.write(word + "\n")
            server.stdin.flush()
            client.stdin.write("\n")
            client.stdin.flush()
            return client.stdout.readline().strip()

        yield answer
    finally:
        for proc in (client, server):
            if proc:
                proc.kill()
                proc.wait()


def test_late_offline_of_the_old_vif_keeps_the_new_vms_connections(restart, flow):
    assert flow("first") == "first"
    restart.old_vif_vanishes()
    restart.hotplug("offline", 12)
    assert flow("second") == "second"  # the masquerade's entry of the flow is still there


def test_control_a_purge_ends_the_flow(restart, flow):
    """What the old vif's offline would do to it: the test above can fail."""
    assert flow("first") == "first"
    restart.proxy.sh(f"conntrack -D -s {VM_IP} >/dev/null 2>&1 || true")
    assert flow("second") == "timeout"


# -- the planner's rule, without namespaces --------------------------------------

def _state(*pairs):
    table = nft.NftTable(frozenset({"antispoof", "prerouting", "input"}), frozenset(pairs),
                         frozenset(addr for _, addr in pairs), True)
    return nft.NftState({4: table, 6: nft.NftTable(table.chains, frozenset(), frozenset(), True)})


def test_nft_offline_keeps_a_downstream_address_another_vif_holds():
    state = _state(("vif12.0", VM_IP), ("vif13.0", VM_IP))
    script = nft.plan_vif(state, "vif12.0", (ip_address(VM_IP),), False).text
    assert script == f'delete element ip qubes allowed {{ "vif12.0" . {VM_IP} }}\n'


def test_nft_offline_of_the_last_holder_removes_the_downstream_address():
    script = nft.plan_vif(_state(("vif13.0", VM_IP)), "vif13.0", (ip_address(VM_IP),), False).text
    assert script == (f"delete element ip qubes downstream {{ {VM_IP} }}\n"
                      f'delete element ip qubes allowed {{ "vif13.0" . {VM_IP} }}\n')


def test_nft_online_moving_off_an_address_another_vif_holds_keeps_it():
    state = _state(("vif12.0", VM_IP), ("vif13.0", VM_IP))
    script = nft.plan_vif(state, "vif12.0", (ip_address("10.137.7.29"),), True).text
    assert f"delete element ip qubes downstream {{ {VM_IP} }}" not in script
    assert f'delete element ip qubes allowed {{ "vif12.0" . {VM_IP} }}' in script
    assert "add element ip qubes downstream { 10.137.7.29 }" in script



def test_offline_spares_the_connections_of_an_address_another_vif_holds():
    from vif_route_qubes.plan import vif as plan_vif
    from vif_route_qubes.model import VifFacts, VifInputs

    inp = VifInputs("offline", "vif12.0", 12, (ip_address(VM_IP), ip_address("10.137.7.29")), VM_MAC, "vif",
                    ip_address(GW), None, (), False, (), 10.0, None, None)
    state = _state(("vif12.0", VM_IP), ("vif12.0", "10.137.7.29"), ("vif13.0", VM_IP))
    facts = VifFacts(exists=False, rename_pending=False, ipv6_enabled=True, backend="nft", nft=state)
    script = plan_vif.plan_offline(inp, facts).render()
    assert "conntrack -D -f ipv4 -s 10.137.7.29 " in script
    assert VM_IP not in script.split("EOF\n")[-1]  # no conntrack line names the address vif13.0 holds
    assert f"delete element ip qubes downstream {{ {VM_IP} }}" not in script


def test_nft_event_on_existing_tables_is_one_element_batch_rendered_as_nft_f():
    """After `init` a vif event only changes elements: one netlink batch (NftElements),
    which dry-run and error messages show as the `nft -f` input it stands for."""
    step = nft.plan_vif(_state(), "vif12.0", (ip_address(VM_IP),), True)
    assert type(step).__name__ == "NftElements"
    assert [(c.add, c.set, c.version, c.address, c.vif) for c in step.changes] == [
        (True, "allowed", 4, VM_IP, "vif12.0"), (True, "downstream", 4, VM_IP, None)]
    assert step.render() == ("nft -f - <<'EOF'\n"
                             f'add element ip qubes allowed {{ "vif12.0" . {VM_IP} }}\n'
                             f"add element ip qubes downstream {{ {VM_IP} }}\nEOF")
    assert nft.plan_vif(_state(("vif12.0", VM_IP)), "vif12.0", (ip_address(VM_IP),), True) is None


def test_nft_event_without_tables_is_an_nft_f_transaction():
    """Objects to create (no `init`): the whole transaction goes to `nft -f`."""
    step = nft.plan_vif(nft.NftState({}), "vif12.0", (ip_address(VM_IP),), True)
    assert type(step).__name__ == "Nft"
    lines = step.text.splitlines()
    assert lines[0] == "add table ip qubes" and f"add element ip qubes downstream {{ {VM_IP} }}" in lines

