#!/usr/bin/env python3
"""Benchmark of vif-route-qubes and qubes-setup-dnat-to-ns, in namespaces (root).

    .venv/bin/python tests/tools/bench.py [--runs N] [--json] [--skip-scale] [--skip-storm]
                                    [--backend iptables|nft] [--mode server|in-process|both] [--no-init]
                                    [--originals DIR]

Prints, for each target, the median and the min-max spread of N runs (>= 10):
  pair      online+offline of one vif (manual form: no xenstore/qubesdb stand-ins,
            whose Python start-up would be measured instead of ours)
  online    online alone
  hotplug   online+offline in Xen's form, with the file-backed stand-ins
  scale     one more online+offline with 400 vifs already online, vs none
            (300 rounds or more, turn about)
  storm     100 online events started at once vs the same 100 one by one
  dns       qubes-setup-dnat-to-ns with unchanged inputs (exit 100)
  originals with --originals DIR: online+offline in Xen's form of ours and of
            the shell original in DIR (R4.0's for iptables, R4.2's for nft),
            turn about, same stand-ins, and the ratio ours/original
            (tests/tools/bench_originals.py)
and the in-process split (imports, inputs, lock, facts, plan, apply, and
each applied step) from VIF_ROUTE_TIMING, the interpreter's bare start-up,
the five most expensive imports (python -X importtime), and the split of a
library call (`libraries`, in-process, in the namespace): importing pyroute2
and sh, opening pyroute2's IPRoute, one route replace (+ del) over it, one
sh call of `true` through system.tools and bare, sh's own `_timeout`, and
the same `true` through subprocess for comparison.

Each mode (issue 16) is measured alike: `server` through one
`vif-route-qubes serve` started for the run in a namespace of its own
(VIF_ROUTE_SERVER=require: an event no server took fails the benchmark),
`in-process` with VIF_ROUTE_SERVER=off.  Server mode adds the client's split
of one event (client start, connect and hello, fork, child's work) and the
memory: the server's resident size after start and after 1,000 events,
each child's peak (the server logs it per event) and the waiting spare
child's resident size (`--no-spare`: a server without one).
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kit"))
import bench_originals  # noqa: E402
from netns import BIN, FAKEBIN, RUN_PREFIX, Namespaces, XenEnv  # noqa: E402
from server_mode import TestServer  # noqa: E402

VIF = str(BIN / "vif-route-qubes")
DNS = str(BIN / "qubes-setup-dnat-to-ns")
MANUAL = ["--mac", "00:16:3e:5e:6c:19", "--gateway", "10.137.7.1", "--dns1", "10.139.1.1",
          "--dns2", "10.139.1.2", "--gateway6", "", "--visible-ip", "", "--no-harden"]


def stats(samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2),
            "max_ms": round(max(ms), 2), "runs": len(ms)}


def timed(argv: list[str], env: dict, ok=(0,)) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode not in ok:
        raise SystemExit(f"bench: {' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed, result.stderr


def in_ns(ns, argv):
    return ["ip", "netns", "exec", ns.name, *argv]


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@contextmanager
def inside(ns):
    """Children started here run in `ns`: the benchmark itself joins the
    namespace, so a measured time is the command's own and not also that of
    an `ip netns exec` around it (about 2-4 ms a call here)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(home)
        os.close(home)
        os.close(target)


