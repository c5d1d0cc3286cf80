"""Failures reach syslog, facility daemon, as one RFC 3164 datagram (issue 2)."""

import socket

from netns import run_cmd


def test_failure_is_logged_to_syslog_facility_daemon(netns, xen, vifcmd, tmp_path):
    proxy = netns.make("prox")
    path = xen.backend(37, ip="10.137.7.27", mac="00:16:3e:5e:6c:19")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "log")
    listener.bind(address)
    listener.settimeout(5)
    try:
        # No vif37.0 in this namespace: online fails.
        result = run_cmd(proxy, [vifcmd, "online", "type_if=vif"],
                         xen.env(vif="vif37.0", XENBUS_PATH=path, VIF_ROUTE_SYSLOG=address))
        assert result.returncode == 1
        datagram = listener.recv(4096).decode()
    finally:
        listener.close()
    # <27> = daemon (3) * 8 + err (3); the same line as on stderr, with ident and pid.
    assert datagram.startswith("<27>vif-route-qubes["), datagram
    message = datagram.split("]: ", 1)[1]
    assert message == result.stderr.strip().removeprefix("vif-route-qubes: ")
    assert "vif37.0" in message and "no such interface" in message


def test_no_syslog_socket_is_not_an_error(netns, xen, vifcmd, tmp_path):
    proxy = netns.make("prox")
    result = run_cmd(proxy, [vifcmd, "offline", "vif37.0", "10.137.7.27"],
                     xen.env(VIF_ROUTE_SYSLOG=str(tmp_path / "nothing-here")))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
