"""Issue 27 on a booted Debian 12 without Qubes: installed as the README says,
rebooted, then driven from outside as Xen's `xl devd` and NetworkManager drive a
network VM.  One container for the module; the tests run in file order and
each leaves the system as the next expects (the last one uninstalls)."""

import re
import shlex
from dataclasses import dataclass

import pytest

import standins
import uevents
from booted import XEN_SCRIPT, Container, libxl_env
from vmnet import ANSWER, DNS1, HOST, VM_IP, VMNet

HOOK_LOG = "/var/log/vrq-hook.log"  # on the root folder (/run and /tmp are tmpfs inside)
XDD_LOG = "/var/log/vrq-xl-devd.log"
# xl devd's stand-in sends an event as it starts, as xl devd does for a backend
# already waiting then (a vif that is not there: an offline tolerates it; no hook).
XENDRIVERDOMAIN = f"""\
[Unit]
Description=test stand-in for Xen's driver domain (xl devd)
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=-/bin/sh -c 'VIF_ROUTE_HOOKS_DIR=/nonexistent VIF_ROUTE_VERBOSE=1 {XEN_SCRIPT} offline vif99.0 >>{XDD_LOG} 2>&1'
[Install]
WantedBy=multi-user.target
"""
VM2_IP = "10.137.7.28"  # vif38's VM
UNITS = ("vif-route-qubes.socket", "vif-route-qubes.service", "vif-route-qubes-init.service")


@dataclass
class System:
    box: Container
    net: VMNet
    vm: object
    path: str


def served_lines(box: Container) -> list[str]:
    return [line for line in box.journal("vif-route-qubes.service").splitlines() if " served " in line]


def main_pid(box: Container) -> str:
    return box.run("systemctl show -p MainPID --value vif-route-qubes.service").stdout.strip()


@pytest.fixture(scope="module")
def system(request, boot_container, wheelhouse, module_namespaces):
    def setup(box):
        box.write("/etc/systemd/system/xendriverdomain.service", XENDRIVERDOMAIN)
        # a hook that records each run (CONTRACT 1: HOOK online|offline VIF TYPE [ADDR])
        box.write("/rw/config/network-hooks.d/record", f'#!/bin/sh\necho "$*" >>{HOOK_LOG}\n', 0o755)

    box = boot_container(request, "installed", setup)
    box.run("systemctl enable --quiet xendriverdomain.service")
    result = standins.install_project(box, wheelhouse)
    assert result.returncode == 0, result.stderr
    box.reboot()  # what a template's qubes see: everything from boot
    net = VMNet(box, module_namespaces)
    net.uplink()
    net.qubesdb()
    vm, path = net.vif(37)
    return System(box, net, vm, path)


def test_units_enabled_and_started_at_boot(system):
    box = system.box
    for unit in UNITS:
        assert box.run(f"systemctl is-enabled {unit}", check=False).stdout.strip() == "enabled", unit
    assert box.run("systemctl is-active vif-route-qubes.socket vif-route-qubes.service").stdout.split() == \
        ["active", "active"]
    assert box.run("systemctl show -p Result --value vif-route-qubes-init.service").stdout.strip() == "success"
    journal = box.journal("vif-route-qubes.service")
    assert journal.count("listening on /run/vif-route-qubes/server.sock") == 1, journal
    for name in ("vif-route-qubes", "qubes-setup-dnat-to-ns", "qubes_setup_dnat_to_ns"):
        assert box.run(f"readlink /usr/bin/{name}").stdout.strip() == f"{standins.VENV}/bin/{name}"


def test_xl_devd_starts_once_the_server_is_warm(system):
    """The server tells systemd it is ready after its warm-up (Type=notify), and
    xl devd is ordered after it: the event sent as xl devd starts is served by a
    warm server, not by a child that imports the engine for it."""
    box = system.box
    said = box.read(XDD_LOG)
    child = re.search(r"served by vif-route-qubes server pid \d+, child (\d+)", said)
    assert child, said
    line = [line for line in served_lines(box) if re.search(rf"by (spare )?child {child[1]}:", line)]
    assert len(line) == 1 and ": status 0," in line[0], (line, served_lines(box))
    assert "forked in the warm-up" not in line[0], line
    assert box.run("systemctl show -p StatusText --value vif-route-qubes.service").stdout.startswith("warm:")


