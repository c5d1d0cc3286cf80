"""Faults in the middle of `vif-route-qubes online/offline`, checked with real packets
(issue "Faults, hostile input"; CONTRACT section 1, "Errors", "offline", "Idempotence").

One topology per test:
    app eth0 10.137.7.27 (and 10.137.7.99, an address the VM does not own)
      --vif37.0-- proxy eth0 192.0.2.2 ---- 192.0.2.1 eth0 upstream (UDP receiver)
The invariant checked after every fault: whenever vif37.0 is up, its anti-spoofing
is in place in both families, and a datagram the VM sends from 10.137.7.99 never
reaches upstream while one from 10.137.7.27 does.  Then the same command with the
real tools must converge to the state of an uninterrupted run, and `offline` must
leave nothing of the vif.  Helpers: faults_box.py (topology, probe, judges),
faults_udp.py (the datagrams).

The faults in online and the kills run under both firewall backends (a test that
takes `backend` gets a box under it); the other tests under iptables.  Every event
runs as libxl's xl devd runs it (faults_box.Box.run/popen): relative XENBUS_PATH,
libxl's environment only, stdin /dev/null, and a kill is libxl's SIGKILL of the pid.
"""

import os
import random
import signal
import subprocess
import time
from collections import Counter
from typing import NamedTuple

import pytest

from faults_box import PATH, VIF, Box, alive, announcer, hold_lock, one_line, timed
from firewall import CHANGE_TOOL, nft_stand_in

SEED = 20240613  # fixed: a failing kill point can be replayed
KILLS = 50  # per backend (test_faults.py stays well under 2 minutes with both)


@pytest.fixture
def box(netns, xen, vifcmd, request):
    """The topology, under the test's `backend` when it takes one, else iptables."""
    made = Box(netns, xen, vifcmd, request.getfixturevalue("backend") if "backend" in request.fixturenames
               else "iptables")
    yield made
    made.close()


# -- 1. a forked program fails in the middle of online -----------------------

class Fault(NamedTuple):
    name: str
    stand_in: str | None   # program put first on PATH ...
    body: str | None       # ... with this shell body
    env: dict
    exit: int
    after: str | None      # state right after: "base", "online" or None (in between)
    status: str | None     # hotplug-status in xenstore (None: xenstore-write itself fails)
    says: str              # the stderr line names it
    backends: tuple = ("iptables", "nft")  # the backends that have this fault


FAULTS = [
    # The ipsets are made before the restore whose rules use them: they stay (empty, the link down).
    Fault("iptables-restore", "iptables-restore", "echo 'injected failure' >&2; exit 1", {}, 1, None, "error",
          "iptables-restore", ("iptables",)),
    # The IPv4 restore has succeeded by then: the link must still stay down.
    Fault("ip6tables-restore", "ip6tables-restore", "echo 'injected failure' >&2; exit 1", {}, 1, None, "error",
          "ip6tables-restore", ("iptables",)),
    # The nft backend's one transaction (both families) fails; its reads still work.
    # (No counterpart of the ip6tables-restore case: nothing applies halfway.)
    Fault("nft", "nft", nft_stand_in("echo 'injected failure' >&2; exit 1"), {}, 1, "base", "error", "nft",
          ("nft",)),
    Fault("xenstore-write", None, None, {"FAKE_XENSTORE_WRITE_FAIL": "1"}, 1, "online", None, "xenstore-write"),
    # The tool bound (default 10 s) shortened with VIF_ROUTE_TOOL_TIMEOUT; the
    # stand-in forks so that killing only the direct child would not be enough.
    Fault("qubesdb-read-hangs", "qubesdb-read", "sleep 60; exit 0", {"VIF_ROUTE_TOOL_TIMEOUT": "1"}, 1, "base",
          "error", "qubesdb-read"),
    Fault("hook-hangs", None, None, {"VIF_ROUTE_HOOK_TIMEOUT": "1"}, 0, "online", "connected", "killed"),
]


# `backend` given directly (it overrides the session fixture): each fault only under its backends.
@pytest.mark.parametrize("backend,fault", [(b, f) for f in FAULTS for b in f.backends],
                         ids=[f"{b}-{f.name}" for f in FAULTS for b in f.backends])
