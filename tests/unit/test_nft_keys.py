"""The netlink key layout of the nft reading (system/nftables.py): element keys
of an undecoded set list and the (ifname . address) pair keys, without a kernel.
The readings themselves, against `nft -j list ruleset`: tests/netns/test_nft_reading.py."""

import struct

from vif_route_qubes.system import nftables


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def test_element_keys_of_an_undecoded_list():
    key4 = nftables.pair_key("vif37.0", "10.137.7.27")
    key6 = nftables.pair_key("vif1399.0", "fd09:24ef:4179::b18f")
    odd = b"\x0a\x89\x07"  # a length that needs padding
    comment = _attr(6, b"\x00\x05hello")  # NFTA_SET_ELEM_USERDATA after the key
    elements = b"".join([
        _attr(1, _attr(1, _attr(1, key4), nested=True), nested=True),
        _attr(1, _attr(3, b"\0\0\0\0") + _attr(1, _attr(1, key6), nested=True) + comment, nested=True),
        _attr(1, _attr(1, _attr(1, odd), nested=True) + comment, nested=True),
    ])
    assert nftables.element_keys(elements) == [key4, key6, odd]
    assert nftables.element_keys(elements[:-3]) == [key4, key6]  # a truncated element is left out
    assert nftables.element_keys(b"") == []


def test_pair_keys_round_trip():
    assert nftables.pair_key("vif37.0", "10.137.7.27") == b"vif37.0" + b"\0" * 9 + bytes([10, 137, 7, 27])
    assert nftables.decode_pair(nftables.pair_key("vif37.0", "10.137.7.27"), 4) == ("vif37.0", "10.137.7.27")
    key6 = nftables.pair_key("vif37.0", "fd09:24ef:4179:0::a8b:1")
    assert nftables.decode_pair(key6, 6) == ("vif37.0", "fd09:24ef:4179::a8b:1")
    assert nftables.decode_pair(key6, 4) is None and nftables.decode_pair(b"\0" * 4, 4) is None
    assert nftables.decode_address(nftables.address_key("fd09::1")) == "fd09::1"
