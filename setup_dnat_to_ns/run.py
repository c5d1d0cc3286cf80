"""What `qubes-setup-dnat-to-ns` does, from parsed option values (fast path or click)."""

import os
import sys
from contextlib import nullcontext

from setup_dnat_to_ns import facts
from setup_dnat_to_ns.check import run_dns_check
from setup_dnat_to_ns.plan import DnsInputs, plan_dns, plan_dns_nft
from setup_dnat_to_ns.resolvers import upstream_servers
from vif_route_qubes import logsetup
from vif_route_qubes.errors import VifError
from vif_route_qubes.facts.ipt_state import read_tables
from vif_route_qubes.inputs import parse
from vif_route_qubes.inputs.read import QDB_DNS
from vif_route_qubes.system import backend as backends
from vif_route_qubes.system import sources
from vif_route_qubes.system.lock import locked
from vif_route_qubes.system.tools import ToolMissing

EXIT_UNCHANGED = 100
# The four actions Qubes' own hook acts on, and those after which NetworkManager
# has new resolvers too: `dhcp6-change` (IPv6 resolvers), `reapply` (`nmcli
# device reapply` rewrites resolv.conf) and `dns-change` (NetworkManager >= 1.20,
# whenever its DNS configuration changes).  Any other action is a no-op.
ACTIONS = ("up", "vpn-up", "vpn-down", "dhcp4-change", "dhcp6-change", "reapply", "dns-change")


def run_dns(params: dict) -> int:
    """The exit status of one run (0, 100, or a failure's status)."""
    log = logsetup.setup(params["verbose"], "qubes-setup-dnat-to-ns")
    sources.set_timeout(params["tool_timeout"])
    action = params["action"]
    if params.get("check"):
        return run_dns_check(lambda: _virtual(params), params["resolv_conf"],
                             params["as_json"], params["backend"], params["lock_file"], params["lock_timeout"])
    if action is not None and action not in ACTIONS:
        log.debug("%s %s: nothing to do", params["iface"], action)
        return 0
    try:
        return _run(dispatcher=action is not None, params=params,
                    resolv_conf=params["resolv_conf"], firewall_flag=params["firewall_flag"],
                    dry_run=params["dry_run"], backend=params["backend"], lock_file=params["lock_file"],
                    lock_timeout=params["lock_timeout"])
    except VifError as exc:
        log.error("%s", exc)
        return exc.exit_code


QDB_DNS6 = ("/qubes-netvm-primary-dns6", "/qubes-netvm-secondary-dns6")


def _virtual(params: dict) -> tuple:
    """The virtual DNS addresses, IPv4 then IPv6 (options first, else qubesdb, one read)."""
    keys = [(QDB_DNS[0], "dns1", 4), (QDB_DNS[1], "dns2", 4),
            (QDB_DNS6[0], "dns6_1", 6), (QDB_DNS6[1], "dns6_2", 6)]
    wanted = [key for key, name, _ in keys if params.get(name) is None]
    qdb = {}
    if wanted:
        try:
            qdb = sources.qubesdb_read(wanted)
        except ToolMissing:
            pass  # no qubesdb (not on Qubes): only the options' addresses
    found = []
    for key, name, version in keys:
        text = params.get(name) if params.get(name) is not None else qdb.get(key)
        if text:
            label = f"virtual {'IPv6 ' if version == 6 else ''}DNS {name[-1]}"
            found.append(parse.address_of(text, version, source=label))
    return tuple(dict.fromkeys(found))


def _run(*, dispatcher, params, resolv_conf, firewall_flag, dry_run, backend, lock_file, lock_timeout):
    firewall = backends.resolve(backend)
    virtual = _virtual(params)
    if not virtual:
        return 0  # this VM provides no network: nothing to do
    inp = DnsInputs(virtual=virtual, upstream=upstream_servers(resolv_conf), dispatcher=dispatcher,
                    firewall_running=os.path.exists(firewall_flag), ratemask=facts.ratemask())
    with nullcontext() if dry_run else locked(lock_file, lock_timeout, "DNS rules") as lock_fd:
        if firewall == "nft":
            tables, current = facts.dnat_state()
            batch = plan_dns_nft(inp, current, tables)
        else:
            batch = plan_dns(inp, read_tables())
        if not batch.changes:
            return EXIT_UNCHANGED
        if dry_run:
            sys.stdout.write(batch.render())
            return 0
        from vif_route_qubes.system.apply import Applier  # start-up: pyroute2 only when rules change (rarely)

        with Applier(lock_fd) as applier:
            applier.run(batch)
    return 0
