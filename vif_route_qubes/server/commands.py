"""The commands the server runs: the `vif_route_qubes.served` entry point group.

Each package that wants its command served declares `NAME = "module:function"`
there (pyproject.toml), so this package never names another one: the DNS
command's package depends on this one, not the other way round.  The group
is read the first time another package's command is asked for, or by the
warm-up: importlib.metadata costs ~15 ms, which the event that made systemd
start the server would otherwise wait for before its hello.
"""

import functools

GROUP = "vif_route_qubes.served"
# This package's own command, known without the group (and served where its metadata is missing).
OWN = {"vif-route-qubes": "vif_route_qubes.cli.main"}


@functools.cache
def served() -> dict[str, str]:
    """Command name -> the module whose main() runs it in-process."""
    from importlib.metadata import entry_points  # start-up: not before the first hello (see above)

    return {**{point.name: point.value.partition(":")[0] for point in entry_points(group=GROUP)}, **OWN}


def module_of(entry: object) -> str | None:
    """The module of a served command, None for any other name."""
    if not isinstance(entry, str):
        return None
    return OWN.get(entry) or served().get(entry)
