"""`vif-route-qubes check` and `qubes-setup-dnat-to-ns --check` (issue "Drift").

Each test brings the state up with the real commands, breaks it by hand in the
provider's namespace, expects `check` to exit 1 and name the difference, then
repairs it the way the product would (`online`, `offline` for a vif that is
gone, or `qubes-setup-dnat-to-ns`) and expects exit 0 again.
"""

import json

import pytest

from netns import BIN, run_cmd, state_of

VM_MAC = "00:16:3e:5e:6c:19"
GW = "10.137.7.1"
VIRTUAL = ("10.139.1.1", "10.139.1.2")
DNSCMD = str(BIN / "qubes-setup-dnat-to-ns")


def add_vm(netns, xen, proxy, domid, addr):
    vm = netns.make("app")
    vif = f"vif{domid}.0"
    netns.vif(proxy, vm, vif, vm_mac=VM_MAC, vm_addrs=(addr,), gateway=GW)
    return vif, xen.backend(domid, ip=addr, mac=VM_MAC)


@pytest.fixture
def online(netns, xen, vifcmd):
    """A ProxyVM with vif37.0 (10.137.7.27) online; xenstore knows this domain's id."""
    proxy = netns.make("proxy")
    xen.qdb_write("/qubes-netvm-gateway", GW)
    xen.xs_write("domid", "0")
    vif, path = add_vm(netns, xen, proxy, 37, "10.137.7.27")
    env = xen.env(vif=vif, XENBUS_PATH=path)
    result = run_cmd(proxy, [vifcmd, "online", "type_if=vif"], env)
    assert result.returncode == 0, result.stderr

    class Setup:
        ns, xenv = proxy, xen

        def check(self, *args, **extra):
            """`check` with udev's environment (vif, XENBUS_PATH), unless given a VIF or --all."""
            environ = xen.env(**extra) if any(a == "--all" or a.startswith("vif") for a in args) else env
            return run_cmd(proxy, [vifcmd, "check", *args], environ)

        def online(self):
            result = run_cmd(proxy, [vifcmd, "online", "type_if=vif"], env)
            assert result.returncode == 0, result.stderr

    return Setup()


def clean(result):
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result
    return result


def drifts(result) -> list[str]:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    return result.stdout.splitlines()


# -- clean state -----------------------------------------------------------

def test_clean_state_and_json(online):
    clean(online.check())
    clean(online.check("--all"))
    clean(online.check("vif37.0", "10.137.7.27", "--mac", VM_MAC))
    xen = online.xenv
    xen.xs_rm("backend/vif/37/0/ip")  # --all without xenstore's keys: the addresses come from the rules
    clean(online.check("--all"))
    for args in ((), ("--all",)):
        result = online.check("--json", *args) if args else run_cmd(
            online.ns, [str(BIN / "vif-route-qubes"), "check", "--json", "vif37.0", "10.137.7.27"], xen.env())
        assert result.returncode == 0 and json.loads(result.stdout) == [], result


def test_check_changes_nothing(online):
    online.ns.sh("ip link set vif37.0 down && sysctl -qw net.ipv4.conf.vif37/0.proxy_arp=0")
    before = state_of(online.ns)
    assert online.check().returncode == 1
    assert online.check("--all", "--json").returncode == 1
    assert state_of(online.ns) == before


def test_vif_before_online(netns, xen, vifcmd):
    """An interface online never ran for: everything online would do is listed."""
    proxy = netns.make("proxy")
    xen.qdb_write("/qubes-netvm-gateway", GW)
    vif, path = add_vm(netns, xen, proxy, 37, "10.137.7.27")
    lines = drifts(run_cmd(proxy, [vifcmd, "check", "type_if=vif"], xen.env(vif=vif, XENBUS_PATH=path)))
    for expected in ("QBS-ANTISPOOF: jump missing from iptables raw PREROUTING: -A PREROUTING -j QBS-ANTISPOOF",
                     "QBS-ANTISPOOF: qbs-allowed4 missing", "QBS-ANTISPOOF: qbs-downstream6 missing",
                     "QBS-ANTISPOOF: anti-spoofing chain QBS-ANTISPOOF missing",
                     "vif37.0: proxy_arp is 0, should be 1", "vif37.0: link down",
                     "vif37.0: gateway address 10.137.7.1/32 missing",
                     "vif37.0: route 10.137.7.27 metric 32715 missing",
                     f"vif37.0: neighbour 10.137.7.27 lladdr {VM_MAC} missing"):
        assert expected in lines
    assert "vif37.0: link down" in drifts(run_cmd(proxy, [vifcmd, "check", "--all"], xen.env()))


