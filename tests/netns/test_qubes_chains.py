"""The chains others fill (issue 18 part 3, CONTRACT section 3): Qubes R4.1's
firewall daemon flushes and fills filter QBS-FORWARD, raw QBS-PREROUTING and
mangle QBS-POSTROUTING (iptables); the user has custom-input and
custom-forward (both backends).  `init` makes them, jumps to them, and no
command ever flushes them.

Topology:  app (10.137.7.27) --vif37.0--+
                                        proxy --eth0 192.0.2.2 -- eth0 upstream (192.0.2.1, 192.0.2.3)
           sib (10.137.7.28) --vif38.0--+
Datagrams are real; what arrives is told apart by its payload (upstream sees
the proxy's masqueraded address).  Every exchange ends with a datagram that
must arrive, so a missing one was dropped, not late.
"""

import re

import pytest

from netns import BIN, run_cmd, settled
from test_antispoof import PORT, exchange, no_rp_filter
from vif_route_qubes.plan import base_ipt
from vif_route_qubes.plan import ipt_text as ipt_state

GW = "10.137.7.1"
VM_IP, SIB_IP = "10.137.7.27", "10.137.7.28"
VM_MAC, SIB_MAC = "00:16:3e:5e:6c:19", "00:16:3e:5e:6c:1a"
UP_OPEN, UP_CLOSED = "192.0.2.1", "192.0.2.3"

# Rules of the shape R4.1's daemon writes: a chain per source address
# (accept what the VM may reach, reject the rest), jumped to from QBS-FORWARD
# by source; its raw and mangle chains (here rules that only count, to show
# they are consulted).
DAEMON = {
    "filter": ["-N qbs-10-137-7-27",
               f"-A qbs-10-137-7-27 -d {UP_OPEN}/32 -j ACCEPT",
               f"-A qbs-10-137-7-27 -d {SIB_IP}/32 -j ACCEPT",  # R4.1 would let this through; not ours
               "-A qbs-10-137-7-27 -j REJECT --reject-with icmp-host-prohibited",
               f"-A QBS-FORWARD -s {VM_IP}/32 -j qbs-10-137-7-27"],
    "raw": [f"-A QBS-PREROUTING -s {VM_IP}/32 -i vif37.0"],
    "mangle": [f"-A QBS-POSTROUTING -s {VM_IP}/32 -o eth0"],
}
DAEMON_CHAINS = {"filter": ("QBS-FORWARD", "qbs-10-137-7-27"), "raw": ("QBS-PREROUTING",),
                 "mangle": ("QBS-POSTROUTING",)}


def arrived(receiver, sends, end) -> set[str]:
    """Payloads that reach `receiver`: each (ns, src, dst, payload), then `end` (ns, src, dst),
    which must arrive (test_antispoof.exchange asserts it)."""
    return {payload for _, payload in exchange(receiver, sends, end)} - {"end"}


