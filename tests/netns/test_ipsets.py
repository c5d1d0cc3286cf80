"""The anti-spoofing sets (issue 15), with real datagrams where it matters.

  - the old per-vif layout (QBS-AS-vifD.N chains) converges by `init` and by
    `online`, and no spoofed datagram gets through while it does;
  - with 400 vifs' elements in the sets, one more online+offline touches only
    its own elements;
  - `check` on both backends names an element deleted by hand, one added for
    another address and a static rule removed, and they are repaired;
  - a restarted VM (same address, new vif) keeps its upstream protection when
    the old vif's offline comes late, in either order, on both backends.
The topology and datagram helpers are test_antispoof's.
"""

import json
import subprocess
import sys
import time

import pytest

from firewall import ipset_members, ipt_problems, nft_set
from netns import run_cmd
from test_antispoof import PORT as ANTISPOOF_PORT
from test_antispoof import GW, SIB_IP, VM_IP, VM_MAC, build, exchange, hotplug_online, send

PY = sys.executable
PORT = 5354

# The rules the old layout (until the ipsets) left for vif37.0 (10.137.7.27) and vif38.0 (10.137.7.28).
OLD4 = """*raw
:QBS-ANTISPOOF - [0:0]
:QBS-AS-vif37.0 - [0:0]
:QBS-AS-vif38.0 - [0:0]
-I PREROUTING 1 -j QBS-ANTISPOOF
-A QBS-AS-vif37.0 -s 10.137.7.27/32 -j RETURN
-A QBS-AS-vif37.0 -j DROP
-A QBS-AS-vif38.0 -s 10.137.7.28/32 -j RETURN
-A QBS-AS-vif38.0 -j DROP
-A QBS-ANTISPOOF -i vif37.0 -m comment --comment "vif37.0" -j QBS-AS-vif37.0
-A QBS-ANTISPOOF -s 10.137.7.27/32 ! -i vif+ -m comment --comment "vif37.0" -j DROP
-A QBS-ANTISPOOF -i vif38.0 -m comment --comment "vif38.0" -j QBS-AS-vif38.0
-A QBS-ANTISPOOF -s 10.137.7.28/32 ! -i vif+ -m comment --comment "vif38.0" -j DROP
COMMIT
"""
OLD6 = """*raw
:QBS-ANTISPOOF - [0:0]
:QBS-AS-vif37.0 - [0:0]
:QBS-AS-vif38.0 - [0:0]
-I PREROUTING 1 -j QBS-ANTISPOOF
-A QBS-AS-vif37.0 -j DROP
-A QBS-AS-vif38.0 -j DROP
-A QBS-ANTISPOOF -i vif37.0 -m comment --comment "vif37.0" -j QBS-AS-vif37.0
-A QBS-ANTISPOOF -i vif38.0 -m comment --comment "vif38.0" -j QBS-AS-vif38.0
COMMIT
"""

# Sends, every 2 ms until killed, a spoofed datagram and then a legitimate one.
FLOOD = r"""
import socket, sys, time
spoof, own, dst, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
socks = {}
for src in (spoof, own):
    socks[src] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    socks[src].bind((src, 0))
print("ready", flush=True)
n = 0
while True:
    n += 1
    for src in (spoof, own):
        try:
            socks[src].sendto(f"{src} {n}".encode(), (dst, port))
        except OSError:
            pass
    time.sleep(0.002)
"""
# Prints the source each arriving datagram claims (its payload: after `init`
# the proxy masquerades, so the packet's own source is the proxy's).
COUNT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, src = s.recvfrom(200)
    print(data.decode().split()[0], flush=True)
