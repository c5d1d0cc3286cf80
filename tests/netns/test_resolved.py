"""systemd-resolved as the source of the upstream resolvers (CONTRACT section 2).

resolv.conf names the stub 127.0.0.53, so qubes-setup-dnat-to-ns asks
org.freedesktop.resolve1 over the system bus with busctl.  Here "the system
bus" is a private dbus-daemon of the test (its own config; a socket path in
tmp_path, as abstract sockets would not be seen from the test's network
namespace), reached through DBUS_SYSTEM_BUS_ADDRESS; resolved is
tests/kit/fake_resolved.py.  The machine's real system bus is never touched.
"""

import json
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netns import run_cmd

DNS1, DNS2 = "10.139.1.1", "10.139.1.2"
FAKE = Path(__file__).resolve().parents[1] / "kit" / "fake_resolved.py"
ASKED = "Get org.freedesktop.resolve1.Manager DNS"
BUS_CONF = """<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""  # no <servicedir>: nothing is ever activated, a missing name stays missing (case e)


def _first_line(proc: subprocess.Popen, what: str, err: Path, timeout: float = 10) -> str:
    """The first stdout line of a starting daemon, or a clear failure instead of a hang."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    if not line:
        raise AssertionError(f"{what} did not start: {err.read_text().strip()}")
    return line


def _start(argv: list[str], err: Path, **kwargs) -> subprocess.Popen:
    with open(err, "w") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, **kwargs)


def _stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)
    finally:
        proc.stdout.close()


class PrivateBus:
    def __init__(self, root: Path) -> None:
        self.root, self.fake, self.log = root, None, root / "fake-resolved.log"
        (root / "bus.conf").write_text(BUS_CONF.format(socket=root / "bus.sock"))
        self.daemon = _start(["dbus-daemon", f"--config-file={root / 'bus.conf'}", "--nofork", "--nopidfile",
                              "--print-address=1"], root / "dbus.err")
        try:
            self.address = _first_line(self.daemon, "dbus-daemon", root / "dbus.err")
        except AssertionError:
            _stop(self.daemon)  # the fixture's teardown never sees a bus that failed to start
            raise

    def serve(self, servers: list[str], as_json: bool = False) -> None:
        """Start the stand-in resolved with servers "IFINDEX=ADDRESS" (argv or a JSON file)."""
        path = self.root / "servers.json"
        if as_json:
            path.write_text(json.dumps([s.split("=", 1) for s in servers]))
        argv = [sys.executable, str(FAKE), self.address, *(["--json", str(path)] if as_json else servers)]
        env = {"PATH": "/usr/bin:/bin", "FAKE_RESOLVED_LOG": str(self.log)}
        self.fake = _start(argv, self.root / "fake.err", env=env)
        assert _first_line(self.fake, "fake_resolved", self.root / "fake.err") == "ready"

    def asked(self) -> list[str]:  # the stand-in's calls, one line each
        return self.log.read_text().splitlines() if self.log.exists() else []

    def close(self) -> int | None:
        status = _stop(self.fake) if self.fake else None
        _stop(self.daemon)
        return status