def test_fault_in_online_then_real_tools_converge(box, tmp_path, backend, fault):
    online, _ = box.reference()
    env = dict(fault.env)
    if fault.stand_in:
        stand_ins = tmp_path / "stand-ins"
        stand_ins.mkdir()
        (stand_ins / fault.stand_in).write_text(f"#!/bin/sh\n{fault.body}\n")
        (stand_ins / fault.stand_in).chmod(0o755)
        env["PATH"] = f"{stand_ins}:{box.env()['PATH']}"
    if fault.name == "hook-hangs":
        pidfile = tmp_path / "hook-child.pid"
        hook = box.xen.hooks / "50-hangs"
        hook.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nwait\n")
        hook.chmod(0o755)
    started = time.monotonic()
    result = box.run("online", **env)  # as xl devd runs it (faults_box.Box.run)
    took = time.monotonic() - started

    assert result.returncode == fault.exit, result.stderr
    assert "Traceback" not in result.stderr
    line = (result.stderr.splitlines() or [""])[0]
    assert VIF in line and fault.says in line, line
    assert took < 5, f"the fault took {took:.1f} s: a hang is not bounded"
    if fault.status:
        assert box.xen.xs_read(f"{PATH}/hotplug-status") == fault.status
    if fault.status == "error":
        assert box.xen.xs_read(f"{PATH}/hotplug-error") in line
    assert box.quiet() == [], "a hung program (or its child) outlived the event"
    if fault.name == "hook-hangs":
        assert not alive(int(pidfile.read_text())), "the hook's child survived"
        hook.unlink()
    box.assert_guarded(f"after-{fault.name}")
    if fault.after:
        box.assert_state({"base": box.base, "online": online}[fault.after], f"state right after {fault.name}")
    else:
        assert not box.link_up(), f"{fault.name} failed before the link step, yet {VIF} is up"

    # The same event again with the real tools converges to a clean run's state.
    assert box.run("online").returncode == 0
    box.assert_state(online, "online after the fault differs from a clean online")
    assert box.xen.xs_read(f"{PATH}/hotplug-status") == "connected"
    assert box.assert_guarded(f"again-{fault.name}")
    assert box.run("offline").returncode == 0
    box.assert_state(box.base, "offline after the fault left something")
    assert box.leftovers() == []
    one_line(result)  # last, so that the checks above also run when only this fails


# -- 2. SIGKILL at random points of online and offline -----------------------

def test_sigkill_at_random_points_never_unguards_and_reruns_converge(box, tmp_path, backend):
    online, windows = box.reference()
    signal_file = tmp_path / "rules-read"
    rng = random.Random(SEED)
    figures, states_seen = Counter(), set()
    # KILLS kills, and more (up to twice as many) while fewer than 10 left the link up to
    # be probed: where a kill lands depends on the machine's speed, the evidence asked does not.
    for i in range(2 * KILLS):
        if i >= KILLS and box.probe.count >= 10:
            break
        command = ("online", "offline")[i % 2]
        expect_before, expect_after = (box.base, online) if command == "online" else (online, box.base)
        run_time = windows[command][0]
        signal_file.unlink(missing_ok=True)
        if i % 4 < 2:  # anywhere in the run, start-up included (0..150 ms and more)
            delay = rng.uniform(0, max(0.15, 1.2 * run_time))
            proc = box.popen(command)
        else:  # aimed at the changes: counted from the first iptables-restore (nft -f)
            delay = rng.uniform(0, 0.02)
            proc = box.popen(command, PATH=f"{announcer(tmp_path, backend)}:{box.env()['PATH']}",
                             FAULTS_SIGNAL=str(signal_file))
            deadline = time.monotonic() + 5
            while not signal_file.exists() and time.monotonic() < deadline:
                time.sleep(0.001)
            assert signal_file.exists(), f"kill {i}: {command} never ran {CHANGE_TOOL[backend]}: the kill is not aimed"
        time.sleep(delay)
        figures["finished before the kill" if proc.poll() is not None else "killed while running"] += 1
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
        what = f"kill {i}: {command} killed after {delay * 1000:.0f} ms"
        # What the killed event started ends soon: in server mode the server ends the
        # child and its programs; in-process, a program left holding the lock finishes.
        assert box.quiet(within=3) == [], f"{what}: its processes outlived it"
        if box.assert_guarded(f"kill{i}"):
            figures["link up after the kill, spoof probed"] += 1
        if (seen := box.state()) not in (expect_before, expect_after):
            figures["left half done"] += 1
            states_seen.add(seen)
        result = box.run(command)
        assert result.returncode == 0, f"{what}; the rerun failed: {result.stderr}"
        box.assert_state(expect_after, f"{what}; the rerun did not converge")
    assert box.probe.count >= 10, f"too few kills left the link up to prove anything: {figures}"
    print(f"\n{backend}: {KILLS} kills, windows {windows}: {dict(figures)}, "
          f"{len(states_seen)} distinct half-done states")


# -- 3. the interface disappears ---------------------------------------------

