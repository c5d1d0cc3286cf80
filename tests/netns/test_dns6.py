"""IPv6 virtual DNS (issue 17, qubes-issues #10038), end to end on both backends.

The Qubes R4 walk-through, dual-stack: AppVM -> ProxyVM -> NetVM -> upstream,
the virtual DNS addresses 10.139.1.1/.2 and fd09:24ef:4179::a8b:1/::a8b:2 in
both providers' qubesdb, the ProxyVM's resolv.conf naming all four (so it
DNATs them to themselves), the NetVM's naming 203.0.113.53 and 2001:db8::53
(dnsmasq in the upstream namespace).  A family whose uplink has no resolver
is refused at once (ICMP/ICMPv6 port unreachable, TCP reset), also in a burst.
"""

import json
import subprocess
import sys
import time

import pytest

from netns import run_cmd
from walkthrough import (ANSWER6, APP2_6, APP2_DOMID, APP2_IP, APP2_MAC, APP6, DNS6_A, DNS_A, HERE, NAME,
                         PROXY6, R4_DNS1, R4_DNS2, VDNS6, Walkthrough)

V6_UP, V4_UP = f"nameserver {DNS6_A}", f"nameserver {DNS_A}"
BURST = """
import json, sys, threading, time
sys.path.insert(0, {here!r})
import dnsq
out, threads, start = [], [], time.monotonic()
def one(tcp):
    out.append(dnsq.ask({server!r}, {name!r}, tcp=tcp, timeout=2.0, connected=True)[1])
for i in range({count}):
    threads.append(threading.Thread(target=one, args=(i % 2 == 1,)))
    threads[-1].start()
for t in threads:
    t.join()
print(json.dumps({{"outcomes": out, "seconds": time.monotonic() - start}}))
"""


@pytest.fixture(scope="module")
def walk(tmp_path_factory, backend):
    topo = Walkthrough(tmp_path_factory.mktemp(f"dns6-{backend}"), firewall=backend, layout="r4", ipv6=True)
    try:
        topo.build()
        yield topo
    finally:
        topo.close()


def use(walk, *lines):
    walk.net.set_resolv(*lines)
    return walk.net.dnat("eth0", "dhcp4-change")


@pytest.fixture
def dual_uplink(walk):
    yield
    result = use(walk, V4_UP, V6_UP)
    assert result.returncode in (0, 100), result.stderr


def counters(walk, family: int) -> int:
    """Packets to port 53 the upstream received on eth0 (ip6tables or iptables raw counters)."""
    tool = "ip6tables" if family == 6 else "iptables"
    text = walk.upstream.out(f"{tool} -t raw -L PREROUTING -v -n -x")
    return sum(int(line.split()[0]) for line in text.splitlines() if "dpt:53" in line)


@pytest.fixture
def capture(walk):
    """Counting rules for udp/tcp 53 arriving at the upstream, both families."""
    for tool in ("iptables", "ip6tables"):
        for proto in ("udp", "tcp"):
            walk.upstream.sh(f"{tool} -t raw -A PREROUTING -i eth0 -p {proto} --dport 53")
    yield
    for tool in ("iptables", "ip6tables"):
        for proto in ("udp", "tcp"):
            walk.upstream.sh(f"{tool} -t raw -D PREROUTING -i eth0 -p {proto} --dport 53", check=False)


# 1 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("aaaa", [False, True], ids=["A", "AAAA"])
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("which", [0, 1], ids=["dns6-1", "dns6-2"])
def test_queries_through_the_ipv6_virtual_addresses(walk, which, tcp, aaaa):
    server = VDNS6[which]
    address, outcome = walk.dns(walk.app, server, tcp=tcp, aaaa=aaaa)
    assert address == ANSWER6[DNS6_A][aaaa], f"query to {server}: {outcome}"
    proto = "tcp" if tcp else "udp"
    # The ProxyVM translates the virtual address to itself and masquerades...
    proxy = [f for f in walk.flows(walk.proxy.ns) if (f.proto, f.src, f.dst) == (proto, APP6, server)]
    assert proxy and all((f.reply_src, f.reply_dst) == (server, PROXY6) for f in proxy), proxy
    # ...the NetVM translates it to the one IPv6 upstream, for both virtual addresses.
    net = [f for f in walk.flows(walk.net.ns) if (f.proto, f.src, f.dst) == (proto, PROXY6, server)]
    assert net and all(f.reply_src == DNS6_A for f in net), net
    assert not [f.line for f in walk.flows(walk.net.ns) if APP6 in f.line]


