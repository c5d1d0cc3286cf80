"""`vif-route-qubes`: the entry point.

Xen's hotplug convention is honoured first: `key=value` arguments set
variables exactly as the environment would.  click then parses the rest
(commands.py).  main() reads sys.argv and the environment when called, not
when imported, so it can run again in the same process (tests) or in a
forked child that already imported it (the command server).
"""

from vif_route_qubes import timing  # noqa: F401  (first: starts the benchmark's clock)

import os
import sys

from vif_route_qubes.cli.commands import cli
from vif_route_qubes.cli.options import run_main


def xen_assignments(argv: list[str]) -> list[str]:
    """Move `key=value` arguments into the environment; return the rest."""
    rest = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if eq and name.isidentifier() and name.isascii() and not arg.startswith("-"):
            os.environ[name] = value
        else:
            rest.append(arg)
    return rest


def main() -> None:
    """Run the command sys.argv names; ends with SystemExit(status)."""
    args = xen_assignments(sys.argv[1:])
    run_main(cli, args, "vif-route-qubes")
