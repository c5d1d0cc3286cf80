"""The `qubes-setup-dnat-to-ns` command line (also installed as qubes_setup_dnat_to_ns).

Exit status: 0 rules changed (or nothing to do), 100 rules already as they
should be (also with --dry-run), 1 failure, 2 usage error.
"""

import os
import sys

import click

from vif_route_qubes import __version__
from vif_route_qubes.options import common_options, run_main

EXIT_UNCHANGED = 100
ACTIONS = ("up", "vpn-up", "vpn-down", "dhcp4-change")
QDB_DNS = ("/qubes-netvm-primary-dns", "/qubes-netvm-secondary-dns")
EPILOG = """Exit status: 0 rules changed or nothing to do, 100 rules unchanged (also
with --dry-run), 1 failure, 2 usage error."""


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="qubes-setup-dnat-to-ns")
@click.argument("iface", required=False)
@click.argument("action", required=False)
@click.option("--dns1", envvar="VIF_ROUTE_DNS1", show_envvar=True,
              help="Virtual DNS 1 [default: qubesdb /qubes-netvm-primary-dns].")
@click.option("--dns2", envvar="VIF_ROUTE_DNS2", show_envvar=True,
              help="Virtual DNS 2 [default: qubesdb /qubes-netvm-secondary-dns].")
@click.option("--resolv-conf", default="/etc/resolv.conf", show_default=True, envvar="QUBES_RESOLV_CONF",
              show_envvar=True, help="Where the upstream resolvers are read (nameserver lines); "
                                     "when it names 127.0.0.53, systemd-resolved is asked over D-Bus.")
@click.option("--firewall-flag", default="/run/qubes-service/qubes-firewall", show_default=True,
              envvar="QUBES_FIREWALL_FLAG", show_envvar=True,
              help="When this file exists, qubes-firewall.service is reloaded after a change.")
@click.option("--check", is_flag=True, help="Change nothing: list how the DNS rules differ from what they "
                                             "should be; exit 0 when they are right, 1 when not (or unreadable).")
@click.option("--json", "as_json", is_flag=True, help="With --check: print the differences as JSON.")
@common_options
def cli(iface, action, dns1, dns2, resolv_conf, firewall_flag, check, as_json, dry_run, verbose, backend,
        lock_file, lock_timeout, tool_timeout):
    """DNAT the VMs' virtual DNS addresses to the resolvers this VM uses.

    \b
    At start-up:            qubes-setup-dnat-to-ns
    NetworkManager hook:    qubes-setup-dnat-to-ns IFACE ACTION
    (acts on up, vpn-up, vpn-down, dhcp4-change; any other action is a no-op)
    """
    from vif_route_qubes import logsetup, sources
    from vif_route_qubes.errors import VifError

    log = logsetup.setup(verbose, "qubes-setup-dnat-to-ns")
    sources.set_timeout(tool_timeout)
    if iface is not None and action is None:
        raise click.UsageError("give both IFACE and ACTION, or neither")
    if check:
        from vif_route_qubes.check import run_dns_check

        sys.exit(run_dns_check(lambda: _virtual(dns1, dns2), resolv_conf, as_json, backend, lock_file,
                               lock_timeout))
    if action is not None and action not in ACTIONS:
        log.debug("%s %s: nothing to do", iface, action)
        return
    try:
        sys.exit(_run(dispatcher=action is not None, dns1=dns1, dns2=dns2, resolv_conf=resolv_conf,
                      firewall_flag=firewall_flag, dry_run=dry_run, backend=backend,
                      lock_file=lock_file, lock_timeout=lock_timeout))
    except VifError as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)


def _virtual(dns1, dns2):
    from vif_route_qubes import parse, sources
    from vif_route_qubes.errors import VifError

    wanted = [key for key, given in zip(QDB_DNS, (dns1, dns2)) if given is None]
    qdb = {}
    if wanted:
        try:
            qdb = sources.qubesdb_read(wanted)
        except VifError as exc:
            if "is not installed" not in str(exc):
                raise
    texts = [given if given is not None else qdb.get(key) for key, given in zip(QDB_DNS, (dns1, dns2))]
    found = [parse.address_of(t, 4, source=f"virtual DNS {i}") for i, t in enumerate(texts, 1) if t]
    return tuple(dict.fromkeys(found))


def _run(*, dispatcher, dns1, dns2, resolv_conf, firewall_flag, dry_run, backend, lock_file, lock_timeout):
    from contextlib import nullcontext

    from setup_dnat_to_ns.plan import DnsInputs, plan_dns, plan_dns_nft
    from setup_dnat_to_ns.resolvers import upstream_servers
    from vif_route_qubes import ipt_state
    from vif_route_qubes.errors import VifError
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
            from vif_route_qubes import netlink, nft

            batch = plan_dns_nft(inp, nft.current_dnat_rules(), netlink.nft_table_exists(nft.TABLE, 4))
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


def main() -> None:
    run_main(cli, sys.argv[1:], os.path.basename(sys.argv[0]) or "qubes-setup-dnat-to-ns")
