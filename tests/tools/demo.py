#!/usr/bin/env python3
"""The project's demo: the seed's Qubes OS networking walk-through, live.

    bash tests/tools/install.sh && .venv/bin/python tests/tools/demo.py      (as root)

Builds AppVM -> ProxyVM -> NetVM -> upstream in network namespaces with the
project's own programs (tests/kit/walkthrough.py), then follows a ping, a UDP
datagram and a DNS query hop by hop, using each VM's connection tracking as
evidence.  Every namespace and process it made is removed at the end, also on
Ctrl-C or SIGTERM.  Exit 0 when everything behaved as the walk-through says.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kit"))

from netns import RUN_PREFIX  # noqa: E402
from walkthrough import (ANSWER, ANSWER6, APP6, APP_IP, DNS6_A, DNS_A, DNS_B, ECHO_PORT, HOST, NAME,  # noqa: E402
                         NET_UPLINK, PROG_BIN, PROXY_GW, VDNS6, Flow, Walkthrough)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DemoError(Exception):
    pass


class Interrupted(Exception):
    pass


def _interrupt(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def check(condition, message: str) -> None:
    if not condition:
        raise DemoError(message)


def ep(address: str, port: str) -> str:
    return f"{address}:{port}" if port else address


def ct_text(flow: Flow) -> str:
    """The conntrack entry's addresses (and ports), request side | reply side."""
    def side(src, dst, sport, dport):
        return " ".join(f"{k}={v}" for k, v in (("src", src), ("dst", dst), ("sport", sport), ("dport", dport)) if v)
    return (f"{flow.proto} {side(flow.src, flow.dst, flow.sport, flow.dport)} | "
            f"{side(flow.reply_src, flow.reply_dst, flow.reply_sport, flow.reply_dport)}")


def find(flows: list[Flow], proto: str, src: str, dst: str, sport: str = "") -> Flow:
    for flow in flows:
        if (flow.proto, flow.src, flow.dst) == (proto, src, dst) and sport in ("", flow.sport):
            return flow
    raise DemoError(f"no {proto} conntrack entry {src} > {dst} (port {sport or '-'})")


def hop_by_hop(walk: Walkthrough, proto: str, dst: str, sport: str = "",
               upstream_note: str = "") -> tuple[Flow, Flow]:
    """Print the request as each hop sees it, read back from the ProxyVM's and NetVM's
    conntrack entries (what came in, and what the reply will be addressed to)."""
    p = find(walk.flows(walk.proxy.ns), proto, APP_IP, dst, sport)
    n = find(walk.flows(walk.net.ns), proto, p.reply_dst, p.reply_src, p.reply_dport)
    check(not any(APP_IP in f.line for f in walk.flows(walk.net.ns)), "the NetVM knows the AppVM's address")

    def nat(flow):
        done = [name for name, changed in (("DNAT", flow.reply_src != flow.dst),
                                           ("MASQUERADE", flow.reply_dst != flow.src)) if changed]
        return " + ".join(done) or "no translation"

    rows = [("AppVM", "eth0 out", ep(p.src, p.sport), ep(p.dst, p.dport), f"route: default via {PROXY_GW}"),
            ("ProxyVM", "vif37.0 in", ep(p.src, p.sport), ep(p.dst, p.dport), "anti-spoofing: the VM's own source"),
            ("ProxyVM", "eth0 out", ep(p.reply_dst, p.reply_dport), ep(p.reply_src, p.reply_sport), nat(p)),
            ("NetVM", "vif5.0 in", ep(n.src, n.sport), ep(n.dst, n.dport), "(it never sees 10.137.7.27)"),
            ("NetVM", "eth0 out", ep(n.reply_dst, n.reply_dport), ep(n.reply_src, n.reply_sport), nat(n)),
            ("upstream", "eth0 in", ep(n.reply_dst, n.reply_dport), ep(n.reply_src, n.reply_sport), upstream_note)]
    for vm, where, src, dst_, note in rows:
        print(f"    {vm:<8} {where:<10} {src + ' > ' + dst_:<38} {note}")
        if (vm, where) == ("ProxyVM", "eth0 out"):
            print(f"      ProxyVM conntrack -L: {ct_text(p)}")
        if (vm, where) == ("NetVM", "eth0 out"):
            print(f"      NetVM conntrack -L:   {ct_text(n)}")
    return p, n


