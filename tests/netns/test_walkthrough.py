"""The three-hop walk-through, end to end: AppVM -> ProxyVM -> NetVM -> upstream.

The topology (tests/kit/walkthrough.py) is built once for the module per firewall
backend and per layout: the seed's addresses, and Qubes R4's, where every
virtual DNS address is 10.139.1.1/.2 and the ProxyVM DNATs them to themselves
(its resolv.conf names them).  A test that changes the topology (a second
AppVM, another resolver) puts it back before it ends.
"""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from firewall import antispoof_sources
from walkthrough import (ANSWER, APP2_DOMID, APP2_IP, APP2_MAC, APP_IP, DNS_A, DNS_B, ECHO_PORT, HOST, LAYOUTS,
                         NET_UPLINK, PROXY_IP, R4_DNS1, R4_DNS2, Walkthrough)

UPDATES_PROXY = "--no-block try-restart qubes-updates-proxy.service"


@pytest.fixture(scope="module", params=LAYOUTS)
def walk(tmp_path_factory, backend, request):
    topo = Walkthrough(tmp_path_factory.mktemp(f"walkthrough-{backend}-{request.param}"), firewall=backend,
                       layout=request.param)
    try:
        topo.build()  # raises when a bring-up step (init, online, first DNS run) fails
        yield topo
    finally:
        topo.close()


def use_resolvers(walk, vm, *lines, action=("eth0", "dhcp4-change")):
    """Give the VM another resolv.conf and run the NetworkManager dispatcher form."""
    vm.set_resolv(*lines)
    return vm.dnat(*action)


@pytest.fixture
def restore_net_resolver(walk):
    """Whatever a test did to the NetVM's resolver, put back 203.0.113.53."""
    yield
    result = use_resolvers(walk, walk.net, f"nameserver {DNS_A}")
    assert result.returncode in (0, 100), result.stderr
    assert walk.dns(walk.app, walk.app_dns[0])[0] == ANSWER[DNS_A]


# 1 --------------------------------------------------------------------------------

def test_ping_upstream_is_masqueraded_at_every_hop(walk):
    ping = walk.ping(walk.app, HOST)
    assert ping.returncode == 0, ping.stdout + ping.stderr

    reply = walk.udp_send(walk.app, HOST, ECHO_PORT)
    assert reply is not None, "no answer from the UDP service at 198.51.100.1"
    assert reply.startswith(f"seen {NET_UPLINK}:"), reply
    seen = walk.echo_log.read_text().split()
    assert seen[-2] == NET_UPLINK, f"the upstream service saw {seen[-2]}"

    flows = walk.flows(walk.net.ns)
    assert any(f.proto == "icmp" and (f.src, f.dst, f.reply_dst) == (PROXY_IP, HOST, NET_UPLINK) for f in flows)
    assert any(f.proto == "udp" and (f.src, f.dst, f.dport) == (PROXY_IP, HOST, str(ECHO_PORT)) for f in flows)
    leaked = [f.line for f in flows if APP_IP in f.line]
    assert not leaked, f"the NetVM learned the AppVM's address: {leaked}"


# 2 --------------------------------------------------------------------------------

@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("which", [0, 1], ids=["dns1", "dns2"])
def test_dns_through_both_dnat_hops(walk, which, tcp):
    server = walk.app_dns[which]
    address, outcome = walk.dns(walk.app, server, tcp=tcp)
    assert address == ANSWER[DNS_A], f"query to {server}: {outcome}"


def test_r4_proxyvm_translates_to_the_same_address(walk):
    """Qubes R4: the ProxyVM's DNAT maps each virtual address to itself; the query
    is forwarded (not dropped as untranslated) and the NetVM translates it."""
    if walk.layout != "r4":
        pytest.skip("the seed's layout has no identity DNAT")
    assert walk.dns(walk.app, R4_DNS2, tcp=True)[0] == ANSWER[DNS_A]
    proxy = [f for f in walk.flows(walk.proxy.ns) if f.proto == "tcp" and f.dst == R4_DNS2 and f.src == APP_IP]
    assert proxy and all(f.reply_src == R4_DNS2 and f.reply_dst == PROXY_IP for f in proxy), proxy
    net = [f for f in walk.flows(walk.net.ns) if f.proto == "tcp" and f.dst == R4_DNS2 and f.src == PROXY_IP]
    assert net and all(f.reply_src == DNS_A for f in net), net


