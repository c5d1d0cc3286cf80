"""Issue 29: the Debian package (udev/build-deb), installed with apt into a
booted Debian 12, with and without a stand-in of Qubes' networking package.
Built once per run (a second build, one version higher, for the upgrade).  Each
class has one container; its tests run in file order, each leaving the system
as the next expects (the last ones remove and purge the package)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import standins
from booted import Container
from vmnet import ANSWER, DNS1, HOST, VMNet

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "vif-route-qubes"
VENV = "/opt/venvs/vif-route-qubes"
UNITS = ("vif-route-qubes.socket", "vif-route-qubes.service", "vif-route-qubes-init.service")
QUBES_PATHS = (standins.QUBES_XEN_SCRIPT, standins.QUBES_DNAT)
OUR_PATHS = (VENV, "/usr/bin/vif-route-qubes", "/usr/bin/qubes-setup-dnat-to-ns", "/usr/bin/qubes_setup_dnat_to_ns",
             "/usr/lib/vif-route-qubes", "/usr/lib/NetworkManager/dispatcher.d/50-qubes-setup-dnat-to-ns",
             *(f"/lib/systemd/system/{unit}" for unit in UNITS), "/usr/share/doc/vif-route-qubes")
OUR_XEN_SCRIPT = "/usr/lib/vif-route-qubes/xen-vif-route-qubes"
NM_HOOK = "/usr/lib/NetworkManager/dispatcher.d/50-qubes-setup-dnat-to-ns"
# What the package is built from (udev/build-deb copies the same into its own folder).
SOURCES = ("pyproject.toml", "README.md", "vif_route_qubes", "setup_dnat_to_ns", "udev")


def build(checkout: Path, out: Path) -> Path:
    result = subprocess.run([str(checkout / "udev" / "build-deb"), str(out)], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr
    deb = Path(result.stdout.strip())
    assert deb.parent == out and re.fullmatch(r"vif-route-qubes_[^_]+_all\.deb", deb.name), deb
    return deb


@pytest.fixture(scope="session")
def deb(tmp_path_factory) -> Path:
    return build(REPO, tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def newer_deb(tmp_path_factory) -> tuple[Path, str]:
    """The same code built as the next version (a copy of the checkout whose
    __version__ has .post1 added): (the .deb, that version)."""
    copy = tmp_path_factory.mktemp("checkout-next")
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, copy / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (REPO / name).is_dir() else {}))
    init = copy / "vif_route_qubes" / "__init__.py"
    old = re.search(r'^__version__ = "(.+)"$', init.read_text(), re.M).group(1)
    init.write_text(init.read_text().replace(f'"{old}"', f'"{old}.post1"'))
    return build(copy, tmp_path_factory.mktemp("deb-next")), f"{old}.post1"


def apt_install(box: Container, deb: Path) -> str:
    box.write(f"/root/{deb.name}", deb.read_bytes())
    return box.run(f"DEBIAN_FRONTEND=noninteractive apt-get install -y /root/{deb.name}", timeout=300).stdout


def apt(box: Container, action: str) -> str:
    return box.run(f"DEBIAN_FRONTEND=noninteractive apt-get {action} -y {PACKAGE}", timeout=300).stdout


def diversions(box: Container) -> list[str]:
    return sorted(box.run("dpkg-divert --list").stdout.splitlines())


def ours_diverted(box: Container) -> list[str]:
    return [line for line in diversions(box) if line.endswith(f"by {PACKAGE}")]


def main_pid(box: Container) -> str:
    return box.run("systemctl show -p MainPID --value vif-route-qubes.service").stdout.strip()


def served_by(box: Container, pid: str) -> list[str]:
    return [line for line in box.journal("vif-route-qubes.service").splitlines()
            if f"serve[{pid}]: served " in line]


def assert_installed_as_packaged(box: Container) -> None:
    """The commands run from /usr/bin; the virtualenv is Debian's Python's, compiled, without pip."""
    for name in ("vif-route-qubes", "qubes-setup-dnat-to-ns", "qubes_setup_dnat_to_ns"):
        assert box.run(f"readlink /usr/bin/{name}").stdout.strip() == f"{VENV}/bin/{name}"
        assert box.run(f"{name} --help").stdout.startswith("Usage:"), name
    assert box.run(f"readlink -f {VENV}/bin/python").stdout.strip().startswith("/usr/bin/python3")
    assert box.run(f"ls {VENV}/lib/python3.11/site-packages | grep -E '^(pip|setuptools)' || true").stdout == ""
    assert box.run(f"find {VENV}/lib -name '*.pyc' -path '*vif_route_qubes/server*' | wc -l").stdout.strip() != "0"
    assert box.run(f"readlink -f {standins.QUBES_XEN_SCRIPT}").stdout.strip() == OUR_XEN_SCRIPT


def assert_removed(box: Container) -> None:
    """`apt remove`: units stopped and disabled, our files and diversions gone."""
    assert box.run("systemctl is-active vif-route-qubes.socket vif-route-qubes.service",
                   check=False).stdout.split() == ["inactive", "inactive"]
    assert box.run("find /etc/systemd/system -name 'vif-route-qubes*'").stdout == ""
    assert box.run("systemctl list-unit-files 'vif-route-qubes*' --no-legend", check=False).stdout.strip() == ""
    assert ours_diverted(box) == []
    assert box.run(f"ls -d {' '.join(OUR_PATHS)} 2>/dev/null || true").stdout == ""


def assert_purged(box: Container) -> None:
    """`apt purge`: dpkg knows nothing of ours; no file, unit link, diversion or state."""
    assert box.run(f"dpkg-query -W -f='${{Status}}' {PACKAGE}", check=False).stdout.strip() in ("", "unknown ok not-installed")
    for path in (*OUR_PATHS, *QUBES_PATHS):
        owners = box.run(f"dpkg -S {path}", check=False).stdout.partition(": ")[0].split(", ")
        assert PACKAGE not in owners, path
    found = box.run("find / -xdev \\( -name 'vif-route-qubes*' -o -name '*dnat-to-ns*' \\) "
                    "-not -path '/proc/*' -not -path '/root/*' -not -path '/var/log/*'", check=False).stdout
    left = [p for p in found.split() if p not in QUBES_PATHS]
    assert left == [], left
    assert box.run("systemctl list-unit-files 'vif-route-qubes*' --no-legend", check=False).stdout.strip() == ""
    assert box.run("grep -rl vif-route-qubes /var/lib/systemd/deb-systemd-helper-enabled || true").stdout == ""
    assert ours_diverted(box) == []


def network(box: Container, namespaces, domid: int):
    net = VMNet(box, namespaces)
    net.uplink()
    net.qubesdb()
    vm, path = net.vif(domid)
    return net, vm, path


def test_lintian_finds_no_error_or_warning_it_was_not_told_why(deb):
    """Every warning lintian keeps is overridden, with the reason beside it
    (udev/debian/vif-route-qubes.lintian-overrides), and every override is used."""
    result = subprocess.run(["lintian", "--pedantic", "--info", str(deb)], capture_output=True, text=True,
                            timeout=300)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWIP]: ", line)]
    assert not [t for t in tags if t[0] in "EW" or "unused-override" in t or "mismatched-override" in t], tags


# -- without Qubes: a Xen driver domain -------------------------------------
class TestWithoutQubes:
    @pytest.fixture(scope="class")
    @classmethod
    def netvm(cls, request, boot_container):
        return boot_container(request, "deb-plain")

    def test_apt_installs_it_pulling_only_debian_packages(self, netvm, deb):
        out = apt_install(netvm, deb)
        # apt pulls nothing: every dependency is a package of the Debian root already there
        new = re.search(r"NEW packages will be installed:\n((?:  .*\n)+)", out).group(1).split()
        assert new == [PACKAGE] and "0 upgraded, 1 newly installed, 0 to remove" in out, out
        depends = netvm.run(f"dpkg-query -W -f='${{Depends}}' {PACKAGE}").stdout
        for name in {re.match(r"\s*([a-z0-9.+-]+)", d).group(1) for d in depends.split(",")}:
            assert netvm.run(f"dpkg-query -W -f='${{Status}}' {name}").stdout == "install ok installed", name
        assert netvm.run(f"dpkg-query -W -f='${{Status}}' {PACKAGE}").stdout == "install ok installed"
        assert_installed_as_packaged(netvm)
        for unit in UNITS:
            assert netvm.run(f"systemctl is-enabled {unit}").stdout.strip() == "enabled", unit
        assert netvm.run("systemctl is-active vif-route-qubes.socket vif-route-qubes.service").stdout.split() == \
            ["active", "active"]

    def test_first_event_after_boot_is_served_and_the_vif_works(self, netvm, module_namespaces):
        netvm.reboot()  # as a template's network qubes: everything from boot
        assert netvm.run("systemctl show -p Result --value vif-route-qubes-init.service").stdout.strip() == "success"
        net, vm, path = network(netvm, module_namespaces, 41)
        pid = main_pid(netvm)
        result = netvm.xl_devd("online", "vif41.0", path)
        assert result.returncode == 0, result.stderr
        assert [line for line in served_by(netvm, pid) if "served vif-route-qubes" in line], \
            netvm.journal("vif-route-qubes.service")
        assert netvm.xen.xs_read(f"{path}/hotplug-status") == "connected"
        assert vm.sh(f"ping -c1 -W3 {HOST}", check=False).returncode == 0
        netvm.run(f"{NM_HOOK} eth0 up")  # as NetworkManager's dispatcher runs it
        assert net.ask(vm, DNS1) == ANSWER
        netvm.xl_devd("offline", "vif41.0", path)

    def test_remove_stops_and_disables_everything(self, netvm):
        apt(netvm, "remove")
        assert_removed(netvm)
        assert netvm.run(f"dpkg-query -W -f='${{Status}}' {PACKAGE}").stdout == "deinstall ok config-files"

    def test_purge_leaves_nothing(self, netvm):
        apt(netvm, "purge")
        assert_purged(netvm)


# -- on Qubes: qubes-core-agent-networking (stood in) installed first ---------
class TestOnQubes:
    @pytest.fixture(scope="class")
    @classmethod
    def qubes(cls, tmp_path_factory):
        folder = tmp_path_factory.mktemp("standin")
        return standins.QubesPackage(folder, "4.2.30-1"), standins.QubesPackage(folder, "4.2.31-1")

    @pytest.fixture(scope="class")
    @classmethod
    def netvm(cls, request, boot_container, qubes):
        netvm = boot_container(request, "deb-qubes")
        qubes[0].install(netvm)
        netvm.run("systemctl start qubes-antispoof.service")  # Qubes' base, loaded as at its boot
        return netvm

    @staticmethod
    def caller_runs(netvm: Container) -> list[str]:
        """Run Qubes' stand-in NetworkManager hook; the trace lines it left."""
        netvm.run(f"rm -f {standins.STANDIN_TRACE}")
        netvm.run(standins.QubesPackage.CALLER)
        return (netvm.read(standins.STANDIN_TRACE) or "").splitlines()

    def test_install_diverts_qubes_programs_and_its_callers_run_ours(self, netvm, deb, qubes, module_namespaces):
        apt_install(netvm, deb)
        assert_installed_as_packaged(netvm)
        assert ours_diverted(netvm) == sorted(f"diversion of {p} to {p}.distrib by {PACKAGE}" for p in QUBES_PATHS)
        for path in QUBES_PATHS:
            assert netvm.read(f"{path}.distrib") == qubes[0].files[path]
        net, vm, path = network(netvm, module_namespaces, 51)
        # the outside-Qubes files are there, and inert: the boot unit's condition
        # fails, our NetworkManager hook does nothing (no DNAT to the virtual DNS)
        netvm.run("systemctl start vif-route-qubes-init.service")
        assert netvm.run("systemctl show -p ConditionResult --value vif-route-qubes-init.service").stdout.strip() == "no"
        assert netvm.run(f"{NM_HOOK} eth0 up && echo $?").stdout.strip() == "0"
        assert DNS1 not in netvm.run("nft list ruleset").stdout
        # Qubes' caller runs our DNS command: the DNAT is there, Qubes' program never ran
        trace = self.caller_runs(netvm)
        assert len(trace) == 1 and re.fullmatch(r"standin-nmhook 4\.2\.30-1: exit (0|100)", trace[0]), trace
        assert DNS1 in netvm.run("nft list ruleset").stdout
        # Xen's script is ours: the vif event is served, the stand-in's script never runs
        netvm.run(f"rm -f {standins.STANDIN_TRACE}")
        result = netvm.xl_devd("online", "vif51.0", path)
        assert result.returncode == 0, result.stderr
        assert served_by(netvm, main_pid(netvm)) and netvm.read(standins.STANDIN_TRACE) is None
        assert vm.sh(f"ping -c1 -W3 {HOST}", check=False).returncode == 0

    def test_upgrading_qubes_package_keeps_ours_in_place(self, netvm, qubes):
        qubes[1].install(netvm)
        assert netvm.run(f"readlink -f {standins.QUBES_XEN_SCRIPT}").stdout.strip() == OUR_XEN_SCRIPT
        for path in QUBES_PATHS:
            assert netvm.read(f"{path}.distrib") == qubes[1].files[path]
        assert len(ours_diverted(netvm)) == 2
        trace = self.caller_runs(netvm)
        assert len(trace) == 1 and trace[0].startswith("standin-nmhook 4.2.31-1: exit"), trace

    def test_upgrading_ours_keeps_diversions_and_serves_with_new_code(self, netvm, newer_deb, qubes):
        deb, version = newer_deb
        before, old_pid = diversions(netvm), main_pid(netvm)
        apt_install(netvm, deb)
        assert netvm.run(f"dpkg-query -W -f='${{Version}}' {PACKAGE}").stdout == version
        assert diversions(netvm) == before
        for path in QUBES_PATHS:
            assert netvm.read(f"{path}.distrib") == qubes[1].files[path]
        assert netvm.run("vif-route-qubes --version").stdout.split()[-1] == version
        pid = main_pid(netvm)
        assert pid not in ("0", old_pid) and served_by(netvm, pid), netvm.journal("vif-route-qubes.service")
        assert self.caller_runs(netvm)[0].startswith("standin-nmhook 4.2.31-1: exit")

    def test_remove_puts_qubes_programs_back(self, netvm, qubes):
        apt(netvm, "remove")
        assert_removed(netvm)
        for path in QUBES_PATHS:
            assert netvm.path(path).read_bytes() == qubes[1].files[path].encode(), path
            assert not netvm.path(path).is_symlink() and not netvm.path(f"{path}.distrib").exists()
            assert netvm.run(f"dpkg -S {path}").stdout.startswith(f"{standins.QubesPackage.NAME}:")
        assert self.caller_runs(netvm) == [f"standin qubes-setup-dnat-to-ns 4.2.31-1: ",
                                         "standin-nmhook 4.2.31-1: exit 0"]
        netvm.run(f"rm -f {standins.STANDIN_TRACE}")
        assert netvm.xl_devd("online", "vif52.0", "backend/vif/52/0").returncode == 0
        assert netvm.read(standins.STANDIN_TRACE) == "standin vif-route-qubes 4.2.31-1: online type_if=vif\n"

    def test_purge_leaves_nothing_and_qubes_intact(self, netvm, qubes):
        apt(netvm, "purge")
        assert_purged(netvm)
        for path in QUBES_PATHS:
            assert netvm.path(path).read_bytes() == qubes[1].files[path].encode(), path
        assert netvm.run(f"dpkg -V {standins.QubesPackage.NAME}").stdout == ""
