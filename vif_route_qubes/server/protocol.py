"""The server's wire format: length-prefixed JSON, bytes as base64, file
descriptors as SCM_RIGHTS.  No pickle: a request is data, never code.

    server -> client  {"hello": NAME, "version": V, "pid": P}  or {"refused": why}
    client -> server  {"version": V, "entry": ..., "argv": [...], "env": [[k, v]...], ...}
                      with fds 0, 1, 2, /proc/self/ns/net, /proc/self/ns/mnt, cwd
    server -> client  {"accepted": child pid}  or {"refused": why}
    server -> client  {"status": exit status}  or {"failed": why}

Light on purpose: the client imports this module before anything else.
"""

import base64
import json
import socket

NAME = "vif-route-qubes"
VERSION = 1
DEFAULT_SOCKET = "/run/vif-route-qubes/server.sock"
REQUEST_CAP = 4 << 20   # bytes of one request (the environment and argv of exec() fit in 2 MiB, x4/3 base64)
REPLY_CAP = 64 << 10
FD_NAMES = ("stdin", "stdout", "stderr", "netns", "mntns", "cwd")
_HEAD = 4


class ProtocolError(Exception):
    """The peer broke the protocol (or went away); the message says how, in one line."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("a bytes field is not a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ProtocolError("a bytes field is not valid base64") from None


def frame(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode("ascii")
    return len(body).to_bytes(_HEAD, "big") + body


def send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = frame(message)
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


def _read_exact(sock: socket.socket, count: int, got: bytes) -> bytes:
    while len(got) < count:
        chunk = sock.recv(min(count - len(got), 1 << 16))
        if not chunk:
            raise ProtocolError(f"connection closed after {len(got)} of {count} bytes")
        got += chunk
    return got


def receive(sock: socket.socket, cap: int, max_fds: int = 0) -> tuple[dict, list[int]]:
    """One message (and the descriptors sent with its first bytes).  Raises
    ProtocolError for a closed connection, a frame over `cap`, or bad JSON;
    descriptors received with a bad message are closed."""
    fds: list[int] = []
    try:
        if max_fds:
            first, fds, flags, _ = socket.recv_fds(sock, _HEAD, max_fds)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("too many descriptors")
        else:
            first = sock.recv(_HEAD)
        if not first:
            raise ProtocolError("connection closed")
        head = _read_exact(sock, _HEAD, first)
        size = int.from_bytes(head, "big")
        if size > cap:
            raise ProtocolError(f"message of {size} bytes is over the limit of {cap}")
        body = _read_exact(sock, size, b"")
        try:
            message = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("message is not JSON") from None
        if not isinstance(message, dict):
            raise ProtocolError("message is not a JSON object")
        return message, fds
    except BaseException:
        for fd in fds:
            _close(fd)
        raise


def parse(buffer: bytes, cap: int) -> dict | None:
    """The message in `buffer` once it is whole (None before); ProtocolError
    as soon as its length is over `cap` or its body is not a JSON object."""
    if len(buffer) < _HEAD:
        return None
    size = int.from_bytes(buffer[:_HEAD], "big")
    if size > cap:
        raise ProtocolError(f"message of {size} bytes is over the limit of {cap}")
    if len(buffer) < _HEAD + size:
        return None
    if len(buffer) > _HEAD + size:
        raise ProtocolError("bytes after the message")
    try:
        message = json.loads(buffer[_HEAD:])
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("message is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    return message


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
