"""The command server (issue 16, CONTRACT section 7) as a user of the two commands
sees it: the light client, refusals, fallback before acceptance and failure
after it.  The rest of the namespace suite runs through the session's server
too (conftest.py, server_mode.py); test_server_life.py has the client's death,
idle exit, socket activation, many clients at once and the units.

Every server made here runs in a network namespace of its own; every event
runs in test namespaces.
"""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

import memory
from vif_route_qubes.server.spare import WAITING_NAME
from netns import BIN, RUN_PREFIX, run_cmd
from server_kit import HEAVY, PY, ROOT, VIFCMD, own_server, pids_in, cmdline, run_help, served_env, wait_for  # noqa: F401
from test_vif_behaviour import PATH37, err_lines, is_up, vrq
from test_vif_behaviour import setup as provider_with_vif

# -- the light client ---------------------------------------------------------

@pytest.mark.parametrize("program", ["vif-route-qubes", "qubes-setup-dnat-to-ns"])
def test_a_served_event_imports_nothing_heavy_in_the_client(command_server, own_server, program):
    server = command_server or own_server()
    result = subprocess.run([PY, "-X", "importtime", str(BIN / program), "--help"], capture_output=True,
                            text=True, env=served_env(server), timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout  # click's help, printed by the server's child
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "vif_route_qubes.server.client" in imported
    assert not {name for name in imported if name.split(".")[0] in HEAVY}, sorted(imported)
    # Nor what costs most of a light start: re (pip's wrappers import it) and json (which imports it).
    assert not {"re", "enum", "json"} & imported, sorted(imported)


def test_in_process_run_does_import_them(command_server):
    """The check above can fail: the same measure sees click when the client runs in-process."""
    result = subprocess.run([PY, "-X", "importtime", VIFCMD, "--help"], capture_output=True, text=True,
                            env={**os.environ, "VIF_ROUTE_SERVER": "off"}, timeout=30)
    assert result.returncode == 0 and "Usage:" in result.stdout
    assert re.search(r"\|\s+click$", result.stderr, re.M)


def _sockets(pid: int) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed meanwhile: the server answers before it reaps
            pass
    return [link[len("socket:["):-1] for link in links if link.startswith("socket:")]


def _inodes(pid: int, table: str, column: int) -> set[str]:
    """Socket inodes of /proc/PID/net/TABLE: those of that process's network namespace."""
    rows = [line.split() for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]]
    return {row[column] for row in rows if len(row) > column}


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _waiting(pid: int) -> bool:
    """A spare past its start, waiting for a request (named so only then).  A
    spare forked while a request ran holds that request's connection until
    it has closed what it inherited (CI saw it still there)."""
    return _comm(pid) == WAITING_NAME


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    except (FileNotFoundError, ProcessLookupError):
        return None


@pytest.mark.parametrize("spare", [True, False], ids=["spare", "no-spare"])
def test_the_server_has_one_thread_and_no_netlink_socket(own_server, spare):
    """Nor its spare child, forked ahead of the next request: it holds nothing of one."""
    server = own_server(args=[] if spare else ["--no-spare"])
    assert run_help(server).returncode == 0  # after a request too
    want = 2 if spare else 1  # the listening socket, and the spare's channel
    deadline = time.monotonic() + 5
    while True:  # the request's connection is closed once its child is reaped, a moment after the client exits
        sockets, children = _sockets(server.pid), _children(server.pid)
        if ((len(sockets), len(children)) == (want, want - 1) and all(map(_waiting, children))
                or time.monotonic() > deadline):
            break
        time.sleep(0.05)
    for pid in (server.pid, *children):
        assert os.listdir(f"/proc/{pid}/task") == [str(pid)]
    netlink = _inodes(server.pid, "netlink", 9)
    assert netlink, "the namespace's own netlink sockets are listed (the check can fail)"
    # Unix sockets of the server's namespace only, no netlink one.
    assert len(sockets) == want and set(sockets) <= _inodes(server.pid, "unix", 6) - netlink, sockets
    assert len(children) == want - 1, children
    for pid in children:
        assert set(_sockets(pid)) <= _inodes(server.pid, "unix", 6) - netlink
    if spare:  # and a later event is run by it, once it is ready (it makes its memory its own on idle CPU time)
        for _ in range(25):
            time.sleep(0.2)
            assert run_help(server).returncode == 0
            if "served vif-route-qubes by spare child" in server.log().splitlines()[-1]:
                break
        assert "served vif-route-qubes by spare child" in server.log().splitlines()[-1], server.log()
        server.stop()
        assert not any(Path(f"/proc/{pid}").exists() for pid in children), "the spare outlived the server"


