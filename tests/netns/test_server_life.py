"""The command server's life (issue 16): the client's death ends its child and the
child's programs, idle exit, systemd socket activation, a hundred clients at
once, and the units udev/install puts in place.  Every server made here runs
in a network namespace of its own; every event runs in test namespaces."""

import os
import re
import subprocess
import time

import pytest  # noqa: F401

from netns import BIN, RUN_PREFIX, Namespace, run_cmd, sh
from server_kit import ROOT, VIFCMD, alive, own_server, pids_in, run_help, served_env, wait_for  # noqa: F401
from test_vif_behaviour import PATH37, is_up, vrq
from test_vif_behaviour import setup as provider_with_vif

def test_the_clients_death_ends_the_child_and_its_programs(netns, xen, vifcmd, command_server, own_server, tmp_path):
    server = command_server or own_server()
    proxy, path = provider_with_vif(netns, xen)
    pids = tmp_path / "pids"
    # A hook that starts a program in a session of its own, then waits.
    (xen.hooks / "50-stays").write_text(f"#!/bin/sh\necho $$ >> {pids}\nsetsid sleep 60 &\necho $! >> {pids}\nwait\n")
    (xen.hooks / "50-stays").chmod(0o755)
    env = xen.env(vif="vif37.0", XENBUS_PATH=PATH37, VIF_ROUTE_HOOK_TIMEOUT="30", **server.env())
    client = proxy.popen([vifcmd, "online", "type_if=vif"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, 15), "the hook never ran"
    started = [int(p) for p in pids.read_text().split()]
    assert all(alive(p) for p in started)
    client.kill()  # libxl's SIGKILL
    client.wait()
    assert wait_for(lambda: not any(alive(p) for p in started), 5), "the hook or its program outlived the client"
    assert wait_for(lambda: pids_in(proxy) == [], 5), pids_in(proxy)
    assert "is gone: ending the child" in server.log()
    (xen.hooks / "50-stays").unlink()
    result = vrq(proxy, xen, vifcmd, "online", **server.env())
    assert result.returncode == 0, result.stderr
    assert is_up(proxy, "vif37.0") and xen.xs_read(f"{path}/hotplug-status") == "connected"


def test_a_program_started_as_a_hook_dies_is_ended_too(netns, xen, vifcmd, command_server, own_server, tmp_path):
    """A hook that, on the SIGTERM the client's death brings, starts a program in
    a session of its own and exits: the orphan is reparented to the child (a
    subreaper, kept alive until the end), so it is found and killed as well."""
    server = command_server or own_server()
    proxy, _ = provider_with_vif(netns, xen)
    pids = tmp_path / "pids"
    late = tmp_path / "late"
    hook = xen.hooks / "50-late"
    hook.write_text(f"#!/bin/sh\ntrap 'setsid sleep 60 & echo $! > {late}; exit 0' TERM\necho $$ > {pids}\n"
                    "while :; do sleep 0.05; done\n")
    hook.chmod(0o755)
    env = xen.env(vif="vif37.0", XENBUS_PATH=PATH37, VIF_ROUTE_HOOK_TIMEOUT="30", **server.env())
    client = proxy.popen([vifcmd, "online", "type_if=vif"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: pids.exists() and pids.read_text().strip(), 15), "the hook never ran"
    client.kill()
    client.wait()
    assert wait_for(lambda: late.exists() and late.read_text().strip(), 5), "the hook's trap did not run"
    orphan = int(late.read_text())
    assert wait_for(lambda: not alive(orphan), 5), "the program the dying hook started outlived the event"
    assert wait_for(lambda: pids_in(proxy) == [], 5), pids_in(proxy)
    hook.unlink()


# -- idle exit, socket activation, many at once -------------------------------------

def test_idle_exit_then_clients_run_in_process(own_server):
    server = own_server(idle=1.0)
    assert run_help(server).returncode == 0
    started = time.monotonic()
    assert server.proc.wait(timeout=10) == 0
    assert 0.5 < time.monotonic() - started < 5, "exited too early or too late"
    assert "idle for 1 s: exiting" in server.log() and not server.socket.exists()
    result = subprocess.run([VIFCMD, "online", "vif37.0", "10.137.7.27", "--gateway", "10.137.7.1",
                             "--dry-run", "-v"], capture_output=True, text=True, timeout=30,
                            env={**served_env(server), "VIF_ROUTE_SERVER": ""})
    assert "run in-process (server at" in result.stderr, result.stderr


def test_idle_exit_waits_for_a_running_event(own_server, tmp_path):
    server = own_server(idle=0.5)
    hook_dir = tmp_path / "slow-bin"
    hook_dir.mkdir()
    (hook_dir / "qubesdb-read").write_text("#!/bin/sh\nsleep 2\nexit 2\n")
    (hook_dir / "qubesdb-read").chmod(0o755)
    home = Namespace(f"{RUN_PREFIX}-idlecl")
    sh(f"ip netns add {home.name}")
    try:
        result = run_cmd(home, [VIFCMD, "online", "vif37.0", "10.137.7.27", "--dry-run"],
                         served_env(server, PATH=f"{hook_dir}:{os.environ['PATH']}"))
    finally:
        sh(f"ip netns del {home.name}", check=False)
    assert "the event failed" not in result.stderr, result.stderr  # the child was not cut short
    assert server.proc.wait(timeout=10) == 0 and server.served() == 1


@pytest.mark.no_event  # its events go to a server of its own
def test_socket_activation_serves_the_event_that_started_the_server(netns, xen, tmp_path):
    """systemd's protocol (LISTEN_FDS, LISTEN_PID, fd 3) by systemd-socket-activate, which
    starts `serve` at the first connection, and no sooner: that first event (Xen's online,
    whose hook runs one more event) is served by the server it started, and so is the
    hook's.  Client and server find the socket as installed ones do: the client by
    VIF_ROUTE_SERVER_SOCKET, `serve` with no --socket of its own and the same variable in
    its environment (before issue 28 `serve` offered itself to that socket, waited out its
    own hello, and the event ran in-process)."""
    proxy, path = provider_with_vif(netns, xen)
    sock = tmp_path / "activated.sock"
    nested = tmp_path / "nested"
    (xen.hooks / "50-nested").write_text(f"#!/bin/sh\nvif-route-qubes --help > /dev/null 2> {nested}\n"
                                         f"echo \"status $?\" >> {nested}\n")
    (xen.hooks / "50-nested").chmod(0o755)
    home = Namespace(f"{RUN_PREFIX}-act")
    sh(f"ip netns add {home.name}")
    log_path = tmp_path / "activated.log"
    with open(log_path, "wb") as log:
        # systemd-socket-activate passes on only the variables -E names
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{home.name}", "systemd-socket-activate", "-l", str(sock),
                                 "-E", f"VIF_ROUTE_SERVER_SOCKET={sock}", "-E", "PATH", VIFCMD, "serve"],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    env = {"VIF_ROUTE_SERVER_SOCKET": str(sock), "VIF_ROUTE_SERVER": "require"}
    try:
        assert wait_for(sock.exists, 10)
        assert "serve[" not in log_path.read_text() and proc.poll() is None  # not started before an event
        first = vrq(proxy, xen, VIFCMD, "online", "type_if=vif", "-v", **env)
        text = log_path.read_text(errors="replace")
        assert first.returncode == 0, (first.stderr, text)
        assert f"served by vif-route-qubes server pid {proc.pid}" in first.stderr, (first.stderr, text)
        assert nested.read_text().splitlines()[-1] == "status 0", nested.read_text()  # the hook's event: served
        assert is_up(proxy, "vif37.0") and xen.xs_read(f"{path}/hotplug-status") == "connected"
        assert "refused a connection" not in text and "Broken pipe" not in text, text
        (xen.hooks / "50-nested").unlink()
        second = vrq(proxy, xen, VIFCMD, "offline", "type_if=vif", "-v", **env)  # resident: the same server
        assert second.returncode == 0 and f"served by vif-route-qubes server pid {proc.pid}" in second.stderr
        assert proc.poll() is None, "the server did not stay"
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        text = log_path.read_text(errors="replace")
        assert "idle timeout none" in text, text  # resident by default
        assert "exit after 3 events" in text and "refused a connection" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sh(f"ip netns del {home.name}", check=False)


HUNDRED = 100


def test_a_hundred_clients_at_once_are_all_served_once(netns, xen, vifcmd, command_server, own_server):
    server = command_server or own_server()
    proxy, vms = netns.make("prov"), netns.make("vms")
    batch = "".join(f"link add vif{d}.0 address fe:ff:ff:ff:ff:ff type veth peer name p{d} netns {vms.name}\n"
                    for d in range(1, HUNDRED + 1))
    subprocess.run(["ip", "-n", proxy.name, "-batch", "-"], input=batch, text=True, check=True)
    before = server.served()
    env = xen.env(QUBES_NET_BACKEND="nft", **server.env())
    procs = {d: proxy.popen([vifcmd, "online", f"vif{d}.0", f"10.137.{d // 200}.{d % 200 + 2}", "--gateway",
                             "10.137.99.1", "--mac", "00:16:3e:5e:6c:19", "-v"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for d in range(1, HUNDRED + 1)}
    results = {d: (p.communicate(timeout=120), p.returncode) for d, p in procs.items()}
    assert {d: rc for d, (_, rc) in results.items() if rc != 0} == {}, [results[d] for d in results if results[d][1]]
    for d, ((out, err), _) in results.items():
        assert err.count("served by vif-route-qubes server pid") == 1, err
        assert f"vif{d}.0" in err and not re.search(rf"vif(?!{d}\.0\b)\d+\.0", err), err  # its own log only
    assert server.served() - before == HUNDRED
    routes = proxy.out("ip -4 route").splitlines()
    for d in range(1, HUNDRED + 1):
        assert sum(f"10.137.{d // 200}.{d % 200 + 2} dev vif{d}.0 " in line for line in routes) == 1, d
    elements = proxy.out("nft list set ip qubes allowed")
    assert sum(f'"vif{d}.0"' in elements for d in range(1, HUNDRED + 1)) == HUNDRED


# -- the units -----------------------------------------------------------------------

def test_units_are_installed_enabled_verified_and_removed(tmp_path):
    install = ROOT / "udev" / "install"
    done = subprocess.run([str(install), "--root", str(tmp_path), "--bindir", str(BIN), "--any-bindir"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    units = tmp_path / "etc/systemd/system"
    socket_unit = (units / "vif-route-qubes.socket").read_text()
    for line in ("SocketMode=0600", "Accept=no", "ListenStream=/run/vif-route-qubes/server.sock"):
        assert line in socket_unit.splitlines()
    assert "xendriverdomain.service" in next(x for x in socket_unit.splitlines() if x.startswith("Before="))
    assert f"ExecStart={BIN}/vif-route-qubes serve" in (units / "vif-route-qubes.service").read_text()
    wants = units / "sockets.target.wants" / "vif-route-qubes.socket"
    assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/vif-route-qubes.socket"
    verify = subprocess.run(["systemd-analyze", "verify", "./vif-route-qubes.socket", "./vif-route-qubes.service"],
                            cwd=units, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    undone = subprocess.run([str(install), "--root", str(tmp_path), "--uninstall"], capture_output=True, text=True,
                            timeout=60)
    assert undone.returncode == 0, undone.stderr
    assert not wants.is_symlink() and not (units / "vif-route-qubes.socket").exists()
    assert not (units / "vif-route-qubes.service").exists()


def test_a_served_child_lets_go_of_the_clients_output_before_its_exit(tmp_path):
    # The child's report to the server is held (its pipe is full), so the child
    # stays alive just before its exit: by then the client's output must be at
    # EOF already, or an exit slowed by the kernel (an nf_tables socket after
    # deletes) would hold back udev and any shell reading that output.
    import select
    from fcntl import F_SETPIPE_SZ, fcntl

    from vif_route_qubes.server import child

    out_r, out_w = os.pipe()
    report_r, report_w = os.pipe()
    fcntl(report_w, F_SETPIPE_SZ, 4096)
    os.write(report_w, b"x" * 4096)  # full: the child's report blocks
    stdin = os.open(os.devnull, os.O_RDONLY)
    fds = [stdin, out_w, os.dup(out_w), os.open("/proc/self/ns/net", os.O_RDONLY),
           os.open("/proc/self/ns/mnt", os.O_RDONLY), os.open(str(tmp_path), os.O_RDONLY)]
    request = {"entry": "vif-route-qubes", "argv": [b"vif-route-qubes", b"--help"], "env": [(b"PATH", b"/usr/bin")],
               "umask": 0o022, "nice": os.getpriority(os.PRIO_PROCESS, 0), "started": time.perf_counter(),
               "stdio": [["utf-8", "strict"]] * 3, "ignored": [], "blocked": []}
    server_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(out_r)
            os.close(report_r)
            child.run(request, fds, server_pid, report_w)  # never returns
        finally:
            os._exit(1)
    for fd in (*fds, report_w):
        os.close(fd)
    try:
        output = b""
        while select.select([out_r], [], [], 10)[0]:
            chunk = os.read(out_r, 65536)
            if not chunk:
                break
            output += chunk
        else:
            pytest.fail("the client's output was not at EOF while the child waited to report")
        assert b"Usage: vif-route-qubes" in output
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child exited before its report was read"
        assert os.read(report_r, 4096) == b"x" * 4096
        assert os.read(report_r, 100).split()[0] == b"0"
    finally:
        os.close(report_r)
        os.close(out_r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