class Proxy:
    def __init__(self, netns, xen, backend):
        self.xen, self.backend = xen, backend
        self.ns, self.app, self.sib, self.up = (netns.make(role) for role in ("proxy", "app", "sib", "upst"))
        netns.vif(self.ns, self.app, "vif37.0", vm_mac=VM_MAC, vm_addrs=(VM_IP,), gateway=GW)
        netns.vif(self.ns, self.sib, "vif38.0", vm_mac=SIB_MAC, vm_addrs=(SIB_IP,), gateway=GW)
        netns.link(self.ns, "eth0", self.up, "eth0")
        self.ns.sh("ip addr add 192.0.2.2/24 dev eth0")
        self.up.sh(f"ip addr add {UP_OPEN}/24 dev eth0 && ip addr add {UP_CLOSED}/24 dev eth0")
        for ns in (self.ns, self.app, self.sib, self.up):
            no_rp_filter(ns)
        xen.qdb_write("/qubes-netvm-gateway", GW)
        xen.backend(37, ip=VM_IP, mac=VM_MAC)
        xen.backend(38, ip=SIB_IP, mac=SIB_MAC)
        self.resolv = xen.root / "resolv.conf"
        self.ok("vif-route-qubes", "init", "--backend", backend)
        self.hotplug("online", 37)
        self.hotplug("online", 38)

    def ok(self, *argv, **extra):
        env = self.xen.env(QUBES_NET_BACKEND=self.backend, QUBES_RESOLV_CONF=str(self.resolv),
                           QUBES_FIREWALL_FLAG=str(self.xen.root / "no-qubes-firewall"),
                           FAKE_SYSTEMCTL_LOG=str(self.xen.root / "systemctl"), **extra)
        result = run_cmd(self.ns, [str(BIN / argv[0]), *argv[1:]], env)
        assert result.returncode in (0, 100), f"{argv}: {result.stderr}"
        return result

    def hotplug(self, command, domid):
        return self.ok("vif-route-qubes", command, "type_if=vif", vif=f"vif{domid}.0",
                       XENBUS_PATH=f"/local/domain/0/backend/vif/{domid}/0")

    def dns(self, *resolvers):
        self.resolv.write_text("".join(f"nameserver {r}\n" for r in resolvers) or "# none\n")
        return self.ok("qubes-setup-dnat-to-ns", "--dns1", "10.139.1.1", "--dns2", "10.139.1.2")

    def to_upstream(self) -> set[str]:
        sends = [(vm, src, dst, f"{name}->{dst}") for vm, src, name in ((self.app, VM_IP, "app"),
                                                                      (self.sib, SIB_IP, "sib"))
                 for dst in (UP_OPEN, UP_CLOSED)]
        return arrived(self.up, sends, end=(self.ns, "192.0.2.2", UP_OPEN))


def daemon_rules(ns) -> dict[str, list[str]]:
    """The daemon's chains' rules as iptables-save prints them, per table."""
    found = {}
    for name, chains in DAEMON_CHAINS.items():
        saved = ns.out(f"iptables-save -t {name}").splitlines()
        found[name] = [line for line in saved if line.split(" ")[:2] in [["-A", c] for c in chains]]
    return found


def counted(ns, table, chain) -> int:
    listing = ns.out(f"iptables -t {table} -L {chain} -n -v -x")
    return sum(int(line.split()[0]) for line in listing.splitlines()[2:] if line.strip())


# -- iptables: what init makes --------------------------------------------------------

def test_init_makes_the_daemons_and_the_users_chains_in_place(netns, xen, vifcmd):
    proxy = netns.make("proxy")
    env = xen.env(QUBES_NET_BACKEND="iptables")
    assert run_cmd(proxy, [vifcmd, "init"], env).returncode == 0
    for tool in ("iptables-save", "ip6tables-save"):
        raw, mangle, filt = (proxy.out(f"{tool} -t {t}") for t in ("raw", "mangle", "filter"))
        pre = re.findall(r"^-A PREROUTING .*$", raw, re.M)
        assert pre == ['-A PREROUTING -m comment --comment "qubes base" -j QBS-ANTISPOOF',
                       "-A PREROUTING -j QBS-PREROUTING"], tool  # after the anti-spoofing
        assert re.findall(r"^-A POSTROUTING .*$", mangle, re.M) == ["-A POSTROUTING -j QBS-POSTROUTING"]
        assert re.findall(r"^-A INPUT .*$", filt, re.M) == ["-A INPUT -j custom-input", "-A INPUT -j QBS-BASE-INPUT"]
        assert re.findall(r"^-A FORWARD .*$", filt, re.M) == ["-A FORWARD -j custom-forward",
                                                             "-A FORWARD -j QBS-BASE-FORWARD"]
        for chain in ("QBS-FORWARD", "custom-input", "custom-forward"):
            assert f":{chain} - [0:0]" in filt
    forward = re.findall(r"^-A QBS-BASE-FORWARD .*$", proxy.out("iptables-save -t filter"), re.M)
    # The daemon's QBS-FORWARD only after the vif-to-vif drop.
    assert forward.index("-A QBS-BASE-FORWARD -i vif+ -o vif+ -j DROP") < \
        forward.index("-A QBS-BASE-FORWARD -i vif+ -j QBS-FORWARD")
    once = settled(proxy)
    assert run_cmd(proxy, [vifcmd, "init"], env).returncode == 0
    assert settled(proxy) == once


