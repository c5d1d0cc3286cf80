"""`--dry-run` (CONTRACT section 5): it changes nothing, and the script it prints,
run by `sh` in an identical twin namespace pair, leaves the same state as the
real run."""


from firewall import antispoof_sources
from netns import XenEnv, comparable, run_cmd, settled, state_of

VM_MAC = "00:16:3e:5e:6c:19"
ADDRS = ("10.137.7.27", "10.137.7.28", "fd09:24ef:4179::a89:71b")
GW = "10.137.7.1"
GW6 = "fd09:24ef:4179::a89:1"
CONF = ("/proc/sys/net/ipv4/conf/vif37.0/", "/proc/sys/net/ipv6/conf/vif37.0/")


def build_pair(netns, xen):
    """A ProxyVM with vif37.0 towards a dual-stack AppVM; returns (proxy, XENBUS_PATH).
    The raw tables exist already (iptables-nft creates a table on first use)."""
    proxy = netns.make("proxy")
    proxy.sh("for t in iptables ip6tables; do $t -t raw -N PRIME && $t -t raw -X PRIME; done")
    vm = netns.make("app")
    netns.vif(proxy, vm, "vif37.0", vm_mac=VM_MAC, vm_addrs=ADDRS, gateway=GW)
    path = xen.backend(37, ip=" ".join(ADDRS), mac=VM_MAC)
    xen.qdb_write("/qubes-netvm-gateway", GW)
    xen.qdb_write("/qubes-netvm-gateway6", GW6)
    xen.qdb_write("/qubes-service/harden-network-interfaces", "1")
    return proxy, path


def twins(netns, xen, tmp_path):
    """Two identical pairs, each with its own (identical) xenstore and qubesdb."""
    xen_b = XenEnv(tmp_path / "twin")
    proxy_a, path = build_pair(netns, xen)
    proxy_b, _ = build_pair(netns, xen_b)
    return (proxy_a, xen), (proxy_b, xen_b), path


# What applies the anti-spoofing rules, in the printed script.
RULES_TOOLS = {"iptables": ("iptables-restore", "ip6tables-restore"), "nft": ("nft -f -",)}


def vifcall(proxy, xen, vifcmd, backend, command, path, *options):
    env = xen.env(vif="vif37.0", XENBUS_PATH=path, QUBES_NET_BACKEND=backend)
    result = run_cmd(proxy, [vifcmd, command, *options, "type_if=vif"], env)
    assert result.returncode == 0, result.stderr
    return result




def sysctls(ns):
    """Every readable value of the vif's IPv4 and IPv6 conf folders."""
    return ns.sh(f"grep -rs . {' '.join(CONF)}", check=False).stdout


def dry_run(proxy, xen, vifcmd, backend, command, path):
    """Run --dry-run, check it changed nothing, return the script it printed."""
    before, conf_before = settled(proxy), sysctls(proxy)
    status_before = xen.xs_read(f"{path}/hotplug-status")
    script = vifcall(proxy, xen, vifcmd, backend, command, path, "--dry-run").stdout
    assert script.startswith("#!/bin/sh\n")
    assert state_of(proxy) == before
    assert sysctls(proxy) == conf_before
    assert xen.xs_read(f"{path}/hotplug-status") == status_before
    return script


def run_script(proxy, xen, script):
    """The printed script, run by sh as root in the twin, with the same env
    (so xenstore-write reaches the twin's stand-in xenstore)."""
    result = run_cmd(proxy, ["sh", "-e"], xen.env(), input=script)
    assert result.returncode == 0, f"{result.stderr}\n--- script ---\n{script}"


def assert_twins_equal(proxy_a, proxy_b):
    assert comparable(settled(proxy_b)) == comparable(settled(proxy_a))
    assert sysctls(proxy_b) == sysctls(proxy_a)


def test_dry_run_online_script_makes_the_same_state(netns, xen, vifcmd, backend, tmp_path):
    (proxy_a, xen_a), (proxy_b, xen_b), path = twins(netns, xen, tmp_path)
    script = dry_run(proxy_b, xen_b, vifcmd, backend, "online", path)
    # The script says, in shell, what online does (not only comments).
    assert all(tool in script for tool in RULES_TOOLS[backend])
    assert "ip route replace 10.137.7.28/32 dev vif37.0 metric 32715" in script
    # Anti-spoofing before the link is up (nft: the elements, then the vif's group).
    up = script.index("ip link set dev vif37.0 up")
    assert all(script.index(tool) < up for tool in RULES_TOOLS[backend])
    if backend == "nft":
        assert script.index("nft -f -") < script.index("ip link set dev vif37.0 group 2\n") < up

    vifcall(proxy_a, xen_a, vifcmd, backend, "online", path)
    run_script(proxy_b, xen_b, script)

    assert_twins_equal(proxy_a, proxy_b)
    # The comparison covers what online is for, in both twins.
    state = settled(proxy_b)
    assert antispoof_sources(proxy_b, backend, "vif37.0") == set(ADDRS)
    assert "fd09:24ef:4179::a89:71b dev vif37.0 metric 32715" in state
    assert f"inet6 {GW6}/128 scope global" in state
    assert "10.137.7.28 dev vif37.0 lladdr 00:16:3e:5e:6c:19 PERMANENT" in state
    conf = sysctls(proxy_b)
    for line in ("ipv4/conf/vif37.0/proxy_arp:1", "ipv6/conf/vif37.0/proxy_ndp:1",
                 "ipv4/conf/vif37.0/send_redirects:0", "ipv6/conf/vif37.0/accept_ra:0"):
        assert f"/proc/sys/net/{line}\n" in conf
    assert xen_b.xs_read(f"{path}/hotplug-status") == xen_a.xs_read(f"{path}/hotplug-status") == "connected"


def test_dry_run_offline_script_makes_the_same_state(netns, xen, vifcmd, backend, tmp_path):
    (proxy_a, xen_a), (proxy_b, xen_b), path = twins(netns, xen, tmp_path)
    before = comparable(settled(proxy_a))
    vifcall(proxy_a, xen_a, vifcmd, backend, "online", path)
    vifcall(proxy_b, xen_b, vifcmd, backend, "online", path)
    script = dry_run(proxy_b, xen_b, vifcmd, backend, "offline", path)
    assert "vif37.0" in script and all(tool in script for tool in RULES_TOOLS[backend])

    vifcall(proxy_a, xen_a, vifcmd, backend, "offline", path)
    run_script(proxy_b, xen_b, script)

    assert_twins_equal(proxy_a, proxy_b)
    assert comparable(settled(proxy_b)) == before
    assert "/proc/sys/net/ipv4/conf/vif37.0/proxy_arp:0\n" in sysctls(proxy_b)


def test_dry_run_of_online_twice_is_a_no_op_script(netns, xen, vifcmd, backend):
    """Once online, a dry run shows nothing left to change in the rules: its
    script, run again, leaves the state as it is."""
    proxy, path = build_pair(netns, xen)
    vifcall(proxy, xen, vifcmd, backend, "online", path)
    before = settled(proxy)
    script = dry_run(proxy, xen, vifcmd, backend, "online", path)
    assert not any(tool in script for tool in RULES_TOOLS[backend])
    run_script(proxy, xen, script)
    assert settled(proxy) == before
