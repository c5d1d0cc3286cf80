"""The shell originals in the same benchmark (issue 16): `--originals DIR`.

DIR holds the original vif-route-qubes of one Qubes release with what it
sources (vif-qubes-nat.sh, Xen's vif-common.sh and the hotplug scripts under
it, a hotplugpath.sh), as the README's benchmark section says; R4.0's (iptables)
is measured with --backend iptables, R4.2's (nft) with --backend nft.

Both run in Xen's form, as libxl runs a vif script: `online`/`offline` with
`type_if=vif`, vif=vifD.N, a relative XENBUS_PATH, stdin /dev/null, with the
same file-backed xenstore/qubesdb stand-ins on PATH, each in a namespace of
its own with one vif, turn about (ours' pair, the original's pair, ...) so
that a slow spell of the machine weighs on both alike; twice: with the suite's
Python stand-ins (tests/kit/fakebin, ~8 ms a call) and with their shell twins
(tests/kit/fakebin/sh, ~2 ms, nearer the real C tools), since the original calls
them four times as often as ours. Each side sees its namespace's /sys, as `ip
netns exec` gives it (R4.2's offline tests /sys/class/net/VIF), through one
mount namespace for all its runs and not one `ip netns exec` per call. The
namespace of the original is as Qubes leaves it at boot: nothing for R4.0 (it
only inserts rules into raw PREROUTING), the R4.2 tables (`init` makes that
layout) for nft.

Before the timed runs each side does one online and one offline whose effect
is checked (route to the VM via the vif, the anti-spoofing rules or set
elements, hotplug-status `connected`; all gone after offline), so the figure
cannot be that of a script failing early, and its stand-in calls are counted;
a timed run that exits non-zero stops the benchmark.
"""

import ctypes
import os
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

VIF, ADDR, MAC, DOMID = "vif37.0", "10.137.7.27", "00:16:3e:5e:6c:19", 37
QUBESDB = {"/qubes-netvm-gateway": "10.137.7.1", "/qubes-netvm-primary-dns": "10.139.1.1",
           "/qubes-netvm-secondary-dns": "10.139.1.2"}

CLONE_NEWNET, CLONE_NEWNS = 0x40000000, 0x00020000
MS_REC, MS_SLAVE, MNT_DETACH = 0x4000, 0x80000, 2
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


@contextmanager
def inside_with_sys(ns):
    """Children started here run in `ns` and see its /sys: the benchmark joins
    the network namespace and a mount namespace of its own with the sysfs of
    `ns` on /sys (what `ip netns exec` does for each call); both are left after."""
    home_net = os.open("/proc/self/ns/net", os.O_RDONLY)
    home_mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    cwd = os.open(".", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        _check(_libc.setns(target, CLONE_NEWNET), "setns net")
        _check(_libc.unshare(CLONE_NEWNS), "unshare mount")
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")
        _check(_libc.umount2(b"/sys", MNT_DETACH), "umount /sys")
        _check(_libc.mount(ns.name.encode(), b"/sys", b"sysfs", 0, None), "mount sysfs")
        yield
    finally:
        _check(_libc.setns(home_mnt, CLONE_NEWNS), "setns mount")
        _check(_libc.setns(home_net, CLONE_NEWNET), "setns net")
        os.fchdir(cwd)
        for fd in (home_net, home_mnt, cwd, target):
            os.close(fd)


def kind_of(directory: Path) -> str:
    script = directory / "vif-route-qubes"
    if not os.access(script, os.X_OK) or not (directory / "vif-common.sh").exists():
        raise SystemExit(f"bench: {directory} has no executable vif-route-qubes and vif-common.sh (see README)")
    text = script.read_text()
    return "nft" if "nftables_cmd" in text else "iptables"


def run(argv, env, log: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-5:] if log.exists() else []
        raise SystemExit(f"bench: {' '.join(argv)} failed ({result.returncode}): "
                         f"{result.stderr.strip()} {' | '.join(tail)}")
    return elapsed


def _out(ns, argv) -> str:
    return subprocess.run(["ip", "netns", "exec", ns.name, *argv], capture_output=True, text=True).stdout


def state(ns, backend: str) -> dict:
    """What of the vif's setup is in `ns`: the route, the anti-spoofing entry."""
    route = f"dev {VIF}" in _out(ns, ["ip", "route", "show", ADDR])
    if backend == "nft":
        firewall = f'"{VIF}" . {ADDR}' in _out(ns, ["nft", "list", "set", "ip", "qubes", "allowed"])
    else:  # R4.0: rules in raw PREROUTING; ours: an element of the ipset
        rules = _out(ns, ["iptables-save", "-t", "raw"])
        firewall = (f"! -s {ADDR}/32 -i {VIF} -j DROP" in rules
                    or f"add qbs-allowed4 {ADDR},{VIF}" in _out(ns, ["ipset", "save", "qbs-allowed4"]))
    return {"route": route, "firewall": firewall}


STANDINS = ("xenstore-read", "xenstore-write", "qubesdb-read")
COUNTER = """#!/bin/sh
echo "${0##*/}" >> "$STANDIN_CALLS"
exec "$STANDIN_REAL/${0##*/}" "$@"
"""


def pair(argv, env, log) -> tuple[float, float]:
    return run([*argv, "online", "type_if=vif"], env, log), run([*argv, "offline", "type_if=vif"], env, log)


def check(name, ns, argv, env, log, xen, path, backend) -> dict:
    """One online and one offline, their effect checked, the stand-in calls counted."""
    calls = xen.root / "standin-calls"
    counters = xen.root / "counters"
    counters.mkdir(exist_ok=True)
    for tool in STANDINS:
        (counters / tool).write_text(COUNTER)
        (counters / tool).chmod(0o755)
    real = env["PATH"].split(":", 1)[0]
    counted = dict(env, PATH=f"{counters}:{env['PATH']}", STANDIN_CALLS=str(calls), STANDIN_REAL=real)
    calls.write_text("")
    with inside_with_sys(ns):
        run([*argv, "online", "type_if=vif"], counted, log)
    up, status = state(ns, backend), xen.xs_read(f"{path}/hotplug-status")
    with inside_with_sys(ns):
        run([*argv, "offline", "type_if=vif"], counted, log)
    down = state(ns, backend)
    if not (all(up.values()) and status == "connected" and not any(down.values())):
        raise SystemExit(f"bench: {name} did not do its job in {ns.name}: after online {up}, "
                         f"hotplug-status {status!r}; after offline {down}")
    xen.xs_rm(f"{path}/hotplug-status")
    return {"after_online": up, "hotplug_status": status, "after_offline": down,
            "standin_calls_per_pair": len(calls.read_text().split())}


def figures(samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2),
            "max_ms": round(max(ms), 2), "runs": len(ms)}


