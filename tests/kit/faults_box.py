"""The topology and judges of tests/netns/test_faults.py (faults in the middle of vif events).

    app eth0 10.137.7.27 (and 10.137.7.99, an address the VM does not own)
      --vif37.0-- proxy eth0 192.0.2.2 ---- 192.0.2.1 eth0 upstream (UDP receiver)
"""

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from firewall import CHANGE_TOOL, guard_problems, nft_stand_in, nft_tables
from netns import VIF_MAC, pids_in, run_libxl, state_of, wait_for

PY = sys.executable
HERE = Path(__file__).parent
VIF, PATH = "vif37.0", "backend/vif/37/0"  # XENBUS_PATH as xl devd and the kernel give it
VM_IP, NOT_VM_IP, GW, VM_MAC = "10.137.7.27", "10.137.7.99", "10.137.7.1", "00:16:3e:5e:6c:19"
UPSTREAM, PORT = "192.0.2.1", 5353


class Probe:
    """A UDP receiver upstream and a sender in the VM, both up for the whole test
    (a probe then costs two pipe round trips, not two Python start-ups)."""

    def __init__(self, app, up):
        self.recv = up.popen([PY, str(HERE / "faults_udp.py"), "recv", str(PORT)], stdout=subprocess.PIPE,
                             text=True)
        self.send = app.popen([PY, str(HERE / "faults_udp.py"), "send", str(PORT)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
        assert self.recv.stdout.readline().strip() == "ready"
        self.arrived: set[tuple[str, str]] = set()
        self.cond = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()
        self.count = 0

    def _collect(self):
        for line in self.recv.stdout:
            with self.cond:
                self.arrived.add(tuple(line.split()))
                self.cond.notify_all()

    def _send(self, src, payload):
        self.send.stdin.write(f"{src} {UPSTREAM} {payload}\n")
        self.send.stdin.flush()
        assert self.send.stdout.readline().startswith("sent")

    def check(self, tag):
        """The spoof goes first on the same path, so once the VM's own datagram is
        in, a spoof that is missing was dropped, not late."""
        self.count += 1
        self._send(NOT_VM_IP, f"spoof-{tag}")
        self._send(VM_IP, f"own-{tag}")
        with self.cond:
            self.cond.wait_for(lambda: (VM_IP, f"own-{tag}") in self.arrived, timeout=3)
            got = set(self.arrived)
        assert (VM_IP, f"own-{tag}") in got, f"the VM's own datagram {tag} did not arrive: the wiring is broken"
        assert not [p for p in got if p[1].startswith("spoof-")], f"spoofed datagrams got through: {sorted(got)}"

    def close(self):
        for proc in (self.send, self.recv):
            proc.kill()
            proc.wait()


class Box:
    """The topology above, with helpers to run the command (under firewall backend
    `backend`) and judge the state."""

    def __init__(self, netns, xen, vifcmd, backend="iptables"):
        self.netns, self.xen, self.vifcmd, self.backend = netns, xen, vifcmd, backend
        self.proxy, self.app, self.up = (netns.make(role) for role in ("proxy", "app", "upstream"))
        # iptables-nft makes a table on first use and keeps it: make the raw tables
        # now, so that "before online" compares with "after offline".
        self.proxy.sh("for t in iptables ip6tables; do $t -t raw -N PRIME && $t -t raw -X PRIME; done")
        # No duplicate address detection: the vif's link-local address (and its
        # local route) is final at once, so states compare without waiting.
        self.proxy.sh("sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv4.conf.all.rp_filter=0"
                      " net.ipv4.conf.default.rp_filter=0 net.ipv4.ip_forward=1")
        self.make_vif()
        netns.link(self.proxy, "eth0", self.up, "eth0")
        self.proxy.sh("ip addr add 192.0.2.2/24 dev eth0")
        self.up.sh(f"ip addr add {UPSTREAM}/24 dev eth0 && ip route add 10.137.7.0/24 via 192.0.2.2"
                   " && for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done")
        xen.backend(37, ip=VM_IP, mac=VM_MAC)
        xen.qdb_write("/qubes-netvm-gateway", GW)
        self.probe = Probe(self.app, self.up)
        self.base, self.base_rules = self.state(), self.rules()

    def make_vif(self):
        """(Re)create the veth pair standing in for vif37.0, down as Xen makes it."""
        self.netns.vif(self.proxy, self.app, VIF, vm_mac=VM_MAC, vm_addrs=(VM_IP, NOT_VM_IP), gateway=GW)
        # A permanent neighbour for the gateway: the VM's datagrams reach the vif
        # whenever it is up, whatever step `online` was stopped at (even before the
        # gateway address exists to answer ARP), so the probe is always meaningful.
        self.app.sh(f"ip neigh replace {GW} lladdr {VIF_MAC} dev eth0 nud permanent"
                    " && for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done")

    def env(self, **extra):
        return self.xen.env(vif=VIF, XENBUS_PATH=PATH, QUBES_NET_BACKEND=self.backend, **extra)

    def argv(self, command, *words):
        return [self.vifcmd, command, "type_if=vif", *words]

    def run(self, command, *words, **extra):
        """The event as xl devd runs it (relative XENBUS_PATH, libxl's environment only,
        stdin /dev/null); `extra`: the test's own variables on top."""
        return run_libxl(self.proxy, self.xen, self.argv(command, *words), VIF, PATH, timeout=60,
                         QUBES_NET_BACKEND=self.backend, **extra)

    def popen(self, command, **extra):
        """The same, running: SIGKILL it as libxl does after its timeout."""
        return run_libxl(self.proxy, self.xen, self.argv(command), VIF, PATH, popen=True,
                         QUBES_NET_BACKEND=self.backend, **extra)

    def rules(self):
        """iptables-save without comments, and the nft backend's tables (none under iptables)."""
        return "\n".join(line for tool in ("iptables-save", "ip6tables-save")
                         for line in self.proxy.out(tool).splitlines() if not line.startswith("#")
                         ) + "\n" + nft_tables(self.proxy)

    def state(self):
        return re.sub(r"\[\d+:\d+\]", "[0:0]", state_of(self.proxy))  # packet counters move

    def assert_state(self, expected, what, timeout=2.0):
        """Equal to `expected`, allowing the kernel a moment for asynchronous bits."""
        deadline = time.monotonic() + timeout
        while (now := self.state()) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert now == expected, what

    def link_up(self):
        shown = self.proxy.sh(f"ip -o link show {VIF}", check=False).stdout
        return re.search(r"[<,]UP[,>]", shown) is not None

    def guard_problems(self):
        """What is missing of the vif's anti-spoofing (README layout), per family."""
        return guard_problems(self.proxy, self.backend, VIF, {VM_IP}, set())

    def assert_guarded(self, tag):
        """The invariant: up implies anti-spoofing (rules, and a real spoof dropped)."""
        if not self.link_up():
            return False
        assert self.guard_problems() == [], f"{tag}: {VIF} is up without its anti-spoofing"
        self.probe.check(tag)
        return True

    def leftovers(self):
        """Anything of the vif after offline: rules, chains, routes, neighbours, gateway."""
        found = [f"rule: {line}" for line in self.rules().splitlines()
                 if VIF in line or "QBS-AS-" in line or VM_IP in line]
        shown = self.proxy.sh(f"ip -o link show {VIF}", check=False).stdout
        found += [f"link: {shown.strip()}"] if shown and " group default " not in shown else []  # nft's group 2
        found += [f"route: {line}" for line in self.proxy.out("ip route show table all").splitlines() if VM_IP in line]
        found += [f"neigh: {line}" for line in self.proxy.out("ip neigh show").splitlines() if VM_IP in line]
        found += [f"addr: {line}" for line in self.proxy.out("ip -4 addr").splitlines() if f"{GW}/32" in line]
        return found

    def reference(self):
        """A clean online (its state), then offline back to the base; for each, the
        window (seconds from the start) in which it changes the system."""
        windows = {}
        for command in ("online", "offline"):
            started = time.monotonic()
            result = self.run(command, VIF_ROUTE_TIMING="1")
            assert result.returncode == 0, result.stderr
            windows[command] = change_window(result.stderr, time.monotonic() - started)
            if command == "online":
                online = self.state()
        self.assert_state(self.base, "online then offline must leave the state from before")
        self.xen.xs_rm(f"{PATH}/hotplug-status")
        return online, windows

    def quiet(self, within=1.0):
        """The processes left in the provider once `within` seconds have passed with
        some there ([] as soon as none is): a hung tool or hook that was not killed
        stays (they sleep 60 s).  The wait is for a served child, which answers and
        lets go of the client's stdio before its exit, so it may still be exiting
        (a few ms) when the client has returned."""
        wait_for(lambda: not pids_in(self.proxy), within)
        return pids_in(self.proxy)

    def close(self):
        self.probe.close()


def change_window(stderr, took):
    """(whole run, from reading the rules to the last change), in seconds, from the
    product's VIF_ROUTE_TIMING line.  The changes take a few milliseconds of a
    ~150 ms run (start-up, reading inputs), so kills spread over the whole run
    alone would rarely land in them.  The status write to xenstore is left out:
    it changes no network state."""
    for line in stderr.splitlines():
        if line.startswith("timing "):
            record = json.loads(line[len("timing "):])
            phases = record["phases_ms"]
            changing = sum(ms for kind, ms in record["steps_ms"] if kind not in ("XenstoreWrite", "Hook"))
            return took, (phases.get("facts", 0) + phases.get("plan", 0) + changing) / 1000 + 0.003
    return took, took  # no timing line (the product changed): the whole run


def alive(pid):
    """Running, not merely a zombie its new parent has yet to reap."""
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        except FileNotFoundError:
            return False
        time.sleep(0.02)
    return True


def one_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, f"want one clear line:\n{result.stderr}"
    return lines[0]


def announcer(folder, backend="iptables"):
    """An iptables-restore (nft backend: an nft, on its transaction `nft -f`) first on
    PATH that creates $FAULTS_SIGNAL, then runs the real one: the product's first
    fork that changes anything (online: before the link comes up; offline: after
    it went down), a reference point for the kill that start-up jitter and a
    loaded machine do not blur."""
    stand_in = folder / "announce" / CHANGE_TOOL[backend]
    if not stand_in.exists():
        stand_in.parent.mkdir()
        signal = ': > "$FAULTS_SIGNAL"'
        body = (nft_stand_in(signal) if backend == "nft"
                else f'{signal}\nexec {shutil.which("iptables-restore")} "$@"')
        stand_in.write_text(f"#!/bin/sh\n{body}\n")
        stand_in.chmod(0o755)
    return stand_in.parent


HOLDER = """import fcntl, sys
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""


def hold_lock(path):
    holder = subprocess.Popen([PY, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def timed(func):
    started = time.monotonic()
    result = func()
    return result, time.monotonic() - started
