"""What the booted-system tests put into the container besides the OS: the
xenstore/qubesdb stand-ins, the project installed as the README says, and a
stand-in for Qubes' networking package.

    xen_standins(box) -> XenEnv        tests/kit/fakebin's stand-ins on the container's PATH
                                       (/usr/local/sbin), file-backed under /var/lib/vrq-test;
                                       the returned netns.XenEnv writes those files from the host
    make_wheelhouse(dest) -> Path      wheels of the project's dependencies and build
                                       requirements (host pip, once per run)
    install_project(box, wheelhouse, *install_args)
                                       copy the checkout to /root/vif-route-qubes, python3 -m venv
                                       /opt/venvs/vif-route-qubes, pip install ./ (offline, from the
                                       wheelhouse), udev/install ARGS; returns udev/install's result
    udev_install(box, *args, check=True)   udev/install ARGS run from the copied checkout
    uninstall_project(box)             udev/install --uninstall, then rm -r the virtualenv
    QubesPackage(folder, version).deb  a .deb named qubes-core-agent-networking (dpkg-deb), owning
                                       the two Qubes paths, the nft base files and a caller
    MARKER                             the line every installed file of ours carries
"""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kit"))
from netns import XenEnv  # noqa: E402
from qubes_base import ANTISPOOF_NFT  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FAKEBIN = REPO / "tests" / "kit" / "fakebin"
VENV = "/opt/venvs/vif-route-qubes"
CHECKOUT = "/root/vif-route-qubes"
WHEELS = "/root/wheels"
MARKER = "# vif-route-qubes: installed by udev/install (removed by udev/install --uninstall)"
QUBES_XEN_SCRIPT = "/etc/xen/scripts/vif-route-qubes"
QUBES_DNAT = "/usr/lib/qubes/qubes-setup-dnat-to-ns"
STANDIN_TRACE = "/var/log/qubes-standin.log"
XEN_DATA = "/var/lib/vrq-test"


def xen_standins(box) -> XenEnv:
    """xenstore-read, xenstore-write, qubesdb-read on the container's PATH: the
    Python stand-ins (run by the container's /usr/bin/python3, their shebang),
    behind small wrappers that point them at the container's files, since a
    service's environment carries no FAKE_* variables."""
    lib = "/usr/local/lib/vrq-test-fakebin"
    for name in ("_fakedb.py", "xenstore-read", "xenstore-write", "qubesdb-read"):
        box.write(f"{lib}/{name}", (FAKEBIN / name).read_bytes(), 0o755)
    for name, var, sub in (("xenstore-read", "FAKE_XENSTORE_DIR", "xenstore"),
                           ("xenstore-write", "FAKE_XENSTORE_DIR", "xenstore"),
                           ("qubesdb-read", "FAKE_QUBESDB_DIR", "qubesdb")):
        box.write(f"/usr/local/sbin/{name}",
                  f'#!/bin/sh\n# test stand-in: {name} backed by files under {XEN_DATA}\n'
                  f'export {var}="${{{var}:-{XEN_DATA}/{sub}}}"\nexec {lib}/{name} "$@"\n', 0o755)
    box.xen = XenEnv(box.path(XEN_DATA))
    return box.xen


def make_wheelhouse(dest: Path) -> Path:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    wants = [*meta["project"]["dependencies"], *meta["build-system"]["requires"], "wheel"]
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(dest),
                    *wants], check=True, capture_output=True, text=True)
    return dest


