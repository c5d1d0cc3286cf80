"""`vif-route-qubes`: the entry point.

Xen's hotplug convention is honoured first: `key=value` arguments set
variables exactly as the environment would.  The usual event invocations
then run without importing click (fastargs.py); everything else (help,
init, check, errors in the arguments) goes to the click commands.
"""

from vif_route_qubes import timing  # noqa: F401  (first: starts the benchmark's clock)

import os
import sys


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
    args = xen_assignments(sys.argv[1:])
    from vif_route_qubes.fastargs import parse_event

    fast = parse_event(args, os.environ)
    if fast is not None:
        from vif_route_qubes.event import run_event
        from vif_route_qubes.quickexit import run_then_exit

        run_then_exit(run_event, *fast)
    from vif_route_qubes.commands import cli
    from vif_route_qubes.options import run_main

    run_main(cli, args, "vif-route-qubes")