"""


def _start(ns, script, *args):
    proc = ns.popen([PY, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _stop(proc) -> str:
    proc.kill()
    out, _ = proc.communicate(timeout=10)
    return out


def old_layout(netns, xen, vifcmd):
    """The topology of test_antispoof with the old per-vif rules, made as the old code made them."""
    proxy, app, sib, up = build(netns, xen, vifcmd)
    proxy.sh(f"iptables-restore --noflush <<'END'\n{OLD4}END\nip6tables-restore --noflush <<'END'\n{OLD6}END")
    app.sh(f"ip addr add {SIB_IP}/32 dev eth0")  # the VM claims its sibling's address
    return proxy, app, sib, up


def assert_converged(proxy):
    raw = proxy.out("iptables-save -t raw") + proxy.out("ip6tables-save -t raw")
    assert "QBS-AS-" not in raw and "--comment \"vif3" not in raw, raw
    assert ipt_problems(proxy, "vif37.0", {4: {VM_IP}, 6: set()}) == []
    assert ipt_problems(proxy, "vif38.0", {4: {SIB_IP}, 6: set()}) == []


@pytest.mark.parametrize("how", ["init", "online"])
def test_old_layout_converges_and_nothing_spoofed_passes(netns, xen, vifcmd, how):
    proxy, app, _, up = old_layout(netns, xen, vifcmd)
    receiver = _start(up, COUNT, str(PORT))
    flood = _start(app, FLOOD, SIB_IP, VM_IP, "192.0.2.1", str(PORT))
    try:
        time.sleep(0.3)
        env = xen.env(QUBES_NET_BACKEND="iptables")
        for _ in range(3):  # the migration, then the steady state, while the flood goes on
            if how == "init":
                result = run_cmd(proxy, [vifcmd, "init"], env)
            else:
                result = run_cmd(proxy, [vifcmd, "online", "type_if=vif"],
                                 xen.env(vif="vif37.0", XENBUS_PATH=xen.backend(37, ip=VM_IP, mac=VM_MAC),
                                         QUBES_NET_BACKEND="iptables"))
            assert result.returncode == 0, result.stderr
        time.sleep(0.3)
    finally:
        _stop(flood)
        got = _stop(receiver).split()
    assert got.count(VM_IP) > 50, "the legitimate datagrams did not arrive: the wiring is broken"
    assert SIB_IP not in got, f"{got.count(SIB_IP)} spoofed datagrams got through during the migration"
    assert_converged(proxy)


@pytest.mark.no_event  # a control: runs none of our commands (server mode counts them)
def test_old_layout_control_spoofs_pass_without_rules(netns, xen, vifcmd):
    """The same flood with no rules at all: spoofed datagrams arrive, so the test above can fail."""
    proxy, app, _, up = build(netns, xen, vifcmd)
    app.sh(f"ip addr add {SIB_IP}/32 dev eth0")
    receiver = _start(up, COUNT, str(PORT))
    flood = _start(app, FLOOD, SIB_IP, VM_IP, "192.0.2.1", str(PORT))
    time.sleep(0.5)
    _stop(flood)
    got = _stop(receiver).split()
    assert got.count(SIB_IP) > 50 and got.count(VM_IP) > 50


def test_offline_under_the_old_layout_removes_its_rules(netns, xen, vifcmd):
    """A vif whose offline comes before any online of the new code: the layout
    converges and only that vif's protection goes."""
    proxy, _, _, _ = old_layout(netns, xen, vifcmd)
    result = run_cmd(proxy, [vifcmd, "offline", "vif38.0", SIB_IP], xen.env(QUBES_NET_BACKEND="iptables"))
    assert result.returncode == 0, result.stderr
    assert "QBS-AS-" not in proxy.out("iptables-save -t raw")
    assert ipt_problems(proxy, "vif37.0", {4: {VM_IP}, 6: set()}) == []
    assert ipset_members(proxy, "qbs-allowed4") == [f"{VM_IP},vif37.0"]
    assert ipset_members(proxy, "qbs-downstream4") == [VM_IP]


# -- many vifs: one event touches only its own elements -------------------------

def sets_of(ns) -> dict:
    return {name: sorted(ipset_members(ns, name) or []) for name in
            ("qbs-allowed4", "qbs-downstream4", "qbs-allowed6", "qbs-downstream6")}