def copy_checkout(box) -> None:
    """The checkout's files (tracked and new ones, not the ignored .venv or caches)."""
    dest = box.path(CHECKOUT)
    if dest.exists():
        shutil.rmtree(dest)
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True)
    if listed.returncode != 0:  # not a git checkout (an unpacked release): the tree without what git ignores
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info",
                                                                  ".pytest_cache", ".hypothesis", "build"))
        return
    names = listed.stdout.decode().split("\0")
    for name in filter(None, names):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def udev_install(box, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return box.run(f"cd {CHECKOUT} && udev/install {' '.join(args)}", check=check)


def install_project(box, wheelhouse: Path, *install_args: str, check: bool = True) -> subprocess.CompletedProcess:
    copy_checkout(box)
    if box.path(WHEELS).exists():
        shutil.rmtree(box.path(WHEELS))
    shutil.copytree(wheelhouse, box.path(WHEELS))
    box.run(f"python3 -m venv {VENV} && cd {CHECKOUT} && "
            f"{VENV}/bin/pip install -q --no-index --find-links {WHEELS} ./", timeout=300)
    return udev_install(box, *install_args, check=check)


def uninstall_project(box) -> subprocess.CompletedProcess:
    result = udev_install(box, "--uninstall")
    box.run(f"rm -r {VENV}")
    return result


# -- the stand-in Qubes networking package -----------------------------------
# Our own minimal base files: the anti-spoofing one is tests/kit/qubes_base.py's
# (the layout of CONTRACT section 1), this one a masquerade so a vif reaches out.
IPV4_NFT = """\
#!/usr/sbin/nft -f
# test stand-in base (tests/system): forwarding out of vifs, masqueraded
table ip qubes {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifgroup 2 accept
    oif lo accept
    masquerade
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    ct state related,established accept
    oifgroup 2 drop
  }
}
"""


class QubesPackage:
    """qubes-core-agent-networking, stood in: every program writes one trace
    line (its name, this version, its arguments) to /var/log/qubes-standin.log."""

    NAME = "qubes-core-agent-networking"
    CALLER = "/usr/lib/qubes/standin-nmhook"  # runs the DNS command, as qubes-nmhook does

    def __init__(self, folder: Path, version: str = "4.2.30-1") -> None:
        self.version = version
        self.tree = folder / f"standin-{version}"
        self.files = {
            QUBES_XEN_SCRIPT: self._tracer("vif-route-qubes"),
            QUBES_DNAT: self._tracer("qubes-setup-dnat-to-ns"),
            "/etc/qubes/qubes-antispoof.nft": ANTISPOOF_NFT,
            "/etc/qubes/qubes-ipv4.nft": IPV4_NFT,
            self.CALLER: ("#!/bin/sh\n# test stand-in caller: runs the DNS command as Qubes' hooks do\n"
                          f"{QUBES_DNAT}\nstatus=$?\n"
                          f"echo \"standin-nmhook {version}: exit $status\" >>{STANDIN_TRACE}\n"),
            "/lib/systemd/system/qubes-antispoof.service": (
                "[Unit]\nDescription=test stand-in: Qubes' nftables base\nBefore=network-pre.target\n"
                "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
                "ExecStart=/usr/sbin/nft -f /etc/qubes/qubes-antispoof.nft\n"
                "ExecStart=/usr/sbin/nft -f /etc/qubes/qubes-ipv4.nft\n"
                # Qubes' network-proxy-setup.sh turns forwarding on; here the base's unit does
                "ExecStart=/usr/sbin/sysctl -q -w net.ipv4.ip_forward=1\n"),
        }
        self.deb = self._build(folder)

    def _tracer(self, name: str) -> str:
        return (f"#!/bin/sh\n# test stand-in of Qubes' {name}, version {self.version}\n"
                f"echo \"standin {name} {self.version}: $*\" >>{STANDIN_TRACE}\n")

    def _build(self, folder: Path) -> Path:
        import hashlib

        if self.tree.exists():
            shutil.rmtree(self.tree)
        sums = []
        for inside, text in self.files.items():
            target = self.tree / inside.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            target.chmod(0o644 if inside.endswith((".nft", ".service")) else 0o755)
            sums.append(f"{hashlib.md5(text.encode()).hexdigest()}  {inside.lstrip('/')}\n")
        control = self.tree / "DEBIAN"
        control.mkdir()
        (control / "control").write_text(
            f"Package: {self.NAME}\nVersion: {self.version}\nArchitecture: all\n"
            "Maintainer: vif-route-qubes tests <tests@example.invalid>\n"
            "Description: test stand-in for Qubes' networking package\n"
            " Owns the paths Qubes' package owns; not Qubes' code.\n")
        (control / "conffiles").write_text("".join(f"{p}\n" for p in self.files if p.startswith("/etc/")))
        (control / "md5sums").write_text("".join(sums))
        deb = folder / f"{self.NAME}_{self.version}_all.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(self.tree), str(deb)],
                       check=True, capture_output=True)
        return deb

    def install(self, box) -> None:
        """dpkg -i inside the container (as an upgrade when another version is there)."""
        box.write(f"/root/{self.deb.name}", self.deb.read_bytes())
        box.run(f"dpkg -i /root/{self.deb.name}")