def test_ipv4_still_answered_beside_ipv6(walk):
    for server in (R4_DNS1, R4_DNS2):
        assert walk.dns(walk.app, server, aaaa=True)[0] is not None


# 2 ---------------------------------------------------------------------------------

def _refused_at_once(walk, servers):
    for server in servers:
        started = time.monotonic()
        address, outcome = walk.dns(walk.app, server, connected=True, timeout=2)
        elapsed = time.monotonic() - started
        assert outcome == "refused", f"UDP to {server}: {outcome} after {elapsed:.3f} s"
        assert walk.dns(walk.app, server, tcp=True, timeout=2)[1] == "refused", f"TCP to {server}"


def _burst(walk, vms, server, count):
    procs = [vm_ns.popen([sys.executable, "-c", BURST.format(here=str(HERE), server=server, name=NAME,
                                                             count=count)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for vm_ns in vms]
    results = [json.loads(proc.communicate(timeout=30)[0]) for proc in procs]
    return [o for r in results for o in r["outcomes"]], max(r["seconds"] for r in results)


@pytest.mark.parametrize("family", [6, 4], ids=["ipv4-only-uplink", "ipv6-only-uplink"])
def test_family_without_upstream_is_refused_at_once(walk, dual_uplink, capture, family):
    result = use(walk, V4_UP if family == 6 else V6_UP)
    assert result.returncode == 0, result.stderr
    servers = VDNS6 if family == 6 else (R4_DNS1, R4_DNS2)
    walk.upstream.sh("iptables -t raw -Z PREROUTING && ip6tables -t raw -Z PREROUTING")
    _refused_at_once(walk, servers)

    app2, vif, xb = walk.add_app(APP2_DOMID, APP2_IP, APP2_MAC, APP2_6)
    try:
        outcomes, seconds = _burst(walk, (walk.app, app2), servers[0], 25)
    finally:
        offline = walk.remove_app(app2, vif, xb)
    assert offline.returncode == 0, offline.stderr
    assert outcomes == ["refused"] * 50, {o: outcomes.count(o) for o in set(outcomes)}
    assert seconds < 1.0, f"the burst took {seconds:.2f} s"
    time.sleep(0.2)
    assert counters(walk, family) == 0, "a query to the refused family left the NetVM"
    # The other family still answers, and the counters do count.
    other = (R4_DNS1, R4_DNS2) if family == 6 else VDNS6
    assert walk.dns(walk.app, other[0])[0] is not None
    assert counters(walk, 4 if family == 6 else 6) >= 1


# 3 ---------------------------------------------------------------------------------

def _custom(walk):
    ns = walk.net.ns
    if walk.firewall == "nft":
        return [line.strip() for line in ns.out("nft list chain ip6 qubes custom-dnat-dns").splitlines()
                if "dport 53" in line]
    return [line for line in ns.out("ip6tables -t nat -S custom-dnat-dns").splitlines() if line.startswith("-A")]


def test_uplink_change_follows_and_the_users_chain_survives(walk, dual_uplink):
    ns, mine = walk.net.ns, "fd09:24ef:4179::a8b:99"
    if walk.firewall == "nft":
        ns.sh(f"nft add rule ip6 qubes custom-dnat-dns ip6 daddr {mine} udp dport 53 dnat to {DNS6_A}")
    else:
        ns.sh(f"ip6tables -t nat -A custom-dnat-dns -d {mine}/128 -p udp --dport 53 -j DNAT "
              f"--to-destination {DNS6_A}")
    before = _custom(walk)
    assert len(before) == 1, before
    for lines, v6_answers in (((V4_UP,), False), ((V4_UP, V6_UP), True)):
        assert use(walk, *lines).returncode == 0
        assert use(walk, *lines).returncode == 100
        assert _custom(walk) == before
        outcome = walk.dns(walk.app, VDNS6[1], aaaa=True, connected=True, timeout=1)[1]
        assert (outcome == ANSWER6[DNS6_A][1]) if v6_answers else (outcome == "refused"), outcome
    # The user's rule works: a third virtual address of the user's own.
    assert walk.dns(walk.proxy.ns, mine, aaaa=True)[1] == ANSWER6[DNS6_A][1]


# 4 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("/qubes-netvm-primary-dns6", "10.139.1.1"),
    ("/qubes-netvm-secondary-dns6", "fd09:24ef:4179::a8b:2 x"),
    ("/qubes-netvm-primary-dns6", "fd09:24ef:4179::a8b:1%eth0"),
    ("/qubes-netvm-secondary-dns6", "fd09:24ef:4179::a8b:\x1b[2J"),
    ("/qubes-netvm-primary-dns", "fd09:24ef:4179::a8b:1"),  # and the IPv4 key's like it
], ids=["ipv4-in-dns6", "trailing-word", "zone-index", "control", "ipv6-in-dns"])
def test_malformed_ipv6_keys_are_refused(netns, xen, tmp_path, backend, key, value):
    ns = netns.make("bad6")
    good = {"/qubes-netvm-primary-dns": R4_DNS1, "/qubes-netvm-secondary-dns": R4_DNS2,
            "/qubes-netvm-primary-dns6": VDNS6[0], "/qubes-netvm-secondary-dns6": VDNS6[1]}
    for k, v in {**good, key: value}.items():
        xen.qdb_write(k, v)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"{V4_UP}\n{V6_UP}\n")
    env = xen.env(QUBES_RESOLV_CONF=str(resolv), QUBES_FIREWALL_FLAG=str(tmp_path / "none"),
                  QUBES_NET_BACKEND=backend)
    result = run_cmd(ns, ["qubes-setup-dnat-to-ns"], env)
    assert result.returncode == 2, (result.returncode, result.stderr)  # bad input, as for IPv4
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "DNS" in lines[0] and "\x1b" not in lines[0], result.stderr
    assert "PR-QBS" not in ns.out("iptables-save") + ns.out("ip6tables-save")
    assert "qubes" not in ns.out("nft list tables")