def test_400_vifs_one_more_touches_only_its_own_elements(netns, xen, vifcmd):
    """400 VMs' elements (loaded with `ipset restore`: the state 400 onlines
    leave, made faster), then one more vif online and offline."""
    proxy = netns.make("proxy")
    xen.qdb_write("/qubes-netvm-gateway", GW)
    vm = netns.make("app")
    netns.vif(proxy, vm, "vif37.0", vm_mac=VM_MAC, vm_addrs=(VM_IP,), gateway=GW)
    env = xen.env(QUBES_NET_BACKEND="iptables")
    assert run_cmd(proxy, [vifcmd, "init"], env).returncode == 0
    lines = []
    for i in range(400):
        addr, addr6 = f"10.137.{100 + i // 200}.{i % 200 + 1}", f"fd09:24ef:4179::b{i:03x}"
        lines += [f"add qbs-allowed4 {addr},vif{1000 + i}.0", f"add qbs-downstream4 {addr}",
                  f"add qbs-allowed6 {addr6},vif{1000 + i}.0", f"add qbs-downstream6 {addr6}"]
    proxy.sh("ipset restore <<'END'\n" + "\n".join(lines) + "\nEND")
    before = sets_of(proxy)
    assert len(before["qbs-allowed4"]) == 400
    path = xen.backend(37, ip=VM_IP, mac=VM_MAC)
    hotplug_online(proxy, xen, vifcmd, "vif37.0", path, "iptables")
    during = sets_of(proxy)
    assert during["qbs-allowed4"] == sorted(before["qbs-allowed4"] + [f"{VM_IP},vif37.0"])
    assert during["qbs-downstream4"] == sorted(before["qbs-downstream4"] + [VM_IP])
    assert during["qbs-allowed6"] == before["qbs-allowed6"] and during["qbs-downstream6"] == before["qbs-downstream6"]
    result = run_cmd(proxy, [vifcmd, "offline", "type_if=vif"], xen.env(vif="vif37.0", XENBUS_PATH=path,
                                                                       QUBES_NET_BACKEND="iptables"))
    assert result.returncode == 0, result.stderr
    assert sets_of(proxy) == before


# -- the base marker: the last offline keeps init's static parts without reading raw --

NO_SAVE = """#!/bin/sh
echo "$0 must not run here" >&2
exit 1
"""


@pytest.mark.parametrize("marker", ["made-by-init", "destroyed"])
def test_the_last_offline_keeps_the_base_init_made(netns, xen, vifcmd, tmp_path, marker):
    """`init` makes the empty set qbs-base beside its jump: the last vif's offline
    then knows from the sets' headers that the static parts stay, and runs no
    iptables-save (here one that fails).  A base without the marker (made before
    it existed) is still recognised, by its jump in the raw table."""
    proxy = netns.make("proxy")
    vm = netns.make("app")
    netns.vif(proxy, vm, "vif37.0", vm_mac=VM_MAC, vm_addrs=(VM_IP,), gateway=GW)
    env = xen.env(QUBES_NET_BACKEND="iptables")
    assert run_cmd(proxy, [vifcmd, "init", "--gateway6", ""], env).returncode == 0
    assert "qbs-base" in proxy.out("ipset list -n").split()
    manual = ["vif37.0", VM_IP, "--mac", VM_MAC, "--gateway", GW, "--gateway6", "", "--visible-ip", ""]
    assert run_cmd(proxy, [vifcmd, "online", *manual], env).returncode == 0
    offline_env = env
    if marker == "destroyed":
        proxy.sh("ipset destroy qbs-base")
    else:
        fake = tmp_path / "bin"
        fake.mkdir()
        for name in ("iptables-save", "ip6tables-save"):
            (fake / name).write_text(NO_SAVE)
            (fake / name).chmod(0o755)
        offline_env = dict(env, PATH=f"{fake}:{env['PATH']}")
    result = run_cmd(proxy, [vifcmd, "offline", *manual], offline_env)
    assert result.returncode == 0, result.stderr
    # The sets stay (empty) and the static rules with them.
    assert {name: ipset_members(proxy, name) for name in sets_of(proxy)} == {name: [] for name in sets_of(proxy)}
    raw = proxy.out("iptables-save -t raw") + proxy.out("ip6tables-save -t raw")
    assert raw.count('-A PREROUTING -m comment --comment "qubes base" -j QBS-ANTISPOOF') == 2, raw
    assert raw.count("--match-set qbs-allowed") == 2 and raw.count("--match-set qbs-downstream") == 2, raw