def measure(netns, env, xen, runs: int, directory: Path, backend: str, mode: str, plain_make, ours: str,
            fakebin: Path) -> dict:
    """Ours and the original, with the suite's Python stand-ins (tests/kit/fakebin) and
    with their shell twins (tests/kit/fakebin/sh, nearer the C tools' cost)."""
    directory = Path(directory).resolve()
    path = xen.backend(DOMID, ip=ADDR, mac=MAC)
    for key, value in QUBESDB.items():
        xen.qdb_write(key, value)
    base = {key: value for key, value in env.items() if key != "VIF_ROUTE_TIMING"}
    base.update(vif=VIF, XENBUS_PATH=path)
    log = directory / "log" / "xen-hotplug.log"
    # the original's namespace as Qubes leaves a VM at boot: R4.2's tables, or nothing
    sides = {"ours": (netns.make("ours"), [ours]),
             "original": (netns.make("orig") if backend == "nft" else plain_make("orig"),
                          [str(directory / "vif-route-qubes")])}
    for ns, _ in sides.values():
        netns.vif(ns, plain_make("ovm"), VIF)
    report = {"original_dir": str(directory), "mode": mode}
    for kind, folder in (("python_standins", fakebin), ("shell_standins", fakebin / "sh")):
        kind_env = dict(base, PATH=f"{folder}:{base['PATH']}")
        checked = {name: check(name, ns, argv, kind_env, log, xen, path, backend)
                   for name, (ns, argv) in sides.items()}
        pairs, onlines, offlines = ({"ours": [], "original": []} for _ in range(3))
        for _ in range(runs):
            for name, (ns, argv) in sides.items():
                with inside_with_sys(ns):
                    on, off = pair(argv, kind_env, log)
                pairs[name].append(on + off)
                onlines[name].append(on)
                offlines[name].append(off)
        ours_ms, orig_ms = statistics.median(pairs["ours"]), statistics.median(pairs["original"])
        report[kind] = {
            "ours_pair": figures(pairs["ours"]), "original_pair": figures(pairs["original"]),
            "ratio_ours_to_original": round(ours_ms / orig_ms, 3),
            # each round's two pairs ran one after the other: their ratio cancels the machine's spells
            "paired_ratio": round(statistics.median(o / r for o, r in zip(pairs["ours"], pairs["original"])), 3),
            "online_median_ms": {name: round(statistics.median(t) * 1000, 2) for name, t in onlines.items()},
            "offline_median_ms": {name: round(statistics.median(t) * 1000, 2) for name, t in offlines.items()},
            "checked_once": checked}
    return report
