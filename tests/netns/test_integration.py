"""The udev/ integration files, installed by udev/install into a temporary
root and run the way udev, Xen, NetworkManager and systemd run them
(CONTRACT section 4).  Nothing is ever installed into the real /."""

import fnmatch
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from netns import BIN, FAKEBIN, SERVICE_PATH, run_cmd, run_libxl, state_of

INSTALL = Path(__file__).resolve().parents[2] / "udev" / "install"
TEMPLATES = INSTALL.parent
MARKER = "# vif-route-qubes: installed by udev/install (removed by udev/install --uninstall)"
RULES = "etc/udev/rules.d/90-vif-route-qubes.rules"
HOOK = "etc/NetworkManager/dispatcher.d/50-qubes-setup-dnat-to-ns"
XEN = "etc/xen/scripts/vif-route-qubes"
QUBES_DNS = "usr/lib/qubes/qubes-setup-dnat-to-ns"
UNIT = "etc/systemd/system/vif-route-qubes-init.service"
SOCKET = "etc/systemd/system/vif-route-qubes.socket"
SERVICE = "etc/systemd/system/vif-route-qubes.service"
# destination: (template, mode)
TEMPLATE = {
    RULES: ("90-vif-route-qubes.rules.in", 0o644),
    HOOK: ("50-qubes-setup-dnat-to-ns.in", 0o755),
    XEN: ("xen-vif-route-qubes.in", 0o755),
    QUBES_DNS: ("qubes-setup-dnat-to-ns.in", 0o755),
    UNIT: ("vif-route-qubes-init.service.in", 0o644),
    SOCKET: ("vif-route-qubes.socket.in", 0o644),  # the command server
    SERVICE: ("vif-route-qubes.service.in", 0o644),
}
LINKS = {f"usr/bin/{name}": str(BIN / name)
         for name in ("vif-route-qubes", "qubes-setup-dnat-to-ns", "qubes_setup_dnat_to_ns")}
# What each kind of system gets (CONTRACT section 4), and the units' enabling links.
OUTSIDE_QUBES = {XEN, HOOK, UNIT, SOCKET, SERVICE}
ON_QUBES = {XEN, QUBES_DNS, SOCKET, SERVICE}
WANTS = {UNIT: "multi-user.target.wants", SOCKET: "sockets.target.wants", SERVICE: "multi-user.target.wants"}
VM_MAC = "00:16:3e:5e:6c:19"
VM_IP = "10.137.7.27"
VIF = "vif37.0"


