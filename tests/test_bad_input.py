"""Refused input (CONTRACT section 1, "Inputs" and "Errors"), parser properties,
and 40 vifs brought online and offline at the same moment."""

import ipaddress
import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netns import VIF_MAC, comparable, run_cmd, settled, state_of
from vif_route_qubes.inputs import parse
from vif_route_qubes.errors import InputError

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


# -- the pure parsers: random text never escapes as anything but InputError --

ADDR_CHARS = "0123456789abcdefABCDEF.:"
address_like = st.one_of(
    st.ip_addresses().map(str),
    st.text(alphabet=ADDR_CHARS, max_size=45),
    st.text(max_size=45),
)
address_lists = st.one_of(
    st.lists(st.ip_addresses().map(str), max_size=4).map(" ".join),  # mostly accepted
    st.lists(st.one_of(address_like, st.sampled_from(["", " ", "\t", "\n", ";", "/32", "%eth0"])),
             max_size=6).map(" ".join),
)
vif_like = st.one_of(
    st.builds("vif{}.{}{}".format, st.integers(-1, 40000), st.integers(-1, 99), st.sampled_from(["", "-emu", " "])),
    st.from_regex(r"\Avif[0-9.]{1,12}(-emu)?\Z"),
    st.text(max_size=20),
)
mac_like = st.one_of(
    st.lists(st.integers(0, 255), min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b)),
    st.from_regex(r"\A[0-9a-fA-Fz:]{15,18}\Z"),
    st.text(max_size=20),
)
xenbus_like = st.one_of(
    st.builds("{}backend/vif/{}/{}{}".format, st.sampled_from(["", "/", "/local/domain/0/", "/local/domain/7/",
                                                                "local/domain/0/", "/local/domain//"]),
              st.sampled_from([0, 7, 37]) | st.integers(-1, 40000), st.integers(0, 9),
              st.sampled_from(["", "", "/", "/..", "\n", " "])),
    st.text(max_size=40),
)
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(address_lists)
def test_address_list_accepts_only_addresses(text):
    try:
        addrs = parse.address_list(text, source="test ip")
    except InputError as exc:
        assert "\n" not in str(exc)  # one line, even for multi-line input
        return
    words = [w for w in text.split(" ") if w]
    assert addrs and len(set(addrs)) == len(addrs)
    assert set(addrs) == {ipaddress.ip_address(w) for w in words}
    for addr in addrs:
        assert isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address))
        assert parse.address(str(addr), source="again") == addr  # round trip through text
        assert not (addr.is_multicast or addr.is_unspecified or addr.is_loopback)


@PROPERTY
@given(address_like, st.sampled_from([4, 6]))
def test_address_of_accepts_only_that_family(text, version):
    try:
        addr = parse.address_of(text, version, source="test gateway")
    except InputError:
        return
    assert addr.version == version and addr == ipaddress.ip_address(text)


@PROPERTY
@given(vif_like, st.booleans())
def test_vif_name_accepts_only_vif_names(text, tap):
    try:
        name, domid = parse.vif_name(text, tap=tap)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    match = re.fullmatch(r"vif(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-emu)?", name)
    assert name == text and match and bool(match.group(3)) == tap
    assert domid == int(match.group(1)) <= 32752 and len(name) <= 15


@PROPERTY
@given(mac_like)
def test_mac_accepts_only_unicast_macs(text):
    try:
        value = parse.mac(text, source="test mac")
    except InputError:
        return
    assert value == text.lower() and re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", value)
    assert parse.mac(value, source="again") == value
    assert not int(value[:2], 16) & 1  # never a multicast MAC


@PROPERTY
@given(xenbus_like, st.one_of(st.sampled_from(["vif37.0", "vif0.0", "vif7.3", "vif37.0-emu"]), vif_like))
def test_xenbus_path_accepts_only_the_vifs_own_backend(text, vif):
    try:
        value = parse.xenbus_path(text, vif)
    except InputError as exc:
        assert not parse.xenbus_path_ok(text, vif) and "\n" not in str(exc)
        return
    assert value == text and parse.xenbus_path_ok(text, vif)
    match = re.fullmatch(r"(/local/domain/(0|[1-9][0-9]*)/)?backend/vif/(0|[1-9][0-9]*)/(0|[1-9][0-9]*)", value)
    assert match and re.match(rf"vif{match[3]}\.{match[4]}(-emu)?$", vif)


@PROPERTY
@given(st.text(max_size=20))
def test_device_type_is_a_plain_word(text):
    try:
        value = parse.device_type(text)
    except InputError:
        return
    assert value == text and re.fullmatch(r"[a-z][a-z0-9_-]*", value)


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