@pytest.fixture
def bus(tmp_path):
    for tool in ("busctl", "dbus-daemon"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is missing (Debian packages systemd and dbus; tests/tools/install.sh installs them)")
    (tmp_path / "bus").mkdir()
    private = PrivateBus(tmp_path / "bus")
    try:
        yield private
    finally:
        status = private.close()
    # after the teardown above, so that a failure here never leaves a process behind
    assert status in (None, 0), f"fake_resolved did not exit cleanly on SIGTERM (status {status})"


@pytest.fixture
def vm(netns):  # deleted, with anything still running in it, by the netns fixture
    return netns.make("res")


@pytest.fixture
def dnat(vm, xen, bus, tmp_path):
    """Runs qubes-setup-dnat-to-ns in the namespace, against the private bus."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# systemd-resolved's stub-resolv.conf\nnameserver 127.0.0.53\noptions edns0 trust-ad\n")
    env = xen.env(DBUS_SYSTEM_BUS_ADDRESS=bus.address, QUBES_RESOLV_CONF=str(resolv),
                  FAKE_SYSTEMCTL_LOG=str(tmp_path / "systemctl.log"),
                  QUBES_FIREWALL_FLAG=str(tmp_path / "no-qubes-firewall"))

    def run(*extra: str) -> subprocess.CompletedProcess:
        return run_cmd(vm, ["qubes-setup-dnat-to-ns", "--dns1", DNS1, "--dns2", DNS2, *extra], env)

    return run


def _lines(ns, table: str, prefix: str) -> list[str]:
    return [line for line in ns.out(f"iptables-save -t {table}").splitlines() if line.startswith(prefix)]


def _dnat(target1: str, target2: str) -> list[str]:
    return ["-A PR-QBS -j custom-dnat-dns"] + [
        f"-A PR-QBS -d {virtual}/32 -p {proto} -m {proto} --dport 53 -j DNAT --to-destination {target}"
        for virtual, target in ((DNS1, target1), (DNS2, target2)) for proto in ("udp", "tcp")]


def _assert_guarded(ns, refused: bool = True) -> None:
    """With no upstream, DNS to either virtual address is refused in FORWARD and
    INPUT (port unreachable, reset); with one, the guard is empty."""
    guard = _lines(ns, "filter", "-A QBS-DNS-GUARD")
    want = "-j REJECT --reject-with {}"
    assert guard == ([f"-A QBS-DNS-GUARD -d {virtual}/32 -p {proto} -m {proto} --dport 53 "
                      + want.format("icmp-port-unreachable" if proto == "udp" else "tcp-reset")
                      for virtual in (DNS1, DNS2) for proto in ("udp", "tcp")] if refused else [])
    jumps = _lines(ns, "filter", "-A ")
    assert jumps[:1] == ["-A INPUT -j QBS-DNS-GUARD"] and "-A FORWARD -j QBS-DNS-GUARD" in jumps, jumps


def test_busctl_reaches_the_private_bus(vm, bus):
    """The premise of this file: sd-bus's `busctl --system` honours DBUS_SYSTEM_BUS_ADDRESS."""
    bus.serve(["0=203.0.113.53"])
    result = vm.sh(f"DBUS_SYSTEM_BUS_ADDRESS='{bus.address}' busctl --system --json=short get-property "
                   "org.freedesktop.resolve1 /org/freedesktop/resolve1 org.freedesktop.resolve1.Manager DNS")
    assert json.loads(result.stdout) == {"type": "a(iiay)", "data": [[0, 2, [203, 0, 113, 53]]]}
    assert bus.asked() == [ASKED]


@pytest.mark.parametrize("servers, as_json, targets", [
    # (a) global servers win over per-link ones; one global server takes both addresses
    (["0=203.0.113.53", "2=203.0.113.99"], False, ("203.0.113.53", "203.0.113.53")),
    # (a) two IPv4 global servers, an IPv6 one between them (skipped), per-link first on the wire
    (["2=203.0.113.99", "0=203.0.113.53", "0=2001:db8::53", "0=203.0.113.56"], False,
     ("203.0.113.53", "203.0.113.56")),
    # (b) per-link only: used in order (given through the stand-in's JSON file)
    (["2=203.0.113.54", "2=203.0.113.55"], True, ("203.0.113.54", "203.0.113.55")),
], ids=["global-one", "global-two-mixed", "per-link-only"])
def test_resolved_servers_are_dnat_targets(vm, bus, dnat, servers, as_json, targets):
    bus.serve(servers, as_json=as_json)
    result = dnat()
    assert result.returncode == 0, result.stderr
    assert bus.asked() == [ASKED], "qubes-setup-dnat-to-ns did not ask the stand-in resolved"
    assert _lines(vm, "nat", "-A PR-QBS") == _dnat(*targets)
    assert "-A PREROUTING -j PR-QBS" in _lines(vm, "nat", "-A PREROUTING")
    _assert_guarded(vm, refused=False)
    # the same answer again: nothing to change
    again = dnat()
    assert again.returncode == 100, again.stderr


@pytest.mark.parametrize("servers", [[], ["0=2001:db8::53", "2=2001:db8::54"]], ids=["none", "ipv6-only"])
def test_no_usable_server_refuses_dns(vm, bus, dnat, servers):
    """(c) no servers, (d) IPv6 servers only (the virtual addresses are IPv4): nothing to
    forward to, so queries to the virtual addresses are refused inside the VM."""
    bus.serve(servers)
    result = dnat()
    assert result.returncode == 0, result.stderr
    assert bus.asked() == [ASKED]
    assert _lines(vm, "nat", "-A PR-QBS") == ["-A PR-QBS -j custom-dnat-dns"]
    assert not [line for line in _lines(vm, "nat", "-A ") if "DNAT" in line]
    _assert_guarded(vm)


def test_resolved_not_on_the_bus_refuses_dns(vm, dnat):
    """(e) resolv.conf names the stub but nobody owns org.freedesktop.resolve1: one clear
    line, and DNS is refused, never forwarded untranslated."""
    result = dnat()
    assert result.returncode in (0, 1), result.stderr
    message = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(message) == 1 and "resolve" in message[0], result.stderr
    assert not [line for line in _lines(vm, "nat", "-A ") if "DNAT" in line]
    _assert_guarded(vm)


def test_resolved_ipv6_servers_are_dnat_targets_link_local_skipped(vm, bus, xen, tmp_path):
    """Family 10: per family, the global servers if any, else the per-link ones; a
    link-local server (usable only with its interface) is skipped with a log line."""
    bus.serve(["0=203.0.113.53", "2=fe80::53", "2=2001:db8:53::54", "3=2001:db8:53::55"])
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\n")
    env = xen.env(DBUS_SYSTEM_BUS_ADDRESS=bus.address, QUBES_RESOLV_CONF=str(resolv),
                  QUBES_FIREWALL_FLAG=str(tmp_path / "no-qubes-firewall"))
    v6 = ("fd09:24ef:4179::a8b:1", "fd09:24ef:4179::a8b:2")
    result = run_cmd(vm, ["qubes-setup-dnat-to-ns", "--dns1", DNS1, "--dns6-1", v6[0], "--dns6-2", v6[1]], env)
    assert result.returncode == 0, result.stderr
    assert "fe80::53" in result.stderr and "link-local" in result.stderr, result.stderr
    rules = [line for line in vm.out("ip6tables-save -t nat").splitlines() if line.startswith("-A PR-QBS")]
    assert rules == ["-A PR-QBS -j custom-dnat-dns"] + [
        f"-A PR-QBS -d {virtual}/128 -p {proto} -m {proto} --dport 53 -j DNAT --to-destination {target}"
        for virtual, target in zip(v6, ("2001:db8:53::54", "2001:db8:53::55")) for proto in ("udp", "tcp")]
    assert _lines(vm, "nat", "-A PR-QBS -d") == [
        f"-A PR-QBS -d {DNS1}/32 -p {proto} -m {proto} --dport 53 -j DNAT --to-destination 203.0.113.53"
        for proto in ("udp", "tcp")]
