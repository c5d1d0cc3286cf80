"""Behaviours of `vif-route-qubes` seen by a user: conntrack purge, hooks, failure
reporting, tap and add/remove, the manual form and input precedence, hardening,
--help and the lock (CONTRACT section 1).

Where the firewall takes part (failure of its tool, tap add/remove and the
no-op events, the manual form, hardening, the lock) a test takes `backend` and
runs under both backends; the others run under the default (iptables here).
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from firewall import antispoof_sources, failing_change_tool
from netns import BIN, FAKEBIN, run_cmd, state_of

VM4, VM4B, VM6 = "10.137.7.27", "10.137.7.40", "fd09:24ef:4179::a89:71b"
MAC = "00:16:3e:5e:6c:19"
PATH37 = "/local/domain/0/backend/vif/37/0"


def setup(netns, xen, addrs=(VM4,), vif="vif37.0", xs_ip=None, veth=True):
    """Provider and VM joined by `vif`; xenstore and qubesdb as Xen and Qubes fill them."""
    proxy = netns.make("prov")
    # iptables-nft makes a table on first use and never drops it: make the raw
    # tables now, as on a real provider, so that "before" compares with "after".
    proxy.sh("for t in iptables ip6tables; do $t -t raw -N PRIME && $t -t raw -I PREROUTING -j PRIME"
             " && $t -t raw -D PREROUTING -j PRIME && $t -t raw -X PRIME; done")
    if veth:
        netns.vif(proxy, netns.make("app"), vif, vm_mac=MAC, vm_addrs=addrs, gateway="10.137.7.1")
    path = xen.backend(37, ip=" ".join(addrs) if xs_ip is None else xs_ip, mac=MAC)
    xen.qdb_write("/qubes-netvm-gateway", "10.137.7.1")
    return proxy, path


def vrq(proxy, xen, vifcmd, *argv, vif="vif37.0", path=PATH37, backend=None, **env):
    """Run vif-route-qubes in the provider, the hotplug way (env vif and XENBUS_PATH) by
    default, under firewall `backend` (QUBES_NET_BACKEND) when given."""
    base = {"vif": vif, "XENBUS_PATH": path} if vif else {}
    if backend:
        base["QUBES_NET_BACKEND"] = backend
    return run_cmd(proxy, [vifcmd, *argv], xen.env(**base, **env), timeout=30)


def err_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


def is_up(proxy, vif):
    return re.search(r"[<,]UP[,>]", proxy.out(f"ip link show {vif}")) is not None


# -- 1. connection tracking -------------------------------------------------

CT_VM = [  # entries that belong to the VM: as source, as destination, as reply source (DNAT), IPv6
    f"-s {VM4} -d 198.51.100.1 -p udp --sport 1000 --dport 53",
    f"-s 198.51.100.9 -d {VM4} -p udp --sport 1001 --dport 53",
    f"-s 198.51.100.9 -d 198.51.100.1 -r {VM4} -q 198.51.100.9 -p tcp --sport 1002 --dport 80"
    " --reply-port-src 80 --reply-port-dst 1002 --state ESTABLISHED",
    f"-s {VM6} -d fd09:24ef:4179:1::1 -p udp --sport 1003 --dport 53",
]
CT_OTHER = [  # another VM whose address is a prefix of the VM's as text, and plain upstream traffic
    "-s 10.137.7.2 -d 198.51.100.1 -p udp --sport 2000 --dport 53",
    "-s 198.51.100.9 -d 198.51.100.1 -p tcp --sport 2001 --dport 80 --state ESTABLISHED",
    "-s fd09:24ef:4179::2 -d fd09:24ef:4179:1::1 -p udp --sport 2002 --dport 53",
]


def conntrack_entries(proxy):
    out = proxy.out("conntrack -L -f ipv4 2>/dev/null; conntrack -L -f ipv6 2>/dev/null")
    return [line for line in out.splitlines() if "src=" in line]


def fill_conntrack(proxy):
    for entry in CT_VM + CT_OTHER:
        proxy.sh(f"conntrack -I {entry} --timeout 100")
    assert len(conntrack_entries(proxy)) == len(CT_VM + CT_OTHER)


def assert_only_others_left(proxy):
    left = conntrack_entries(proxy)
    assert not [e for e in left if f"={VM4} " in e or f"={VM6} " in e], left
    assert len(left) == len(CT_OTHER), left


def test_conntrack_of_the_vm_is_purged_on_online_and_offline(netns, xen, vifcmd):
    proxy, _ = setup(netns, xen, addrs=(VM4, VM6))
    fill_conntrack(proxy)
    dry = vrq(proxy, xen, vifcmd, "online", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert len(conntrack_entries(proxy)) == len(CT_VM + CT_OTHER)  # a dry run purges nothing
    deletes = [line for line in dry.stdout.splitlines() if line.startswith("conntrack -D")]
    for addr in (VM4, VM6):
        for flag in ("-s", "-d", "--reply-src"):
            assert any(f" {flag} {addr} " in line for line in deletes), (addr, flag, deletes)

    assert vrq(proxy, xen, vifcmd, "online").returncode == 0
    assert_only_others_left(proxy)
    proxy.sh("conntrack -F 2>/dev/null")
    fill_conntrack(proxy)
    assert vrq(proxy, xen, vifcmd, "offline").returncode == 0
    assert_only_others_left(proxy)


# -- 2. hooks ---------------------------------------------------------------

def hook(xen, name, body, mode=0o755):
    path = xen.hooks / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("dev_type", ["vif", "ioemu"])
def test_hooks_run_per_address_in_name_order(netns, xen, vifcmd, dev_type):
    proxy, path = setup(netns, xen, addrs=(VM4, VM4B))
    xen.xs_write(f"{path}/type", dev_type)
    log = xen.root / "hooks.log"
    for name in ("20-second", "10-first", "15-not-executable", ".hidden"):
        hook(xen, name, f'echo "{name} $*" >> {log}', 0o644 if name.startswith("15") else 0o755)
    (xen.hooks / "12-a-folder").mkdir()  # executable, but not a file
    for command in ("online", "offline"):
        log.unlink(missing_ok=True)
        assert vrq(proxy, xen, vifcmd, command).returncode == 0
        lines = log.read_text().splitlines()
        assert sorted(lines) == sorted(f"{n} {command} vif37.0 {dev_type} {a}"
                                       for n in ("10-first", "20-second") for a in (VM4, VM4B))
        for addr in (VM4, VM4B):  # for each address, name order
            assert [ln.split()[0] for ln in lines if ln.endswith(addr)] == ["10-first", "20-second"]


def test_hook_of_a_vm_without_addresses_runs_once_without_addr(netns, xen, vifcmd):
    proxy, path = setup(netns, xen, addrs=())
    xen.xs_rm(f"{path}/ip")
    log = xen.root / "hooks.log"
    hook(xen, "10-log", f'echo "$# $*" >> {log}')
    assert vrq(proxy, xen, vifcmd, "online").returncode == 0
    assert log.read_text().splitlines() == ["3 online vif37.0 vif"]


def test_failing_hook_is_logged_and_not_fatal(netns, xen, vifcmd):
    proxy, path = setup(netns, xen)
    bad = hook(xen, "10-fails", "echo 'hook trouble' >&2; exit 1")
    result = vrq(proxy, xen, vifcmd, "online")
    assert result.returncode == 0
    assert str(bad) in result.stderr
    assert xen.xs_read(f"{path}/hotplug-status") == "connected"
    assert is_up(proxy, "vif37.0")


def test_the_lock_holder_runs_first_and_a_hook_at_the_events_priority(netns, xen, vifcmd):
    # While it holds the lock an event runs at nice -20 (system/lock.py), and so
    # do its own programs (xenstore-write here); a hook, not ours, runs at the
    # niceness the event was started with.
    proxy, path = setup(netns, xen)
    log = xen.root / "nice.log"
    hook(xen, "10-nice", f'echo "hook $(nice)" >> {log}')
    fake = xen.root / "bin"
    fake.mkdir()
    real = shutil.which("xenstore-write", path=xen.env()["PATH"])
    (fake / "xenstore-write").write_text(f'#!/bin/sh\necho "xenstore-write $(nice)" >> {log}\nexec {real} "$@"\n')
    (fake / "xenstore-write").chmod(0o755)
    env = xen.env(vif="vif37.0", XENBUS_PATH=path, PATH=f"{fake}:{xen.env()['PATH']}")
    result = run_cmd(proxy, ["nice", "-n", "5", vifcmd, "online"], env)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["hook 5", "xenstore-write -20"]
    assert xen.xs_read(f"{path}/hotplug-status") == "connected"


def test_hanging_hook_is_killed_with_its_children(netns, xen, vifcmd):
    proxy, path = setup(netns, xen)
    pidfile = xen.root / "sleep.pid"
    slow = hook(xen, "10-hangs", f"sleep 60 & echo $! > {pidfile}; wait")
    started = time.monotonic()
    result = vrq(proxy, xen, vifcmd, "online", VIF_ROUTE_HOOK_TIMEOUT="1")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 8
    assert str(slow) in result.stderr
    assert xen.xs_read(f"{path}/hotplug-status") == "connected"
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 3  # the orphaned child may take a moment to be reaped
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the hook's `sleep 60` child is still running"


# -- 3. failure reporting ---------------------------------------------------

def assert_reported(result, xen, path, *words):
    assert result.returncode == 1, result.stderr
    lines = err_lines(result)
    assert len(lines) == 1, lines
    assert "vif37.0" in lines[0] and all(w in lines[0] for w in words), lines
    assert xen.xs_read(f"{path}/hotplug-status") == "error"
    assert xen.xs_read(f"{path}/hotplug-error") and xen.xs_read(f"{path}/hotplug-error") in lines[0]


def test_missing_interface_fails_and_is_reported_to_xen(netns, xen, vifcmd, backend):
    proxy, path = setup(netns, xen, veth=False)
    before = state_of(proxy)
    assert_reported(vrq(proxy, xen, vifcmd, "online", backend=backend), xen, path)
    assert state_of(proxy) == before


def test_failed_firewall_tool_leaves_the_link_down(netns, xen, vifcmd, backend):
    """iptables-restore fails, or nft's transaction (`nft -f`; its reads still work)."""
    proxy, path = setup(netns, xen)
    before = state_of(proxy)
    fake = xen.root / "bin"
    fake.mkdir()
    tool = failing_change_tool(fake, backend)
    env_path = f"{fake}:{xen.env()['PATH']}"
    result = vrq(proxy, xen, vifcmd, "online", PATH=env_path, backend=backend)
    assert_reported(result, xen, path, tool, "injected restore failure")
    after = state_of(proxy)
    if backend == "iptables":
        # The ipsets are made before the restore whose rules use them: they stay, empty.
        assert not [line for line in proxy.out("ipset save").splitlines() if line.startswith("add ")]
        before, after = (re.sub(r"\$ ipset save\n.*?(?=\$ nft )", "", text, flags=re.S) for text in (before, after))
    assert after == before  # the first change that uses the sets failed: no rule, no element, no link
    assert not is_up(proxy, "vif37.0")  # never up without anti-spoofing
    assert proxy.out("ip route show dev vif37.0").strip() == ""
    assert proxy.out("ip -6 route show dev vif37.0 proto boot").strip() == ""


