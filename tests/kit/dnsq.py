#!/usr/bin/env python3
"""A tiny DNS client (standard library only) for the walk-through.

    dnsq.py [--tcp] [--aaaa] [--connected] [--timeout SECONDS] SERVER NAME

Sends one A (or AAAA) query for NAME to SERVER (IPv4 or IPv6) port 53 and
prints the first address of that type in the answer (exit 0), or `timeout`,
`no answer`, `refused` or `error: ...` (exit 1).  --connected uses a
connected UDP socket, which sees an ICMP port unreachable as `refused` (as a
stub resolver does); an unconnected one waits for its timeout.
Run it inside a namespace: `ip netns exec NS python3 tests/kit/dnsq.py ...`.
"""

import argparse
import random
import socket
import struct
import sys
import time


A, AAAA = 1, 28


def build_query(name: str, qid: int, qtype: int = A) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # recursion desired, one question
    labels = b"".join(bytes([len(part)]) + part.encode("ascii") for part in name.rstrip(".").split("."))
    return header + labels + b"\0" + struct.pack("!HH", qtype, 1)  # class IN


def _skip_name(msg: bytes, off: int) -> int:
    while True:
        length = msg[off]
        if length & 0xC0 == 0xC0:  # compression pointer ends the name
            return off + 2
        if length == 0:
            return off + 1
        off += 1 + length


def parse_reply(msg: bytes, qid: int, qtype: int = A) -> str | None:
    """First address of qtype in the answer section; ValueError when it is not our reply."""
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
        if rtype == qtype == A and rclass == 1 and rdlen == 4:
            return socket.inet_ntoa(msg[off:off + 4])
        if rtype == qtype == AAAA and rclass == 1 and rdlen == 16:
            return socket.inet_ntop(socket.AF_INET6, msg[off:off + 16])
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


def ask(server: str, name: str, tcp: bool = False, timeout: float = 2.0, port: int = 53, qtype: int = A,
        connected: bool = False) -> tuple[str | None, str]:
    """(address or None, what happened: the address, `timeout`, `no answer`, `refused` or `error: ...`)."""
    qid = random.randrange(1 << 16)
    packet = build_query(name, qid, qtype)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    try:
        if tcp:
            with socket.create_connection((server, port), timeout=timeout) as sock:
                sock.sendall(struct.pack("!H", len(packet)) + packet)
                size = struct.unpack("!H", _recv_exact(sock, 2))[0]
                address = parse_reply(_recv_exact(sock, size), qid, qtype)
        else:
            # Unconnected socket: a stray ICMP error is not reported, so a query
            # that gets no DNS answer ends in a timeout, as for a real resolver.
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                if connected:
                    sock.connect((server, port))
                    sock.send(packet)
                else:
                    sock.sendto(packet, (server, port))
                deadline = time.monotonic() + timeout
                while True:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    reply, source = sock.recvfrom(4096)
                    if source[0] != server:
                        continue  # only the address we asked may answer
                    try:
                        address = parse_reply(reply, qid, qtype)
                        break
                    except ValueError:
                        continue
    except (socket.timeout, TimeoutError):
        return None, "timeout"
    except ConnectionRefusedError:  # ICMP port unreachable (UDP) or a reset (TCP)
        return None, "refused"
    except (OSError, ValueError, struct.error) as exc:
        return None, f"error: {exc}"
    return (address, address) if address else (None, "no answer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tcp", action="store_true", help="query over TCP instead of UDP")
    parser.add_argument("--aaaa", action="store_true", help="ask for AAAA instead of A")
    parser.add_argument("--connected", action="store_true", help="UDP: a connected socket (sees ICMP errors)")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("server")
    parser.add_argument("name")
    args = parser.parse_args()
    address, outcome = ask(args.server, args.name, args.tcp, args.timeout, qtype=AAAA if args.aaaa else A,
                           connected=args.connected)
    print(outcome)
    return 0 if address else 1


if __name__ == "__main__":
    sys.exit(main())