# -- each kind of drift, made by hand; online repairs it ---------------------

DRIFTS = {
    "allowed-element-deleted": (
        "ipset del qbs-allowed4 10.137.7.27,vif37.0",
        ["vif37.0: element missing from qbs-allowed4: 10.137.7.27,vif37.0"]),
    "downstream-element-deleted": (
        "ipset del qbs-downstream4 10.137.7.27",
        ["vif37.0: element missing from qbs-downstream4: 10.137.7.27"]),
    "element-for-another-address": (
        "ipset add qbs-allowed4 10.137.7.99,vif37.0",
        ["vif37.0: unexpected element in qbs-allowed4: 10.137.7.99,vif37.0 (not an address of the VM)"]),
    "static-rule-deleted": (
        "iptables -t raw -D QBS-ANTISPOOF ! -i vif+ -m set --match-set qbs-downstream4 src -j DROP",
        ["QBS-ANTISPOOF: anti-spoofing rule missing: "
         "-A QBS-ANTISPOOF ! -i vif+ -m set --match-set qbs-downstream4 src -j DROP"]),
    "ipv6-static-rule-deleted": (
        "ip6tables -t raw -D QBS-ANTISPOOF -i vif+ -m set ! --match-set qbs-allowed6 src,src -j DROP",
        ["QBS-ANTISPOOF: IPv6 anti-spoofing rule missing: "
         "-A QBS-ANTISPOOF -i vif+ -m set ! --match-set qbs-allowed6 src,src -j DROP"]),
    "proxy-arp-off": (
        "sysctl -qw net.ipv4.conf.vif37/0.proxy_arp=0",
        ["vif37.0: proxy_arp is 0, should be 1"]),
    "neighbour-deleted": (
        "ip neigh del 10.137.7.27 dev vif37.0",
        [f"vif37.0: neighbour 10.137.7.27 lladdr {VM_MAC} missing"]),
    "neighbour-wrong-mac": (
        "ip neigh replace 10.137.7.27 lladdr 00:16:3e:00:00:01 dev vif37.0 nud permanent",
        [f"vif37.0: neighbour 10.137.7.27 has MAC 00:16:3e:00:00:01, should be {VM_MAC}"]),
    # Without its last IPv4 address, the kernel flushes the link's routes and neighbours too.
    "gateway-removed": (
        "ip addr del 10.137.7.1/32 dev vif37.0",
        ["vif37.0: gateway address 10.137.7.1/32 missing", "vif37.0: route 10.137.7.27 metric 32715 missing",
         f"vif37.0: neighbour 10.137.7.27 lladdr {VM_MAC} missing"]),
    "route-deleted": (
        "ip route del 10.137.7.27 dev vif37.0",
        ["vif37.0: route 10.137.7.27 metric 32715 missing"]),
    # The kernel drops the IPv4 routes and the neighbours of a link that goes down.
    "link-down": (
        "ip link set vif37.0 down",
        ["vif37.0: link down", "vif37.0: route 10.137.7.27 metric 32715 missing",
         f"vif37.0: neighbour 10.137.7.27 lladdr {VM_MAC} missing"]),
    "stray-route-to-vm": (
        "ip route add 10.137.7.27 dev vif37.0 metric 100",
        ["vif37.0: unexpected route 10.137.7.27 dev vif37.0 metric 100 (not the VM's route)"]),
}


def _drift_then_repair(online, breaker, expected):
    online.ns.sh(breaker)
    assert drifts(online.check()) == expected
    assert drifts(online.check("--all")) == expected  # the MAC comes from xenstore here
    report = json.loads(online.check("--json").stdout)
    assert [f"{r.get('vif') or r.get('scope')}: {r['detail']}" for r in report] == expected
    online.online()
    clean(online.check())
    clean(online.check("--all"))


@pytest.mark.parametrize("breaker, expected", DRIFTS.values(), ids=DRIFTS.keys())
def test_drift_reported_and_repaired_by_online(online, breaker, expected):
    _drift_then_repair(online, breaker, expected)