# -- check on both backends -------------------------------------------------------

def _elements(ns, backend, vif):
    if backend == "nft":
        return {e["concat"][1] for e in nft_set(ns, "ip", "allowed") if e["concat"][0] == vif}
    return {m.split(",")[0] for m in ipset_members(ns, "qbs-allowed4") if m.endswith("," + vif)}


CHECK_CASES = {
    # (how the state is broken per backend, what check says, what repairs it)
    "element-deleted": ({"iptables": f"ipset del qbs-allowed4 {VM_IP},vif37.0",
                         "nft": f"nft delete element ip qubes allowed '{{ \"vif37.0\" . {VM_IP} }}'"},
                        {"iptables": f"vif37.0: element missing from qbs-allowed4: {VM_IP},vif37.0",
                         "nft": f'vif37.0: element missing from ip qubes allowed: "vif37.0" . {VM_IP}'}, "online"),
    "element-for-another-address": (
        {"iptables": "ipset add qbs-allowed4 10.137.7.99,vif37.0",
         "nft": "nft add element ip qubes allowed '{ \"vif37.0\" . 10.137.7.99 }'"},
        {"iptables": "vif37.0: unexpected element in qbs-allowed4: 10.137.7.99,vif37.0 (not an address of the VM)",
         "nft": 'vif37.0: unexpected element in ip qubes allowed: "vif37.0" . 10.137.7.99 '
                "(not an address of the VM)"}, "online"),
    "static-rule-removed": (
        {"iptables": "iptables -t raw -D QBS-ANTISPOOF -i vif+ -m set ! --match-set qbs-allowed4 src,src -j DROP",
         "nft": "nft -a list chain ip qubes antispoof | sed -n 's/.*accept # handle //p'"
                " | xargs -I@ nft delete rule ip qubes antispoof handle @"},
        {"iptables": "QBS-ANTISPOOF: anti-spoofing rule missing: "
                     "-A QBS-ANTISPOOF -i vif+ -m set ! --match-set qbs-allowed4 src,src -j DROP",
         "nft": "qubes: ip qubes antispoof rule missing: iifname . ip saddr @allowed accept"}, "init"),
}


@pytest.mark.parametrize("case", CHECK_CASES, ids=CHECK_CASES)
def test_check_names_and_repairs(netns, xen, vifcmd, backend, case):
    breaker, expected, repair = CHECK_CASES[case]
    proxy, app, _, up = build(netns, xen, vifcmd, backend)
    xen.xs_write("domid", "0")  # --all reads each vif's addresses from xenstore
    env = xen.env(vif="vif37.0", XENBUS_PATH=xen.backend(37), QUBES_NET_BACKEND=backend)

    def check(*args):
        return run_cmd(proxy, [vifcmd, "check", *args], xen.env(QUBES_NET_BACKEND=backend) if args else env)

    assert (check().returncode, check().stdout) == (0, "")
    proxy.sh(breaker[backend])
    for args in ((), ("--all",)):
        result = check(*args)
        assert result.returncode == 1 and expected[backend] in result.stdout.splitlines(), result
    result = check("--all", "--json")
    assert result.returncode == 1
    assert expected[backend].split(": ", 1)[1] in [item["detail"] for item in json.loads(result.stdout)]
    argv = [vifcmd, "init"] if repair == "init" else [vifcmd, "online", "type_if=vif"]
    assert run_cmd(proxy, argv, env).returncode == 0
    for args in ((), ("--all",)):
        result = check(*args)
        assert (result.returncode, result.stdout) == (0, ""), result
    assert _elements(proxy, backend, "vif37.0") == {VM_IP}
    app.sh("ip addr add 10.137.7.99/32 dev eth0")
    assert claimed(up, [(app, "10.137.7.99"), (app, VM_IP)]) == [VM_IP]


