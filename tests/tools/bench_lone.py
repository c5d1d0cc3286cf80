"""Lone events (issue 28): `tests/tools/bench.py --lone [--quiet SECONDS] [--gap SECONDS]`.

Most events on a network VM come alone, minutes apart.  Each round times one
online+offline of vif37.0 in Xen's form (type_if=vif, relative XENBUS_PATH,
stdin /dev/null), interleaved, each side in a namespace of its own, and
every event a lone one: after QUIET seconds without any (the resident server
and the original) or GAP seconds (the socket-started and in-process sides,
which start new processes for each event anyway; the gap lets the machine go
idle, as before a lone event: until 2026-12-07 they ran right after the
resident's event, the first one on a machine just woken, and paid for it):
  socket     the server started by its socket for the event: systemd-socket-activate
             holds VIF_ROUTE_SERVER_SOCKET (the path the client really uses) and
             starts `vif-route-qubes serve` on the event's connection; a new server
             for each event (online, then offline), stopped after it
  resident   one `serve` for the whole run (resident: no idle exit), each event
             after QUIET seconds without any (default 60: what a lone event finds)
  in-process VIF_ROUTE_SERVER=off
  original   the shell original (--originals DIR, see tests/tools/bench_originals.py),
             each event also after QUIET seconds without any: the ratio compares
             lone events with lone events (until 2026-12-07 the original ran
             right after the others, on a warm machine)
with stand-ins for xenstore and qubesdb compiled from tests/tools/bench_standins.c
(gcc, at run time): ~1 ms a call, as the real C tools.  Before the timed
rounds each side's online and offline are checked once (route, anti-spoofing,
hotplug-status; all gone after offline).  Medians per side and event, the
ratio to the original, each event's split (VIF_ROUTE_TIMING: the client's
start, connect and hello, fork or spare, the child's phases, each program and
netlink step), and the resident server's PSS after the quiet period (server
and spare; tests/kit/memory.py pss_kb).
"""

import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import bench_originals as orig

HERE = Path(__file__).parent
EVENTS = ("online", "offline")
# Sides whose every event comes after QUIET seconds: the resident server (its
# spare gone) and the original, compared as lone events both; the others after GAP.
AFTER_QUIET = ("resident", "original")


def build_standins(folder: Path) -> Path:
    """xenstore-read, xenstore-write, qubesdb-read compiled into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "xenstore-read"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(HERE / "bench_standins.c")], check=True)
    for name in ("xenstore-write", "qubesdb-read"):
        (folder / name).symlink_to("xenstore-read")
    return folder


def _split(stderr: str) -> dict:
    """The client's and the child's timing lines of one event, flattened (ms)."""
    import json

    out = {}
    for line in stderr.splitlines():
        if line.startswith("client-timing "):
            out.update({f"client.{k}": v for k, v in json.loads(line[14:]).items()})
        elif line.startswith("timing "):
            record = json.loads(line[7:])
            out.update({f"phase.{k}": v for k, v in record["phases_ms"].items()})
            for kind, ms in record["steps_ms"]:
                out[f"step.{kind}"] = out.get(f"step.{kind}", 0) + ms
    return out


def _median_split(splits: list[dict]) -> dict:
    keys = dict.fromkeys(k for s in splits for k in s)
    return {k: round(statistics.median(s.get(k, 0) for s in splits), 2) for k in keys}


class Activated:
    """systemd-socket-activate holding `socket` in namespace `home`; the server it
    starts on the first connection is the activator's own process (exec), its
    spare a child in the same session: both ended by the session's group."""

    def __init__(self, bin_dir: Path, home: str, socket: Path, log: Path) -> None:
        self.socket = socket
        extra = [f"-E{k}={os.environ[k]}" for k in ("PYTHONPATH",) if k in os.environ]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", home, "nice", "-n", "-10", "systemd-socket-activate",
                                          "-l", str(socket), *extra, str(bin_dir / "vif-route-qubes"), "serve"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 10
        while not socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: systemd-socket-activate did not listen on {socket}")
            time.sleep(0.01)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a spare left behind
        except ProcessLookupError:
            pass
        self.socket.unlink(missing_ok=True)


def _pss(pid: int) -> dict:
    """PSS (kB) of the server and of its children (the spare), or why not."""
    try:
        from memory import pss_kb
    except ImportError:
        return {"missing": "tests/kit/memory.py pss_kb(pid) (the server helper's)"}
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    kids = [pss_kb(int(c)) for c in children]
    return {"server_kb": pss_kb(pid), "children_kb": kids, "total_kb": pss_kb(pid) + sum(kids)}