def _waiting_spares(server) -> list[int]:
    """The server's children that ran no event (a served child may linger a moment after its answer)."""
    served = {int(pid) for pid in re.findall(r"by (?:spare )?child (\d+)", server.log())}
    return [pid for pid in _children(server.pid) if pid not in served]


def _one_spare(server, not_this: int | None = None) -> int:
    deadline = time.monotonic() + 5
    while True:
        found = [pid for pid in _waiting_spares(server) if pid != not_this]
        if len(found) == 1 or time.monotonic() > deadline:
            assert len(found) == 1, (found, server.log())
            return found[0]
        time.sleep(0.05)


def test_a_ready_spare_waits_at_the_servers_priority(own_server):
    """It prefaults on idle CPU time only (SCHED_IDLE); ready, it waits at the
    server's policy and nice value.  A SCHED_IDLE spare woken on a busy CPU
    waits for an idle one (0.36 s for `--version` here, with a busy loop on
    its CPU, against 10 ms in a child forked then: BENCHMARKS.md)."""
    server = own_server()
    assert run_help(server).returncode == 0
    waiting = _one_spare(server)
    assert wait_for(lambda: _waiting(waiting), 5), _comm(waiting)
    assert os.sched_getscheduler(waiting) == os.sched_getscheduler(server.pid) == os.SCHED_OTHER
    assert os.getpriority(os.PRIO_PROCESS, waiting) == os.getpriority(os.PRIO_PROCESS, server.pid) == -10
    assert run_help(server).returncode == 0
    assert f"served vif-route-qubes by spare child {waiting}:" in server.log().splitlines()[-1], server.log()


def test_a_spare_killed_while_it_waits_is_replaced_and_events_still_run(own_server):
    server = own_server()
    assert run_help(server).returncode == 0
    spare = _one_spare(server)
    os.kill(spare, signal.SIGKILL)  # a child of the test's own server
    deadline = time.monotonic() + 5
    while f"spare child {spare} ended unused" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"spare child {spare} ended unused" in server.log()
    result = run_help(server)
    assert result.returncode == 0 and "version" in result.stdout, result.stderr
    # Forked for it, or run by a new spare made meanwhile (CI saw that once under load).
    last = server.log().splitlines()[-1]
    assert "served vif-route-qubes by child" in last or "served vif-route-qubes by spare child" in last, last
    assert f"spare child {spare}:" not in last
    assert _one_spare(server, not_this=spare) != spare  # and a new spare waits
    assert server.proc.poll() is None


BUDGET_KB = 40 * 1024  # issue 28: the resident server after a quiet period, spare included (PSS)


def test_a_quiet_server_drops_its_spare_keeps_its_budget_and_makes_one_again(own_server):
    server = own_server(args=["--spare-idle", "3"])
    assert run_help(server).returncode == 0
    spare = _one_spare(server)
    assert wait_for(lambda: f"spare child {spare} dropped" in server.log(), 15), server.log()
    assert wait_for(lambda: memory.children(server.pid) == [], 5)
    quiet = memory.tree_pss_kb(server.pid)
    assert list(quiet) == [server.pid] and quiet[server.pid] <= BUDGET_KB, quiet
    assert run_help(server).returncode == 0  # a lone event: a child forked for it
    assert "served vif-route-qubes by child" in server.log().splitlines()[-1]
    again = _one_spare(server)  # requests come again: so does the spare
    for _ in range(10):  # and it runs the next one, once ready (within the 3 s)
        assert run_help(server).returncode == 0
        if f"by spare child {again}" in server.log():
            break
        time.sleep(0.2)
    assert f"served vif-route-qubes by spare child {again}" in server.log(), server.log()
    assert "idle timeout none" in server.log() and server.proc.poll() is None  # resident by default


# -- refusals: the server keeps serving -----------------------------------------