def claimed(receiver, senders) -> list[str]:
    """Each (ns, source) sends a datagram to 192.0.2.1 naming its source in the
    payload (masquerading after `init` hides the packet's own); the last one is
    legitimate and must arrive.  Returns the sources named by what arrived."""
    proc = _start(receiver, COUNT, str(ANTISPOOF_PORT))
    try:
        for ns, src in senders:
            send(ns, src, "192.0.2.1", f"{src} x")
        time.sleep(0.5)
    finally:
        got = _stop(proc).split()
    assert senders[-1][1] in got, f"the legitimate datagram did not arrive: {got}"
    return got


def test_check_names_a_stale_element_on_both_backends(netns, xen, vifcmd, backend):
    proxy, _, _, _ = build(netns, xen, vifcmd, backend)
    proxy.sh("ip link del vif38.0")  # the VM died; offline never ran
    result = run_cmd(proxy, [vifcmd, "check", "--all"], xen.env(QUBES_NET_BACKEND=backend))
    assert result.returncode == 1
    assert f"vif38.0: stale anti-spoofing elements for {SIB_IP} (no such interface)" in result.stdout.splitlines()


# -- a restarted VM: the old vif's offline comes late ---------------------------------

@pytest.mark.parametrize("order", ["old-offline-late", "new-offline-first"])
def test_restarted_vm_keeps_its_upstream_protection(netns, xen, vifcmd, backend, order):
    """vif37.0 and vif40.0 (the same VM restarted) both hold 10.137.7.27; one
    goes offline with its interface already gone: the other keeps the
    address in downstream, so it is still dropped when it comes from upstream."""
    proxy, app, sib, up = build(netns, xen, vifcmd, backend)
    vm2 = netns.make("app2")
    netns.vif(proxy, vm2, "vif40.0", vm_mac=VM_MAC, vm_addrs=(VM_IP,), gateway=GW)
    hotplug_online(proxy, xen, vifcmd, "vif40.0", xen.backend(40, ip=VM_IP, mac=VM_MAC), backend)
    gone, kept = ("vif37.0", "vif40.0") if order == "old-offline-late" else ("vif40.0", "vif37.0")
    proxy.sh(f"ip link del {gone}")
    domid = gone[3:5]
    result = run_cmd(proxy, [vifcmd, "offline", "type_if=vif"],
                     xen.env(vif=gone, XENBUS_PATH=xen.backend(int(domid)), QUBES_NET_BACKEND=backend))
    assert result.returncode == 0, result.stderr
    if backend == "nft":
        assert VM_IP in nft_set(proxy, "ip", "downstream")
    else:
        assert VM_IP in ipset_members(proxy, "qbs-downstream4")
    assert _elements(proxy, backend, kept) == {VM_IP} and _elements(proxy, backend, gone) == set()
    # The VM behind the vif that stays still works...
    vm = vm2 if kept == "vif40.0" else app
    got = exchange(up, [(vm, VM_IP, "192.0.2.1", "own")], end=(sib, SIB_IP, "192.0.2.1"))
    assert (VM_IP, "own") in got
    # ...and its address forged upstream is still dropped.
    up.sh(f"ip addr add {VM_IP}/32 dev lo")
    got = exchange(sib, [(up, VM_IP, SIB_IP, "forged")], end=(up, "192.0.2.1", SIB_IP))
    assert (VM_IP, "forged") not in got