# 5: --dry-run and --check cover both families ---------------------------------------

@pytest.fixture
def single(netns, xen, tmp_path, backend):
    """One providing VM with both families' virtual DNS addresses and a resolv.conf."""
    ns = netns.make("dns6")
    for k, v in {"/qubes-netvm-primary-dns": R4_DNS1, "/qubes-netvm-secondary-dns": R4_DNS2,
                 "/qubes-netvm-primary-dns6": VDNS6[0], "/qubes-netvm-secondary-dns6": VDNS6[1]}.items():
        xen.qdb_write(k, v)
    resolv = tmp_path / "resolv.conf"
    env = xen.env(QUBES_RESOLV_CONF=str(resolv), QUBES_FIREWALL_FLAG=str(tmp_path / "none"),
                  QUBES_NET_BACKEND=backend)

    class Single:
        def __init__(self):
            self.ns, self.resolv, self.env = ns, resolv, env

        def run(self, *args, **kwargs):
            return run_cmd(ns, ["qubes-setup-dnat-to-ns", *args], env, **kwargs)

        def state(self):
            text = ns.out("iptables-save; ip6tables-save; nft list ruleset; sysctl net.ipv4.icmp_ratemask "
                          "net.ipv6.icmp.ratemask")
            return "\n".join(line for line in text.splitlines() if not line.startswith("#"))

    return Single()


