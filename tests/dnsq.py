#!/usr/bin/env python3
"""A tiny DNS client (standard library only) for the walk-through.

    dnsq.py [--tcp] [--timeout SECONDS] SERVER NAME

Sends one A query for NAME to SERVER port 53 and prints the first A address
of the answer (exit 0), or `timeout`, `no answer` or `error: ...` (exit 1).
Run it inside a namespace: `ip netns exec NS python3 tests/dnsq.py ...`.
"""

import argparse
import random
import socket
import struct
import sys
import time


def build_query(name: str, qid: int) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # recursion desired, one question
    labels = b"".join(bytes([len(part)]) + part.encode("ascii") for part in name.rstrip(".").split("."))
    return header + labels + b"\0" + struct.pack("!HH", 1, 1)  # type A, class IN


def _skip_name(msg: bytes, off: int) -> int:
    while True:
        length = msg[off]
        if length & 0xC0 == 0xC0:  # compression pointer ends the name
            return off + 2
        if length == 0:
            return off + 1
        off += 1 + length


def parse_reply(msg: bytes, qid: int) -> str | None:
    """First A address in the answer section; ValueError when it is not our reply."""
    rid, flags, qdcount, ancount = struct.unpack("!HHHH", msg[:8])
    if rid != qid or not flags & 0x8000:
        raise ValueError("not a reply to our query")
    off = 12
    for _ in range(qdcount):
        off = _skip_name(msg, off) + 4
    for _ in range(ancount):
        off = _skip_name(msg, off)
        rtype, rclass, _ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10
        if rtype == 1 and rclass == 1 and rdlen == 4:
            return socket.inet_ntoa(msg[off:off + 4])
        off += rdlen
    return None


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        data += chunk
    return data


def ask(server: str, name: str, tcp: bool = False, timeout: float = 2.0, port: int = 53) -> tuple[str | None, str]:
    """(address or None, what happened: the address, `timeout`, `no answer` or `error: ...`)."""
    qid = random.randrange(1 << 16)
    packet = build_query(name, qid)
    try:
        if tcp:
            with socket.create_connection((server, port), timeout=timeout) as sock:
                sock.sendall(struct.pack("!H", len(packet)) + packet)
                size = struct.unpack("!H", _recv_exact(sock, 2))[0]
                address = parse_reply(_recv_exact(sock, size), qid)
        else:
            # Unconnected socket: a stray ICMP error is not reported, so a query
            # that gets no DNS answer ends in a timeout, as for a real resolver.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(packet, (server, port))
                deadline = time.monotonic() + timeout
                while True:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    reply, source = sock.recvfrom(4096)
                    if source[0] != server:
                        continue  # only the address we asked may answer
                    try:
                        address = parse_reply(reply, qid)
                        break
                    except ValueError:
                        continue
    except (socket.timeout, TimeoutError):
        return None, "timeout"
    except (OSError, ValueError, struct.error) as exc:
        return None, f"error: {exc}"
    return (address, address) if address else (None, "no answer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tcp", action="store_true", help="query over TCP instead of UDP")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("server")
    parser.add_argument("name")
    args = parser.parse_args()
    address, outcome = ask(args.server, args.name, args.tcp, args.timeout)
    print(outcome)
    return 0 if address else 1


if __name__ == "__main__":
    sys.exit(main())
