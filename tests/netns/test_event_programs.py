"""An event starts only the programs it needs (issue 28; CONTRACT section 1, `offline`).

An offline learns what to undo from the kernel (the vif's set elements, routes,
neighbours, addresses, hardening, its namespace when mapped): with no hook it
starts no program at all; with a hook it reads the device type from xenstore,
once.  An online reads xenstore once, qubesdb once and writes xenstore once.
Every program an event may run is wrapped on PATH (tests/kit/event_programs.py) and
its calls counted; each case also checks that the event did its job, so that a
count of zero cannot come from an event that did nothing.

    app eth0 10.137.7.27 (+ fd09:24ef:4179::a89:71b) --vif37.0-- proxy (ran `init`)
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from event_programs import Counter
from firewall import antispoof_sources, ipset_members, nft_set
from netns import state_of

VIF, GW, MAC = "vif37.0", "10.137.7.1", "00:16:3e:5e:6c:19"
ADDR, ADDR6, GW6 = "10.137.7.27", "fd09:24ef:4179::a89:71b", "fd09:24ef:4179::a89:1"


def nsenter(ns, argv, env):
    return subprocess.run([shutil.which("nsenter"), f"--net=/run/netns/{ns.name}", *argv], env=env, capture_output=True,
                          text=True, timeout=60)


class Vif:
    """The proxy (after `init`), its VM behind vif37.0, Xen's keys, and the counting PATH."""

    def __init__(self, netns, xen, vifcmd, backend, tmp_path: Path, addrs=(ADDR,), gateway6=None):
        self.xen, self.vifcmd, self.backend = xen, vifcmd, backend
        self.proxy, vm = netns.make("proxy"), netns.make("app")
        self.proxy.sh("for t in iptables ip6tables; do $t -t raw -N PRIME && $t -t raw -X PRIME; done"
                      " && sysctl -qw net.ipv6.conf.default.accept_dad=0")
        netns.vif(self.proxy, vm, VIF, vm_mac=MAC, vm_addrs=addrs, gateway=GW)
        self.path = xen.backend(37, ip=" ".join(addrs), mac=MAC)
        xen.qdb_write("/qubes-netvm-gateway", GW)
        if gateway6:
            xen.qdb_write("/qubes-netvm-gateway6", gateway6)
        self.env = xen.env(vif=VIF, XENBUS_PATH=self.path, QUBES_NET_BACKEND=backend)
        self.counter = Counter(tmp_path / "counted", self.env["PATH"])
        self.env["PATH"] = self.counter.path
        assert self.run("init", "--backend", backend)  # the documented setup: the base is there
        self.before = self.state()

    def run(self, command, *words):
        """The event in Xen's form; the programs it started, as `NAME ARGS` lines."""
        self.counter.reset()
        argv = [self.vifcmd, command, *words] if command == "init" else [self.vifcmd, command, "type_if=vif"]
        result = nsenter(self.proxy, argv, self.env)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        return self.counter.calls() or ["(none)"]

    def state(self):
        return re.sub(r"\[\d+:\d+\]", "[0:0]", state_of(self.proxy))

    def online(self) -> list[str]:
        calls = self.run("online")
        assert antispoof_sources(self.proxy, self.backend, VIF) >= {ADDR}
        assert f"{ADDR} scope link metric 32715" in self.proxy.out(f"ip route show dev {VIF}")
        assert self.xen.xs_read(f"{self.path}/hotplug-status") == "connected"
        return calls


def pairs_of(ns, backend, vif) -> set[str]:
    """The addresses `vif` has a pair for in the `allowed` sets (both families)."""
    if backend == "nft":
        return {e["concat"][1] for family in ("ip", "ip6") for e in nft_set(ns, family, "allowed")
                if isinstance(e, dict) and e["concat"][0] == vif}
    return {entry.rsplit(",", 1)[0] for version in (4, 6) for entry in ipset_members(ns, f"qbs-allowed{version}") or []
            if entry.rsplit(",", 1)[1] == vif}


