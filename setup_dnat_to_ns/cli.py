"""`qubes-setup-dnat-to-ns` (also installed as qubes_setup_dnat_to_ns): the entry point.

The usual invocations (none, or NetworkManager's IFACE ACTION) run without
importing click (vif_route_qubes/fastargs.py); the rest goes to click.

Exit status: 0 rules changed (or nothing to do), 100 rules already as they
should be (also with --dry-run), 1 failure, 2 usage error.
"""

import os
import sys


def main() -> None:
    prog = os.path.basename(sys.argv[0]) or "qubes-setup-dnat-to-ns"
    from vif_route_qubes.fastargs import parse_dns

    fast = parse_dns(sys.argv[1:], os.environ)
    if fast is not None:
        from setup_dnat_to_ns.run import run_dns
        from vif_route_qubes.quickexit import run_then_exit

        run_then_exit(run_dns, fast)
    from setup_dnat_to_ns.commands import cli
    from vif_route_qubes.options import run_main

    run_main(cli, sys.argv[1:], prog)
