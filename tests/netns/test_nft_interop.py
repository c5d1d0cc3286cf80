"""The nft backend beside Qubes' own tables and the user's rules (CONTRACT
sections 1 to 3 with --backend nft).

QUBES_BASE below is a base written for these tests in the shape of Qubes R4.2:
tables ip/ip6 qubes with the sets `allowed` and `downstream` and the chains
prerouting (raw), antispoof, postrouting, input, forward, custom-input,
custom-forward and, in ip, dnat-dns.  Its rules deliberately differ from the
ones `init` would write (an input policy of drop, an `invalid` drop...), so
that a command that rewrote what it found would show.  Rulesets are compared
as `nft -j -s list ruleset` (the stateless listing, as JSON), set elements
apart from everything else.
"""

import json
import shlex

import pytest

from firewall import antispoof_sources, link_group, nft_stand_in
from netns import BIN, run_cmd

VM_MAC = "00:16:3e:5e:6c:19"
GW = "10.137.7.1"
V6 = "fd09:24ef:4179::a89:71b"
DNS1, DNS2 = "10.139.1.1", "10.139.1.2"
RESOLVER_A, RESOLVER_B = "203.0.113.53", "203.0.113.54"
USER_RULE = "ip daddr 198.51.100.7 drop"

QUBES_BASE = """
table ip qubes {
    set downstream { type ipv4_addr; }
    set allowed { type ifname . ipv4_addr; }
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        ip saddr @downstream counter drop
    }
    chain antispoof {
        iifname . ip saddr @allowed accept
        counter drop
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifgroup 2 accept
        oifname "lo" accept
        masquerade
    }
    chain custom-input {
    }
    chain custom-forward {
    }
    chain input {
        type filter hook input priority filter; policy drop;
        jump custom-input
        ct state invalid counter drop
        iifgroup 2 udp dport 67 counter drop
        ct state established,related accept
        iifgroup 2 meta l4proto icmp accept
        iifname "lo" accept
        iifgroup 2 counter reject with icmp host-prohibited
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        jump custom-forward
        ct state invalid counter drop
        ct state established,related accept
        iifgroup 2 oifgroup 2 counter drop
        oifgroup 2 counter drop
    }
    chain dnat-dns {
        type nat hook prerouting priority dstnat; policy accept;
    }
}
table ip6 qubes {
    set downstream { type ipv6_addr; }
    set allowed { type ifname . ipv6_addr; }
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        ip6 saddr @downstream counter drop
    }
    chain antispoof {
        iifname . ip6 saddr @allowed accept
        counter drop
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifgroup 2 accept
        oifname "lo" accept
        masquerade
    }
    chain custom-input {
    }
    chain custom-forward {
    }
    chain input {
        type filter hook input priority filter; policy drop;
        jump custom-input
        ct state invalid counter drop
        ct state established,related accept
        iifgroup 2 meta l4proto ipv6-icmp accept
        iifname "lo" accept
        iifgroup 2 counter reject with icmpv6 admin-prohibited
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        jump custom-forward
        ct state invalid counter drop
        ct state established,related accept
        iifgroup 2 oifgroup 2 counter drop
        oifgroup 2 counter drop
    }
}
"""


# -- helpers ----------------------------------------------------------------------

def load(ns, script):
    ns.sh(f"nft -f - <<'EOF'\n{script}\nEOF")


def ruleset(ns):
    """(everything but set elements, the set elements as (family, set, element))."""
    rest, elements = [], set()
    for item in json.loads(ns.out("nft -j -s list ruleset"))["nftables"]:
        kind, body = next(iter(item.items()))
        if kind == "set":
            for elem in body.pop("elem", []):
                elements.add((body["family"], body["name"], tuple(elem["concat"]) if "concat" in elem else elem))
        rest.append(item)
    return rest, elements


def shape(ns):
    """Tables, sets (with their types) and chains (with type, hook and priority) of ours."""
    found = set()
    for item in ruleset(ns)[0]:
        kind, body = next(iter(item.items()))
        if kind == "table" and body["name"] == "qubes":
            found.add((body["family"], "table"))
        elif kind == "set" and body["table"] == "qubes":
            found.add((body["family"], "set", body["name"], json.dumps(body["type"])))
        elif kind == "chain" and body["table"] == "qubes":
            found.add((body["family"], "chain", body["name"], body.get("type"), body.get("hook"), body.get("prio")))
    return found


def elements_of(vif, *addrs):
    out = set()
    for addr in addrs:
        family = "ip6" if ":" in addr else "ip"
        out |= {(family, "allowed", (vif, addr)), (family, "downstream", addr)}
    return out