def dnat_summary(walk: Walkthrough, vm, tool: str = "iptables") -> str:
    rules = vm.ns.out(f"{tool} -t nat -S PR-QBS")
    pairs = dict.fromkeys(re.findall(r"-d (\S+)/(?:32|128) .* --to-destination (\S+)", rules))
    return ", ".join(f"{a} -> {b}" for a, b in pairs) or "(none)"


def dnsmasq_lines(walk: Walkthrough, server: str, client: str, wait: float = 2.0) -> list[str]:
    """The lines dnsmasq on `server` logged for queries from `client` (it logs right after answering)."""
    deadline = time.monotonic() + wait
    while True:
        text = walk.dns_log(server).read_text() if walk.dns_log(server).exists() else ""
        lines = text.splitlines()
        hits = [i for i, line in enumerate(lines) if f"from {client}" in line]
        if hits or time.monotonic() > deadline:
            return [re.sub(r"^.*?dnsmasq\[\d+\]: ", "", line) for i in hits for line in lines[i:i + 2]]
        time.sleep(0.05)


def demo(walk: Walkthrough) -> None:
    print("Qubes OS networking walk-through, live in network namespaces (nothing outside them is touched)")
    print("  AppVM 10.137.7.27 -> ProxyVM (vif37.0 gw 10.137.7.1 | eth0 10.137.1.26)"
          " -> NetVM (vif5.0 gw 10.137.1.1 | eth0 192.0.2.2) -> upstream")
    print("  dual-stack: AppVM fd09:24ef:4179::a89:71b, virtual IPv6 DNS fd09:24ef:4179::a8b:1 and ::a8b:2,"
          " upstream resolver 2001:db8:53::53")
    print("\nBring-up, in the order the system runs it (Xen hotplug form for each vif):")
    walk.build()
    print("  DNS DNAT in place (nat PR-QBS, udp and tcp port 53):")
    print(f"    ProxyVM: {dnat_summary(walk, walk.proxy)}")
    print(f"    NetVM:   {dnat_summary(walk, walk.net)}")
    print("  and for IPv6 (ip6tables nat PR-QBS; the ProxyVM's resolv.conf names the virtual addresses):")
    print(f"    ProxyVM: {dnat_summary(walk, walk.proxy, 'ip6tables')}")
    print(f"    NetVM:   {dnat_summary(walk, walk.net, 'ip6tables')}")

    print(f"\n1. The AppVM pings {HOST}")
    ping = walk.ping(walk.app, HOST)
    check(ping.returncode == 0, f"ping {HOST} from the AppVM failed: {ping.stdout.strip()}")
    print("  app$ ping -c 1 " + HOST + ":  " + next(line for line in ping.stdout.splitlines() if "bytes from" in line))
    print("  Hop by hop, the echo request as each hop sees it (conntrack -L: request | expected reply):")
    p, n = hop_by_hop(walk, "icmp", HOST, upstream_note=f"{HOST} (on lo) answers")
    print(f"  The echo reply is un-NATed on the way back: > {n.reply_dst} (NetVM eth0),"
          f" > {p.reply_dst} (ProxyVM eth0), > {p.src} (AppVM).")
    reply = walk.udp_send(walk.app, HOST, ECHO_PORT)
    check(reply is not None, f"the UDP recorder on {HOST}:{ECHO_PORT} did not answer")
    seen = walk.echo_log.read_text().split()
    check(seen[-2] == NET_UPLINK, f"the UDP recorder saw {seen[-2]}, not {NET_UPLINK}")
    print(f"  A UDP datagram to the recorder on {HOST}:{ECHO_PORT} takes the same path;"
          f" the recorder saw the source {seen[-2]}:{seen[-1]}")

    print(f"\n2. The AppVM asks its DNS server {PROXY_GW} for {NAME} (UDP)")
    answer, outcome = walk.dns(walk.app, PROXY_GW)
    check(answer == ANSWER[DNS_A], f"DNS query to {PROXY_GW}: {outcome}")
    print(f"  app$ python3 tests/kit/dnsq.py {PROXY_GW} {NAME}  ->  {answer}")
    print("  Hop by hop (no VM runs a resolver: each DNATs its virtual DNS address upstream):")
    port = find(walk.flows(walk.proxy.ns), "udp", APP_IP, PROXY_GW).sport  # the client's port
    _, net_flow = hop_by_hop(walk, "udp", PROXY_GW, port, upstream_note="dnsmasq answers")
    server = net_flow.reply_src
    logged = dnsmasq_lines(walk, server, NET_UPLINK)
    check(logged, f"dnsmasq on {server} logged no query from {NET_UPLINK}")
    check(not dnsmasq_lines(walk, DNS_B, NET_UPLINK, wait=0), f"dnsmasq on {DNS_B} was asked too")
    print(f"  Answered by the dnsmasq on {server} (the one that says {ANSWER[server]}); its log:")
    for line in logged[-2:]:
        print(f"    {line}")
    print(f"  The answer reaches the AppVM from {PROXY_GW}:53: no VM names the real resolver in its configuration.")

    v6 = VDNS6[0]
    print(f"\n3. The AppVM asks the IPv6 virtual DNS address {v6} for {NAME} (AAAA, UDP)")
    answer6, outcome6 = walk.dns(walk.app, v6, aaaa=True)
    check(answer6 == ANSWER6[DNS6_A][1], f"AAAA query to {v6}: {outcome6}")
    print(f"  app$ python3 tests/kit/dnsq.py --aaaa {v6} {NAME}  ->  {answer6}")
    p = find(walk.flows(walk.proxy.ns), "udp", APP6, v6)
    n = find(walk.flows(walk.net.ns), "udp", p.reply_dst, p.reply_src, p.reply_dport)
    print("  ProxyVM: DNAT to the same address (its resolv.conf names it) + MASQUERADE; conntrack -L:")
    print(f"    {ct_text(p)}")
    print(f"  NetVM: DNAT to the real resolver {n.reply_src} + MASQUERADE; conntrack -L:")
    print(f"    {ct_text(n)}")
    check(n.reply_src == DNS6_A, f"the NetVM sent the IPv6 query to {n.reply_src}, not {DNS6_A}")
    check(dnsmasq_lines(walk, DNS6_A, n.reply_dst), f"dnsmasq on {DNS6_A} logged no query from {n.reply_dst}")
    print(f"  Answered by the dnsmasq on {DNS6_A}; an uplink with no IPv6 resolver would refuse it at once.")


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "must run as root: it builds network namespaces (and never touches the root one)"
    for tool in ("ip", "iptables-restore", "conntrack", "dnsmasq", "ping"):
        if not shutil.which(tool):
            return f"{tool} is missing: run `bash tests/tools/install.sh` first"
    if not (PROG_BIN / "vif-route-qubes").exists():
        return f"vif-route-qubes is not installed in {PROG_BIN}: run `bash tests/tools/install.sh` first"
    return None