def _saved(*lines):
    chains = {line.split(" ")[1] for line in lines} | {"INPUT", "FORWARD", "PREROUTING", "POSTROUTING"}
    return ipt_state.TableState(frozenset(chains), tuple((c, tuple(ln for ln in lines if ln.split(" ")[1] == c))
                                                         for c in sorted(chains)))


def test_init_over_the_older_base_only_adds_the_user_jumps_first():
    """A VM whose base an older `init` made: the user's chains go before ours."""
    filt = _saved("-A INPUT -j QBS-BASE-INPUT", "-A FORWARD -j QBS-BASE-FORWARD",
                  "-A FORWARD -i eth9 -j ACCEPT")
    out = base_ipt._filter(filt._replace(chains=filt.chains | {"QBS-INPUT", "QBS-FORWARD"}), 4, True)
    assert [line for line in out if line.startswith(("-I", "-D"))] == ["-I INPUT 1 -j custom-input",
                                                                       "-I FORWARD 1 -j custom-forward"]


def test_a_misplaced_jump_is_moved_after_the_users():
    state = _saved("-A FORWARD -j QBS-BASE-FORWARD", "-A FORWARD -i eth9 -j ACCEPT",
                   "-A FORWARD -j custom-forward", "-A FORWARD -j custom-forward")
    assert base_ipt.ensure_jumps(state, "FORWARD", ("-A FORWARD -j custom-forward",
                                                    "-A FORWARD -j QBS-BASE-FORWARD")) == [
        "-D FORWARD -j custom-forward", "-D FORWARD -j QBS-BASE-FORWARD", "-I FORWARD 3 -j QBS-BASE-FORWARD"]


# -- iptables: the daemon's rules work and survive every command -----------------------

def test_firewall_daemon_rules_enforce_and_survive_every_command(netns, xen):
    proxy = Proxy(netns, xen, "iptables")
    for table, lines in DAEMON.items():
        for line in lines:
            proxy.ns.sh(f"iptables -t {table} {line}")
    written = daemon_rules(proxy.ns)
    assert all(written.values()), written

    def enforced():
        assert proxy.to_upstream() == {f"app->{UP_OPEN}", f"sib->{UP_OPEN}", f"sib->{UP_CLOSED}"}

    enforced()
    assert between_vms(proxy) == set()  # QBS-FORWARD comes after the vif-to-vif drop
    assert counted(proxy.ns, "raw", "QBS-PREROUTING") > 0 and counted(proxy.ns, "mangle", "QBS-POSTROUTING") > 0

    xen.backend(39, ip="10.137.7.39", mac=VM_MAC)
    netns.vif(proxy.ns, netns.make("third"), "vif39.0", vm_addrs=("10.137.7.39",), gateway=GW)
    steps = [("init", lambda: proxy.ok("vif-route-qubes", "init", "--backend", "iptables")),
             ("online again", lambda: proxy.hotplug("online", 37)),
             ("another vif online", lambda: proxy.hotplug("online", 39)),
             ("another vif offline", lambda: proxy.hotplug("offline", 39)),
             ("sibling offline", lambda: proxy.hotplug("offline", 38)),
             ("sibling online", lambda: proxy.hotplug("online", 38)),
             ("dns, two resolvers", lambda: proxy.dns("203.0.113.53", "203.0.113.54")),
             ("dns, one resolver", lambda: proxy.dns("203.0.113.53")),
             ("dns, no resolver", lambda: proxy.dns()),
             ("dns, back", lambda: proxy.dns("203.0.113.54"))]
    for what, step in steps:
        step()
        assert daemon_rules(proxy.ns) == written, f"after {what}"
    assert "-A PR-QBS -d 10.139.1.1/32" in proxy.ns.out("iptables-save -t nat")  # the DNS steps did act
    enforced()


def test_without_the_daemons_rules_the_vm_reaches_both(netns, xen):
    """Control: the rejection above is the daemon's rules' doing."""
    proxy = Proxy(netns, xen, "iptables")
    assert proxy.to_upstream() == {f"{vm}->{dst}" for vm in ("app", "sib") for dst in (UP_OPEN, UP_CLOSED)}


