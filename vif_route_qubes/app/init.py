"""`vif-route-qubes init`: install the base ruleset and turn on forwarding, idempotently."""

import sys
from contextlib import nullcontext
from typing import NamedTuple

from vif_route_qubes import logsetup
from vif_route_qubes.errors import VifError
from vif_route_qubes.facts import ipt_state, nft_state
from vif_route_qubes.facts.ipsets import read_sets
from vif_route_qubes.inputs import parse
from vif_route_qubes.plan import antispoof_ipt, base_ipt, ipt_text, nft
from vif_route_qubes.plan.batch import Batch, Nft, Restore, Sysctl
from vif_route_qubes.optspec import RunOptions
from vif_route_qubes.system import apply, backend, sources
from vif_route_qubes.system.ipset import Ipsets
from vif_route_qubes.system.lock import locked
from vif_route_qubes.system.tools import ToolMissing

log = logsetup.get_logger("vif-route-qubes")
QDB_GATEWAY6 = "/qubes-netvm-gateway6"


class InitInputs(NamedTuple):
    ipv6: bool  # IPv6 is routed for the VMs (qubesdb has an IPv6 gateway)


def read_init_inputs(gateway6: str | None) -> InitInputs:
    if gateway6 is None:
        try:
            gateway6 = sources.qubesdb_read([QDB_GATEWAY6]).get(QDB_GATEWAY6)
        except ToolMissing:
            pass  # no qubesdb (not on Qubes): IPv6 not routed
    if gateway6:
        parse.address_of(gateway6, 6, source="IPv6 gateway")
    return InitInputs(ipv6=bool(gateway6))


def plan_init(inp: InitInputs, save4: str, save6: str, sets: dict) -> Batch:
    """The base of both families; the anti-spoofing sets (filled from the old
    per-vif layout, if any) before the restores whose rules use them."""
    tables = {4: ipt_text.parse_save(save4), 6: ipt_text.parse_save(save6)}
    raw = {v: tables[v].get("raw", ipt_text.EMPTY_TABLE) for v in (4, 6)}
    steps = [step for step in antispoof_ipt.plan_static(raw, sets, base=True) if not isinstance(step, Restore)]
    for family, text, routed in ((4, save4, True), (6, save6, inp.ipv6)):
        rules = base_ipt.plan_base(ipt_text.parse_save(text), family, routed)
        if rules:
            steps.append(Restore(family, rules))
    return Batch("vif-route-qubes init", tuple(steps + forwarding(inp)))


def plan_init_nft(inp: InitInputs, state, rules: dict | None = None) -> Batch:
    """`rules`: (version, chain) -> the rules of an existing anti-spoofing chain, refilled when they differ."""
    lines = [line for version, routed in ((4, True), (6, inp.ipv6))
             for line in nft.base_objects(version, state.table(version), routed)]
    lines += [line for version in (4, 6) for line in nft.repair_antispoof(version, rules or {})]
    steps = [Nft("\n".join(lines) + "\n")] if lines else []
    return Batch("vif-route-qubes init", tuple(steps + forwarding(inp)))


def forwarding(inp: InitInputs) -> list:
    steps = []
    steps.append(Sysctl("net/ipv4/ip_forward", "1"))
    steps.append(Sysctl("net/ipv6/conf/all/forwarding", "1" if inp.ipv6 else "0", tolerant=True))
    return steps


def run_init(inp: InitInputs, firewall: str, dry_run: bool, lock_file: str, lock_timeout: float, out) -> int:
    with nullcontext() if dry_run else locked(lock_file, lock_timeout, "init") as lock_fd:
        if firewall == "nft":
            state = nft_state.read_state()
            rules = {(v, chain): nft_state.chain_rules(v, chain) for v, table in state.tables.items()
                     for chain in ("antispoof", "prerouting") if chain in table.chains}
            batch = plan_init_nft(inp, state, rules)
        else:
            with Ipsets() as ipsets:
                sets = read_sets(ipsets)
            batch = plan_init(inp, *ipt_state.save_both(), sets)
        if dry_run:
            out.write(batch.render())
            return 0
        with apply.Applier(lock_fd) as applier:
            applier.run(batch)
    return 0


def run_init_command(opts: RunOptions, gateway6: str | None) -> None:
    """`vif-route-qubes init` from its options; a failure is one line on stderr and its exit status."""
    log = logsetup.setup(opts.verbose)
    sources.set_timeout(opts.tool_timeout)
    try:
        run_init(read_init_inputs(gateway6), backend.resolve(opts.backend), opts.dry_run, opts.lock_file,
                 opts.lock_timeout, sys.stdout)
    except VifError as exc:
        log.error("init: %s", exc)
        sys.exit(exc.exit_code)
