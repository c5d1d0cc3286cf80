"""The server's wire format: length-prefixed JSON, bytes as base64, file
descriptors as SCM_RIGHTS.  No pickle: a request is data, never code.

    server -> client  {"hello": NAME, "version": V, "pid": P}  or {"refused": why}
    client -> server  {"version": V, "entry": ..., "argv": [...], "env": [[k, v]...], ...}
                      with fds 0, 1, 2, /proc/self/ns/net, /proc/self/ns/mnt, cwd
    server -> client  {"accepted": child pid}  or {"refused": why}
    server -> client  {"status": exit status}  or {"failed": why}

Encoding and decoding only, no socket: the client imports this module at
every event, so it takes only C modules (binascii, _json) and each side does
its own I/O.  json's Python modules import `re` (about 12 ms of every event
here, with enum), so JSON is written by dumps() below and read by _json's
scanner, the C code json.loads runs; anything the scanner does not take
whole goes to json.loads, so what is accepted is exactly what json accepts.
"""

import _json
import binascii

NAME = "vif-route-qubes"
VERSION = 1
DEFAULT_SOCKET = "/run/vif-route-qubes/server.sock"
REQUEST_CAP = 4 << 20   # bytes of one request (the environment and argv of exec() fit in 2 MiB, x4/3 base64)
REPLY_CAP = 64 << 10
FD_NAMES = ("stdin", "stdout", "stderr", "netns", "mntns", "cwd")
HEAD = 4  # bytes of the length prefix (big-endian)
# Commands never offered to a server, nor run by one: `serve` IS the server (offered
# to the socket systemd holds for it, it would wait out its own hello).
NEVER_SERVED = {"vif-route-qubes": ("serve",)}
_INF = float("inf")


class ProtocolError(Exception):
    """The peer broke the protocol (or went away); the message says how, in one line."""


def b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def unb64(text) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("a bytes field is not a base64 string")
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (ValueError, UnicodeEncodeError):  # binascii.Error is a ValueError
        raise ProtocolError("a bytes field is not valid base64") from None


def command_of(argv: list[str]) -> str | None:
    """The command an argv names: its first argument that is neither an
    option nor a Xen `key=value` assignment (cli/main.xen_assignments)."""
    for arg in argv[1:]:
        name, eq, _ = arg.partition("=")
        if arg.startswith("-") or (eq and name.isidentifier() and name.isascii()):
            continue
        return arg
    return None


def never_served(entry: str, argv: list[str]) -> bool:
    return command_of(argv) in NEVER_SERVED.get(entry, ())


def dumps(value) -> str:
    """json.dumps(value, separators=(",", ":")) for the types a message holds
    (dict with str keys, list, tuple, str, int, float, bool, None)."""
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if value is None or value is True or value is False:
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (_INF, -_INF):
            return "Infinity" if value > 0 else "-Infinity"
        return float.__repr__(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(dumps, value)) + "]"
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("a message's keys are strings")
        return "{" + ",".join(f"{dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"{type(value).__name__} is not in a message")


class _JsonDefaults:
    """What _json's scanner reads of a json.JSONDecoder: json.loads' defaults."""
    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__


_scan = _json.make_scanner(_JsonDefaults())


def loads(body: bytes):
    """json.loads(body): the scanner for a body it takes whole, else json.loads
    itself (whitespace around the value, UTF-16, and the errors, whose
    exception class lives in json.decoder)."""
    try:
        text = body.decode("utf-8")
        value, end = _scan(text, 0)
        if end == len(text):
            return value
    except Exception:  # noqa: BLE001  (StopIteration, ValueError, SystemError without json.decoder)
        pass
    import json  # start-up: the light client loads json only for an odd string

    return json.loads(body)


def frame(message: dict) -> bytes:
    body = dumps(message).encode("ascii")
    return len(body).to_bytes(HEAD, "big") + body


def body_size(head: bytes, cap: int) -> int:
    """The length a frame's prefix announces; ProtocolError when it is over `cap`."""
    size = int.from_bytes(head, "big")
    if size > cap:
        raise ProtocolError(f"message of {size} bytes is over the limit of {cap}")
    return size


def decode(body: bytes) -> dict:
    try:
        message = loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("message is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    return message


def parse(buffer: bytes, cap: int) -> dict | None:
    """The message in `buffer` once it is whole (None before); ProtocolError
    as soon as its length is over `cap` or its body is not a JSON object."""
    if len(buffer) < HEAD:
        return None
    size = body_size(buffer[:HEAD], cap)
    if len(buffer) < HEAD + size:
        return None
    if len(buffer) > HEAD + size:
        raise ProtocolError("bytes after the message")
    return decode(buffer[HEAD:])
