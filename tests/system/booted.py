"""A booted Debian 12 (systemd as PID 1) in a container: the network VM of the
booted-system tests (issue 27; the Debian package's tests of issue 29 use it too).

The kit (tests/system/):
    debroot.tarball(scratch)            the cached Debian 12 root (mmdebstrap), built when missing
    Container.boot(folder, tar)         unpack a fresh root into folder/root and boot it:
                                        systemd-nspawn --boot --private-network (log: folder/nspawn.log)
      .root                             the root folder, on the host: write files into it
      .pid1                             the container's PID 1, as the host sees it
      .netns                            /proc/PID1/ns/net: the network VM's namespace
      .run(cmd, check=True, input=None, timeout=120) -> CompletedProcess
                                        `sh -c cmd` inside (nsenter -t PID1 -a), with a clean
                                        environment (a service's PATH, LANG, HOME), text output
      .write(path, text, mode=0o644)    a file inside (path absolute as the container sees it)
      .read(path) -> str | None         (write/read go through the root folder: not for /run, /tmp,
                                        which are tmpfs inside; use run("cat ...") there)
      .journal(unit) -> str             `journalctl -u unit -o cat` of this boot
      .xl_devd(command, vif, path, **env) -> CompletedProcess
                                        /etc/xen/scripts/vif-route-qubes COMMAND type_if=vif as
                                        xl devd runs it: a transient service (systemd-run --wait
                                        --pipe), stdin /dev/null, a service's environment plus
                                        vif, XENBUS_PATH, XENBUS_TYPE, XENBUS_BASE_PATH, netdev,
                                        script (and **env)
      .reboot()                         power off, boot the same root again (new PID 1, new netns)
      .close()                          power off, kill nspawn if it lingers, delete the root
    Stand-ins (standins.py): xenstore/qubesdb on the container's PATH, file-backed
    (Container.xen: a tests/netns.XenEnv over the container's files), the Qubes stand-in
    package (QubesPackage), the wheelhouse and the install of the project as the
    README says (install_project / uninstall).
    Network (vmnet.py): VMNet(container, namespaces) makes the uplink to an "internet"
    namespace (a host and a DNS server) and vifs to VM namespaces.

Nothing here touches the host's own network, /etc or services: the container has a
private network namespace, and everything made is deleted by close() / the finalizers.
"""

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import debroot

# A systemd service's PATH (systemd 252's default for system services).
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLEAN_ENV = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb"}
XEN_SCRIPT = "/etc/xen/scripts/vif-route-qubes"


def libxl_env(vif: str, path: str, script: str = XEN_SCRIPT) -> dict[str, str]:
    """The variables libxl adds to xl devd's environment for a vif's script."""
    return {"vif": vif, "XENBUS_PATH": path, "XENBUS_TYPE": "vif", "XENBUS_BASE_PATH": "backend",
            "netdev": "", "script": script}