def measure(netns, env, xen, runs: int, originals: Path | None, backend: str, quiet: float, gap: float,
            bin_dir: Path, server_cls, home: str, plain_make) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="lone-", dir=xen.root))
    cbin = build_standins(tmp / "cbin")
    path = xen.backend(orig.DOMID, ip=orig.ADDR, mac=orig.MAC)
    for key, value in orig.QUBESDB.items():
        xen.qdb_write(key, value)
    base = dict(env, vif=orig.VIF, XENBUS_PATH=path, PATH=f"{cbin}:{env['PATH']}", VIF_ROUTE_TIMING="1")
    for key in ("VIF_ROUTE_SERVER", "VIF_ROUTE_SERVER_SOCKET"):
        base.pop(key, None)
    ours = [str(bin_dir / "vif-route-qubes")]
    sides = {}
    (tmp / "resident").mkdir()
    resident = server_cls(bin_dir, home, tmp / "resident", idle=86400)  # resident for the run
    try:
        sides["resident"] = (netns.make("lres"), ours, dict(base, **resident.env()))
        act_socket = tmp / "activated" / "server.sock"
        act_socket.parent.mkdir()
        sides["socket"] = (netns.make("lsoc"), ours, dict(base, VIF_ROUTE_SERVER_SOCKET=str(act_socket),
                                                          VIF_ROUTE_SERVER="require"))
        sides["in-process"] = (netns.make("lin"), ours, dict(base, VIF_ROUTE_SERVER="off"))
        if originals:
            original = netns.make("lorg") if backend == "nft" else plain_make("lorg")
            sides["original"] = (original, [str(Path(originals).resolve() / "vif-route-qubes")],
                                 {k: v for k, v in base.items() if k != "VIF_ROUTE_TIMING"})
        for ns, _, _ in sides.values():
            netns.vif(ns, plain_make("lvm"), orig.VIF)

        def event(name, command) -> tuple[float, str]:
            ns, argv, side_env = sides[name]
            activated = Activated(bin_dir, home, act_socket, tmp / "activated.log") if name == "socket" else None
            try:
                with orig.inside_with_sys(ns):
                    start = time.perf_counter()
                    result = subprocess.run([*argv, command, "type_if=vif"], env=side_env, stdin=subprocess.DEVNULL,
                                            capture_output=True, text=True)
                    elapsed = time.perf_counter() - start
            finally:
                if activated:
                    activated.stop()
            if result.returncode != 0:
                raise SystemExit(f"bench: {name} {command} failed ({result.returncode}): {result.stderr.strip()}")
            return elapsed, result.stderr

        for name, (ns, _, _) in sides.items():  # each side once, its effect checked
            event(name, "online")
            up, status = orig.state(ns, backend), xen.xs_read(f"{path}/hotplug-status")
            event(name, "offline")
            down = orig.state(ns, backend)
            if not (all(up.values()) and status == "connected" and not any(down.values())):
                raise SystemExit(f"bench: lone {name} did not do its job: {up}, {status!r}, after offline {down}")
            xen.xs_rm(f"{path}/hotplug-status")
        times = {name: {e: [] for e in EVENTS} for name in sides}
        splits = {name: {e: [] for e in EVENTS} for name in sides}
        memory = []
        for _ in range(runs):
            for command in EVENTS:
                for name in sides:
                    time.sleep(quiet if name in AFTER_QUIET else gap)  # a lone event: nothing ran just before it
                    if name == "resident" and command == "online":
                        memory.append(_pss(resident.pid))
                    elapsed, err = event(name, command)
                    times[name][command].append(elapsed)
                    splits[name][command].append(_split(err))
        report = {"quiet_s": quiet, "gap_s": gap, "runs": runs, "standins": "compiled C (tests/tools/bench_standins.c)"}
        for name in sides:
            pair = [a + b for a, b in zip(times[name]["online"], times[name]["offline"])]
            report[name] = {"pair_ms": round(statistics.median(pair) * 1000, 1),
                            **{f"{e}_ms": round(statistics.median(times[name][e]) * 1000, 1) for e in EVENTS}}
            if name != "original":
                report[name]["split_ms"] = {e: _median_split(splits[name][e]) for e in EVENTS}
        if "original" in sides:
            for name in sides:
                report[name]["ratio_to_original"] = round(report[name]["pair_ms"] / report["original"]["pair_ms"], 2)
        report["resident_pss_after_quiet"] = memory[len(memory) // 2] if memory else None
        return report
    finally:
        resident.stop()
