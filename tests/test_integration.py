"""The udev/ integration files, installed by udev/install into a temporary
root and run the way udev, Xen, NetworkManager and systemd run them
(CONTRACT section 4).  Nothing is ever installed into the real /."""

import fnmatch
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from netns import BIN, FAKEBIN, SERVICE_PATH, run_cmd, run_libxl, state_of

INSTALL = Path(__file__).parent.parent / "udev" / "install"
TEMPLATES = INSTALL.parent
RULES = "etc/udev/rules.d/90-vif-route-qubes.rules"
HOOK = "etc/NetworkManager/dispatcher.d/50-qubes-setup-dnat-to-ns"
XEN = "etc/xen/scripts/vif-route-qubes"
UNIT = "etc/systemd/system/vif-route-qubes-init.service"
# destination: (template, mode)
FILES = {
    RULES: ("90-vif-route-qubes.rules.in", 0o644),
    HOOK: ("50-qubes-setup-dnat-to-ns.in", 0o755),
    XEN: ("xen-vif-route-qubes.in", 0o755),
    UNIT: ("vif-route-qubes-init.service.in", 0o644),
    "etc/systemd/system/vif-route-qubes.socket": ("vif-route-qubes.socket.in", 0o644),  # the command server
    "etc/systemd/system/vif-route-qubes.service": ("vif-route-qubes.service.in", 0o644),
}
VM_MAC = "00:16:3e:5e:6c:19"
VM_IP = "10.137.7.27"
VIF = "vif37.0"


def install(root: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(INSTALL), "--root", str(root), "--bindir", str(BIN), *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One installed root shared by the tests that only read it."""
    path = tmp_path_factory.mktemp("root")
    install(path)
    return path


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# -- 1. the installer -------------------------------------------------------

def test_install_is_complete_idempotent_and_undone_exactly(tmp_path):
    install(tmp_path)
    assert files_under(tmp_path) == set(FILES)
    for dest, (template, mode) in FILES.items():
        path = tmp_path / dest
        assert stat.S_IMODE(path.stat().st_mode) == mode, dest
        text = path.read_text()
        assert "@BINDIR@" not in text
        assert text == (TEMPLATES / template).read_text().replace("@BINDIR@", str(BIN)), dest
        assert f"{BIN}/" in text, dest  # the commands are called where pip put them

    # Idempotent: nothing rewritten (same inode and mtime), nothing printed.
    before = {dest: (p.stat().st_ino, p.stat().st_mtime_ns) for dest in FILES for p in [tmp_path / dest]}
    again = install(tmp_path)
    assert again.stdout == "" and again.stderr == ""
    assert before == {dest: (p.stat().st_ino, p.stat().st_mtime_ns) for dest in FILES for p in [tmp_path / dest]}

    # A packager's or admin's file beside each of ours must survive uninstall.
    unrelated = {str(Path(dest).parent / "unrelated-vif-route-qubes.conf") for dest in FILES}
    for name in unrelated:
        (tmp_path / name).write_text("not ours\n")
    install(tmp_path, "--uninstall")
    assert files_under(tmp_path) == unrelated
    install(tmp_path, "--uninstall")  # twice is fine
    assert files_under(tmp_path) == unrelated


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


def kernel_uevent(action: str) -> dict[str, str]:
    """The properties of the kernel's xen-backend uevent for vif37.0: those of
    xenbus_uevent_backend (drivers/xen/xenbus/xenbus_probe_backend.c; XENBUS_PATH is
    the device's node name, relative) and of xen-netback's netback_uevent."""
    return {**xen_event(action, "vif-37-0"), "SEQNUM": "4711", "MODALIAS": "xen-backend:vif",
            "XENBUS_TYPE": "vif", "XENBUS_PATH": "backend/vif/37/0", "XENBUS_BASE_PATH": "backend",
            "script": "/etc/xen/scripts/vif-route-qubes", "vif": VIF}


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

    state = state_of(ns)
    hook("down")
    assert state_of(ns) == state
    assert restarts() == [RESTART, RESTART]


# -- 5. the boot unit ---------------------------------------------------------

def test_systemd_analyze_verify_accepts_the_unit(root):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    unit = root / UNIT
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Some defects (an unknown key, a bad value) are only warned about with
    # exit 0; any line naming our unit is such a defect.  Lines about other
    # units (possible on a machine without systemd as PID 1) are not ours.
    assert unit.name not in output, output