# -- 4. tap and add/remove --------------------------------------------------

@pytest.mark.parametrize("command,type_if,vif", [
    ("add", "vif", "vif37.0"), ("remove", "vif", "vif37.0"),
    ("online", "tap", "vif37.0-emu"), ("offline", "tap", "vif37.0-emu")])
def test_events_that_are_no_ops(netns, xen, vifcmd, backend, command, type_if, vif):
    proxy, path = setup(netns, xen, vif=vif)
    before = state_of(proxy)
    result = vrq(proxy, xen, vifcmd, command, f"type_if={type_if}", vif=vif, backend=backend)
    assert result.returncode == 0, result.stderr
    assert state_of(proxy) == before
    assert not is_up(proxy, vif)
    assert xen.xs_read(f"{path}/hotplug-status") is None


def test_tap_is_configured_by_add_and_unconfigured_by_remove(netns, xen, vifcmd, backend):
    proxy, _ = setup(netns, xen, vif="vif37.0-emu")
    before = state_of(proxy)
    result = vrq(proxy, xen, vifcmd, "add", "type_if=tap", vif="vif37.0-emu", backend=backend)
    assert result.returncode == 0, result.stderr
    assert proxy.out("ip route show dev vif37.0-emu").strip() == f"{VM4} scope link metric 32715"
    assert antispoof_sources(proxy, backend, "vif37.0-emu") == {VM4}
    assert is_up(proxy, "vif37.0-emu")
    result = vrq(proxy, xen, vifcmd, "remove", "type_if=tap", vif="vif37.0-emu", backend=backend)
    assert result.returncode == 0, result.stderr
    assert state_of(proxy) == before


