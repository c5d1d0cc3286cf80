"""The applier: the only code that changes the system.

It carries out a Batch step by step, in order, and stops at the first step
that fails (raising VifError with the step's rendered line).  Netlink is used
for links, addresses, routes, neighbours and conntrack; /proc/sys for sysctls;
iptables-restore, hooks and xenstore-write are forked.
"""

import errno
import os
import signal
import socket
import subprocess
import time

from vif_route_qubes import logsetup, netlink, sources
from vif_route_qubes.batch import (Addr, Batch, ConntrackPurge, Exec, Group, Hook, IpsetCreate, IpsetDestroy,
                                   IpsetElements, Link, Neigh, Note, Nft, Rename, ReturnLink, Restore, Route, Run,
                                   Sysctl, XenstoreWrite)
from vif_route_qubes.errors import VifError

log = logsetup.get_logger("vif-route-qubes")
RESTORE_TIMEOUT = 30.0


class Applier:
    def __init__(self, lock_fd: int | None = None) -> None:
        self._rtnl = None
        self._ipsets = None
        # Children that change the system keep the lock alive if we are killed.
        self._fds = (lock_fd,) if lock_fd is not None else ()
        self.timings: list[tuple[str, float]] = []  # (step kind, seconds), for the benchmark

    def __enter__(self) -> "Applier":
        return self

    def __exit__(self, *exc) -> None:
        if self._rtnl is not None:
            self._rtnl.close()
        if self._ipsets is not None:
            self._ipsets.close()

    @property
    def rtnl(self) -> netlink.Netlink:
        if self._rtnl is None:
            self._rtnl = netlink.Netlink(netlink.NETLINK_ROUTE)
        return self._rtnl

    def run(self, batch: Batch) -> None:
        for step in batch.steps:
            started = time.perf_counter()
            try:
                getattr(self, "_" + type(step).__name__.lower())(step)
                self.timings.append((type(step).__name__, time.perf_counter() - started))
            except VifError:
                raise
            except OSError as exc:
                reason = exc.strerror or os.strerror(exc.errno or 0) or str(exc)
                raise VifError(f"{step.render().splitlines()[0]}: {reason}") from None

    # -- one method per step type ------------------------------------------

    def _note(self, step: Note) -> None:
        (log.error if step.error else log.info)("%s", step.message)

    def _restore(self, step: Restore) -> None:
        tool = "ip6tables-restore" if step.family == 6 else "iptables-restore"
        try:
            proc = subprocess.Popen([tool, "-w", "10", "--noflush"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, pass_fds=self._fds)
        except FileNotFoundError:
            raise VifError(f"{tool} is not installed") from None
        try:
            _, stderr = proc.communicate(step.text, timeout=RESTORE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise VifError(f"{tool} did not finish within {RESTORE_TIMEOUT:g} s") from None
        if proc.returncode != 0:
            detail = " ".join(stderr.split())[:300] or f"exit {proc.returncode}"
            raise VifError(f"{tool} failed: {detail}")

    @property
    def ipsets(self):
        if self._ipsets is None:
            from vif_route_qubes.system.ipset import Ipsets

            self._ipsets = Ipsets()
        return self._ipsets

    def _ipsetcreate(self, step: IpsetCreate) -> None:
        self.ipsets.create(step.name, step.stype, step.family)

    def _ipsetelements(self, step: IpsetElements) -> None:
        from vif_route_qubes.antispoof_ipt import set_name

        for change in step.changes:
            entry = (change.address, change.vif) if change.vif else (change.address,)
            call = self.ipsets.add if change.add else self.ipsets.delete
            call(set_name(change.set, change.version), change.version, entry)

    def _ipsetdestroy(self, step: IpsetDestroy) -> None:
        self.ipsets.destroy(step.name)

    def _exec(self, step: Exec) -> None:
        try:
            result = subprocess.run(step.argv, input=step.stdin, capture_output=True, text=True,
                                    errors="replace", timeout=RESTORE_TIMEOUT, pass_fds=self._fds)
        except FileNotFoundError:
            raise VifError(f"{step.argv[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise VifError(f"{' '.join(step.argv)} did not finish within {RESTORE_TIMEOUT:g} s") from None
        if result.returncode != 0:
            raise VifError(f"{' '.join(step.argv)} failed: {' '.join(result.stderr.split())[:300]}")

    def _returnlink(self, step: ReturnLink) -> None:
        self._exec(Exec(("ip", "-n", step.netns, "link", "set", "dev", step.ifname, "netns", str(os.getpid()))))

    def _nft(self, step: Nft) -> None:
        from vif_route_qubes.nft import run_nft

        run_nft(["-f", "-"], stdin=step.text, pass_fds=self._fds)

    def _group(self, step: Group) -> None:
        index = self._index(step.ifname, not step.tolerant)
        if index is not None:
            self.rtnl.link_set(index, group=step.group)

    def _sysctl(self, step: Sysctl) -> None:
        path = "/proc/sys/" + step.path
        try:
            with open(path) as handle:
                if handle.read().strip() == step.value:
                    return
            with open(path, "w") as handle:
                handle.write(step.value)
        except FileNotFoundError:
            if not step.tolerant:
                raise

    def _index(self, ifname: str, required: bool) -> int | None:
        """The interface's index; None (nothing to do) for a removal when it is gone."""
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            if required:
                raise VifError(f"{ifname}: no such interface") from None
            return None

    def _tolerant(self, call, add: bool, *args) -> None:
        try:
            call(add, *args)
        except OSError as exc:
            if add or exc.errno not in netlink.GONE | {errno.EINVAL}:
                raise

    def _rename(self, step: Rename) -> None:
        self.rtnl.link_set(self._index(step.old, True), name=step.new)

    def _link(self, step: Link) -> None:
        index = self._index(step.ifname, not step.tolerant)
        if index is not None:
            self.rtnl.link_set(index, up=step.up)

    def _addr(self, step: Addr) -> None:
        index = self._index(step.ifname, step.add)
        if index is not None:
            self._tolerant(self.rtnl.addr, step.add, index, step.family, step.address, step.prefixlen)

    def _route(self, step: Route) -> None:
        index = self._index(step.ifname, step.add)
        if index is not None:
            self._tolerant(self.rtnl.route, step.add, index, step.family, step.address, step.metric)

    def _neigh(self, step: Neigh) -> None:
        index = self._index(step.ifname, step.add)
        if index is not None:
            self._tolerant(self.rtnl.neigh, step.add, index, step.family, step.address, step.mac)

    def _conntrackpurge(self, step: ConntrackPurge) -> None:
        count = netlink.conntrack_purge(step.addresses)
        if count:
            log.info("purged %d connection tracking entries of %s", count, ", ".join(step.addresses))

    def _hook(self, step: Hook) -> None:
        what = " ".join((step.path, *step.args))
        try:
            # A session of its own, so that a timeout kills the hook's children too.
            proc = subprocess.Popen([step.path, *step.args], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as exc:
            log.error("hook %s: %s", what, exc.strerror)
            return
        try:
            _, err = proc.communicate(timeout=step.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            log.error("hook %s: killed after %g s", what, step.timeout)
            return
        if proc.returncode != 0:
            detail = " ".join(err.decode(errors="replace").split())[:200]
            log.error("hook %s failed with exit %d%s", what, proc.returncode, f": {detail}" if detail else "")

    def _run(self, step: Run) -> None:
        try:
            result = subprocess.run(step.argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    errors="replace", timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("%s: %s", " ".join(step.argv), getattr(exc, "strerror", None) or exc)
            return
        if result.returncode != 0:
            log.error("%s failed with exit %d: %s", " ".join(step.argv), result.returncode,
                      " ".join(result.stderr.split())[:200])

    def _xenstorewrite(self, step: XenstoreWrite) -> None:
        sources.xenstore_write(dict(step.pairs))