def test_first_event_after_boot_is_served_once(system):
    """The vif's online, run as xl devd runs it, is served by the server systemd
    started at boot (no refusal, no second start), the hook runs once."""
    box = system.box
    before = served_lines(box)
    result = box.xl_devd("online", "vif37.0", system.path)
    assert result.returncode == 0, result.stderr
    after = served_lines(box)
    assert len(after) == len(before) + 1 and "served vif-route-qubes" in after[-1], after
    assert f"serve[{main_pid(box)}]" in after[-1]
    journal = box.journal("vif-route-qubes.service")
    assert "refused" not in journal and journal.count("listening on") == 1, journal
    assert box.xen.xs_read(f"{system.path}/hotplug-status") == "connected"
    assert box.read(HOOK_LOG).splitlines() == [f"online vif37.0 vif {VM_IP}"]


def test_vif_works_and_its_protection_holds(system):
    box, vm = system.box, system.vm
    assert vm.sh(f"ping -c1 -W3 {HOST}", check=False).returncode == 0
    # NetworkManager's dispatcher runs our hook on the uplink's `up`
    box.run("/etc/NetworkManager/dispatcher.d/50-qubes-setup-dnat-to-ns eth0 up")
    assert system.net.ask(vm, DNS1) == ANSWER
    vm.sh("ip addr add 10.137.7.99/32 dev eth0")
    assert vm.sh(f"ping -c1 -W1 -I 10.137.7.99 {HOST}", check=False).returncode != 0, "spoofed source passed"
    assert vm.sh(f"ping -c1 -W3 -I {VM_IP} {HOST}", check=False).returncode == 0


def test_socket_starts_the_server_for_an_event(system):
    """With the service stopped and its socket listening, an event makes systemd
    start the server, and that server serves the very event (issue 28)."""
    box = system.box
    box.run("systemctl stop vif-route-qubes.service")
    assert box.run("systemctl is-active vif-route-qubes.socket").stdout.strip() == "active"
    vm2, path2 = system.net.vif(38, ip=VM2_IP, mac="00:16:3e:5e:6c:20")
    result = box.xl_devd("online", "vif38.0", path2)
    assert result.returncode == 0, result.stderr
    pid = main_pid(box)
    assert pid != "0", "the socket did not start the server"
    journal = box.journal("vif-route-qubes.service")
    since_start = journal[journal.rindex("listening on"):]
    assert f"serve[{pid}]: served vif-route-qubes" in since_start, journal
    assert "refused" not in journal, journal
    assert vm2.sh(f"ping -c1 -W3 {HOST}", check=False).returncode == 0


def test_no_udev_rule_by_default(system):
    box = system.box
    rules = box.run("grep -rl vif-route-qubes /etc/udev/rules.d /lib/udev/rules.d /usr/lib/udev/rules.d",
                    check=False).stdout
    assert rules == ""
    assert not [cmd for cmd in uevents.would_run(box, "online", 37) if "vif-route-qubes" in cmd]
    assert box.read(HOOK_LOG).count("online vif37.0") == 1


def test_udev_rule_on_request_matches_our_script_only(system):
    box = system.box
    standins.udev_install(box, "--udev")
    rule = box.read("/etc/udev/rules.d/90-vif-route-qubes.rules")
    assert rule and standins.MARKER in rule
    ours = f"{standins.VENV}/bin/vif-route-qubes"
    assert uevents.would_run(box, "online", 37) == [f"{ours} online type_if=vif"]
    assert uevents.would_run(box, "offline", 37) == [f"{ours} offline type_if=vif"]
    assert uevents.would_run(box, "online", 39, script="/etc/xen/scripts/vif-bridge") == []
    assert uevents.would_run(box, "offline", 39, script="/etc/xen/scripts/vif-bridge") == []
    standins.udev_install(box)  # installed again without --udev: the rule goes
    assert box.read("/etc/udev/rules.d/90-vif-route-qubes.rules") is None