# -- 5. manual form, precedence, key=value ----------------------------------

def routes(proxy):
    return sorted(line.split()[0] for line in proxy.out("ip route show dev vif37.0").splitlines()
                  if "metric 32715" in line)


def test_manual_form_needs_no_xenstore_nor_qubesdb(netns, xen, vifcmd, backend):
    proxy, _ = setup(netns, xen, addrs=(VM4, VM4B))
    # Neither xenstore-read nor qubesdb-read on PATH: everything comes from the command line.
    env_path = ":".join(p for p in xen.env()["PATH"].split(":") if p != str(FAKEBIN))
    result = vrq(proxy, xen, vifcmd, "online", "vif37.0", VM4, VM4B, "--gateway", "10.137.7.1",
                 "--mac", MAC, vif=None, PATH=env_path, backend=backend)
    assert result.returncode == 0, result.stderr
    assert routes(proxy) == [VM4, VM4B]
    assert antispoof_sources(proxy, backend, "vif37.0") == {VM4, VM4B}
    assert "inet 10.137.7.1/32 scope global vif37.0" in proxy.out("ip -4 addr show dev vif37.0")
    neigh = proxy.out("ip neigh show dev vif37.0 nud permanent")
    assert f"{VM4} lladdr {MAC} PERMANENT" in neigh and f"{VM4B} lladdr {MAC} PERMANENT" in neigh
    assert is_up(proxy, "vif37.0")