def chain_rules(ns, chain, family="ip"):
    lines = [line.strip() for line in ns.out(f"nft -s list chain {family} qubes {chain}").splitlines()]
    return [line for line in lines if line and not line.startswith(("table ", "chain ", "type ", "}"))]


class Provider:
    """A network-providing VM's namespace and the commands run in it."""

    def __init__(self, netns, xen, base):
        self.netns, self.xen = netns, xen
        self.ns = netns.make("proxy")
        self.resolv = xen.root / "resolv.conf"
        xen.qdb_write("/qubes-netvm-gateway", GW)
        xen.qdb_write("/qubes-netvm-primary-dns", DNS1)
        xen.qdb_write("/qubes-netvm-secondary-dns", DNS2)
        if base == "qubes":
            load(self.ns, QUBES_BASE)
        elif base == "init":
            assert self.init().returncode == 0

    def env(self, backend="nft", **extra):
        if backend:
            extra["QUBES_NET_BACKEND"] = backend
        return self.xen.env(QUBES_RESOLV_CONF=str(self.resolv), FAKE_SYSTEMCTL_LOG=str(self.xen.root / "systemctl"),
                            QUBES_FIREWALL_FLAG=str(self.xen.root / "no-qubes-firewall"), **extra)

    def run(self, *argv, backend="nft", **extra):
        return run_cmd(self.ns, [*argv], self.env(backend, **extra))

    def init(self, backend="nft"):
        return self.run(str(BIN / "vif-route-qubes"), "init", backend=backend)

    def add_vm(self, domid, *addrs):
        vif = f"vif{domid}.0"
        self.netns.vif(self.ns, self.netns.make("app"), vif, vm_mac=VM_MAC, vm_addrs=addrs, gateway=GW)
        self.xen.backend(domid, ip=" ".join(addrs), mac=VM_MAC)
        return vif

    def hotplug(self, command, vif, backend="nft", **extra):
        domid = vif[3:].split(".")[0]
        return self.run(str(BIN / "vif-route-qubes"), command, "type_if=vif", backend=backend, vif=vif,
                        XENBUS_PATH=f"/local/domain/0/backend/vif/{domid}/0", **extra)

    def dnat(self, *resolvers, args=(), backend="nft"):
        self.resolv.write_text("".join(f"nameserver {r}\n" for r in resolvers) or "# no resolver\n")
        return self.run(str(BIN / "qubes-setup-dnat-to-ns"), *args, backend=backend)

    def xs(self, vif, key):
        return self.xen.xs_read(f"/local/domain/0/backend/vif/{vif[3:].split('.')[0]}/0/{key}")


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def qubes(netns, xen):
    """A ProxyVM with the Qubes-shaped base."""
    return Provider(netns, xen, "qubes")


# -- (a) init and the Qubes base ----------------------------------------------

@pytest.mark.parametrize("gateway6", [None, "fd09:24ef:4179::a89:1"], ids=["ipv4", "ipv6-routed"])
def test_init_on_the_qubes_base_changes_nothing(netns, xen, gateway6):
    if gateway6:
        xen.qdb_write("/qubes-netvm-gateway6", gateway6)
    proxy = Provider(netns, xen, "qubes")
    before = proxy.ns.out("nft -s list ruleset")
    ok(proxy.init())
    ok(proxy.init())
    assert proxy.ns.out("nft -s list ruleset") == before
    assert proxy.ns.out("cat /proc/sys/net/ipv4/ip_forward").strip() == "1"


def test_init_on_an_empty_namespace_makes_the_qubes_shape(netns, xen):
    fresh = Provider(netns, xen, None)
    assert not fresh.ns.out("nft list tables").strip()
    ok(fresh.init())
    reference = netns.make("qubes")
    load(reference, QUBES_BASE)
    assert shape(fresh.ns) == shape(reference)
    assert ("ip", "chain", "dnat-dns", "nat", "prerouting", -100) in shape(fresh.ns)
    assert ("ip6", "set", "allowed", '["ifname", "ipv6_addr"]') in shape(fresh.ns)