def test_offline_after_the_interface_is_gone(box):
    assert box.run("online").returncode == 0
    box.proxy.sh(f"ip link del {VIF}")
    result = box.run("offline")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert box.leftovers() == []
    assert box.rules() == box.base_rules


@pytest.mark.parametrize("command", ["online", "offline"])
def test_interface_vanishes_while_the_command_runs(box, command):
    _, windows = box.reference()
    run_time, change_time = windows[command]
    rng = random.Random(SEED)
    outcomes = Counter()
    for i in range(8):
        if command == "offline":
            assert box.run("online").returncode == 0
        box.xen.xs_rm(f"{PATH}/hotplug-status")
        proc = box.popen(command)
        # Half anywhere in the run, half while it changes the system; `ip -n`
        # (no shell) so that the deletion lands close to the planned moment.
        time.sleep(rng.uniform(0, run_time) if i % 2 else rng.uniform(max(0.0, run_time - change_time - 0.01), run_time))
        subprocess.run(["ip", "-n", box.proxy.name, "link", "del", VIF], check=True)
        _, err = proc.communicate(timeout=30)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
        if command == "offline" or result.returncode == 0:
            assert result.returncode == 0 and "Traceback" not in err, err
        else:
            assert result.returncode == 1, err
            assert VIF in one_line(result)
            assert box.xen.xs_read(f"{PATH}/hotplug-status") == "error"
        outcomes[result.returncode] += 1
        if command == "online":
            assert box.run("offline").returncode == 0
        assert box.leftovers() == [], f"round {i}: offline left something"
        assert box.rules() == box.base_rules
        box.make_vif()
    print(f"\n{command} with the vif deleted under it: exit statuses {dict(outcomes)}")


def test_stale_lock_of_a_killed_process_never_blocks(box, tmp_path):
    holder = hold_lock(box.xen.lock)
    holder.kill()
    holder.wait()
    assert box.xen.lock.exists()
    result, took = timed(lambda: box.run("online", VIF_ROUTE_LOCK_TIMEOUT="5"))
    assert result.returncode == 0 and took < 2.5, (took, result.stderr)

    # vif-route-qubes itself killed while it holds the lock, stuck in a hook
    # whose process lives on: neither the file nor the orphan hook may block.
    pidfile = tmp_path / "hook.pid"
    hook = box.xen.hooks / "50-stuck"
    hook.write_text(f"#!/bin/sh\necho $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}\nexec sleep 60\n")
    hook.chmod(0o755)
    proc = box.popen("offline", VIF_ROUTE_HOOK_TIMEOUT="30")
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pidfile.exists(), "the hook never started"
    proc.kill()
    proc.wait()
    hook.unlink()
    try:
        result, took = timed(lambda: box.run("online", VIF_ROUTE_LOCK_TIMEOUT="5"))
        assert result.returncode == 0 and took < 2.5, (took, result.stderr)
    finally:
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)  # the orphan hook (its own session)
        except ProcessLookupError:
            pass  # server mode: the server ended it with the killed client's child
    box.assert_guarded("after-stale-lock")


def test_held_lock_waits_then_fails_without_change(box):
    holder = hold_lock(box.xen.lock)
    try:
        result, took = timed(lambda: box.run("online", VIF_ROUTE_LOCK_TIMEOUT="1"))
        assert result.returncode == 1, result.stderr
        assert 0.9 <= took < 4, f"waited {took:.1f} s for a 1 s lock timeout"
        line = one_line(result)
        assert "lock" in line and VIF in line, line
        assert box.state() == box.base, "a refused event changed the system"
        assert box.xen.xs_read(f"{PATH}/hotplug-status") == "error"

        # Released while an event waits: that event goes on at once.
        proc = box.popen("online", VIF_ROUTE_LOCK_TIMEOUT="10")
        time.sleep(0.5)
        assert proc.poll() is None, "the event did not wait for the lock"
    finally:
        holder.stdin.close()
        holder.wait()
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert box.assert_guarded("after-wait")


@pytest.mark.parametrize("option", ["--lock-timeout", "--hook-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_timeout_that_is_not_a_finite_number_is_refused(box, option, value):
    """Such a timeout cannot be waited for: a usage error before any change, not a
    traceback once the lock is contended or, worse, halfway through online."""
    holder = hold_lock(box.xen.lock) if option == "--lock-timeout" else None
    hook = box.xen.hooks / "50-quick"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    try:
        result = box.run("online", f"{option}={value}")
    finally:
        if holder:
            holder.stdin.close()
            holder.wait()
    assert result.returncode == 2, result.stderr
    assert option in one_line(result)
    assert box.state() == box.base