def cannot_boot() -> str | None:
    """Why systemd-nspawn cannot boot a container here (None: it can)."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter", "tar"):
        if not shutil.which(tool):
            return f"{tool} is not installed (tests/tools/install.sh installs it)"
    return None


class BootFailed(RuntimeError):
    """systemd-nspawn did not bring the fresh Debian root to `running` (nothing of ours in it yet)."""


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class Container:
    def __init__(self, folder: Path, tar: Path) -> None:
        self.folder = folder
        self.root = folder / "root"
        self.log_path = folder / "nspawn.log"
        self.nspawn: subprocess.Popen | None = None
        self.pid1 = 0
        self.xen = None  # a netns.XenEnv once standins.xen_standins(self) put the stand-ins in
        debroot.unpack(tar, self.root)
        # The container's name lookups never leave it (no network); our tests read resolv.conf.
        (self.root / "etc/resolv.conf").unlink(missing_ok=True)
        (self.root / "etc/resolv.conf").write_text("")
        (self.root / "etc/hostname").write_text("netvm\n")

    @classmethod
    def boot(cls, folder: Path, tar: Path, setup=None) -> "Container":
        """A fresh root, `setup(container)` run on its files before the boot, then booted."""
        box = cls(folder, tar)
        try:
            if setup:
                setup(box)
            box.start()
        except BaseException:
            box.close()
            raise
        return box

    # -- life -------------------------------------------------------------
    def start(self, timeout: float = 90) -> None:
        with open(self.log_path, "ab") as log:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--private-network",
                 "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=pipe",
                 "--machine", self.folder.name[-60:].replace("_", "-") or "netvm", "-D", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.nspawn.poll() is not None:
                raise BootFailed(f"systemd-nspawn exited ({self.nspawn.returncode}): see {self.log_path}")
            kids = _children(self.nspawn.pid)
            if kids and Path(f"/proc/{kids[0]}/comm").read_text().strip() == "systemd":
                self.pid1 = kids[0]
                break
            if time.monotonic() > deadline:
                raise BootFailed(f"no systemd in the container: see {self.log_path}")
            time.sleep(0.05)
        while True:
            state = self.run("systemctl is-system-running --wait", check=False,
                             timeout=max(1.0, deadline - time.monotonic())).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise BootFailed(f"the container's systemd is {state!r}; failed units:\n"
                                   + self.run("systemctl --failed", check=False).stdout)
            time.sleep(0.2)

    def poweroff(self, timeout: float = 45) -> None:
        """Shut the container down (its units stop as at a real shutdown); kill
        nspawn, only it and the container's init, when it lingers."""
        if not self.nspawn or self.nspawn.poll() is not None:
            return
        if self.pid1 and _alive(self.pid1):
            self.run("systemctl --no-block poweroff", check=False, timeout=10)
        try:
            self.nspawn.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.nspawn.send_signal(signal.SIGKILL)
            if self.pid1 and _alive(self.pid1):
                os.kill(self.pid1, signal.SIGKILL)  # init of the container's pid namespace: ends them all
            self.nspawn.wait(timeout=10)

    def reboot(self) -> None:
        self.poweroff()
        self.pid1 = 0
        self.start()

    def close(self) -> None:
        try:
            self.poweroff()
        finally:
            mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                       if line.split()[1].startswith(str(self.root))]
            if not mounted and self.root.exists():
                subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], check=False)

    # -- inside -----------------------------------------------------------
    @property
    def netns(self) -> str:
        return f"/proc/{self.pid1}/ns/net"

    def enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.pid1), "-a", "-r", "-w"]

    def run(self, cmd: str, check: bool = True, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.enter(), "sh", "-c", cmd], env=CLEAN_ENV, input=input,
                                stdin=None if input is not None else subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"in the container: {cmd!r} exited {result.returncode}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def write(self, inside: str, text: str | bytes, mode: int = 0o644) -> Path:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.write_bytes if isinstance(text, bytes) else target.write_text)(text)
        target.chmod(mode)
        return target

    def read(self, inside: str) -> str | None:
        target = self.path(inside)
        return target.read_text() if target.exists() else None

    def journal(self, unit: str) -> str:
        return self.run(f"journalctl --no-pager -b -u {shlex.quote(unit)} -o cat", check=False).stdout

    def xl_devd(self, command: str, vif: str, path: str, script: str = XEN_SCRIPT,
                timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
        """Run the Xen script as `xl devd` runs it (libxl_linux.c): from a service,
        stdin /dev/null, the service's environment plus libxl's variables only."""
        env = {**libxl_env(vif, path, script), **extra}
        flags = " ".join(f"-E {shlex.quote(f'{k}={v}')}" for k, v in env.items())
        return self.run(f"systemd-run --quiet --wait --pipe --collect -p KillMode=mixed {flags} "
                        f"{shlex.quote(script)} {shlex.quote(command)} type_if=vif", check=False, timeout=timeout)