def leftover_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(RUN_PREFIX + "-")]


def main() -> int:
    problem = preflight()
    if problem:
        print(f"demo.py: {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="qubes-walkthrough-"))
    walk = Walkthrough(root, say=print, ipv6=True)
    for sig in SIGNALS:
        signal.signal(sig, _interrupt)
    status = 1
    try:
        demo(walk)
        status = 0
    except Interrupted as exc:
        print(f"\ndemo.py: interrupted ({exc}); cleaning up", file=sys.stderr)
        status = 130
    except (DemoError, AssertionError, OSError, subprocess.SubprocessError) as exc:
        print(f"\ndemo.py: FAILED: {exc}", file=sys.stderr)
    finally:
        for sig in SIGNALS:  # the clean-up itself must not be cut short
            signal.signal(sig, signal.SIG_IGN)
        walk.close()
        for name in leftover_namespaces():  # one made just as a signal came in
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    left = leftover_namespaces()
    print(f"\nCleanup: namespaces deleted, dnsmasq and the recorder stopped"
          f"{'' if not left else '; STILL PRESENT: ' + ', '.join(left)}.")
    if status == 0:
        print(f"demo: OK ({time.monotonic() - started:.1f} s)")
    return status if not left else 1


if __name__ == "__main__":
    sys.exit(main())
