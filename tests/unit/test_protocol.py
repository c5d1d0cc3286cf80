"""The server's wire format (server/protocol.py): its JSON writer and reader
take no Python module of json (they would import `re` into every client), so
they are held here to json's own: the same text written, the same values and
the same refusals read."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vif_route_qubes.server import protocol

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


def same(a, b) -> bool:
    """Equal as JSON values (NaN equal to NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=1000)
@given(values)
def test_dumps_writes_what_json_writes(value):
    assert protocol.dumps(value) == json.dumps(value, separators=(",", ":"))


@settings(max_examples=1000)
@given(values)
def test_a_frame_reads_back_as_written(value):
    data = protocol.frame({"v": value})
    assert protocol.body_size(data[:protocol.HEAD], len(data)) == len(data) - protocol.HEAD
    assert same(protocol.decode(data[protocol.HEAD:]), {"v": value})


def json_verdict(body: bytes):
    try:
        return "ok", json.loads(body)
    except (ValueError, RecursionError):
        return "refused", None


def ours(body: bytes):
    try:
        return "ok", protocol.loads(body)
    except (ValueError, RecursionError):
        return "refused", None


# Texts near JSON: fragments of written values, cut and joined with JSON's own characters.
near_json = st.lists(st.sampled_from(['{', '}', '[', ']', ',', ':', '"', '\\', ' ', '\n', '\x01', 'NaN', '-',
                                      'true', 'nul', '1e', '0', '.5', '"\\u00e9"', '"\\ud800"', '\ufeff'])
                     | values.map(protocol.dumps), max_size=8).map("".join)


@settings(max_examples=2000)
@given(near_json | st.text())
def test_loads_takes_and_refuses_what_json_loads_does(text):
    for body in (text.encode("utf-8", "surrogatepass"), text.encode("utf-16")):
        (verdict, got), (want_verdict, want) = ours(body), json_verdict(body)
        assert verdict == want_verdict, (body, got, want)
        assert same(got, want)


def test_nesting_deeper_than_the_stack_is_refused_as_not_json():
    with pytest.raises(protocol.ProtocolError, match="not JSON"):
        protocol.decode(b"[" * 200_000)


def test_only_string_keys_and_json_types_are_written():
    with pytest.raises(TypeError):
        protocol.dumps({1: "a"})
    with pytest.raises(TypeError):
        protocol.dumps({"a": b"bytes"})