# Static parts that an event cannot see changed without reading every rule (the
# sets' reference counts are still right): `init` restores them.
STATIC_DRIFTS = {
    "antispoof-jump-duplicated": (
        "iptables -t raw -A PREROUTING -j QBS-ANTISPOOF",
        ["QBS-ANTISPOOF: jump duplicated 2 times in iptables raw PREROUTING: -A PREROUTING -j QBS-ANTISPOOF"]),
    "antispoof-jump-deleted": (
        "iptables -t raw -D PREROUTING -j QBS-ANTISPOOF",
        ["QBS-ANTISPOOF: jump missing from iptables raw PREROUTING: -A PREROUTING -j QBS-ANTISPOOF"]),
    "static-rule-duplicated": (
        "iptables -t raw -A QBS-ANTISPOOF -i vif+ -m set ! --match-set qbs-allowed4 src,src -j DROP",
        ["QBS-ANTISPOOF: rule duplicated 2 times: "
         "-A QBS-ANTISPOOF -i vif+ -m set ! --match-set qbs-allowed4 src,src -j DROP"]),
    "foreign-rule-in-static-chain": (
        "iptables -t raw -I QBS-ANTISPOOF 1 -s 10.137.7.99/32 -j RETURN",
        ["QBS-ANTISPOOF: unexpected anti-spoofing rule: -A QBS-ANTISPOOF -s 10.137.7.99/32 -j RETURN"]),
}


@pytest.mark.parametrize("breaker, expected", STATIC_DRIFTS.values(), ids=STATIC_DRIFTS.keys())
def test_static_drift_reported_and_repaired_by_init(online, vifcmd, breaker, expected):
    online.ns.sh(breaker)
    assert drifts(online.check()) == expected
    assert drifts(online.check("--all")) == expected
    result = run_cmd(online.ns, [vifcmd, "init"], online.xenv.env())
    assert result.returncode == 0, result.stderr
    clean(online.check())
    clean(online.check("--all"))


def test_address_dropped_from_xenstore_repaired_by_online(online):
    """The VM lost an address between two onlines: online removes its route and neighbour."""
    xen, path = online.xenv, "/local/domain/0/backend/vif/37/0"
    xen.xs_write(f"{path}/ip", "10.137.7.27 10.137.7.28")
    online.online()
    clean(online.check())
    xen.xs_write(f"{path}/ip", "10.137.7.27")
    assert drifts(online.check()) == [
        "vif37.0: unexpected element in qbs-allowed4: 10.137.7.28,vif37.0 (not an address of the VM)",
        "vif37.0: unexpected route 10.137.7.28 dev vif37.0 metric 32715 (not an address of the VM)",
        "vif37.0: unexpected permanent neighbour 10.137.7.28 (not an address of the VM)"]
    online.online()
    clean(online.check())  # elements, route and neighbour of the old address: all gone


# -- a VM that is gone without offline ----------------------------------------

def test_stale_vif(online, netns, vifcmd):
    proxy, xen = online.ns, online.xenv
    vif, path = add_vm(netns, xen, proxy, 40, "10.137.7.40")
    result = run_cmd(proxy, [vifcmd, "online", "type_if=vif"], xen.env(vif=vif, XENBUS_PATH=path))
    assert result.returncode == 0, result.stderr
    clean(online.check("--all"))
    proxy.sh("ip link del vif40.0")  # the VM died; offline never ran
    expected = ["vif40.0: stale anti-spoofing elements for 10.137.7.40 (no such interface)"]
    assert drifts(online.check("--all")) == expected
    assert drifts(online.check("vif40.0", "10.137.7.40")) == expected
    assert json.loads(online.check("--all", "--json").stdout) == [
        {"vif": "vif40.0", "kind": "stale", "detail": expected[0][len("vif40.0: "):]}]
    clean(online.check())  # vif37.0 is fine
    # online cannot repair a vif that has no interface; offline removes what is left.
    result = run_cmd(proxy, [vifcmd, "offline", "vif40.0", "10.137.7.40"], xen.env())
    assert result.returncode == 0, result.stderr
    clean(online.check("--all"))
    assert drifts(online.check("vif40.0")) == ["vif40.0: no such interface"]


def test_usage_and_backend(online):
    for args in ((), ("--all", "vif37.0")):
        result = run_cmd(online.ns, [str(BIN / "vif-route-qubes"), "check", *args], online.xenv.env())
        assert result.returncode == 2 and "give a VIF or --all" in result.stderr
    # The nft backend is checked too: here nothing of it exists.
    assert drifts(online.check("--all", "--backend", "nft"))[:2] == ["qubes: table ip qubes missing",
                                                                      "qubes: table ip6 qubes missing"]


# -- DNS ------------------------------------------------------------------------

