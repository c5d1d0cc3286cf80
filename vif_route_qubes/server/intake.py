"""The server's side of a connection: a request read without blocking, as it
comes, then checked and decoded (child.decode); the server's messages sent;
a refusal is one message, then close."""

import socket
import time

from vif_route_qubes.server import child, protocol

REQUEST_TIMEOUT = 2.0  # seconds for the whole request after the hello


class Reading:
    """A connection whose request is still arriving."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.buffer, self.fds = conn, b"", []
        self.deadline = time.monotonic() + REQUEST_TIMEOUT


def read_more(reading: Reading) -> dict | None:
    """What arrived now; the decoded request once it is whole, else None.
    BlockingIOError: nothing yet; ProtocolError or OSError: refuse it."""
    data, fds, flags, _ = socket.recv_fds(reading.conn, 1 << 16, len(protocol.FD_NAMES))
    reading.fds += fds
    if flags & socket.MSG_CTRUNC or len(reading.fds) > len(protocol.FD_NAMES):
        raise protocol.ProtocolError("too many descriptors")
    if not data:
        raise protocol.ProtocolError(f"connection closed after {len(reading.buffer)} bytes of the request")
    reading.buffer += data
    message = protocol.parse(reading.buffer, protocol.REQUEST_CAP)
    if message is None:
        return None
    if len(reading.fds) != len(protocol.FD_NAMES):
        raise protocol.ProtocolError(f"{len(reading.fds)} descriptors, not {len(protocol.FD_NAMES)}")
    return child.decode(message)


def send(conn: socket.socket, message: dict) -> None:
    conn.sendall(protocol.frame(message))


def refuse(conn: socket.socket, why: str) -> None:
    try:
        conn.settimeout(0.2)
        send(conn, {"refused": why})
    except OSError:
        pass
    conn.close()
