#!/usr/bin/env python3
"""UDP probe for tests/netns/test_faults.py (standard library only).

    faults_udp.py recv PORT   prints "ready", then "SOURCE PAYLOAD" for every datagram
    faults_udp.py send PORT   reads "SOURCE DESTINATION PAYLOAD" lines on stdin, sends
                              each from SOURCE and answers "sent" (or "error ...")

Both stay up for a whole test, so that a probe costs no process start.
"""

import socket
import sys


def recv(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", port))
        print("ready", flush=True)
        while True:
            data, (src, _) = sock.recvfrom(512)
            print(src, data.decode(errors="replace"), flush=True)


def send(port: int) -> None:
    for line in sys.stdin:
        src, dst, payload = line.split()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((src, 0))
                sock.sendto(payload.encode(), (dst, port))
            print("sent", flush=True)
        except OSError as exc:  # e.g. no route while the link is down
            print("error", exc.strerror, flush=True)


if __name__ == "__main__":
    {"recv": recv, "send": send}[sys.argv[1]](int(sys.argv[2]))