def test_a_non_root_peer_is_refused_in_one_line_and_changes_nothing(own_server, netns, xen, vifcmd):
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}-", dir="/tmp"))
    folder.chmod(0o711)
    server = own_server(folder=folder)
    os.chmod(server.socket, 0o666)  # for the test only: let a non-root peer reach it
    proxy, path = provider_with_vif(netns, xen)
    before = proxy.out("ip -o link show vif37.0; ip route; iptables-save | grep -v '^#'; nft list ruleset")
    env = {**xen.env(vif="vif37.0", XENBUS_PATH=PATH37), **server.env()}
    result = run_cmd(proxy, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", vifcmd, "online",
                             "type_if=vif"], env)
    assert result.returncode == 1
    line, = err_lines(result)
    assert "uid 65534 is not root" in line and "Traceback" not in result.stderr
    assert server.log().count("is not root") == 1
    after = proxy.out("ip -o link show vif37.0; ip route; iptables-save | grep -v '^#'; nft list ruleset")
    assert after == before and xen.xs_read(f"{path}/hotplug-status") is None
    assert server.proc.poll() is None
    assert vrq(proxy, xen, vifcmd, "online", **server.env()).returncode == 0  # still serving root
    assert is_up(proxy, "vif37.0") and "served vif-route-qubes" in server.log()