# 3 --------------------------------------------------------------------------------

def test_second_appvm_has_network_and_siblings_are_isolated(walk):
    app2, vif, xb = walk.add_app(APP2_DOMID, APP2_IP, APP2_MAC)
    try:
        assert walk.proxy.xen.xs_read(f"{xb}/hotplug-status") == "connected"
        assert antispoof_sources(walk.proxy.ns, walk.firewall, vif) == {APP2_IP}
        ping = walk.ping(app2, HOST)
        assert ping.returncode == 0, ping.stdout + ping.stderr

        log1 = walk.start_echo(walk.app, APP_IP, ECHO_PORT)
        log2 = walk.start_echo(app2, APP2_IP, ECHO_PORT)
        pairs = ((walk.app, APP2_IP), (app2, APP_IP))
        # The probes wait for answers that must not come: run them side by side.
        pings = _parallel([lambda s=s, d=d: walk.ping(s, d, timeout=1).returncode for s, d in pairs])
        udps = _parallel([lambda s=s, d=d: walk.udp_send(s, d, ECHO_PORT, timeout=1) for s, d in pairs])
        assert pings == [1, 1], "a sibling VM answered a ping (exit 0) or ping failed otherwise"
        assert udps == [None, None], f"a sibling VM answered over UDP: {udps}"
        assert log1.read_text() == log2.read_text() == "", "a datagram crossed between sibling VMs"
    finally:
        walk.stop_in(walk.app.name)
        offline = walk.remove_app(app2, vif, xb)
    assert offline.returncode == 0, offline.stderr
    assert APP2_IP not in walk.proxy.rules()
    assert walk.ping(walk.app, HOST).returncode == 0  # the first AppVM is untouched


# 4 --------------------------------------------------------------------------------

def test_rerun_with_unchanged_inputs_exits_100(walk):
    for vm in (walk.proxy, walk.net):
        result = vm.dnat()
        assert result.returncode == 100, f"{vm.label}: exit {result.returncode}: {result.stderr}"


def test_dispatcher_down_changes_nothing(walk):
    for vm in (walk.proxy, walk.net):
        before, log_before = vm.rules(), _systemctl_calls(vm)
        result = vm.dnat("eth0", "down")
        assert result.returncode == 0, f"{vm.label}: {result.stderr}"
        assert vm.rules() == before
        assert _systemctl_calls(vm) == log_before


def test_resolver_change_reaches_the_appvm(walk, restore_net_resolver):
    calls_before = _systemctl_calls(walk.net).count(UPDATES_PROXY)
    result = use_resolvers(walk, walk.net, f"nameserver {DNS_B}")
    assert result.returncode == 0, result.stderr
    for server in walk.app_dns:
        for tcp in (False, True):
            address, outcome = walk.dns(walk.app, server, tcp=tcp)
            assert address == ANSWER[DNS_B], f"query to {server} (tcp={tcp}) after the switch: {outcome}"
    assert _systemctl_calls(walk.net).count(UPDATES_PROXY) == calls_before + 1


