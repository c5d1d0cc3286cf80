"""The click command of `qubes-setup-dnat-to-ns`; its options are rows of
vif_route_qubes/optspec.py, but --check and --json.  The run is imported
when the command runs: `--help` and a usage error load no sh."""

import sys

import click

from vif_route_qubes import __version__
from vif_route_qubes.cli.options import options_of
from vif_route_qubes.optspec import DNS

EPILOG = """Exit status: 0 rules changed or nothing to do, 100 rules unchanged (also
with --dry-run), 1 failure, 2 usage error."""


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="qubes-setup-dnat-to-ns")
@click.argument("iface", required=False)
@click.argument("action", required=False)
@click.option("--check", is_flag=True, help="Change nothing: list how the DNS rules differ from what they "
                                             "should be; exit 0 when they are right, 1 when not (or unreadable).")
@click.option("--json", "as_json", is_flag=True, help="With --check: print the differences as JSON.")
@options_of(DNS)
def cli(**params):
    """DNAT the VMs' virtual DNS addresses to the resolvers this VM uses.

    \b
    At start-up:            qubes-setup-dnat-to-ns
    NetworkManager hook:    qubes-setup-dnat-to-ns IFACE ACTION
    (acts on up, vpn-up, vpn-down, dhcp4-change, dhcp6-change, reapply,
    dns-change; any other action is a no-op)
    """
    if params["iface"] is not None and params["action"] is None:
        raise click.UsageError("give both IFACE and ACTION, or neither")
    from setup_dnat_to_ns.run import run_dns  # start-up: sh and the planners only when it runs

    sys.exit(run_dns(params))
