"""A vif event's nft reading over netlink (facts/nft_state.read_vif_state,
system/nftables.py) against the whole `nft -j list ruleset` it replaces.

The planner must make the same transaction from both readings, for online
and offline, whatever the kernel holds: a vif's own pairs among 400 VMs' of
both families, a pair made by hand for it, a restarted VM's two vifs holding
one address, an address another vif holds by hand, tables `init` did not make
(removed by the last offline, kept while a vif-group link is left), no table
at all, a bare table.  The reading itself forks no `nft`.  (The key layout
alone, without a kernel: tests/unit/test_nft_keys.py.)
"""

import json
import sys

import pytest

from vif_route_qubes.system import nftables

PY = sys.executable


# -- both readings in namespaces ----------------------------------------------------

TABLES = """add table {f} qubes
add set {f} qubes allowed {{ type ifname . {t}; }}
add set {f} qubes downstream {{ type {a}; }}
add chain {f} qubes antispoof
add chain {f} qubes prerouting {{ type filter hook prerouting priority raw; policy accept; }}
"""
BASE = "add chain {f} qubes forward {{ type filter hook forward priority filter; policy accept; }}\n"


def _tables(base: bool) -> str:
    out = ""
    for f, t in (("ip", "ipv4_addr"), ("ip6", "ipv6_addr")):
        out += TABLES.format(f=f, t=t, a=t) + (BASE.format(f=f) if base else "")
    return out


def _pair(f: str, vif: str, addr: str, downstream: bool = True) -> str:
    out = f'add element {f} qubes allowed {{ "{vif}" . {addr} }}\n'
    return out + (f"add element {f} qubes downstream {{ {addr} }}\n" if downstream else "")


def _four_hundred() -> str:
    out = ""
    for i in range(400):
        out += _pair("ip", f"vif{1000 + i}.0", f"10.137.{8 + i // 250}.{1 + i % 250}")
        out += _pair("ip6", f"vif{1000 + i}.0", f"fd09:24ef:4179::b{i:03x}")
    return out


# Run in the namespace: both readings, and the plans made from each.
PROBE = r"""
import json, sys
from ipaddress import ip_address
from vif_route_qubes.facts import nft_state
from vif_route_qubes.plan import nft
from vif_route_qubes.system import tools

def forbidden(*args, **kwargs):
    raise AssertionError(f"the netlink reading ran a program: {args}")

out = []
for vif, addrs in json.loads(sys.argv[1]):
    addrs = tuple(ip_address(a) for a in addrs)
    listed = nft_state.read_listed(vif)
    run, tools.run = tools.run, forbidden
    try:
        state = nft_state.read_state(vif, addrs)
    finally:
        tools.run = run
    # What the offline's connection-tracking purge spares (plan/vif.held_by_other_vifs).
    kept = [sorted({a for t in s.tables.values() for n, a in t.allowed if n != vif} & {str(a) for a in addrs})
            for s in (state, listed)]
    for enable in (True, False):
        planned = [nft.plan_vif(s, vif, addrs, enable) for s in (state, listed)]
        out.append({"vif": vif, "enable": enable, "netlink": planned[0] and planned[0].text,
                    "listed": planned[1] and planned[1].text, "kept": kept,
                    "mine": sorted(a for t in state.tables.values() for n, a in t.allowed if n == vif)})
print(json.dumps(out))
"""


def _probe(ns, cases) -> list[dict]:
    result = ns.popen([PY, "-c", PROBE, json.dumps(cases)], stdout=-1, stderr=-1, text=True)
    stdout, stderr = result.communicate(timeout=120)
    assert result.returncode == 0, stderr
    plans = json.loads(stdout)
    for plan in plans:
        assert plan["netlink"] == plan["listed"] and plan["kept"][0] == plan["kept"][1], plan
    return plans


def _load(ns, script: str) -> None:
    ns.sh("nft -f - <<'END'\n" + script + "END")


def _plan(plans, vif, enable) -> str | None:
    return next(p["netlink"] for p in plans if p["vif"] == vif and p["enable"] == enable)