def test_no_usable_resolver_keeps_dns_inside(walk, restore_net_resolver):
    up = walk.upstream
    for proto in ("udp", "tcp"):  # counters only: rules with no target
        up.sh(f"iptables -t raw -A PREROUTING -i eth0 -p {proto} --dport 53")
    try:
        result = use_resolvers(walk, walk.net, "# no IPv4 resolver here", "; nor here",
                               "nameserver 2001:db8::53", "search walk.test")
        assert result.returncode == 0, result.stderr
        up.sh("iptables -t raw -Z PREROUTING")
        queries = [(server, tcp) for server in walk.app_dns for tcp in (False, True)]
        answers = _parallel([lambda q=q: walk.dns(walk.app, q[0], tcp=q[1], timeout=1) for q in queries])
        for (server, tcp), (address, outcome) in zip(queries, answers):
            assert address is None, f"{'TCP' if tcp else 'UDP'} query to {server} was answered: {outcome}"
            if tcp:  # refused at once by the NetVM (a reset), not a timeout
                assert "refused" in outcome.lower(), f"TCP query to {server}: {outcome}"
            else:  # no DNS answer: an unconnected socket does not see the ICMP error
                assert outcome == "timeout", f"UDP query to {server}: {outcome}"
        time.sleep(0.2)  # a late retransmission would still be counted
        assert _dns_packets_seen_upstream(walk) == {"udp": 0, "tcp": 0}

        # The counters do count: with a resolver again, the same query reaches upstream.
        assert use_resolvers(walk, walk.net, f"nameserver {DNS_A}").returncode == 0
        assert walk.dns(walk.app, walk.app_dns[0])[0] == ANSWER[DNS_A]
        assert _dns_packets_seen_upstream(walk)["udp"] >= 1
    finally:
        for proto in ("udp", "tcp"):
            up.sh(f"iptables -t raw -D PREROUTING -i eth0 -p {proto} --dport 53", check=False)


# 5 --------------------------------------------------------------------------------

@pytest.mark.parametrize("resolver", [DNS_B, DNS_A])  # the second round puts the first resolver back
def test_two_simultaneous_runs_leave_one_rule_set(walk, resolver):
    walk.net.set_resolv(f"nameserver {resolver}")
    procs = [walk.net.popen("qubes-setup-dnat-to-ns") for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 100], f"exit statuses {codes}: {[err for _, err in outputs]}"

    ns = walk.net.ns
    if walk.firewall == "nft":  # one chain by name: the rules are what can be doubled
        expected = ["jump custom-dnat-dns"] + [f"ip daddr {virtual} {proto} dport 53 dnat to {resolver}"
                                               for virtual in walk.net_dns for proto in ("udp", "tcp")]
        assert _nft_rules(ns, "dnat-dns") == expected
    else:
        expected = ["-A PR-QBS -j custom-dnat-dns"] + [
            f"-A PR-QBS -d {virtual}/32 -p {proto} -m {proto} --dport 53 -j DNAT --to-destination {resolver}"
            for virtual in walk.net_dns for proto in ("udp", "tcp")]
        assert _rules(ns, "nat", "PR-QBS") == expected
        assert _rules(ns, "filter", "QBS-DNS-GUARD") == []  # a guard only when nothing is translated
        assert _rules(ns, "nat", "PREROUTING").count("-A PREROUTING -j PR-QBS") == 1
        assert _rules(ns, "filter", "FORWARD").count("-A FORWARD -j QBS-DNS-GUARD") == 1
    assert walk.dns(walk.app, walk.app_dns[1])[0] == ANSWER[resolver]


# helpers ----------------------------------------------------------------------------

def _parallel(calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def _systemctl_calls(vm) -> list[str]:
    return vm.systemctl_log.read_text().splitlines() if vm.systemctl_log.exists() else []


def _rules(ns, table: str, chain: str) -> list[str]:
    return [line for line in ns.out(f"iptables -t {table} -S {chain}").splitlines() if line.startswith("-A ")]


def _nft_rules(ns, chain: str) -> list[str]:
    """The rules of chain `ip qubes CHAIN`, as nft prints them (no counters)."""
    lines = [line.strip() for line in ns.out(f"nft -s list chain ip qubes {chain}").splitlines()]
    return [line for line in lines if line and not line.startswith(("table ", "chain ", "type ", "}"))]


def _dns_packets_seen_upstream(walk) -> dict[str, int]:
    """Packets counted by the upstream's raw PREROUTING counter rules for port 53 on eth0."""
    text = walk.upstream.out("iptables -t raw -L PREROUTING -v -n -x")
    counts = {}
    for line in text.splitlines():
        # the prot column may be a name or a number (iptables-nft): use the match text
        match = re.match(r"\s*(\d+)\s+\d+\s+\S+\s+--\s+eth0\s.*\b(udp|tcp) dpt:53\s*$", line)
        if match:
            counts[match.group(2)] = int(match.group(1))
    assert set(counts) == {"udp", "tcp"}, f"counter rules not found in:\n{text}"
    return counts