def test_dry_run_prints_both_families_and_does_them(single, backend):
    single.resolv.write_text(f"{V4_UP}\n")  # IPv6 refused: its ratemask changes too
    before = single.state()
    dry = single.run("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert single.state() == before
    if backend == "nft":
        assert "ip6 qubes dnat-dns" in dry.stdout and "ip qubes dnat-dns" in dry.stdout
    else:
        assert "iptables-restore" in dry.stdout and "ip6tables-restore" in dry.stdout
    assert "net.ipv6.icmp.ratemask=0,3-127" in dry.stdout and "icmp_ratemask" not in dry.stdout
    ok = run_cmd(single.ns, ["sh", "-e"], single.env, input=dry.stdout)
    assert ok.returncode == 0, ok.stderr
    assert single.run().returncode == 100  # the script did all of it
    assert single.run("--dry-run").returncode == 100


def test_check_reports_the_ipv6_rules(single, backend):
    single.resolv.write_text(f"{V4_UP}\n{V6_UP}\n")
    assert single.run().returncode == 0
    assert single.run("--check").returncode == 0
    if backend == "nft":
        handle = next(line.split("# handle ")[1] for line in single.ns.out(
            "nft -a list chain ip6 qubes dnat-dns").splitlines() if f"{VDNS6[1]} tcp dport 53" in line)
        single.ns.sh(f"nft delete rule ip6 qubes dnat-dns handle {handle}")
        expected = [f"DNS: ip6 qubes dnat-dns rule missing: ip6 daddr {VDNS6[1]} tcp dport 53 dnat to {DNS6_A}"]
    else:
        single.ns.sh(f"ip6tables -t nat -D PR-QBS -d {VDNS6[1]}/128 -p tcp -m tcp --dport 53 -j DNAT "
                     f"--to-destination {DNS6_A}")
        expected = [f"DNS: {VDNS6[1]} is DNATed to {DNS6_A} (udp only), should be {DNS6_A}"]
    check = single.run("--check")
    assert check.returncode == 1, check.stderr
    assert check.stdout.splitlines() == expected
    assert single.run().returncode == 0 and single.run("--check").returncode == 0


def test_the_seeds_mangle_guard_is_removed(single, backend):
    """An upgrade: the seed's always-present guard (mangle, DROP) would drop what a
    Qubes R4 ProxyVM DNATs to the same address; the first run removes it."""
    if backend == "nft":
        pytest.skip("the old guard was an iptables chain")
    single.ns.sh(f"iptables -t mangle -N QBS-DNS-GUARD && iptables -t mangle -A QBS-DNS-GUARD -d {R4_DNS1}/32 "
                 "-p udp -m udp --dport 53 -j DROP && iptables -t mangle -A FORWARD -j QBS-DNS-GUARD"
                 " && iptables -t mangle -A INPUT -j QBS-DNS-GUARD")
    single.resolv.write_text(f"{V4_UP}\n{V6_UP}\n")
    assert single.run("--check").returncode == 1  # the old chain is a difference to repair
    assert single.run().returncode == 0
    assert "QBS-DNS-GUARD" not in single.ns.out("iptables-save -t mangle")
    assert single.run().returncode == 100 and single.run("--check").returncode == 0


def test_init_after_the_dns_command_keeps_the_refusal_first(single, backend):
    """`init` inserts its base jumps after the DNS refusal, not above it, so a
    query with no upstream never meets the base ruleset's accept first."""
    if backend == "nft":
        pytest.skip("nft refuses in dnat-dns, before any filter chain")
    single.resolv.write_text("# no resolver\n")
    assert single.run().returncode == 0
    init = run_cmd(single.ns, ["vif-route-qubes", "init", "--backend", "iptables"], single.env)
    assert init.returncode == 0, init.stderr
    for tool in ("iptables", "ip6tables"):
        for builtin, user, base in (("INPUT", "custom-input", "QBS-BASE-INPUT"),
                                    ("FORWARD", "custom-forward", "QBS-BASE-FORWARD")):
            rules = [r for r in single.ns.out(f"{tool} -S {builtin}").splitlines() if r.startswith("-A")]
            assert rules == [f"-A {builtin} -j QBS-DNS-GUARD", f"-A {builtin} -j {user}",
                             f"-A {builtin} -j {base}"], (tool, rules)
    assert single.run().returncode == 100
