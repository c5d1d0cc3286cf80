"""Where the server listens: the socket systemd passes (socket activation,
sd_listen_fds' protocol without its library), or one bound at a path; and
its readiness told to systemd (sd_notify's protocol, also without it)."""

import os
import socket


def systemd_listener() -> socket.socket | None:
    """The socket systemd passes (sd_listen_fds: LISTEN_PID is us, fd 3)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    os.set_inheritable(3, False)
    return socket.socket(fileno=3)


def bound_listener(path: str) -> socket.socket:
    """A 0600 socket at `path`; a stale one (nobody answering) is replaced."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        raise SystemExit(f"vif-route-qubes serve: a server already listens on {path}")
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    finally:
        probe.close()
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(mask)
    sock.listen(1024)
    return sock


def notify_socket() -> str | None:
    """Where systemd (Type=notify) takes our readiness, taken out of the
    environment so that no child, hook or program inherits it."""
    address = os.environ.pop("NOTIFY_SOCKET", None)
    if not address or address[0] not in "/@":
        return None  # unset, or a transport (vsock) only the service manager of a VM uses
    return "\0" + address[1:] if address[0] == "@" else address


def notify(address: str | None, state: str) -> None:
    """sd_notify(): one datagram of `state` lines; nothing when not asked for."""
    if address is None:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), address)