def test_units_verify_and_order_around_xl_devd(system):
    box = system.box
    paths = " ".join(f"/etc/systemd/system/{unit}" for unit in UNITS)
    verify = box.run(f"systemd-analyze verify {paths}", check=False)
    assert verify.returncode == 0 and "vif-route-qubes" not in verify.stderr, verify.stderr

    def prop(unit, name):
        return box.run(f"systemctl show -p {name} --value {unit}").stdout.split()

    for unit in UNITS:
        assert "xendriverdomain.service" in prop(unit, "Before"), unit
    # at shutdown units stop in the reverse order: the server after xl devd
    after = prop("xendriverdomain.service", "After")
    assert "vif-route-qubes.socket" in after and "vif-route-qubes.service" in after
    assert "network-pre.target" in prop("vif-route-qubes-init.service", "Before")


XL_DEVD_STOP = "/usr/local/sbin/vrq-test-xl-devd-stop"


def test_at_shutdown_the_server_serves_the_offlines_xl_devd_runs_last(system):
    """Shutdown stops xl devd and our units in one transaction.  xl devd's last
    offlines (here vif38's, from its ExecStop, a second after it is asked to
    stop) are served by the running server, which stops only after them."""
    box = system.box
    box.run("systemctl start vif-route-qubes.service")  # resident, as after boot
    pid = main_pid(box)
    # As xl devd runs the script: the service's environment plus libxl's variables, stdin /dev/null.
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in libxl_env("vif38.0", "backend/vif/38/0").items())
    box.write(XL_DEVD_STOP, "#!/bin/sh\nsleep 1  # unordered, the server would be gone by now\n"
              f"exec env {env} {XEN_SCRIPT} offline type_if=vif </dev/null\n", 0o755)
    dropin = "/etc/systemd/system/xendriverdomain.service.d/stop.conf"
    box.write(dropin, f"[Service]\nExecStop={XL_DEVD_STOP}\n")
    box.run("systemctl daemon-reload")
    before = served_lines(box)
    try:
        box.run("systemctl stop xendriverdomain.service vif-route-qubes.socket vif-route-qubes.service")
        assert box.run("systemctl show -p Result --value xendriverdomain.service").stdout.strip() == "success"
        journal = box.journal("vif-route-qubes.service")
        after = served_lines(box)
        assert len(after) == len(before) + 1, journal
        assert f"serve[{pid}]" in after[-1] and "status 0" in after[-1], after[-1]
        assert journal.rindex(after[-1]) < journal.rindex("stopping: no new requests"), journal
        assert box.run(f"ip -4 route show {VM2_IP}").stdout.strip() == "", "vif38's route outlived its offline"
    finally:
        box.run(f"rm -f {dropin} && systemctl daemon-reload && systemctl start vif-route-qubes.socket "
                "vif-route-qubes.service xendriverdomain.service")


@pytest.mark.parametrize("bindir", ["/usr/local/bin", "/rw/venv/bin", "/home/user/venv/bin", "/root/venv/bin"])
def test_install_refuses_a_folder_only_one_qube_sees(system, bindir):
    box = system.box
    box.run(f"mkdir -p {bindir} && ln -sf {standins.VENV}/bin/vif-route-qubes {standins.VENV}/bin/"
            f"qubes-setup-dnat-to-ns {bindir}/")
    result = standins.udev_install(system.box, "--root /root/staging", f"--bindir {bindir}", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert box.run("find /root/staging -type f 2>/dev/null | wc -l").stdout.strip() == "0"


def test_offline_then_uninstall_gives_the_system_back(system):
    box = system.box
    result = box.xl_devd("offline", "vif37.0", system.path)
    assert result.returncode == 0, result.stderr
    assert box.read(HOOK_LOG).splitlines()[-1] == f"offline vif37.0 vif {VM_IP}"
    standins.uninstall_project(box)
    assert standins.udev_install(box, "--uninstall").returncode == 0  # twice: nothing left to do
    left = box.run(f"grep -rlxF '{standins.MARKER}' /etc /usr/bin /usr/lib /lib/systemd", check=False).stdout
    assert left == ""
    assert box.run("systemctl list-unit-files 'vif-route-qubes*' --no-legend", check=False).stdout.strip() == ""
    assert box.run("ls /usr/bin | grep -c 'qubes' || true").stdout.strip() == "0"
    assert box.run("systemctl is-active vif-route-qubes.socket", check=False).stdout.strip() == "inactive"
    assert not re.search(r"\.distrib$", box.run("find /etc /usr -name '*.distrib'").stdout, re.M)