@pytest.fixture
def dns(netns, xen, tmp_path):
    ns = netns.make("net")
    for key, value in zip(("/qubes-netvm-primary-dns", "/qubes-netvm-secondary-dns"), VIRTUAL):
        xen.qdb_write(key, value)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 203.0.113.53\n")
    env = xen.env(QUBES_RESOLV_CONF=str(resolv), QUBES_FIREWALL_FLAG=str(tmp_path / "no-firewall"))

    class Dns:
        def __init__(self):
            self.ns, self.resolv = ns, resolv

        def run(self, *args):
            return run_cmd(ns, [DNSCMD, *args], env)

    setup = Dns()
    assert setup.run().returncode == 0
    return setup


def test_dns_clean_and_old_server(dns):
    clean(dns.run("--check"))
    assert json.loads(dns.run("--check", "--json").stdout) == []
    dns.resolv.write_text("nameserver 203.0.113.54\n")  # the uplink changed; the hook did not run
    assert drifts(dns.run("--check")) == [f"DNS: {v} is DNATed to 203.0.113.53, should be 203.0.113.54"
                                          for v in VIRTUAL]
    report = json.loads(dns.run("--check", "--json").stdout)
    assert {(r["scope"], r["kind"]) for r in report} == {("DNS", "dns-target")}
    assert dns.run().returncode == 0
    clean(dns.run("--check"))


def test_dns_no_upstream_and_two_upstreams(dns):
    dns.resolv.write_text("# no resolver\n")
    reject = {"udp": "icmp-port-unreachable", "tcp": "tcp-reset"}
    assert drifts(dns.run("--check")) == [
        f"DNS: filter QBS-DNS-GUARD rule missing: -A QBS-DNS-GUARD -d {v}/32 -p {p} -m {p} --dport 53 "
        f"-j REJECT --reject-with {reject[p]}" for v in VIRTUAL for p in ("udp", "tcp")] + [
        f"DNS: {v} is DNATed to 203.0.113.53, should be refused (no upstream resolver)" for v in VIRTUAL]
    assert dns.run().returncode == 0
    clean(dns.run("--check"))
    dns.resolv.write_text("nameserver 203.0.113.53\nnameserver 203.0.113.54\n")
    assert drifts(dns.run("--check")) == [
        f"DNS: {v} is not DNATed, should be {s}" for v, s in zip(VIRTUAL, ("203.0.113.53", "203.0.113.54"))] + [
        f"DNS: unexpected filter QBS-DNS-GUARD rule: -A QBS-DNS-GUARD -d {v}/32 -p {p} -m {p} --dport 53 "
        f"-j REJECT --reject-with {reject[p]}" for v in VIRTUAL for p in ("udp", "tcp")]
    assert dns.run().returncode == 0
    clean(dns.run("--check"))


DNS_DRIFTS = {
    "guard-jump-deleted": ("iptables -t filter -D FORWARD -j QBS-DNS-GUARD",
                           ["DNS: jump missing (filter): -A FORWARD -j QBS-DNS-GUARD"]),
    "guard-rule-added": ("iptables -t filter -A QBS-DNS-GUARD -d 10.139.1.2/32 -p tcp -m tcp --dport 53 -j DROP",
                         ["DNS: unexpected filter QBS-DNS-GUARD rule: "
                          "-A QBS-DNS-GUARD -d 10.139.1.2/32 -p tcp -m tcp --dport 53 -j DROP"]),
    "custom-jump-deleted": ("iptables -t nat -D PR-QBS -j custom-dnat-dns",
                            ["DNS: nat PR-QBS rule missing: -A PR-QBS -j custom-dnat-dns"]),
    "dnat-rule-deleted": ("iptables -t nat -D PR-QBS -d 10.139.1.1/32 -p udp -m udp --dport 53 "
                          "-j DNAT --to-destination 203.0.113.53",
                          ["DNS: 10.139.1.1 is DNATed to 203.0.113.53 (tcp only), should be 203.0.113.53"]),
    "dnat-rule-duplicated": ("iptables -t nat -A PR-QBS -d 10.139.1.1/32 -p udp -m udp --dport 53 "
                             "-j DNAT --to-destination 203.0.113.53",
                             ["DNS: rule duplicated 2 times: -A PR-QBS -d 10.139.1.1/32 -p udp -m udp "
                              "--dport 53 -j DNAT --to-destination 203.0.113.53"]),
}


@pytest.mark.parametrize("breaker, expected", DNS_DRIFTS.values(), ids=DNS_DRIFTS.keys())
def test_dns_drift_repaired(dns, breaker, expected):
    dns.ns.sh(breaker)
    assert drifts(dns.run("--check")) == expected
    assert dns.run().returncode == 0
    clean(dns.run("--check"))


