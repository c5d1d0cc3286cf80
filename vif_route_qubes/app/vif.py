"""One vif event: read inputs, lock, read the system's state, plan, apply, report."""

import os
from contextlib import nullcontext

from vif_route_qubes import logsetup, timing
from vif_route_qubes.app import offline
from vif_route_qubes.errors import VifError
from vif_route_qubes.facts import ipsets as ipset_facts
from vif_route_qubes.facts import mapped as mapped_facts
from vif_route_qubes.facts import nft_state
from vif_route_qubes.inputs.read import read_vif_inputs
from vif_route_qubes.model import VifFacts, VifInputs
from vif_route_qubes.optspec import RunOptions, VifArgs
from vif_route_qubes.plan import vif as plan_vif
from vif_route_qubes.system import apply, backend, ip, sources, tools
from vif_route_qubes.system.ipset import Ipsets
from vif_route_qubes.system.lock import locked
from vif_route_qubes.system.procfs import read_sysctl

log = logsetup.get_logger("vif-route-qubes")


def effective_command(command: str, type_if: str) -> str | None:
    """Xen's convention: a vif acts on online/offline, a tap on add/remove."""
    if type_if == "tap":
        return {"add": "online", "remove": "offline"}.get(command)
    return command if command in ("online", "offline") else None


def _routes_and_neighbours(vif: str) -> dict:
    """What the vif routes and knows now: old entries of addresses the VM no
    longer has (or stray metrics) are removed by online, all by offline."""
    index = ip.link_index(vif)
    if index is None:
        return {}
    try:
        return {"host_routes": tuple(ip.host_routes(index)), "neighbours": tuple(ip.permanent_neighbours(index))}
    except OSError as exc:
        raise VifError(f"{vif}: reading its routes and neighbours failed: {exc.strerror or exc}") from None


def read_facts(inp: VifInputs, firewall: str, ipsets: Ipsets) -> VifFacts:
    """What the system has now for this vif, read once under the lock (the
    iptables backend's sets over `ipsets`, the event's ipset socket)."""
    exists = os.path.isdir(f"/proc/sys/net/ipv4/conf/{inp.vif}")
    rename_pending = bool(inp.rename_from and not exists
                          and os.path.isdir(f"/proc/sys/net/ipv4/conf/{inp.rename_from}"))
    probe = inp.rename_from if rename_pending else inp.vif
    ipv6_enabled = read_sysctl(f"net/ipv6/conf/{probe}/disable_ipv6") == "0"
    # A vif's own namespace exists only for a mapped VM (a stat, and one `ip -n` if it does).
    extra = {"mapped": mapped_facts.read_facts(inp)}
    if exists:
        extra.update(_routes_and_neighbours(inp.vif))
        if inp.command == "offline":
            extra["harden_defaults"] = offline.harden_defaults(inp)
    if firewall == "nft":
        return VifFacts(exists=exists, rename_pending=rename_pending, ipv6_enabled=ipv6_enabled,
                        backend="nft", nft=nft_state.read_state(inp.vif, inp.addresses), **extra)
    # Whether the routes were read, not `exists`: the vif may vanish in between.
    routed = offline.routed_families("host_routes" in extra, ipv6_enabled)
    ipt = ipset_facts.read_facts(ipsets, inp.vif, inp.addresses, extra.get("host_routes", ()),
                                 inp.command == "online", routed, extra.get("neighbours", ()))
    return VifFacts(exists=exists, rename_pending=rename_pending, ipv6_enabled=ipv6_enabled, ipt=ipt, **extra)


def plan(inp: VifInputs, facts: VifFacts):
    if inp.command == "online":
        in_netns = inp.mapped is not None and facts.mapped.vif_in_netns
        if not facts.exists and not facts.rename_pending and not in_netns:
            raise VifError(f"{inp.vif}: no such interface")
        return plan_vif.plan_online(inp, facts)
    return plan_vif.plan_offline(inp, facts)


def report_error(xenbus_path: str | None, message: str) -> None:
    """Tell Xen's toolstack (hotplug-error, hotplug-status); never raises."""
    if not xenbus_path:
        return
    try:
        sources.xenstore_write({f"{xenbus_path}/hotplug-error": message,
                                f"{xenbus_path}/hotplug-status": "error"})
    except VifError as exc:
        # The failure itself is already on stderr: one line, not two.
        log.debug("could not report the failure to xenstore: %s", exc)


def run_vif(args: VifArgs, opts: RunOptions, out) -> int:
    clock = timing.Clock()
    inp = read_vif_inputs(args)
    clock.mark("inputs")
    firewall = backend.resolve(opts.backend, args.base_wait if inp.command == "online" else None)
    # A dry run only reads, so it takes no lock (and needs no write access to /run).
    with (nullcontext() if opts.dry_run else locked(opts.lock_file, opts.lock_timeout, inp.vif)) as lock_fd, \
            Ipsets() as ipsets:  # one ipset socket for reading and applying, opened by its first request
        clock.mark("lock")
        facts = read_facts(inp, firewall, ipsets)
        if inp.command == "offline":  # what to undo: what the kernel holds (app/offline.py)
            inp = offline.learn(inp, facts, offline.vif_addresses(inp.vif))
        clock.mark("facts")
        batch = plan(inp, facts)
        clock.mark("plan")
        if opts.dry_run:
            out.write(batch.render())
            return 0
        with apply.Applier(lock_fd, ipsets) as applier:
            applier.run(batch)
        clock.mark("apply")
    clock.report(applier.timings + tools.TIMINGS)
    log.debug("%s %s done", inp.command, inp.vif)
    return 0
