"""The applier: the only code that changes the system.

It carries out a Batch step by step, in order, and stops at the first step
that fails (raising VifError with the step's rendered line).  Each step type
has one function (STEPS below).  Kernel requests go through system.ip
(pyroute2: links, addresses, routes, neighbours, conntrack), set elements
through system.ipset and system.nft_elements (netlink too), /proc/sys is
written directly, and every program (iptables-restore, nft, ip netns, hooks,
xenstore-write, systemctl) runs through system.tools (sh).
"""

import os
import time

from vif_route_qubes import logsetup
from vif_route_qubes.errors import VifError
from vif_route_qubes.plan import elements
from vif_route_qubes.plan.batch import (Addr, Batch, ConntrackPurge, Exec, Group, Hook, IpsetCreate, IpsetDestroy,
                                        IpsetElements, Link, LinkDel, MoveLink, Neigh, Nft, NftElements, Note, Rename,
                                        Restore, ReturnLink, Route, Run, Sysctl, VethAdd, XenstoreWrite)
from vif_route_qubes.system import ip, lock, sources, tools
from vif_route_qubes.system.ipset import Ipsets
from vif_route_qubes.system.nft_elements import ElementWriter

log = logsetup.get_logger("vif-route-qubes")


class Applier:
    def __init__(self, lock_fd: int | None = None, ipsets=None) -> None:
        # Children that change the system keep the lock alive if we are killed.
        self.fds = (lock_fd,) if lock_fd is not None else ()
        self.timings: list[tuple[str, float]] = []  # (step kind, seconds), for the benchmark
        self._ipsets = ipsets  # the event's, when it read the sets already (its owner closes it)
        self._own_ipsets = ipsets is None
        self._nft_elements = None

    def __enter__(self) -> "Applier":
        return self

    def __exit__(self, *exc) -> None:
        ip.close()
        if self._nft_elements is not None:
            self._nft_elements.close()
        if self._ipsets is not None and self._own_ipsets:
            self._ipsets.close()

    @property
    def ipsets(self):
        """The ipset netlink socket, opened by the first ipset step."""
        if self._ipsets is None:
            self._ipsets = Ipsets()
        return self._ipsets

    @property
    def nft_elements(self):
        """The nfnetlink socket of element changes, opened by the first such step."""
        if self._nft_elements is None:
            self._nft_elements = ElementWriter()
        return self._nft_elements

    def run(self, batch: Batch) -> None:
        for step in batch.steps:
            started = time.perf_counter()
            try:
                STEPS[type(step)](self, step)
                self.timings.append((type(step).__name__, time.perf_counter() - started))
            except VifError:
                raise
            except OSError as exc:
                reason = exc.strerror or os.strerror(exc.errno or 0) or str(exc)
                raise VifError(f"{step.render().splitlines()[0]}: {reason}") from None

    def tool(self, argv, stdin: str | None = None, what: str | None = None) -> tools.Result:
        """A program that changes the system: it inherits the lock."""
        return tools.run(argv, stdin=stdin, pass_fds=self.fds, what=what)


# -- one function per step type ----------------------------------------------

def _note(app: Applier, step: Note) -> None:
    (log.error if step.error else log.info)("%s", step.message)


def _restore(app: Applier, step: Restore) -> None:
    tool = "ip6tables-restore" if step.family == 6 else "iptables-restore"
    app.tool([tool, "-w", "10", "--noflush"], stdin=step.text)


def _ipsetcreate(app: Applier, step: IpsetCreate) -> None:
    app.ipsets.create(step.name, step.stype, step.family)


def _ipsetelements(app: Applier, step: IpsetElements) -> None:
    for change in step.changes:
        entry = (change.address, change.vif) if change.vif else (change.address,)
        call = app.ipsets.add if change.add else app.ipsets.delete
        call(elements.ipset_name(change.set, change.version), change.version, entry)


def _ipsetdestroy(app: Applier, step: IpsetDestroy) -> None:
    app.ipsets.destroy(step.name)



def _exec(app: Applier, step: Exec) -> None:
    app.tool(step.argv, stdin=step.stdin, what=" ".join(step.argv))


def _returnlink(app: Applier, step: ReturnLink) -> None:
    ip.link_return_from_netns(step.netns, step.ifname)


def _movelink(app: Applier, step: MoveLink) -> None:
    ip.link_move_to_netns(_index(step.ifname, True), step.netns)


def _vethadd(app: Applier, step: VethAdd) -> None:
    ip.veth_add(step.ifname, step.address, step.peer, step.peer_address, step.netns)