def split_of(stderr: str, prefix: str = "timing ") -> dict | None:
    for line in stderr.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    return None


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def served_bench(ns, env, server, runs, events=1000):
    """The client's split of one served event, and the memory figures."""
    splits = []
    with inside(ns):
        for _ in range(runs):
            _, err = timed([VIF, "online", "vif37.0", "10.137.7.27", *MANUAL], env)
            splits.append(split_of(err, "client-timing "))
            timed([VIF, "offline", "vif37.0", "10.137.7.27", *MANUAL], env)
        after_start = rss_kb(server.pid)
        for i in range(events // 2):
            timed([VIF, "online", "vif37.0", "10.137.7.27", *MANUAL], env)
            timed([VIF, "offline", "vif37.0", "10.137.7.27", *MANUAL], env)
    after = rss_kb(server.pid)
    time.sleep(1)  # the spare child made after the last event, ready
    spares = [int(p) for p in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
    peaks = [int(line.rsplit("peak ", 1)[1].split()[0]) for line in server.log().splitlines() if " peak " in line]
    return {"client_split_ms": {k: round(statistics.median(s[k] for s in splits), 2) for k in splits[0]},
            "server_rss_kb": {"after_start": after_start, f"after_{events}_more_events": after,
                              "growth_pct": round(100 * (after / after_start - 1), 1)},
            "child_peak_rss_kb": {"median": statistics.median(peaks), "max": max(peaks), "events": len(peaks)},
            "spare_rss_kb": [rss_kb(pid) for pid in spares]}


def pair_bench(ns, env, runs: int, vif="vif37.0", addr="10.137.7.27"):
    pairs, onlines, splits = [], [], []
    for _ in range(runs):
        with inside(ns):
            t_on, err_on = timed([VIF, "online", vif, addr, *MANUAL], env)
            t_off, err_off = timed([VIF, "offline", vif, addr, *MANUAL], env)
        pairs.append(t_on + t_off)
        onlines.append(t_on)
        splits.append((split_of(err_on), split_of(err_off)))
    return pairs, onlines, splits


def median_split(splits: list[dict]) -> dict:
    phases = {}
    for key in splits[0]["phases_ms"]:
        phases[key] = round(statistics.median(s["phases_ms"].get(key, 0) for s in splits), 2)
    steps = [[kind, round(statistics.median(s["steps_ms"][i][1] for s in splits), 2)]
             for i, (kind, _) in enumerate(splits[0]["steps_ms"])]
    return {"phases_ms": phases, "steps_ms": steps}


def top_imports(ns, env) -> list[list]:
    result = subprocess.run(in_ns(ns, [sys.executable, "-X", "importtime", "-m", "vif_route_qubes", "online",
                                       "vif37.0", "10.137.7.27", *MANUAL, "--dry-run"]),
                            env=env, capture_output=True, text=True)
    rows = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative_us, name = line[len("import time:"):].split("|")
            if cumulative_us.strip().isdigit():
                rows.append([name.strip(), round(int(cumulative_us) / 1000, 2)])
    return sorted(rows, key=lambda r: -r[1])[:5]


LIBRARY_PROBE = r"""
import json, os, statistics, subprocess, sys, time
def median_ms(f, n):
    f()
    samples = []
    for _ in range(n):
        start = time.perf_counter(); f(); samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1000, 3)
out = {}
start = time.perf_counter(); import pyroute2; out["import_pyroute2_ms"] = round((time.perf_counter() - start) * 1000, 2)
start = time.perf_counter(); import sh; out["import_sh_ms"] = round((time.perf_counter() - start) * 1000, 2)
from vif_route_qubes.system import ip, tools
runs = int(sys.argv[1])
out["iproute_open_close_ms"] = median_ms(lambda: pyroute2.IPRoute(strict_check=True).close(), runs)
lo = ip.link_index("lo")
def route():
    ip.route_replace(lo, "192.0.2.77", 99)
    ip.route_del(lo, "192.0.2.77", 99)
out["route_replace_and_del_ms"] = median_ms(route, runs)
out["host_routes_dump_ms"] = median_ms(lambda: ip.host_routes(lo), runs)
out["sh_true_via_tools_ms"] = median_ms(lambda: tools.run(["true"]), runs)
true = sh.Command("true")
out["sh_true_bare_ms"] = median_ms(lambda: true(_tty_out=False), runs)
out["sh_true_with_sh_timeout_ms"] = median_ms(lambda: true(_tty_out=False, _timeout=10), max(3, runs // 3))
out["subprocess_true_ms"] = median_ms(lambda: subprocess.run(["true"]), runs)
print(json.dumps(out))
"""


def library_calls(ns, env, runs) -> dict:
    """What one pyroute2 request and one sh call cost in-process (in the namespace)."""
    result = subprocess.run(in_ns(ns, [sys.executable, "-c", LIBRARY_PROBE, str(runs)]), env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench: the library probe failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def startup(env, runs) -> dict:
    return stats([timed([sys.executable, "-c", "pass"], env)[0] for _ in range(runs)])


def make_vifs(netns, provider, vms, count, first_domid):
    """`count` veth pairs named vifD.0 in the provider, peers in `vms`."""
    script = []
    for i in range(count):
        domid = first_domid + i
        script.append(f"link add vif{domid}.0 netns {provider.name} type veth peer name e{domid} netns {vms.name}")
    subprocess.run(["ip", "-batch", "-"], input="\n".join(script) + "\n", text=True, check=True)


def scale_bench(netns, env, runs):
    """One more online+offline with 400 vifs already online, against the same
    with none: two namespaces measured turn about, so that a slow spell of
    the machine weighs on both sides alike."""
    empty, loaded = netns.make("sc0"), netns.make("sc4")
    make_vifs(netns, empty, netns.make("vm0"), 1, 37)
    others = netns.make("vm4")
    make_vifs(netns, loaded, others, 1, 37)
    make_vifs(netns, loaded, others, 400, 1000)
    with inside(loaded):
        for i in range(400):
            timed([VIF, "online", f"vif{1000 + i}.0", f"10.137.{8 + i // 250}.{1 + i % 250}", *MANUAL], env)
    # An offline's wait in the kernel varies by several ms from one run to the
    # next (4 ms steps): 300 rounds or more, or a 5 % difference is lost in noise.
    base, with_400 = [], []
    for _ in range(max(runs, 300)):
        base += pair_bench(empty, env, 1)[0]
        with_400 += pair_bench(loaded, env, 1)[0]
    return {"none": stats(base), "with_400": stats(with_400),
            "increase_pct": round(100 * (statistics.median(with_400) / statistics.median(base) - 1), 1),
            # each round's two pairs ran one after the other: their ratio
            # cancels the machine's slower and faster spells
            "paired_increase_pct": round(100 * (statistics.median(w / b for w, b in zip(with_400, base)) - 1), 1)}


def protected(ns) -> tuple[int, int]:
    """(how many vifs have their anti-spoofing in place: distinct interfaces in
    ipset qbs-allowed4 (iptables) or in the `allowed` set (nft), how many
    rules are there twice)."""
    rules = subprocess.run(in_ns(ns, ["iptables-save", "-t", "raw"]), capture_output=True, text=True).stdout
    saved = subprocess.run(in_ns(ns, ["ipset", "save", "qbs-allowed4"]), capture_output=True, text=True).stdout
    chains = len({line.rsplit(",", 1)[1] for line in saved.splitlines() if line.startswith("add ")})
    dispatch = [line for line in rules.splitlines() if line.startswith("-A QBS-")]
    twice = len(dispatch) - len(set(dispatch))
    listing = subprocess.run(in_ns(ns, ["nft", "-j", "list", "set", "ip", "qubes", "allowed"]), capture_output=True,
                             text=True).stdout
    elements = json.loads(listing)["nftables"][1]["set"].get("elem", []) if listing else []
    return chains or len({e["concat"][0] for e in elements if isinstance(e, dict) and "concat" in e}), twice


def storm_bench(netns, env, count=100):
    results = {}
    for mode in ("serial", "parallel"):
        provider, vms = netns.make("stp" if mode == "parallel" else "sts"), netns.make("stv")
        make_vifs(netns, provider, vms, count, 2000)
        argvs = [[VIF, "online", f"vif{2000 + i}.0", f"10.138.{i // 250}.{1 + i % 250}", *MANUAL]
                 for i in range(count)]
        with inside(provider):
            start = time.perf_counter()
            if mode == "serial":
                for argv in argvs:
                    timed(argv, env)
            else:
                procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                         for argv in argvs]
                failed = [p for p in procs if p.wait() != 0]
                if failed:
                    raise SystemExit(f"bench: {len(failed)} of {count} parallel onlines failed")
            results[mode] = round(time.perf_counter() - start, 3)
        results[f"{mode}_vifs_protected"], results[f"{mode}_duplicated_rules"] = protected(provider)
    results["parallel_faster"] = results["parallel"] < results["serial"]
    return results


def dns_bench(netns, env, runs):
    ns = netns.make("dns")
    resolv = Path(env["QUBES_RESOLV_CONF"])
    resolv.write_text("nameserver 203.0.113.53\n")
    # Every virtual address given (IPv6 ones empty: none), as a caller outside Qubes
    # would: qubesdb is not asked, so the run is the command's own.
    argv = [DNS, "--dns1", "10.139.1.1", "--dns2", "10.139.1.2", "--dns6-1", "", "--dns6-2", ""]
    with inside(ns):
        timed(argv, env)
        return stats([timed(argv, env, ok=(100,))[0] for _ in range(runs)])


def measure(netns, env, args, runs, xen, server=None) -> dict:
    provider, vm = netns.make("prov"), netns.make("vm")
    netns.vif(provider, vm, "vif37.0")
    report = {"interpreter_startup": startup(env, runs)}
    pairs, onlines, splits = pair_bench(provider, env, runs)
    report["pair"] = stats(pairs)
    report["online"] = stats(onlines)
    report["split_online"] = median_split([s[0] for s in splits])
    report["split_offline"] = median_split([s[1] for s in splits])
    if server is None:
        report["top_imports_cumulative_ms"] = top_imports(provider, env)
        report["libraries"] = library_calls(provider, env, runs)
    path = xen.backend(37, ip="10.137.7.27", mac="00:16:3e:5e:6c:19")
    xen.qdb_write("/qubes-netvm-gateway", "10.137.7.1")
    hot_env = dict(env, vif="vif37.0", XENBUS_PATH=path)
    with inside(provider):
        hot = [timed([VIF, "online", "type_if=vif"], hot_env)[0]
               + timed([VIF, "offline", "type_if=vif"], hot_env)[0] for _ in range(runs)]
    report["hotplug_pair_with_standins"] = stats(hot)
    report["dns_unchanged"] = dns_bench(netns, env, runs)
    if args.originals:
        report["originals"] = bench_originals.measure(
            netns, env, xen, runs, args.originals, args.backend, "server" if server else "in-process",
            plain_make=lambda role: Namespaces.make(netns, role), ours=VIF, fakebin=FAKEBIN)
    if not args.skip_scale:
        report["scale"] = scale_bench(netns, env, runs)
    if not args.skip_storm:
        report["storm_100"] = storm_bench(netns, env)
    if server is not None:
        report.update(served_bench(provider, env, server, runs, 0 if args.skip_memory else 1000))
    return report


def lone(args, runs) -> dict:
    """tests/tools/bench_lone.py in namespaces that ran `init`, servers in a namespace of their own."""
    import bench_lone

    netns, home = Namespaces(), f"{RUN_PREFIX}-blon"
    with tempfile.TemporaryDirectory() as tmp:
        xen = XenEnv(Path(tmp))
        env = xen.env(QUBES_NET_BACKEND=args.backend, VIF_ROUTE_SERVER="off")
        plain_make = netns.make

        def make_with_base(role):
            ns = plain_make(role)
            timed(in_ns(ns, [VIF, "init", "--gateway6", ""]), env)
            return ns

        netns.make = make_with_base
        subprocess.run(["ip", "netns", "add", home], check=True)
        try:
            return bench_lone.measure(netns, env, xen, runs, args.originals, args.backend, args.quiet, args.gap, BIN,
                                      TestServer, home, lambda role: Namespaces.make(netns, role))
        finally:
            netns.cleanup()
            subprocess.run(["ip", "netns", "del", home], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-storm", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="no 1,000 events for the server's memory")
    parser.add_argument("--mode", choices=("server", "in-process", "both"), default="both")
    parser.add_argument("--no-spare", action="store_true", help="server mode without its spare child (serve --no-spare)")
    parser.add_argument("--no-init", action="store_true",
                        help="namespaces without `init`: each first online makes the static parts, its offline removes them")
    parser.add_argument("--backend", choices=("iptables", "nft"), default="iptables",
                        help="firewall backend measured (each namespace gets `init` first, see --no-init)")
    parser.add_argument("--originals", metavar="DIR", type=Path,
                        help="also time the shell original in DIR (R4.0's for iptables, R4.2's for nft; see README)")
    parser.add_argument("--lone", action="store_true",
                        help="also time lone events: socket-started, resident after --quiet, in-process "
                             "(and the original with --originals), compiled stand-ins (tests/tools/bench_lone.py)")
    parser.add_argument("--only-lone", action="store_true", help="the lone events alone (implies --lone)")
    parser.add_argument("--quiet", type=float, default=60.0,
                        help="seconds without an event before each lone event of the resident server and the original")
    parser.add_argument("--gap", type=float, default=10.0,
                        help="seconds without an event before each lone event of the socket-started and in-process "
                             "sides (each starts new processes anyway; the gap lets the machine go idle)")
    args = parser.parse_args()
    runs = max(args.runs, 10)
    args.lone = args.lone or args.only_lone
    if args.originals and bench_originals.kind_of(args.originals) != args.backend:
        parser.error(f"{args.originals} holds the {bench_originals.kind_of(args.originals)} original, "
                     f"not one for --backend {args.backend}")
    report = {"backend": args.backend}
    if args.lone:
        report["lone"] = lone(args, runs)
    for mode in (() if args.only_lone else ("in-process", "server") if args.mode == "both" else (args.mode,)):
        netns = Namespaces()
        home, server = f"{RUN_PREFIX}-bsrv", None
        with tempfile.TemporaryDirectory() as tmp:
            xen = XenEnv(Path(tmp))
            env = xen.env(VIF_ROUTE_TIMING="1", QUBES_RESOLV_CONF=str(Path(tmp) / "resolv.conf"),
                          QUBES_NET_BACKEND=args.backend, VIF_ROUTE_SERVER="off")
            if not args.no_init:
                # Every namespace starts as a VM that ran `init` at boot (the documented setup:
                # the sets and static rules are there, so an event only changes its elements).
                make = netns.make

                def make_with_base(role, make=make):
                    ns = make(role)
                    timed(in_ns(ns, [VIF, "init", "--gateway6", ""]), env)
                    return ns

                netns.make = make_with_base
            try:
                if mode == "server":
                    subprocess.run(["ip", "netns", "add", home], check=True)
                    folder = Path(tmp) / "server"
                    folder.mkdir()
                    server = TestServer(BIN, home, folder, args=("--no-spare",) if args.no_spare else ())
                    env.update(server.env())
                report[mode] = measure(netns, env, args, runs, xen, server)
            finally:
                netns.cleanup()
                if server:
                    server.stop()
                    subprocess.run(["ip", "netns", "del", home], capture_output=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for mode, figures in report.items():
        if not isinstance(figures, dict):
            print(f"{mode:28} {figures}")
            continue
        print(f"-- {mode}")
        for key, value in figures.items():
            print(f"{key:28} {json.dumps(value)}")
    for mode, figures in report.items():
        for kind, o in (figures.get("originals", {}).items() if isinstance(figures, dict) else ()):
            if isinstance(o, dict):
                print(f"ours/original {mode:10} {kind:15} {o['ratio_ours_to_original']} (paired "
                      f"{o['paired_ratio']}): ours {o['ours_pair']['median_ms']} ms, "
                      f"original {o['original_pair']['median_ms']} ms")


if __name__ == "__main__":
    main()
