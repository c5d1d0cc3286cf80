"""The server's wire format: length-prefixed JSON, bytes as base64, file
descriptors as SCM_RIGHTS.  No pickle: a request is data, never code.

    server -> client  {"hello": NAME, "version": V, "pid": P}  or {"refused": why}
    client -> server  {"version": V, "entry": ..., "argv": [...], "env": [[k, v]...], ...}
                      with fds 0, 1, 2, /proc/self/ns/net, /proc/self/ns/mnt, cwd
    server -> client  {"accepted": child pid}  or {"refused": why}
    server -> client  {"status": exit status}  or {"failed": why}

Encoding and decoding only, no socket: the client imports this module at
every event, so it takes json (whose `re` the entry point's wrapper has
loaded already) and binascii (C), and each side does its own I/O.
"""

import binascii
import json

NAME = "vif-route-qubes"
VERSION = 1
DEFAULT_SOCKET = "/run/vif-route-qubes/server.sock"
REQUEST_CAP = 4 << 20   # bytes of one request (the environment and argv of exec() fit in 2 MiB, x4/3 base64)
REPLY_CAP = 64 << 10
FD_NAMES = ("stdin", "stdout", "stderr", "netns", "mntns", "cwd")
HEAD = 4  # bytes of the length prefix (big-endian)


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


def frame(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode("ascii")
    return len(body).to_bytes(HEAD, "big") + body


def body_size(head: bytes, cap: int) -> int:
    """The length a frame's prefix announces; ProtocolError when it is over `cap`."""
    size = int.from_bytes(head, "big")
    if size > cap:
        raise ProtocolError(f"message of {size} bytes is over the limit of {cap}")
    return size


def decode(body: bytes) -> dict:
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
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