def test_dns_duplicated_jump_repaired(dns):
    dns.ns.sh("iptables -t nat -A PREROUTING -j PR-QBS")
    assert drifts(dns.run("--check")) == ["DNS: jump duplicated 2 times (nat): -A PREROUTING -j PR-QBS"]
    dns.run()
    clean(dns.run("--check"))


def test_dns_duplicated_jump_is_a_change(dns):
    dns.ns.sh("iptables -t nat -A PREROUTING -j PR-QBS")
    assert dns.run().returncode == 0  # a copy made by hand is removed: a real change
    assert dns.run().returncode == 100


def test_dns_check_backend_nft(dns):
    """The DNS check reads nft too: here nothing is installed on nft (the rules are iptables')."""
    result = dns.run("--check", "--backend", "nft")
    assert result.returncode == 1 and result.stdout.splitlines() == ["DNS: chain ip qubes dnat-dns missing"]
    assert dns.run("--backend", "nft").returncode == 0
    clean(dns.run("--check", "--backend", "nft"))


# -- dual stack and hardening, --all from the rules, the lock -------------------

GW6 = "fd09:24ef:4179::a89:1"
V6 = "fd09:24ef:4179::a89:71b"


def test_dual_stack_hardened_vif(netns, xen, vifcmd):
    """IPv6 routes, neighbours, the /128 gateway, proxy_ndp and the hardening sysctls."""
    proxy = netns.make("proxy")
    for key, value in (("/qubes-netvm-gateway", GW), ("/qubes-netvm-gateway6", GW6),
                       ("/qubes-service/harden-network-interfaces", "1")):
        xen.qdb_write(key, value)
    xen.xs_write("domid", "0")
    vm = netns.make("app")
    netns.vif(proxy, vm, "vif37.0", vm_mac=VM_MAC, vm_addrs=("10.137.7.27", "10.137.7.28", V6), gateway=GW)
    path = xen.backend(37, ip=f"10.137.7.27 10.137.7.28 {V6}", mac=VM_MAC)
    env = xen.env(vif="vif37.0", XENBUS_PATH=path)

    def check(*args):
        return run_cmd(proxy, [vifcmd, "check", *args], env if not args else xen.env())

    def online():
        assert run_cmd(proxy, [vifcmd, "online", "type_if=vif"], env).returncode == 0

    online()
    clean(check())
    clean(check("--all"))
    proxy.sh(f"ip -6 addr del {GW6}/128 dev vif37.0 && ip -6 neigh del {V6} dev vif37.0"
             " && sysctl -qw net.ipv6.conf.vif37/0.proxy_ndp=0 net.ipv4.conf.vif37/0.accept_redirects=1"
             f" && ipset del qbs-allowed6 {V6},vif37.0"
             " && ip route del 10.137.7.28 dev vif37.0")
    expected = [f"vif37.0: element missing from qbs-allowed6: {V6},vif37.0",
                "vif37.0: accept_redirects is 1, should be 0",
                "vif37.0: IPv6 proxy_ndp is 0, should be 1",
                f"vif37.0: IPv6 gateway address {GW6}/128 missing",
                "vif37.0: route 10.137.7.28 metric 32715 missing",
                f"vif37.0: neighbour {V6} lladdr {VM_MAC} missing"]
    assert sorted(drifts(check())) == sorted(expected)
    assert sorted(drifts(check("--all"))) == sorted(expected)
    online()
    clean(check())


def test_all_without_xenstore_uses_the_rules(online):
    online.xenv.xs_rm("backend/vif/37/0/ip")
    online.ns.sh("ipset del qbs-downstream4 10.137.7.27 && ip route del 10.137.7.27")
    # The address is still named by the vif's element, so --all knows what to expect.
    assert drifts(online.check("--all")) == [
        "vif37.0: element missing from qbs-downstream4: 10.137.7.27",
        "vif37.0: route 10.137.7.27 metric 32715 missing"]


