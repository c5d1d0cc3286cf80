"""`qubes-setup-dnat-to-ns` (also installed as qubes_setup_dnat_to_ns): the entry point.

click parses the command line (commands.py).  main() reads sys.argv and the
environment when called, so it can run again in the same process or in a
forked child that already imported it (the command server).

Exit status: 0 rules changed (or nothing to do), 100 rules already as they
should be (also with --dry-run), 1 failure, 2 usage error.
"""

import os
import sys

from setup_dnat_to_ns.commands import cli
from vif_route_qubes.cli.options import run_main


def main() -> None:
    """Run with sys.argv; ends with SystemExit(status)."""
    prog = os.path.basename(sys.argv[0]) or "qubes-setup-dnat-to-ns"
    run_main(cli, sys.argv[1:], prog)