@pytest.fixture
def vif(netns, xen, vifcmd, backend, tmp_path):
    return Vif(netns, xen, vifcmd, backend, tmp_path)


def names(calls: list[str]) -> list[str]:
    return [line.split(" ", 1)[0] for line in calls if line != "(none)"]


def test_an_online_reads_xenstore_and_qubesdb_once_and_writes_once(vif):
    calls = vif.online()
    assert sorted(names(calls)) == ["qubesdb-read", "xenstore-read", "xenstore-write"], calls


def test_a_plain_offline_starts_no_program(vif):
    vif.online()
    calls = vif.run("offline")
    assert names(calls) == [], calls
    assert vif.state() == vif.before  # it did undo everything
    assert pairs_of(vif.proxy, vif.backend, VIF) == set()


def test_an_offline_with_ipv6_and_hardening_starts_no_program(netns, xen, vifcmd, backend, tmp_path):
    box = Vif(netns, xen, vifcmd, backend, tmp_path, addrs=(ADDR, ADDR6), gateway6=GW6)
    xen.qdb_write("/qubes-service/harden-network-interfaces", "1")
    conf = f"/proc/sys/net/ipv6/conf/{VIF}/accept_source_route"
    before = box.proxy.out(f"cat {conf}").strip()
    box.online()
    assert box.proxy.out(f"cat {conf}").strip() == "-1"  # hardened, so it can tell
    assert f"{GW6}/128" in box.proxy.out(f"ip -6 addr show dev {VIF}")
    calls = box.run("offline")
    assert names(calls) == [], calls
    assert box.proxy.out(f"cat {conf}").strip() == before
    assert box.state() == box.before


def test_an_offline_with_a_hook_reads_only_the_device_type(vif, tmp_path):
    seen = tmp_path / "hook.log"
    hook = vif.xen.hooks / "10-record"
    hook.write_text(f"#!/bin/sh\necho \"$*\" >> {seen}\n")
    hook.chmod(0o755)
    vif.xen.xs_write(f"{vif.path}/type", "ioemu")
    vif.online()
    seen.write_text("")
    calls = vif.run("offline")
    assert names(calls) == ["xenstore-read"], calls
    assert calls[0].endswith(f"{vif.path}/type"), calls  # the type alone
    assert seen.read_text() == f"offline {VIF} ioemu {ADDR}\n"
    assert vif.state() == vif.before


def test_an_offline_of_a_vif_that_is_gone_still_starts_no_program_for_what_the_kernel_holds(vif):
    """Xen removed the interface before its offline: the sets still hold its pair,
    and the offline finds it there (no xenstore `ip` needed); it asks xenstore only
    whether the vif was renamed (`vifname`), which the kernel cannot tell."""
    vif.online()
    vif.proxy.sh(f"ip link del {VIF}")
    calls = vif.run("offline")
    assert names(calls) == ["xenstore-read"] and calls[0].endswith(f"{vif.path}/vifname"), calls
    assert pairs_of(vif.proxy, vif.backend, VIF) == set()
    vif.run("offline")  # twice: exit 0 again


def test_no_event_starts_a_program_when_the_environment_says_everything(vif):
    """The manual form with every input given: an online runs nothing but the
    changes it makes over netlink (no xenstore, no qubesdb)."""
    vif.env = {k: v for k, v in vif.env.items() if k not in ("XENBUS_PATH", "vif")}
    vif.counter.reset()
    argv = [vif.vifcmd, "online", VIF, ADDR, "--mac", MAC, "--gateway", GW, "--gateway6", "", "--dns1", "",
            "--dns2", "", "--visible-ip", "", "--no-harden"]
    result = nsenter(vif.proxy, argv, vif.env)
    assert result.returncode == 0, result.stderr
    assert vif.counter.calls() == []
    assert antispoof_sources(vif.proxy, vif.backend, VIF) == {ADDR}
    result = nsenter(vif.proxy, [vif.vifcmd, "offline", VIF], vif.env)
    assert result.returncode == 0, result.stderr
    assert vif.counter.calls() == []
    assert vif.state() == vif.before