def raw_exchange(server, payload: bytes, fds=(), hold=False):
    """Connect, read the hello, send `payload` (with fds), return the reply (or None)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server.socket))
    head = sock.recv(4)
    hello = json.loads(sock.recv(int.from_bytes(head, "big")))
    assert hello["hello"] == "vif-route-qubes"
    if fds:
        socket.send_fds(sock, [payload], list(fds))
    else:
        sock.sendall(payload)
    if not hold:
        sock.shutdown(socket.SHUT_WR)
    try:
        head = sock.recv(4)
        return json.loads(sock.recv(int.from_bytes(head, "big"))) if head else None
    finally:
        sock.close()


def framed(obj) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("name,payload,with_fds", [
    ("junk", b"GET / HTTP/1.0\r\n\r\n", False),
    ("oversized", struct.pack(">I", 512 << 20) + b"{}", True),
    ("truncated", struct.pack(">I", 1000) + b'{"version": 1', True),
    ("not-json", struct.pack(">I", 5) + b"\xff\xfe{}x", True),
    ("deeply-nested", struct.pack(">I", 200_000) + b"[" * 200_000, True),  # deeper than the recursion limit
    ("no-descriptors", framed({"version": 1, "entry": "vif-route-qubes", "argv": [], "env": []}), False),
    ("bad-fields", framed({"version": 1, "entry": "vif-route-qubes", "argv": ["!!"], "env": [],
                           "umask": 18, "started": 0, "ignored": [], "blocked": [],
                           "stdio": [["utf-8", "strict"]] * 3}), True),
    ("unknown-entry", framed({"version": 1, "entry": "/bin/sh", "argv": ["eA=="], "env": []}), True),
    ("other-version", framed({"version": 99}), True),
    ("serve-itself", framed({"version": 1, "entry": "vif-route-qubes", "argv": ["dmlmLXJvdXRlLXF1YmVz", "c2VydmU="],
                             "env": [], "umask": 18, "nice": 0, "started": 0, "ignored": [], "blocked": [],
                             "stdio": [["utf-8", "strict"]] * 3}), True),  # `serve` is never served
])
def test_bad_requests_are_refused_and_the_server_keeps_serving(own_server, name, payload, with_fds):
    server = own_server()
    fds = [os.open("/dev/null", os.O_RDWR) for _ in range(6)] if with_fds else []
    try:
        reply = raw_exchange(server, payload, fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert reply is not None and "refused" in reply, reply
    assert server.log().count("refused a connection") == 1
    assert " served " not in server.log(), "a bad request was run"
    result = run_help(server)
    assert result.returncode == 0 and "version" in result.stdout
    assert server.served() == 1 and server.proc.poll() is None


def test_a_client_that_sends_nothing_delays_the_server_only_briefly(own_server):
    server = own_server()
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.connect(str(server.socket))
    try:
        started = time.monotonic()
        result = run_help(server)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 6
    finally:
        stuck.close()
    assert server.served() == 1


# -- fallback before acceptance, failure after it ---------------------------------

def test_no_server_means_in_process_and_verbose_says_which(tmp_path, command_server):
    missing = tmp_path / "none.sock"
    for env, says in (({"VIF_ROUTE_SERVER_SOCKET": str(missing)}, "run in-process (server at"),
                      ({"VIF_ROUTE_SERVER": "off"}, "run in-process (VIF_ROUTE_SERVER=off)")):
        result = subprocess.run([VIFCMD, "online", "vif37.0", "10.137.7.27", "--gateway", "10.137.7.1",
                                 "--dry-run", "-v"], capture_output=True, text=True, timeout=30,
                                env={**{k: v for k, v in os.environ.items() if not k.startswith("VIF_ROUTE_")}, **env})
        assert says in result.stderr, result.stderr
    result = subprocess.run([VIFCMD, "--version"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "VIF_ROUTE_SERVER_SOCKET": str(missing), "VIF_ROUTE_SERVER": "require"})
    assert result.returncode == 1 and "no server took the event" in result.stderr


def test_served_and_in_process_runs_look_the_same(netns, xen, vifcmd, command_server, own_server):
    server = command_server or own_server()
    proxy, _ = provider_with_vif(netns, xen)
    runs = {}
    for mode, env in (("served", server.env()), ("in-process", {"VIF_ROUTE_SERVER": "off"})):
        runs[mode] = [vrq(proxy, xen, vifcmd, *argv, **env)
                      for argv in (("online", "--dry-run"), ("online", "--mac", "bad"), ("frobnicate",),
                                   ("online", "-v", "--dry-run"))]
    for served, local in zip(runs["served"], runs["in-process"]):
        assert served.returncode == local.returncode
        assert served.stdout == local.stdout
        strip = lambda text: re.sub(r".*(served by vif-route-qubes server pid \d+|run in-process \(.*\)).*\n", "", text)
        assert strip(served.stderr) == strip(local.stderr)
    for mode, results in runs.items():  # -v is our steps, not the libraries' chatter (sh, pyroute2, asyncio)
        assert not re.search(r"NLMSG|started process|Using selector", results[3].stderr), (mode, results[3].stderr)
    assert "served by vif-route-qubes server pid" in runs["served"][3].stderr
    assert "run in-process (VIF_ROUTE_SERVER=off)" in runs["in-process"][3].stderr


def test_changed_installed_code_makes_the_client_run_in_process(own_server):
    server = own_server()
    module = ROOT / "vif_route_qubes" / "errors.py"
    saved = module.stat()
    try:
        os.utime(module, ns=(saved.st_atime_ns, saved.st_mtime_ns + 1_000_000_000))
        result = subprocess.run([VIFCMD, "online", "vif37.0", "10.137.7.27", "--gateway", "10.137.7.1",
                                 "--dry-run", "-v"], capture_output=True, text=True, timeout=30,
                                env={**served_env(server), "VIF_ROUTE_SERVER": ""})
    finally:
        os.utime(module, ns=(saved.st_atime_ns, saved.st_mtime_ns))
    assert "run in-process (server at" in result.stderr and "installed code changed" in result.stderr
    assert server.proc.wait(timeout=10) == 0, "the server did not exit"
    assert "installed code changed" in server.log() and " served " not in server.log()


def test_the_server_killed_mid_request_fails_the_event_in_one_line(own_server, netns, xen, vifcmd, tmp_path):
    server = own_server()
    proxy, path = provider_with_vif(netns, xen)
    stand_ins = tmp_path / "slow"
    stand_ins.mkdir()
    (stand_ins / "qubesdb-read").write_text(f"#!/bin/sh\ntouch {tmp_path}/reading\nsleep 20\n")
    (stand_ins / "qubesdb-read").chmod(0o755)
    env = xen.env(vif="vif37.0", XENBUS_PATH=PATH37, PATH=f"{stand_ins}:{xen.env()['PATH']}", **server.env())
    client = proxy.popen([vifcmd, "online", "type_if=vif"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (tmp_path / "reading").exists(), 15), "the event never started"
    os.kill(server.pid, signal.SIGKILL)
    out, err = client.communicate(timeout=15)
    assert client.returncode == 1
    line, = [x for x in err.splitlines() if x.strip()]
    assert "the event failed" in line and f"server pid {server.pid}" in line, line
    assert "Traceback" not in err
    # The child dies with its server (PR_SET_PDEATHSIG); a program it ran runs out like an
    # in-process run's killed in the middle (here the stand-in's sleep: ended now, by pid).
    ours = lambda: [p for p in pids_in(proxy) if "vif-route-qubes" in cmdline(p)]
    assert wait_for(lambda: ours() == [], 5), f"the child outlived its server: {ours()}"
    for pid in pids_in(proxy):
        os.kill(int(pid), signal.SIGKILL)
    assert vrq(proxy, xen, vifcmd, "online", VIF_ROUTE_SERVER="off").returncode == 0  # a rerun converges
    assert is_up(proxy, "vif37.0") and xen.xs_read(f"{path}/hotplug-status") == "connected"
