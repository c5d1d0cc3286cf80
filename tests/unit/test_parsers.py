"""Parser properties (CONTRACT section 1, "Inputs" and "Errors"): random text never
escapes the parsers of vif_route_qubes.inputs.parse as anything but a one-line
InputError, and what they accept is exactly the strict form.  The refused input
through the real command, in namespaces: tests/netns/test_bad_input.py."""

import ipaddress
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vif_route_qubes.errors import InputError
from vif_route_qubes.inputs import parse


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