def test_after_init_among_400_vifs(netns):
    ns = netns.make("read")
    extra = (_pair("ip", "vif37.0", "10.137.7.99", downstream=False)       # made by hand for vif37.0
             + _pair("ip", "vif12.0", "10.137.7.50") + _pair("ip", "vif13.0", "10.137.7.50")  # a restarted VM
             + _pair("ip", "vif1000.0", "10.137.9.200")                    # a second pair of vif1000.0
             + _pair("ip", "vif900.0", "10.137.7.60", downstream=False))   # by hand, another vif's address
    _load(ns, _tables(base=True) + _four_hundred() + extra)
    cases = [("vif1000.0", ["10.137.8.1", "fd09:24ef:4179::b000"]), ("vif1399.0", ["10.137.9.150"]),
             ("vif37.0", ["10.137.7.27", "fd09:24ef:4179::a8b:1b"]), ("vif12.0", ["10.137.7.50"]),
             ("vif13.0", ["10.137.7.50"]), ("vif1001.0", ["10.137.7.50"]), ("vif61.0", ["10.137.7.60"]),
             ("vif500.0", [])]
    plans = _probe(ns, cases)
    mine = {p["vif"]: p["mine"] for p in plans}
    assert mine["vif1000.0"] == ["10.137.8.1", "10.137.9.200", "fd09:24ef:4179::b000"]
    assert mine["vif1399.0"] == ["10.137.9.150", "fd09:24ef:4179::b18f"]
    assert _plan(plans, "vif1000.0", True) == "delete element ip qubes downstream { 10.137.9.200 }\n" \
                                              "delete element ip qubes allowed { \"vif1000.0\" . 10.137.9.200 }\n"
    assert _plan(plans, "vif500.0", True) is None and _plan(plans, "vif500.0", False) is None
    # The pair made by hand for vif37.0 goes, online and offline.
    assert 'delete element ip qubes allowed { "vif37.0" . 10.137.7.99 }' in _plan(plans, "vif37.0", True)
    # A restarted VM: the late offline keeps the address another vif holds.
    assert _plan(plans, "vif12.0", False) == 'delete element ip qubes allowed { "vif12.0" . 10.137.7.50 }\n'
    assert next(p["kept"][0] for p in plans if p["vif"] == "vif12.0") == ["10.137.7.50"]
    assert "downstream { 10.137.7.50 }" not in _plan(plans, "vif1001.0", True)
    # ...and so does an online moving off it.
    moved = _probe(ns, [("vif13.0", ["10.137.7.51"])])
    assert _plan(moved, "vif13.0", True) == ('delete element ip qubes allowed { "vif13.0" . 10.137.7.50 }\n'
                                             'add element ip qubes allowed { "vif13.0" . 10.137.7.51 }\n'
                                             "add element ip qubes downstream { 10.137.7.51 }\n")
    assert _plan(plans, "vif61.0", True) == ('add element ip qubes allowed { "vif61.0" . 10.137.7.60 }\n'
                                             "add element ip qubes downstream { 10.137.7.60 }\n")


def test_tables_no_init_made(netns):
    shared, alone = netns.make("rsh"), netns.make("ral")
    _load(shared, _tables(base=False) + _pair("ip", "vif5.0", "10.137.7.5") + _pair("ip6", "vif6.0", "fd09::6"))
    _load(alone, _tables(base=False) + _pair("ip", "vif7.0", "10.137.7.7"))
    # Another vif's pair keeps the tables, whatever its family.
    assert "delete table" not in _plan(_probe(shared, [("vif5.0", ["10.137.7.5"])]), "vif5.0", False)
    assert _plan(_probe(alone, [("vif7.0", ["10.137.7.7"])]), "vif7.0", False) == \
        "delete table ip qubes\ndelete table ip6 qubes\n"
    # A link left in the vif group keeps them too.
    alone.sh("ip link add vif8.0 type veth peer name p8 && ip link set vif8.0 group 2")
    assert _plan(_probe(alone, [("vif7.0", ["10.137.7.7"])]), "vif7.0", False) == \
        'delete element ip qubes downstream { 10.137.7.7 }\ndelete element ip qubes allowed { "vif7.0" . 10.137.7.7 }\n'


@pytest.mark.parametrize("script", ["", "add table ip qubes\n", "add table ip qubes\nadd chain ip qubes forward\n",
                                    TABLES.format(f="ip6", t="ipv6_addr", a="ipv6_addr")],
                         ids=["none", "bare-table", "chain-only", "ip6-only"])
def test_missing_parts(netns, script):
    ns = netns.make("rmis")
    if script:
        _load(ns, script)
    plans = _probe(ns, [("vif37.0", ["10.137.7.27", "fd09::1b"])])
    online = _plan(plans, "vif37.0", True)
    assert ("add table ip qubes" in online) == (script in ("", TABLES.format(f="ip6", t="ipv6_addr", a="ipv6_addr")))
