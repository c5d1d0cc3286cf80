"""Issue 27 on a booted Debian 12 made Qubes-like by a stand-in of Qubes'
networking package (installed first, with dpkg): what the install sets aside,
who Qubes' callers run, an upgrade of Qubes' package, the uninstall, and a vif
event that comes before Qubes' nftables base is loaded.  One container for the
module; the tests run in file order (the base is loaded in the second)."""

import hashlib

import pytest

import standins
from standins import QUBES_DNAT, QUBES_XEN_SCRIPT, STANDIN_TRACE, QubesPackage
from vmnet import ANSWER, DNS, DNS1, HOST, VMNet

REPLACED = (QUBES_XEN_SCRIPT, QUBES_DNAT)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def trace(box) -> list[str]:
    return (box.read(STANDIN_TRACE) or "").splitlines()


def diversions(box) -> str:
    """The local diversions (the system's own, e.g. dash's of /bin/sh, are not ours)."""
    return "".join(line + "\n" for line in box.run("dpkg-divert --list").stdout.splitlines()
                   if line.startswith("local diversion"))


@pytest.fixture(scope="module")
def qubes(request, boot_container, wheelhouse, module_namespaces, tmp_path_factory):
    folder = tmp_path_factory.mktemp("standin-debs")
    box = boot_container(request, "qubes")
    v1 = QubesPackage(folder, "4.2.30-1")
    v1.install(box)
    result = standins.install_project(box, wheelhouse)
    assert result.returncode == 0, result.stderr
    net = VMNet(box, module_namespaces)
    net.uplink()
    net.qubesdb()
    vm, path = net.vif(37)
    return {"box": box, "net": net, "vm": vm, "path": path, "folder": folder, "v1": v1}


def test_vif_event_before_the_base_builds_no_iptables_protection(qubes):
    box = qubes["box"]
    assert "table ip qubes" not in box.run("nft list ruleset").stdout  # the base is not loaded
    result = box.xl_devd("online", "vif37.0", qubes["path"])
    assert result.returncode != 0
    assert box.xen.xs_read(f"{qubes['path']}/hotplug-status") == "error"
    assert box.run("ipset list -n").stdout.strip() == ""
    saved = box.run("iptables-save; ip6tables-save").stdout
    assert not [line for line in saved.splitlines() if line.startswith("-A")], saved
    assert box.run("ip -br link show vif37.0").stdout.split()[1] == "DOWN"
    # Qubes loads its base; the next event protects the vif with it
    box.run("systemctl start qubes-antispoof.service")
    result = box.xl_devd("online", "vif37.0", qubes["path"])
    assert result.returncode == 0, result.stderr
    assert '"vif37.0" . 10.137.7.27' in box.run("nft list set ip qubes allowed").stdout
    assert box.run("ipset list -n").stdout.strip() == ""
    assert qubes["vm"].sh(f"ping -c1 -W3 {HOST}", check=False).returncode == 0
    assert not [line for line in trace(box) if "standin vif-route-qubes" in line]


def test_install_set_qubes_files_aside(qubes):
    box, v1 = qubes["box"], qubes["v1"]
    listed = diversions(box)
    for path in REPLACED:
        assert f"local diversion of {path} to {path}.distrib" in listed, listed
        assert digest(box.path(path + ".distrib").read_bytes()) == digest(v1.files[path].encode())
        assert standins.MARKER in box.read(path)
    # Qubes' base, its hooks and its units are Qubes': nothing of ours beside them
    for path in ("/etc/NetworkManager/dispatcher.d/50-qubes-setup-dnat-to-ns",
                 "/etc/systemd/system/vif-route-qubes-init.service", "/etc/udev/rules.d/90-vif-route-qubes.rules"):
        assert box.read(path) is None, path
    assert box.run("systemctl is-active vif-route-qubes.socket vif-route-qubes.service").stdout.split() == \
        ["active", "active"]


def test_qubes_caller_runs_our_dns_command(qubes):
    box, vm = qubes["box"], qubes["vm"]
    box.run(QubesPackage.CALLER)
    assert trace(box)[-1] in ("standin-nmhook 4.2.30-1: exit 0", "standin-nmhook 4.2.30-1: exit 100")
    assert not [line for line in trace(box) if "standin qubes-setup-dnat-to-ns" in line]
    assert DNS in box.run("nft list ruleset").stdout
    assert qubes["net"].ask(vm, DNS1) == ANSWER


def test_upgrade_of_qubes_package_keeps_ours(qubes):
    box = qubes["box"]
    v2 = QubesPackage(qubes["folder"], "4.2.31-1")
    v2.install(box)
    qubes["v2"] = v2
    assert box.run(f"dpkg-query -W -f='${{Version}}' {QubesPackage.NAME}").stdout == "4.2.31-1"
    listed = diversions(box)
    for path in REPLACED:
        assert f"local diversion of {path} to {path}.distrib" in listed, listed
        assert standins.MARKER in box.read(path), path
        assert digest(box.path(path + ".distrib").read_bytes()) == digest(v2.files[path].encode()), path
    box.run(QubesPackage.CALLER)
    assert not [line for line in trace(box) if "standin qubes-setup-dnat-to-ns" in line]
    result = box.xl_devd("offline", "vif37.0", qubes["path"])
    assert result.returncode == 0, result.stderr
    assert not [line for line in trace(box) if "standin vif-route-qubes" in line]


def test_uninstall_puts_qubes_files_back(qubes):
    box, v2 = qubes["box"], qubes["v2"]
    standins.uninstall_project(box)
    for path in REPLACED:
        assert digest(box.path(path).read_bytes()) == digest(v2.files[path].encode()), path
        assert not box.path(path + ".distrib").exists(), path
    assert diversions(box).strip() == ""
    assert box.run(f"dpkg --verify {QubesPackage.NAME}", check=False).stdout == ""
    box.run(QubesPackage.CALLER)
    assert trace(box)[-2:] == ["standin qubes-setup-dnat-to-ns 4.2.31-1: ",
                               "standin-nmhook 4.2.31-1: exit 0"], trace(box)
    result = box.xl_devd("online", "vif37.0", qubes["path"])
    assert result.returncode == 0
    assert trace(box)[-1] == "standin vif-route-qubes 4.2.31-1: online type_if=vif"
    assert standins.udev_install(box, "--uninstall").returncode == 0  # twice: nothing to do
    assert diversions(box).strip() == ""