# -- both backends: the user's chains ----------------------------------------------------

USER_FORWARD = {"iptables": "iptables -A custom-forward -i vif37.0 -o vif38.0 -j ACCEPT",
                "nft": 'nft add rule ip qubes custom-forward iifname "vif37.0" oifname "vif38.0" accept'}
USER_INPUT = {"iptables": f"iptables -A custom-input -i vif37.0 -p udp --dport {PORT} -j ACCEPT",
              "nft": f'nft add rule ip qubes custom-input iifname "vif37.0" udp dport {PORT} accept'}


def between_vms(proxy) -> set[str]:
    to_sib = arrived(proxy.sib, [(proxy.app, VM_IP, SIB_IP, "app->sib")], end=(proxy.ns, GW, SIB_IP))
    to_app = arrived(proxy.app, [(proxy.sib, SIB_IP, VM_IP, "sib->app")], end=(proxy.ns, GW, VM_IP))
    return to_sib | to_app


def to_proxy(proxy) -> set[str]:
    return arrived(proxy.ns, [(proxy.app, VM_IP, GW, "app->proxy"), (proxy.sib, SIB_IP, GW, "sib->proxy")],
                   end=(proxy.ns, "192.0.2.2", GW))


def test_a_users_accept_in_custom_forward_lets_one_vm_reach_another(netns, xen, backend):
    proxy = Proxy(netns, xen, backend)
    assert between_vms(proxy) == set()  # isolated by default
    proxy.ns.sh(USER_FORWARD[backend])
    assert between_vms(proxy) == {"app->sib"}  # exactly what the rule says
    proxy.ok("vif-route-qubes", "init", "--backend", backend)
    proxy.hotplug("online", 37)
    proxy.dns("203.0.113.53")
    assert between_vms(proxy) == {"app->sib"}


def test_a_users_accept_in_custom_input_opens_a_port_of_the_proxy(netns, xen, backend):
    proxy = Proxy(netns, xen, backend)
    assert to_proxy(proxy) == set()  # rejected (host-prohibited) by default
    proxy.ns.sh(USER_INPUT[backend])
    assert to_proxy(proxy) == {"app->proxy"}
    proxy.ok("vif-route-qubes", "init", "--backend", backend)
    assert to_proxy(proxy) == {"app->proxy"}


@pytest.mark.parametrize("table", ["raw", "mangle"])
def test_init_never_flushes_the_daemons_raw_and_mangle_chains(netns, xen, vifcmd, table):
    proxy = netns.make("proxy")
    env = xen.env(QUBES_NET_BACKEND="iptables")
    assert run_cmd(proxy, [vifcmd, "init"], env).returncode == 0
    chain = DAEMON_CHAINS[table][0]
    proxy.sh(f"iptables -t {table} -A {chain} -s 10.137.7.99/32 -j DROP")
    assert run_cmd(proxy, [vifcmd, "init"], env).returncode == 0
    assert f"-A {chain} -s 10.137.7.99/32 -j DROP" in proxy.out(f"iptables-save -t {table}")


def test_init_dry_run_script_makes_the_same_rules(netns, xen, vifcmd):
    real, twin = netns.make("real"), netns.make("twin")
    env = xen.env(QUBES_NET_BACKEND="iptables")
    dry = run_cmd(twin, [vifcmd, "init", "--dry-run"], env)
    assert dry.returncode == 0 and "-I FORWARD 1 -j custom-forward" in dry.stdout, dry.stderr
    assert "QBS" not in twin.out("iptables-save")  # the dry run changed nothing
    assert run_cmd(real, [vifcmd, "init"], env).returncode == 0
    assert run_cmd(twin, ["sh", "-e"], env, input=dry.stdout).returncode == 0
    for tool in ("iptables-save", "ip6tables-save"):
        made, scripted = ([line for line in ns.out(tool).splitlines() if not line.startswith("#")]
                          for ns in (real, twin))
        assert "-A FORWARD -j custom-forward" in made and scripted == made, tool