@pytest.mark.parametrize("positional,env_ip,expected", [
    ((VM4,), "10.137.7.60", [VM4]),   # positional beats env `ip` and xenstore `ip`
    ((), VM4, [VM4]),                 # env `ip` beats xenstore `ip`
    ((), None, ["10.137.7.50"]),      # xenstore `ip` when nothing else says
])
def test_address_precedence(netns, xen, vifcmd, positional, env_ip, expected):
    proxy, _ = setup(netns, xen, xs_ip="10.137.7.50")
    extra = {"ip": env_ip} if env_ip else {}
    argv = ["online", "vif37.0", *positional] if positional else ["online"]
    result = vrq(proxy, xen, vifcmd, *argv, **extra)
    assert result.returncode == 0, result.stderr
    assert routes(proxy) == expected


def test_key_value_arguments_act_as_environment(netns, xen, vifcmd):
    proxy, path = setup(netns, xen, xs_ip="10.137.7.50")
    # Nothing in the environment: vif, XENBUS_PATH, ip and an option's variable all as arguments.
    result = vrq(proxy, xen, vifcmd, "online", "type_if=vif", "vif=vif37.0", f"XENBUS_PATH={path}",
                 f"ip={VM4}", "VIF_ROUTE_GATEWAY=10.137.7.9", vif=None)
    assert result.returncode == 0, result.stderr
    assert routes(proxy) == [VM4]
    assert "inet 10.137.7.9/32 scope global vif37.0" in proxy.out("ip -4 addr show dev vif37.0")
    assert xen.xs_read(f"{path}/hotplug-status") == "connected"


# -- 6. hardening: tests/netns/test_xen_hotplug.py (flag 1, 0, absent, garbage; every setting) --


# -- 7. help and version ----------------------------------------------------

def test_help_names_every_option_and_its_variable():
    out = subprocess.run([str(BIN / "vif-route-qubes"), "online", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "100"}, timeout=30)
    assert out.returncode == 0, out.stderr
    for name in ("--mac", "VIF_ROUTE_MAC", "--gateway", "VIF_ROUTE_GATEWAY", "--gateway6", "VIF_ROUTE_GATEWAY6",
                 "--dns1", "VIF_ROUTE_DNS1", "--dns2", "VIF_ROUTE_DNS2", "--harden", "VIF_ROUTE_HARDEN",
                 "--hooks-dir", "VIF_ROUTE_HOOKS_DIR", "--hook-timeout", "VIF_ROUTE_HOOK_TIMEOUT",
                 "--xenbus-path", "XENBUS_PATH", "--backend", "QUBES_NET_BACKEND", "--lock-file",
                 "VIF_ROUTE_LOCK_FILE", "--lock-timeout", "VIF_ROUTE_LOCK_TIMEOUT", "--dry-run"):
        assert name in out.stdout, name
    version = subprocess.run([str(BIN / "vif-route-qubes"), "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and "vif-route-qubes" in version.stdout


# -- 8. the lock ------------------------------------------------------------

HOLDER = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
          "print('held', flush=True)\ntime.sleep(30)\n")


def test_held_lock_times_out_without_changes(netns, xen, vifcmd, backend):
    proxy, path = setup(netns, xen)
    before = state_of(proxy)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(xen.lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = vrq(proxy, xen, vifcmd, "online", VIF_ROUTE_LOCK_TIMEOUT="1", backend=backend)
        assert 0.9 < time.monotonic() - started < 8  # it waited, then gave up
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert_reported(result, xen, path, "lock")
    assert state_of(proxy) == before and not is_up(proxy, "vif37.0")


def test_lock_file_left_by_a_dead_process_does_not_block(netns, xen, vifcmd, backend):
    proxy, path = setup(netns, xen)
    xen.lock.write_text("12345\n")  # left behind; nobody holds it
    started = time.monotonic()
    result = vrq(proxy, xen, vifcmd, "online", VIF_ROUTE_LOCK_TIMEOUT="1", backend=backend)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 8
    assert xen.xs_read(f"{path}/hotplug-status") == "connected"