def _linkdel(app: Applier, step: LinkDel) -> None:
    index = _index(step.ifname, False)
    if index is not None:
        ip.link_del(index)


def _nft(app: Applier, step: Nft) -> None:
    tools.run(["nft", "-f", "-"], stdin=step.text, pass_fds=app.fds)


def _index(ifname: str, required: bool) -> int | None:
    """The interface's index; None (nothing to do) for a removal when it is gone."""
    index = ip.link_index(ifname)
    if index is None and required:
        raise VifError(f"{ifname}: no such interface")
    return index


def _nftelements(app: Applier, step: NftElements) -> None:
    # An error names the `nft -f` input the transaction stands for.
    app.nft_elements.apply(step.table, step.changes, "nftables: " + "; ".join(step.text.splitlines()))


def _group(app: Applier, step: Group) -> None:
    index = _index(step.ifname, not step.tolerant)
    if index is not None:
        ip.link_set_group(index, step.group)


def _sysctl(app: Applier, step: Sysctl) -> None:
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


def _rename(app: Applier, step: Rename) -> None:
    ip.link_rename(_index(step.old, True), step.new)


def _link(app: Applier, step: Link) -> None:
    index = _index(step.ifname, not step.tolerant)
    if index is None:
        return
    try:
        ip.link_set_up(index, step.up)
    except OSError:
        if not step.tolerant:  # `|| true`: also when the link vanishes after its look-up (ENODEV)
            raise


def _on_link(add, delete):
    """An Addr, Route or Neigh step: add(index, step) or delete(index, step) on its
    interface; nothing when a removal finds the interface gone (see _index)."""
    def run(app: Applier, step: Addr | Route | Neigh) -> None:
        index = _index(step.ifname, step.add)
        if index is not None:
            (add if step.add else delete)(index, step)
    return run


_addr = _on_link(lambda index, s: ip.addr_replace(index, s.address, s.prefixlen),
                 lambda index, s: ip.addr_del(index, s.address, s.prefixlen))
_route = _on_link(lambda index, s: ip.route_replace(index, s.address, s.metric),
                  lambda index, s: ip.route_del(index, s.address, s.metric))
_neigh = _on_link(lambda index, s: ip.neigh_replace(index, s.address, s.mac),
                  lambda index, s: ip.neigh_del(index, s.address))


def _conntrackpurge(app: Applier, step: ConntrackPurge) -> None:
    count = ip.conntrack_purge(step.addresses)
    if count:
        log.info("purged %d connection tracking entries of %s", count, ", ".join(step.addresses))


def _hook(app: Applier, step: Hook) -> None:
    """A failing or hanging hook is logged, never fatal (killed with its children)."""
    what = " ".join((step.path, *step.args))
    try:
        result = tools.run([step.path, *step.args], timeout=step.timeout, check=False, discard_stdout=True,
                           nice=lock.waited_nice())
    except tools.ToolTimeout:
        log.error("hook %s: killed after %g s", what, step.timeout)
        return
    except tools.ToolError as exc:
        log.error("hook %s: %s", what, exc)
        return
    if result.exit_code != 0:
        detail = tools.one_line(result.stderr, 200)
        log.error("hook %s failed with exit %d%s", what, result.exit_code, f": {detail}" if detail else "")


def _run(app: Applier, step: Run) -> None:
    """A program whose failure is logged, never fatal (service reloads)."""
    try:
        result = tools.run(step.argv, check=False, nice=lock.waited_nice())
    except tools.ToolError as exc:
        log.error("%s: %s", " ".join(step.argv), exc)
        return
    if result.exit_code != 0:
        log.error("%s failed with exit %d: %s", " ".join(step.argv), result.exit_code,
                  tools.one_line(result.stderr, 200))


def _xenstorewrite(app: Applier, step: XenstoreWrite) -> None:
    sources.xenstore_write(dict(step.pairs))


STEPS = {
    Note: _note, Restore: _restore, IpsetCreate: _ipsetcreate, IpsetElements: _ipsetelements,
    IpsetDestroy: _ipsetdestroy, Exec: _exec, ReturnLink: _returnlink, Nft: _nft, NftElements: _nftelements,
    MoveLink: _movelink, VethAdd: _vethadd, LinkDel: _linkdel,
    Group: _group, Sysctl: _sysctl, Rename: _rename, Link: _link, Addr: _addr, Route: _route, Neigh: _neigh,
    ConntrackPurge: _conntrackpurge, Hook: _hook, Run: _run, XenstoreWrite: _xenstorewrite,
}
