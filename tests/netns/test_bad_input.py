"""Refused input (CONTRACT section 1, "Inputs" and "Errors") and 40 vifs brought
online and offline at the same moment.  The parsers' properties, without a
namespace: tests/unit/test_parsers.py."""

import re
import subprocess

import pytest

from netns import VIF_MAC, comparable, run_cmd, settled, state_of

VM_MAC = "00:16:3e:5e:6c:19"
PATH = "/local/domain/0/backend/vif/37/0"


def make_provider(netns):
    """A ProxyVM namespace whose raw tables exist (iptables-nft makes a table
    on first use, and that alone must not count as a change)."""
    proxy = netns.make("proxy")
    proxy.sh("for t in iptables ip6tables; do $t -t raw -N PRIME && $t -t raw -X PRIME; done")
    return proxy


@pytest.fixture
def box(netns, xen):
    """vif37.0 towards an AppVM, with good xenstore and qubesdb keys that a
    case then spoils one at a time."""
    proxy = make_provider(netns)
    netns.vif(proxy, netns.make("app"), "vif37.0", vm_mac=VM_MAC, vm_addrs=("10.137.7.27",), gateway="10.137.7.1")
    xen.backend(37, ip="10.137.7.27", mac=VM_MAC)
    xen.qdb_write("/qubes-netvm-gateway", "10.137.7.1")
    return proxy


def xenstore_files(xen):
    return {p.name: p.read_text() for p in xen.xenstore.iterdir()}


# (id, xenstore key -> value, qubesdb key -> value, argv after the program, env,
#  the text that the message must quote, whether hotplug-status must say "error")
CASES = [
    ("ip-extra-word", {"ip": "10.137.7.27 foo"}, {}, ["online", "type_if=vif"], {}, "foo", True),
    ("ip-semicolon", {"ip": "10.137.7.27;reboot"}, {}, ["online", "type_if=vif"], {}, "reboot", True),
    ("mac-short", {"mac": "00:16:3e:5e:6c"}, {}, ["online", "type_if=vif"], {}, "00:16:3e:5e:6c", True),
    ("mac-not-hex", {"mac": "zz:16:3e:5e:6c:19"}, {}, ["online", "type_if=vif"], {}, "zz:16", True),
    ("gateway-extra", {}, {"/qubes-netvm-gateway": "10.137.7.1 extra"}, ["online", "type_if=vif"], {},
     "extra", True),
    # Not a vif name: XENBUS_PATH cannot be shown to be its backend, so nothing is written there.
    ("vif-semicolon", {}, {}, ["online", "type_if=vif"], {"vif": "vif37.0;id"}, "vif37.0;id", False),
    ("vif-domid-too-big", {}, {}, ["online", "type_if=vif"], {"vif": "vif32753.0"}, "32753", False),
    ("vif-eth0", {}, {}, ["online", "type_if=vif"], {"vif": "eth0"}, "eth0", False),
    ("vif-no-index", {}, {}, ["online", "type_if=vif"], {"vif": "vif37"}, "vif37", False),
    ("unknown-command", {}, {}, ["explode", "vif37.0"], {}, "explode", False),
    ("xenbus-dotdot", {}, {}, ["online", "type_if=vif"], {"XENBUS_PATH": PATH + "/../../38/0"}, "..", False),
    ("xenbus-vbd", {}, {}, ["online", "type_if=vif"], {"XENBUS_PATH": "/local/domain/0/backend/vbd/37/0"},
     "vbd", False),
    # Another device's backend (maybe another VM's): refused, and nothing written there either.
    ("xenbus-other-domain", {}, {}, ["online", "type_if=vif"], {"XENBUS_PATH": "backend/vif/38/0"},
     "backend/vif/38/0", False),
    ("xenbus-other-device", {}, {}, ["online", "type_if=vif"], {"XENBUS_PATH": "/local/domain/0/backend/vif/37/1"},
     "vif/37/1", False),
    ("xenbus-relative-dotdot", {}, {}, ["online", "type_if=vif"], {"XENBUS_PATH": "backend/vif/37/0/../../38/0"},
     "..", False),
]


