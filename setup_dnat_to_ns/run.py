"""What `qubes-setup-dnat-to-ns` does, from parsed option values (fast path or click)."""

import os
import sys

EXIT_UNCHANGED = 100
ACTIONS = ("up", "vpn-up", "vpn-down", "dhcp4-change")


def run_dns(params: dict) -> int:
    """The exit status of one run (0, 100, or a failure's status)."""
    from vif_route_qubes import logsetup, sources
    from vif_route_qubes.errors import VifError

    log = logsetup.setup(params["verbose"], "qubes-setup-dnat-to-ns")
    sources.set_timeout(params["tool_timeout"])
    action = params["action"]
    if params.get("check"):
        from vif_route_qubes.check_dns import run_dns_check

        return run_dns_check(lambda: _virtual(params["dns1"], params["dns2"]), params["resolv_conf"],
                             params["as_json"], params["backend"], params["lock_file"], params["lock_timeout"])
    if action is not None and action not in ACTIONS:
        log.debug("%s %s: nothing to do", params["iface"], action)
        return 0
    try:
        return _run(dispatcher=action is not None, dns1=params["dns1"], dns2=params["dns2"],
                    resolv_conf=params["resolv_conf"], firewall_flag=params["firewall_flag"],
                    dry_run=params["dry_run"], backend=params["backend"], lock_file=params["lock_file"],
                    lock_timeout=params["lock_timeout"])
    except VifError as exc:
        log.error("%s", exc)
        return exc.exit_code


def _virtual(dns1, dns2):
    from vif_route_qubes import parse, sources
    from vif_route_qubes.inputs import QDB_DNS
    from vif_route_qubes.system.tools import ToolMissing

    wanted = [key for key, given in zip(QDB_DNS, (dns1, dns2)) if given is None]
    qdb = {}
    if wanted:
        try:
            qdb = sources.qubesdb_read(wanted)
        except ToolMissing:
            pass  # no qubesdb (not on Qubes): only the options' addresses
    texts = [given if given is not None else qdb.get(key) for key, given in zip(QDB_DNS, (dns1, dns2))]
    found = [parse.address_of(t, 4, source=f"virtual DNS {i}") for i, t in enumerate(texts, 1) if t]
    return tuple(dict.fromkeys(found))


def _run(*, dispatcher, dns1, dns2, resolv_conf, firewall_flag, dry_run, backend, lock_file, lock_timeout):
    from contextlib import nullcontext

    from setup_dnat_to_ns.plan import DnsInputs, plan_dns, plan_dns_nft
    from setup_dnat_to_ns.resolvers import upstream_servers
    from vif_route_qubes import ipt_state
    from vif_route_qubes.lock import locked

    from vif_route_qubes import backend as backends

    firewall = backends.resolve(backend)
    virtual = _virtual(dns1, dns2)
    if not virtual:
        return 0  # this VM provides no network: nothing to do
    inp = DnsInputs(virtual=virtual, upstream=upstream_servers(resolv_conf), dispatcher=dispatcher,
                    firewall_running=os.path.exists(firewall_flag))
    with nullcontext() if dry_run else locked(lock_file, lock_timeout, "DNS rules") as lock_fd:
        if firewall == "nft":
            from vif_route_qubes import nft
            from vif_route_qubes.system import ip

            batch = plan_dns_nft(inp, nft.current_dnat_rules(), ip.nft_table_exists(nft.TABLE, 4))
        else:
            mangle, nat = ipt_state.save([(4, "mangle"), (4, "nat")])
            tables = {"mangle": ipt_state.table(mangle, "mangle"), "nat": ipt_state.table(nat, "nat")}
            batch = plan_dns(inp, tables)
        if not batch.changes:
            return EXIT_UNCHANGED
        if dry_run:
            sys.stdout.write(batch.render())
            return 0
        from vif_route_qubes.apply import Applier

        with Applier(lock_fd) as applier:
            applier.run(batch)
    return 0
