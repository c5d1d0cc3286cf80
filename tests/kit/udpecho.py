#!/usr/bin/env python3
"""A UDP recorder/echo and its client, for the walk-through (standard library only).

    udpecho.py serve ADDRESS PORT LOGFILE
        binds ADDRESS:PORT, then creates LOGFILE (the sign that it is ready);
        for every datagram appends "SOURCE-IP SOURCE-PORT" to LOGFILE and
        answers "seen SOURCE-IP:SOURCE-PORT".
    udpecho.py send ADDRESS PORT [TIMEOUT]
        sends one datagram and prints the answer (exit 0) or `timeout` (exit 1).
"""

import socket
import sys


def serve(address: str, port: int, logfile: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, port))
        with open(logfile, "a", buffering=1) as log:  # line-buffered: readers see each datagram at once
            while True:
                _data, (src, sport) = sock.recvfrom(2048)
                log.write(f"{src} {sport}\n")
                sock.sendto(f"seen {src}:{sport}".encode(), (src, sport))


def send(address: str, port: int, timeout: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"hello from the walk-through", (address, port))
        try:
            while True:
                data, source = sock.recvfrom(2048)
                if source == (address, port):
                    print(data.decode(errors="replace"))
                    return 0
        except (socket.timeout, TimeoutError):
            print("timeout")
            return 1


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "serve":
        serve(argv[1], int(argv[2]), argv[3])
        return 0
    if len(argv) in (3, 4) and argv[0] == "send":
        return send(argv[1], int(argv[2]), float(argv[3]) if len(argv) == 4 else 2.0)
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