def test_check_waits_for_a_running_event(online):
    """The events' lock is taken shared: a check never reads half an event."""
    import fcntl

    with open(online.xenv.lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = online.check("--all", VIF_ROUTE_LOCK_TIMEOUT="0.3")
        # A check that cannot read fails as any command does: 1, one line on
        # stderr and no report on stdout (drift would be listed on stdout).
        assert result.returncode == 1 and "still held" in result.stderr and not result.stdout, result
        fcntl.flock(handle, fcntl.LOCK_SH)  # another check: no waiting
        clean(online.check("--all", VIF_ROUTE_LOCK_TIMEOUT="0.3"))


def test_dns_rule_for_another_address(dns):
    dns.ns.sh("iptables -t nat -A PR-QBS -d 10.139.1.3/32 -p udp -m udp --dport 53 -j DNAT --to-destination 192.0.2.9")
    assert drifts(dns.run("--check")) == [
        "DNS: 10.139.1.3 is DNATed to 192.0.2.9 (udp only), but it is not a virtual DNS address"]
    assert dns.run().returncode == 0
    clean(dns.run("--check"))


# -- the pure comparisons, without namespaces -------------------------------------

def test_pure_comparisons():
    from ipaddress import ip_address

    from setup_dnat_to_ns.plan import DnsInputs
    from vif_route_qubes.check import drift as check, report
    from setup_dnat_to_ns import check as check_dns
    from vif_route_qubes.plan import ipt_text as ipt_state
    from vif_route_qubes.check.antispoof import AntispoofView, SetView

    assert report.lines_drift("vif1.0", "x", ("-A C -j DROP", "-A C -s a -j RETURN"),
                             ("-A C -s a -j RETURN", "-A C -j DROP"), ordered=True)[0].kind == "rules-out-of-order"
    inp = DnsInputs(virtual=(ip_address("10.139.1.1"),), upstream=(ip_address("203.0.113.53"),))
    missing = check_dns.dns_drift(inp, {})
    assert {d.kind for d in missing} == {"chain-missing", "jump-missing"} and len(missing) == 6
    sets = {4: SetView(True, frozenset({("vif40.0", "10.137.7.40")}), frozenset({"10.137.7.40"})), 6: SetView(True)}
    net = check.NetState({}, {}, (), {}, AntispoofView("iptables", sets, {4: ipt_state.EMPTY_TABLE,
                                                                          6: ipt_state.EMPTY_TABLE}), {})
    assert check.discover(net) == ["vif40.0"]
    assert [d.line() for d in check.stale_drift("vif40.0", net)] == [
        "vif40.0: stale anti-spoofing elements for 10.137.7.40 (no such interface)"]
    assert check.Drift("DNS", "k", "d").record() == {"scope": "DNS", "kind": "k", "detail": "d"}


def test_pure_mapped_vif_is_compared_on_the_main_side():
    """A mapped VM: the main namespace holds a veth end for the real address only."""
    from ipaddress import ip_address

    from vif_route_qubes.check import drift as check
    from vif_route_qubes.plan import ipt_text as ipt_state
    from vif_route_qubes.check.antispoof import AntispoofView, SetView
    from vif_route_qubes.plan.mapped import Mapped
    from vif_route_qubes.model import VifInputs

    real, visible = ip_address("10.137.7.30"), ip_address("10.137.99.30")
    inp = VifInputs("online", "vif37.0", 37, (real,), VM_MAC, "vif", ip_address(GW), None, (), False, (), 10.0,
                    None, mapped=Mapped(real, visible, ip_address("10.137.99.1")), netns_prefix="p-")
    fw = AntispoofView("iptables", {4: SetView(True), 6: SetView(True)},
                       {4: ipt_state.EMPTY_TABLE, 6: ipt_state.EMPTY_TABLE})
    net = check.NetState({"vif37.0": True}, {}, (), {}, fw,
                         {"net/ipv4/conf/vif37.0/proxy_arp": "1", "net/ipv6/conf/vif37.0/disable_ipv6": "0"})
    lines = [d.line() for d in check.vif_drift(inp, net)]
    assert lines[0] == "vif37.0: namespace p-vif37.0 missing"
    assert "vif37.0: route 10.137.7.30 metric 32715 missing" in lines
    assert not any("10.137.99" in line for line in lines)
    net = net._replace(netns=frozenset({"p-vif37.0"}))
    assert "vif37.0: namespace p-vif37.0 missing" not in [d.line() for d in check.vif_drift(inp, net)]


def test_clean_after_init(online, vifcmd):
    """After `init` the dispatch jump is the base's (with its comment): still one jump, no drift."""
    result = run_cmd(online.ns, [vifcmd, "init"], online.xenv.env())
    assert result.returncode == 0, result.stderr
    assert 'comment "qubes base" -j QBS-ANTISPOOF' in online.ns.out("iptables-save -t raw")
    clean(online.check("--all"))
    online.online()
    clean(online.check())