@pytest.mark.parametrize("xs, qdb, argv, env, quoted, reports", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_without_change(box, xen, vifcmd, backend, xs, qdb, argv, env, quoted, reports):
    for key, value in xs.items():
        xen.xs_write(f"{PATH}/{key}", value)
    for key, value in qdb.items():
        xen.qdb_write(key, value)
    before, store_before = state_of(box), xenstore_files(xen)

    environ = xen.env(**{"vif": "vif37.0", "XENBUS_PATH": PATH, "QUBES_NET_BACKEND": backend, **env})
    result = run_cmd(box, [vifcmd, *argv], environ)

    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr
    assert state_of(box) == before
    assert xen.xs_read(f"{PATH}/hotplug-status") != "connected"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert quoted in lines[0]
    if reports:
        # Xen's toolstack learns why: the same message as on stderr.
        assert xen.xs_read(f"{PATH}/hotplug-status") == "error"
        assert xen.xs_read(f"{PATH}/hotplug-error") and xen.xs_read(f"{PATH}/hotplug-error") in lines[0]
    else:
        assert xenstore_files(xen) == store_before  # nothing written anywhere


# -- a host starting 40 VMs at once -------------------------------------------

DOMIDS = range(40, 80)


def forty_vifs(netns, xen):
    """vif40.0..vif79.0 in one ProxyVM, their peers e0..e39 in one "vms" namespace."""
    proxy, vms = make_provider(netns), netns.make("vms")
    batch = "".join(f"link add vif{d}.0 address {VIF_MAC} type veth peer name e{i} netns {vms.name}\n"
                    for i, d in enumerate(DOMIDS))
    proxy.sh(f"ip -batch - <<'EOF'\n{batch}EOF")
    vms.sh(" && ".join(f"ip link set e{i} up" for i in range(len(DOMIDS))))
    for d in DOMIDS:
        xen.backend(d, ip=f"10.137.8.{d}", mac=f"00:16:3e:00:00:{d:02x}")
    xen.qdb_write("/qubes-netvm-gateway", "10.137.8.1")
    return proxy


def hotplug(proxy, xen, vifcmd, backend, command, domid, **popen):
    env = xen.env(vif=f"vif{domid}.0", XENBUS_PATH=f"backend/vif/{domid}/0",
                  QUBES_NET_BACKEND=backend)
    return proxy.popen([vifcmd, command, "type_if=vif"], env=env, text=True, **popen)


def all_at_once(proxy, xen, vifcmd, backend, command):
    procs = [hotplug(proxy, xen, vifcmd, backend, command, d, stderr=subprocess.PIPE) for d in DOMIDS]
    errors = [(p.args[-2:], p.communicate(timeout=120)[1]) for p in procs]
    assert [(args, err) for (args, err), p in zip(errors, procs) if p.returncode != 0] == []




def granted_order(state, backend):
    """The domids in the order the lock let them in: sets list their elements
    in their own order (both backends), so the shared gateway's local routes,
    one per vif in the order they were added."""
    return re.findall(r"^local 10\.137\.8\.1 dev vif(\d+)\.0 table local ", state, re.M)


def test_forty_vifs_at_once_lose_and_duplicate_nothing(netns, xen, vifcmd, backend):
    proxy, twin = forty_vifs(netns, xen), forty_vifs(netns, xen)
    before = comparable(settled(proxy), sort_ipv6_routes=True)

    all_at_once(proxy, xen, vifcmd, backend, "online")
    together = settled(proxy)
    # The lock decides who goes first; replay that order one by one in the twin
    # so that even rule order and the shared gateway's local route must match.
    order = granted_order(together, backend)
    assert sorted(map(int, order)) == list(DOMIDS)  # each vif exactly once
    for domid in order:
        proc = hotplug(twin, xen, vifcmd, backend, "online", domid)
        assert proc.wait(timeout=60) == 0
    assert comparable(together, sort_ipv6_routes=True) == comparable(settled(twin), sort_ipv6_routes=True)
    assert len(re.findall(r"dev vif\d+\.0 scope link metric", together)) == len(DOMIDS)

    all_at_once(proxy, xen, vifcmd, backend, "offline")
    assert comparable(settled(proxy), sort_ipv6_routes=True) == before