def install(root: Path, *args: str, status: int = 0) -> subprocess.CompletedProcess:
    # The checkout's venv: a test-only --bindir (the installer refuses it otherwise).
    result = subprocess.run([str(INSTALL), "--root", str(root), "--bindir", str(BIN), "--any-bindir", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == status, result.stderr
    return result


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One installed root (outside Qubes, with the udev rule) shared by the tests that only read it."""
    path = tmp_path_factory.mktemp("root")
    install(path, "--udev")
    return path


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def expected_files(ours: set[str]) -> set[str]:
    units = {f"etc/systemd/system/{WANTS[dest]}/{Path(dest).name}" for dest in ours if dest in WANTS}
    return ours | units | set(LINKS)


def rendered(dest: str) -> str:
    """The template with BINDIR filled in and the marker after its #! line (or first)."""
    text = (TEMPLATES / TEMPLATE[dest][0]).read_text().replace("@BINDIR@", str(BIN))
    first, rest = text.split("\n", 1)
    return f"{first}\n{MARKER}\n{rest}" if first.startswith("#!") else f"{MARKER}\n{text}"


def fake_dpkg(root: Path) -> None:
    """A root with a dpkg database (empty): the installer diverts with dpkg-divert."""
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text("")


# -- 1. the installer -------------------------------------------------------

@pytest.mark.parametrize("system", ["outside-qubes", "qubes"])
def test_install_is_complete_idempotent_and_undone_exactly(tmp_path, system):
    ours = ON_QUBES if system == "qubes" else OUTSIDE_QUBES
    install(tmp_path, "--qubes" if system == "qubes" else "--no-qubes")
    assert files_under(tmp_path) == expected_files(ours)
    for dest in ours:
        path = tmp_path / dest
        assert stat.S_IMODE(path.stat().st_mode) == TEMPLATE[dest][1], dest
        text = path.read_text()
        assert "@BINDIR@" not in text and MARKER in text.splitlines()
        assert text == rendered(dest), dest
        assert f"{BIN}/" in text or dest == SOCKET, dest  # the commands are called where pip put them
    for link, target in LINKS.items():
        assert os.readlink(tmp_path / link) == target

    # Idempotent: nothing rewritten (same inode and mtime), nothing printed.
    before = {dest: (p.stat().st_ino, p.stat().st_mtime_ns) for dest in ours for p in [tmp_path / dest]}
    again = install(tmp_path)
    assert again.stdout == "" and again.stderr == ""
    assert before == {dest: (p.stat().st_ino, p.stat().st_mtime_ns) for dest in ours for p in [tmp_path / dest]}

    # A packager's or admin's file beside each of ours must survive uninstall,
    # and so must one that names our programs but lacks our marker.
    unrelated = {str(Path(dest).parent / "unrelated-vif-route-qubes.conf") for dest in TEMPLATE}
    for name in unrelated:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("exec /usr/bin/vif-route-qubes \"$@\"  # not ours\n")
    install(tmp_path, "--uninstall")
    assert files_under(tmp_path) == unrelated
    install(tmp_path, "--uninstall")  # twice is fine
    assert files_under(tmp_path) == unrelated


@pytest.mark.parametrize("dpkg", [True, False], ids=["dpkg-divert", "no-dpkg"])
def test_qubes_files_are_set_aside_and_put_back_byte_for_byte(tmp_path, dpkg):
    """On Qubes: Qubes' own Xen script and DNS command (any bytes) are set aside,
    ours take their paths, uninstall puts Qubes' back exactly."""
    if dpkg:
        fake_dpkg(tmp_path)
    qubes = {XEN: b"#!/bin/bash --\n# Qubes' vif-route-qubes\n\xff\xfe\n", QUBES_DNS: b"#!/bin/sh\n# Qubes' DNS\n"}
    for dest, data in qubes.items():
        (tmp_path / dest).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / dest).write_bytes(data)
        (tmp_path / dest).chmod(0o755)
    out = install(tmp_path).stdout  # detected: /usr/lib/qubes is there
    assert files_under(tmp_path) - {str(p.relative_to(tmp_path)) for p in (tmp_path / "var").rglob("*")} \
        == expected_files(ON_QUBES) | {f"{dest}.distrib" for dest in qubes}
    for dest, data in qubes.items():
        assert f"set aside /{dest}" in out
        assert (tmp_path / f"{dest}.distrib").read_bytes() == data
        assert MARKER in (tmp_path / dest).read_text()
    if dpkg:
        listed = subprocess.run(["dpkg-divert", "--root", str(tmp_path), "--list"], capture_output=True,
                                text=True, check=True).stdout
        for dest in qubes:
            assert f"local diversion of /{dest} to /{dest}.distrib" in listed
    assert install(tmp_path).stdout == ""  # idempotent with the diversions in place
    install(tmp_path, "--uninstall")
    for dest, data in qubes.items():
        assert (tmp_path / dest).read_bytes() == data
        assert stat.S_IMODE((tmp_path / dest).stat().st_mode) == 0o755
        assert not (tmp_path / f"{dest}.distrib").exists()
    assert not list((tmp_path / "etc/systemd").rglob("*vif-route-qubes*"))
    if dpkg:
        listed = subprocess.run(["dpkg-divert", "--root", str(tmp_path), "--list"], capture_output=True,
                                text=True, check=True).stdout
        assert listed.strip() == ""


def test_on_qubes_a_later_package_install_lands_beside_ours(tmp_path):
    """Qubes' programs are diverted even before they exist: dpkg then unpacks a
    later Qubes package's files beside ours (here: dpkg-divert's own answer)."""
    fake_dpkg(tmp_path)
    install(tmp_path, "--qubes")
    for dest in (XEN, QUBES_DNS):
        truename = subprocess.run(["dpkg-divert", "--root", str(tmp_path), "--truename", f"/{dest}"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        assert truename == f"/{dest}.distrib"


def test_a_choice_changed_on_a_second_run_leaves_only_the_new_set(tmp_path):
    install(tmp_path, "--no-qubes", "--udev")
    assert (tmp_path / RULES).exists()
    install(tmp_path, "--no-qubes")
    assert files_under(tmp_path) == expected_files(OUTSIDE_QUBES)
    install(tmp_path, "--qubes")
    assert files_under(tmp_path) == expected_files(ON_QUBES)


@pytest.mark.parametrize("bindir", ["/usr/local/bin", "/rw/venv/bin", "/home/user/.venv/bin", "/root/venv/bin",
                                    str(BIN)])
def test_a_bindir_only_one_qube_sees_is_refused(tmp_path, bindir):
    """In a TemplateBasedVM /usr/local, /rw, /home and /root are each qube's own, and a
    checkout's venv goes with the checkout: every other qube would call a missing program."""
    result = subprocess.run([str(INSTALL), "--root", str(tmp_path), "--bindir", bindir], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "/opt" in result.stderr, result.stderr
    assert files_under(tmp_path) == set()


def test_the_default_install_has_no_udev_rule(tmp_path):
    install(tmp_path)
    assert not (tmp_path / RULES).exists()


# -- 2. the udev rules, read and evaluated like udev ------------------------

MATCH_OPS = ("==", "!=")
# udev's rule keys (udev(7)); those taking {attribute} are listed separately.
PLAIN_KEYS = {"ACTION", "DEVPATH", "KERNEL", "KERNELS", "NAME", "SYMLINK", "SUBSYSTEM", "SUBSYSTEMS",
              "DRIVER", "DRIVERS", "TAG", "TAGS", "PROGRAM", "RESULT", "OWNER", "GROUP", "MODE",
              "RUN", "LABEL", "GOTO", "OPTIONS"}
ATTR_KEYS = {"ENV", "ATTR", "ATTRS", "SYSCTL", "CONST", "TEST", "IMPORT", "RUN", "SECLABEL"}
TOKEN = re.compile(r'\s*(?P<key>[A-Z_]+)(?:\{(?P<attr>[^{}]*)\})?\s*(?P<op>==|!=|\+=|=)\s*'
                   r'"(?P<value>[^"\\]*)"\s*')


def parse_rules(text: str) -> list[list[tuple[str, str | None, str, str]]]:
    """Each rule as a list of (key, attr, op, value); fails on anything udev would not read."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not expected"
        tokens, pos = [], 0
        while True:
            m = TOKEN.match(line, pos)
            assert m, f"line {number}: cannot parse at {line[pos:]!r}"
            key, attr, op, value = m["key"], m["attr"], m["op"], m["value"]
            assert key in (ATTR_KEYS if attr is not None else PLAIN_KEYS), f"line {number}: unknown key {key}"
            tokens.append((key, attr, op, value))
            pos = m.end()
            if pos == len(line):
                break
            assert line[pos] == ",", f"line {number}: expected ',' at {line[pos:]!r}"
            pos += 1
        rules.append(tokens)
    return rules


def udev_match(pattern: str, value: str) -> bool:
    # udev patterns are shell globs, with `|` separating alternatives.
    return any(fnmatch.fnmatchcase(value, alt) for alt in pattern.split("|"))


def runs_of(rules, event: dict[str, str], env: dict[str, str]) -> list[list[str]]:
    """The RUN lists of the rules whose match keys all match the event."""
    matched = []
    for rule in rules:
        ok = True
        for key, attr, op, value in rule:
            if op not in MATCH_OPS:
                continue
            assert key in event or key == "ENV", f"the test cannot evaluate {key}"
            actual = env.get(attr, "") if key == "ENV" else event[key]
            ok &= udev_match(value, actual) == (op == "==")
        if ok:
            matched.append([value for key, _, op, value in rule if key == "RUN" and op in ("=", "+=")])
    return matched


def xen_event(action: str, kernel: str, subsystem: str = "xen-backend") -> dict[str, str]:
    return {"ACTION": action, "SUBSYSTEM": subsystem, "KERNEL": kernel,
            "DEVPATH": f"/devices/{subsystem}/{kernel}"}


def kernel_uevent(action: str, script: str = "/etc/xen/scripts/vif-route-qubes") -> dict[str, str]:
    """The properties of the kernel's xen-backend uevent for vif37.0: those of
    xenbus_uevent_backend (drivers/xen/xenbus/xenbus_probe_backend.c; XENBUS_PATH is
    the device's node name, relative) and of xen-netback's netback_uevent."""
    return {**xen_event(action, "vif-37-0"), "SEQNUM": "4711", "MODALIAS": "xen-backend:vif",
            "XENBUS_TYPE": "vif", "XENBUS_PATH": "backend/vif/37/0", "XENBUS_BASE_PATH": "backend",
            "script": script, "vif": VIF}


def setup_vif(netns, xen):
    proxy, vm = netns.make("proxy"), netns.make("app")
    netns.vif(proxy, vm, VIF, vm_mac=VM_MAC, vm_addrs=(VM_IP,), gateway="10.137.7.1")
    path = xen.backend(37, ip=VM_IP, mac=VM_MAC)
    xen.qdb_write("/qubes-netvm-gateway", "10.137.7.1")
    return proxy, path


def assert_configured(proxy, xen, path):
    assert proxy.out(f"ip route show dev {VIF}").strip() == f"{VM_IP} scope link metric 32715"
    # Written where xenstored resolves the relative path: this domain's (0) backend.
    assert xen.xs_read("/local/domain/0/backend/vif/37/0/hotplug-status") == "connected"


def test_udev_rules_match_and_run(root, netns, xen):
    rules = parse_rules((root / RULES).read_text())
    vif_env = {"vif": VIF, "XENBUS_PATH": "backend/vif/37/0"}
    for event in (xen_event("add", VIF, "net"), xen_event("online", "vbd-37-51712"),
                  xen_event("add", "vif-37-0")):
        assert runs_of(rules, event, vif_env) == [], event
    # A vif of the same driver domain whose script is another one (vif-bridge): nothing runs.
    for action in ("online", "offline"):
        event = kernel_uevent(action, script="/etc/xen/scripts/vif-bridge")
        assert runs_of(rules, event, event) == [], event

    proxy, path = setup_vif(netns, xen)
    assert path == "backend/vif/37/0"
    for action in ("online", "offline"):
        event = kernel_uevent(action)
        matched = runs_of(rules, event, event)
        assert len(matched) == 1 and len(matched[0]) == 1, matched
        command = matched[0][0]
        # udev would substitute %k, $kernel, ...: none expected, so shlex splits like udev.
        assert "%" not in command and "$" not in command
        argv = shlex.split(command)
        assert argv == [str(BIN / "vif-route-qubes"), action, "type_if=vif"]
        # The environment udev gives RUN programs: the event's properties and nothing
        # else (a PATH, for the stand-ins), stdin /dev/null.
        env = {**event, "PATH": SERVICE_PATH, **xen.stand_ins()}
        del env["KERNEL"]  # a udev match key, not a uevent property
        result = run_cmd(proxy, argv, env, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        if action == "online":
            assert_configured(proxy, xen, path)
            assert VIF in proxy.out("ipset save")  # its anti-spoofing elements: "gone" below means something
    assert proxy.out(f"ip route show dev {VIF}").strip() == ""
    assert VIF not in proxy.out("ipset save")


# -- 3. the Xen hotplug wrapper ---------------------------------------------

@pytest.mark.parametrize("service_path", [SERVICE_PATH, f"{FAKEBIN}:/usr/bin:/bin"], ids=["path", "no-sbin"])
def test_xen_wrapper_as_xl_devd_runs_it(root, netns, xen, service_path):
    """The installed /etc/xen/scripts/vif-route-qubes, run as xl devd runs it: libxl's
    environment only (relative XENBUS_PATH), stdin /dev/null, no terminal; also from a
    service whose PATH lacks the sbin folders (the wrapper adds them)."""
    proxy, path = setup_vif(netns, xen)
    result = run_libxl(proxy, xen, [str(root / XEN), "online", "type_if=vif"], VIF, path, PATH=service_path)
    assert result.returncode == 0, result.stderr
    assert_configured(proxy, xen, path)
    assert f"{VM_IP},{VIF}" in proxy.out("ipset list qbs-allowed4")  # its anti-spoofing element
    result = run_libxl(proxy, xen, [str(root / XEN), "offline", "type_if=vif"], VIF, path, PATH=service_path)
    assert result.returncode == 0, result.stderr
    assert proxy.out(f"ip route show dev {VIF}").strip() == ""
    assert VIF not in proxy.out("iptables-save -t raw")
    assert "10.137.7.1/32" not in proxy.out(f"ip -4 addr show dev {VIF}")
    assert proxy.out(f"ip neigh show nud permanent dev {VIF}").strip() == ""


# -- 4. the NetworkManager dispatcher hook ----------------------------------

RESTART = "--no-block try-restart qubes-updates-proxy.service"


def dnat_lines(ns) -> list[str]:
    return sorted(line for line in ns.out("iptables-save -t nat").splitlines()
                  if line.startswith("-A PR-QBS"))


def expected_dnat(server: str) -> list[str]:
    return sorted([f"-A PR-QBS -d {virtual}/32 -p {proto} -m {proto} --dport 53 -j DNAT --to-destination {server}"
                   for virtual in ("10.139.1.1", "10.139.1.2") for proto in ("udp", "tcp")]
                  + ["-A PR-QBS -j custom-dnat-dns"])


def test_dispatcher_hook(root, netns, xen, tmp_path):
    ns = netns.make("net")
    xen.qdb_write("/qubes-netvm-primary-dns", "10.139.1.1")
    xen.qdb_write("/qubes-netvm-secondary-dns", "10.139.1.2")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# Generated by NetworkManager\nnameserver 203.0.113.53\n")
    log = tmp_path / "systemctl.log"

    def hook(action: str) -> None:
        # NetworkManager's environment for a dispatcher script (NetworkManager-dispatcher(8)).
        env = xen.env(CONNECTION_UUID="5fb06bd0-0bb0-7ffb-45f1-d6edd65f3e03", CONNECTION_ID="Wired",
                      DEVICE_IFACE="eth0", DEVICE_IP_IFACE="eth0",
                      IP4_NAMESERVERS=resolv.read_text().split()[-1], IP4_NUM_ADDRESSES="1",
                      IP4_ADDRESS_0="192.0.2.2/24 192.0.2.1", IP4_GATEWAY="192.0.2.1",
                      QUBES_RESOLV_CONF=str(resolv), FAKE_SYSTEMCTL_LOG=str(log),
                      # This host's real /run/qubes-service must not decide the systemctl calls.
                      QUBES_FIREWALL_FLAG=str(tmp_path / "no-firewall"))
        assert env["PATH"].startswith(f"{FAKEBIN}:")
        result = run_cmd(ns, [str(root / HOOK), "eth0", action], env)
        assert result.returncode == 0, f"{action}: {result.returncode} {result.stderr}"

    def restarts() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    hook("up")
    assert dnat_lines(ns) == expected_dnat("203.0.113.53")
    assert restarts() == [RESTART]

    state = state_of(ns)
    hook("up")  # the program exits 100 (unchanged); the hook maps it to 0
    assert state_of(ns) == state
    assert restarts() == [RESTART]

    resolv.write_text("nameserver 203.0.113.54\n")
    hook("dhcp4-change")
    assert dnat_lines(ns) == expected_dnat("203.0.113.54")
    assert restarts() == [RESTART, RESTART]

    # The actions after which NetworkManager has new resolvers, beyond Qubes' four:
    # `nmcli device reapply` (reapply), IPv6 resolvers (dhcp6-change), any DNS change.
    expected = [RESTART, RESTART]
    for number, action in enumerate(("reapply", "dhcp6-change", "dns-change"), 55):
        resolv.write_text(f"nameserver 203.0.113.{number}\n")
        hook(action)
        assert dnat_lines(ns) == expected_dnat(f"203.0.113.{number}"), action
        expected.append(RESTART)
        assert restarts() == expected

    state = state_of(ns)
    for action in ("down", "pre-up", "hostname", "connectivity-change"):
        hook(action)
    assert state_of(ns) == state
    assert restarts() == expected


# -- 5. the boot unit ---------------------------------------------------------

@pytest.mark.parametrize("system", ["outside-qubes", "qubes"])
def test_systemd_analyze_verify_accepts_the_units(tmp_path, system):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    install(tmp_path, "--qubes" if system == "qubes" else "--no-qubes")
    units = tmp_path / "etc/systemd/system"
    names = sorted(p.name for p in units.glob("vif-route-qubes*"))
    assert len(names) == (2 if system == "qubes" else 3)
    result = subprocess.run(["systemd-analyze", "verify", *(f"./{name}" for name in names)], cwd=units,
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Some defects (an unknown key, a bad value) are only warned about with
    # exit 0; any line naming our units is such a defect.  Lines about other
    # units (possible on a machine without systemd as PID 1) are not ours.
    assert not any(name in output for name in names), output
    # Ordered against xl devd: listening before its first event, stopped after its last.
    for dest in (SOCKET, SERVICE) + ((UNIT,) if system != "qubes" else ()):
        before = next(line for line in (tmp_path / dest).read_text().splitlines() if line.startswith("Before="))
        assert "xendriverdomain.service" in before.split("=", 1)[1].split(), dest