def test_init_dry_run_script_makes_the_same_ruleset(netns, xen):
    real, twin = Provider(netns, xen, None), Provider(netns, xen, None)
    dry = twin.run(str(BIN / "vif-route-qubes"), "init", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("nft -f -") == 1, dry.stderr
    assert not twin.ns.out("nft list tables").strip()  # the dry run changed nothing
    ok(real.init())
    ok(run_cmd(twin.ns, ["sh", "-e"], twin.env(), input=dry.stdout))
    assert twin.ns.out("nft -s list ruleset") == real.ns.out("nft -s list ruleset")
    assert twin.ns.out("cat /proc/sys/net/ipv4/ip_forward") == "1\n"


# -- (b) per-vif events change their elements and group, nothing else -----------

@pytest.mark.parametrize("base", ["qubes", "init", None], ids=["qubes-base", "after-init", "no-table"])
def test_online_and_offline_change_only_their_own_elements(netns, xen, base):
    proxy = Provider(netns, xen, base)
    other = proxy.add_vm(38, "10.137.7.38")  # IPv4 only: its IPv6 is all dropped
    vif = proxy.add_vm(37, "10.137.7.27", V6)
    ok(proxy.hotplug("online", other))
    rest, elements = ruleset(proxy.ns)
    assert elements == elements_of(other, "10.137.7.38")
    assert link_group(proxy.ns, vif) == "default"

    ok(proxy.hotplug("online", vif))
    assert ruleset(proxy.ns) == (rest, elements | elements_of(vif, "10.137.7.27", V6))
    assert link_group(proxy.ns, vif) == "2" and link_group(proxy.ns, other) == "2"

    ok(proxy.hotplug("offline", vif))
    assert ruleset(proxy.ns) == (rest, elements)  # the other vif's elements (and tables) stay
    assert link_group(proxy.ns, vif) == "default"
    assert antispoof_sources(proxy.ns, "nft", other) == {"10.137.7.38"}


# -- (c) the user's rules survive every command ------------------------------------

@pytest.mark.parametrize("base", ["qubes", "init"], ids=["qubes-base", "after-init"])
def test_user_rule_in_custom_forward_survives_every_command(netns, xen, base):
    proxy = Provider(netns, xen, base)
    proxy.ns.sh(f"nft add rule ip qubes custom-forward {USER_RULE}")
    vif = proxy.add_vm(37, "10.137.7.27", V6)
    steps = [("init", proxy.init), ("online", lambda: proxy.hotplug("online", vif)),
             ("dns with upstream", lambda: proxy.dnat(RESOLVER_A)),
             ("dns without upstream", lambda: proxy.dnat()),
             ("offline", lambda: proxy.hotplug("offline", vif))]
    for what, step in steps:
        ok(step())
        assert chain_rules(proxy.ns, "custom-forward") == [USER_RULE], f"after {what}"
    assert chain_rules(proxy.ns, "custom-forward", "ip6") == []


# -- (d) one transaction per event --------------------------------------------------

def test_a_failed_transaction_applies_nothing_and_the_link_stays_down(netns, xen):
    """The ip6 `allowed` set is full (size 1, another vif's element): the kernel
    refuses the ip6 element after it took the ip ones in the same transaction
    (one netlink batch: the tables exist, so the event changes elements only)."""
    qubes = Provider(netns, xen, None)
    full = 'set allowed { type ifname . ipv6_addr; size 1; elements = { "vif38.0" . fd09:24ef:4179::a89:38 }; }'
    load(qubes.ns, QUBES_BASE.replace("set allowed { type ifname . ipv6_addr; }", full))
    vif = qubes.add_vm(37, "10.137.7.27", V6)
    before = ruleset(qubes.ns)

    result = qubes.hotplug("online", vif)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and vif in result.stderr
    assert "nftables: add element ip qubes allowed" in result.stderr  # the transaction, as nft -f input
    assert "add element ip6 qubes allowed" in result.stderr and "Too many open files" in result.stderr  # ENFILE
    assert ruleset(qubes.ns) == before  # not even the ip elements
    assert "UP" not in qubes.ns.out(f"ip link show dev {vif}").split(">")[0]
    assert link_group(qubes.ns, vif) == "default"
    assert qubes.xs(vif, "hotplug-status") == "error"


def failing_nft(tmp_path, message: str):
    """A folder (to go first on PATH) with an `nft` that reads as usual and fails
    every `nft -f` with `message`."""
    fake = tmp_path / "failing-nft"
    fake.mkdir()
    (fake / "nft").write_text(f"#!/bin/sh\n{nft_stand_in(f'echo {shlex.quote(message)} >&2; exit 1')}\n")
    (fake / "nft").chmod(0o755)
    return fake


@pytest.mark.parametrize("base", [None], ids=["no-table"])
def test_nft_refusing_the_transaction_leaves_everything_as_it_was(netns, xen, tmp_path, base):
    """An `nft` that reads as usual but fails every `nft -f` (as a kernel without
    nf_tables would), put first on PATH.  Without the tables the event runs
    `nft -f` (it creates them); with them it changes elements over netlink,
    whose refusal the test above makes the kernel's."""
    proxy = Provider(netns, xen, base)
    fake = failing_nft(tmp_path, "Error: Could not process rule: Operation not supported")
    vif = proxy.add_vm(37, "10.137.7.27")
    before = proxy.ns.out("nft -s list ruleset")
    path = f"{fake}:{proxy.env()['PATH']}"

    result = proxy.hotplug("online", vif, PATH=path)
    assert result.returncode == 1 and "Operation not supported" in result.stderr
    assert proxy.ns.out("nft -s list ruleset") == before
    assert "UP" not in proxy.ns.out(f"ip link show dev {vif}").split(">")[0]
    assert link_group(proxy.ns, vif) == "default"
    assert proxy.xs(vif, "hotplug-status") == "error"


def test_with_the_tables_an_event_changes_elements_without_the_nft_program(netns, xen, tmp_path):
    """With Qubes' tables in place, online and offline change the set elements over
    netlink: an `nft` first on PATH that fails every `nft -f` changes nothing."""
    proxy = Provider(netns, xen, "qubes")
    fake = failing_nft(tmp_path, "Error: nft -f ran")
    vif = proxy.add_vm(37, "10.137.7.27")
    path = f"{fake}:{proxy.env()['PATH']}"
    ok(proxy.hotplug("online", vif, PATH=path))
    assert antispoof_sources(proxy.ns, "nft", vif) == {"10.137.7.27"}
    assert "10.137.7.27" in proxy.ns.out("nft list set ip qubes downstream")
    ok(proxy.hotplug("offline", vif, PATH=path))
    for name in ("allowed", "downstream"):
        assert "10.137.7.27" not in proxy.ns.out(f"nft list set ip qubes {name}"), name


# -- (e) auto detection --------------------------------------------------------------

def test_auto_without_the_qubes_table_uses_iptables(netns, xen):
    proxy = Provider(netns, xen, None)
    vif = proxy.add_vm(37, "10.137.7.27")
    ok(proxy.hotplug("online", vif, backend=None))
    assert antispoof_sources(proxy.ns, "iptables", vif) == {"10.137.7.27"}
    assert "qubes" not in proxy.ns.out("nft list tables")
    ok(proxy.dnat(RESOLVER_A, backend=None))
    assert "-A PR-QBS -d 10.139.1.1/32 -p udp" in proxy.ns.out("iptables-save -t nat")
    assert "qubes" not in proxy.ns.out("nft list tables")


@pytest.mark.parametrize("base", ["qubes", "init"], ids=["qubes-base", "after-init"])
@pytest.mark.parametrize("auto", [None, "auto"], ids=["unset", "auto"])
def test_auto_with_the_qubes_table_uses_nft(netns, xen, base, auto):
    proxy = Provider(netns, xen, base)
    vif = proxy.add_vm(37, "10.137.7.27")
    ok(proxy.hotplug("online", vif, backend=auto))
    assert antispoof_sources(proxy.ns, "nft", vif) == {"10.137.7.27"}
    ok(proxy.dnat(RESOLVER_A, backend=auto))
    assert chain_rules(proxy.ns, "dnat-dns")[1] == f"ip daddr {DNS1} udp dport 53 dnat to {RESOLVER_A}"
    ok(proxy.hotplug("offline", vif, backend=auto))
    assert "QBS" not in proxy.ns.out("iptables-save") + proxy.ns.out("ip6tables-save")
    assert link_group(proxy.ns, vif) == "default" and not ruleset(proxy.ns)[1]


# -- (f) the DNS rules ---------------------------------------------------------------

def dnat_rules(*pairs):
    """The user's chain first, then each pair's udp and tcp rules ("refuse": udp
    port unreachable, tcp reset)."""
    def target(value, proto):
        return value if value != "refuse" else ("reject" if proto == "udp" else "reject with tcp reset")
    return ["jump custom-dnat-dns"] + [f"ip daddr {virtual} {proto} dport 53 {target(t, proto)}"
                                       for virtual, t in pairs for proto in ("udp", "tcp")]


def test_dns_rules_are_replaced_in_dnat_dns_and_unchanged_is_100(qubes):
    ok(qubes.dnat(RESOLVER_A))
    assert chain_rules(qubes.ns, "dnat-dns") == dnat_rules((DNS1, f"dnat to {RESOLVER_A}"),
                                                          (DNS2, f"dnat to {RESOLVER_A}"))
    state = ruleset(qubes.ns)
    again = qubes.dnat(RESOLVER_A)
    assert again.returncode == 100, again.stderr
    assert ruleset(qubes.ns) == state

    others = [item for item in state[0] if "dnat-dns" not in json.dumps(item)]
    ok(qubes.dnat(RESOLVER_A, RESOLVER_B))
    assert chain_rules(qubes.ns, "dnat-dns") == dnat_rules((DNS1, f"dnat to {RESOLVER_A}"),
                                                          (DNS2, f"dnat to {RESOLVER_B}"))
    rest, elements = ruleset(qubes.ns)
    assert [item for item in rest if "dnat-dns" not in json.dumps(item)] == others and elements == state[1]
    dnat_dns = [item["chain"] for item in rest if item.get("chain", {}).get("name") == "dnat-dns"]
    assert len(dnat_dns) == 1 and (dnat_dns[0]["hook"], dnat_dns[0]["prio"]) == ("prerouting", -100)


def test_no_upstream_refuses_dns_to_the_virtual_addresses(qubes):
    ok(qubes.dnat(RESOLVER_A))
    qubes.resolv.write_text("# nothing usable\nnameserver 2001:db8::53\nnameserver not-an-address\n")
    ok(qubes.run(str(BIN / "qubes-setup-dnat-to-ns")))
    assert chain_rules(qubes.ns, "dnat-dns") == dnat_rules((DNS1, "refuse"), (DNS2, "refuse"))
    assert qubes.run(str(BIN / "qubes-setup-dnat-to-ns")).returncode == 100
    ok(qubes.dnat(RESOLVER_B))  # and back
    assert chain_rules(qubes.ns, "dnat-dns") == dnat_rules((DNS1, f"dnat to {RESOLVER_B}"),
                                                          (DNS2, f"dnat to {RESOLVER_B}"))


def test_dns_dry_run_prints_one_nft_transaction_that_does_the_change(qubes):
    ok(qubes.dnat(RESOLVER_A))
    state = ruleset(qubes.ns)
    unchanged = qubes.dnat(RESOLVER_A, args=("--dry-run",))
    assert unchanged.returncode == 100 and unchanged.stdout == ""

    dry = qubes.dnat(RESOLVER_B, args=("--dry-run",))
    assert dry.returncode == 0, dry.stderr
    assert ruleset(qubes.ns) == state
    assert dry.stdout.count("nft -f -") == 1 and "iptables" not in dry.stdout
    ok(run_cmd(qubes.ns, ["sh", "-e"], qubes.env(), input=dry.stdout))
    assert chain_rules(qubes.ns, "dnat-dns") == dnat_rules((DNS1, f"dnat to {RESOLVER_B}"),
                                                          (DNS2, f"dnat to {RESOLVER_B}"))
    assert qubes.dnat(RESOLVER_B).returncode == 100  # the script did all of it


def test_dns_without_any_table_makes_dnat_dns(netns, xen):
    proxy = Provider(netns, xen, None)
    ok(proxy.dnat(RESOLVER_A))
    assert chain_rules(proxy.ns, "dnat-dns") == dnat_rules((DNS1, f"dnat to {RESOLVER_A}"),
                                                          (DNS2, f"dnat to {RESOLVER_A}"))
    assert proxy.dnat(RESOLVER_A).returncode == 100


def test_dns_reads_both_families_when_one_table_has_no_dnat_dns(netns, xen):
    """Both tables there without the chain (made by hand): the one listing of the
    ruleset finds no `dnat-dns` in either, the DNS rules are made in `ip qubes`
    (only IPv4 virtual addresses), a rerun is unchanged, a change replaces them."""
    proxy = Provider(netns, xen, None)
    proxy.ns.sh("nft add table ip qubes; nft add table ip6 qubes")
    ok(proxy.dnat(RESOLVER_A))
    assert chain_rules(proxy.ns, "dnat-dns") == dnat_rules((DNS1, f"dnat to {RESOLVER_A}"),
                                                          (DNS2, f"dnat to {RESOLVER_A}"))
    assert proxy.dnat(RESOLVER_A).returncode == 100
    ok(proxy.dnat(RESOLVER_B))
    assert chain_rules(proxy.ns, "dnat-dns") == dnat_rules((DNS1, f"dnat to {RESOLVER_B}"),
                                                          (DNS2, f"dnat to {RESOLVER_B}"))
