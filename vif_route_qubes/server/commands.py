"""The commands the server runs: the `vif_route_qubes.served` entry point group.

Each package that wants its command served declares `NAME = "module:function"`
there (pyproject.toml), so this package never names another one: the DNS
command's package depends on this one, not the other way round.  Read once,
at the server's start.
"""

from importlib.metadata import entry_points

GROUP = "vif_route_qubes.served"


def served() -> dict[str, str]:
    """Command name -> the module whose main() runs it in-process."""
    table = {point.name: point.value.partition(":")[0] for point in entry_points(group=GROUP)}
    # This package's own command is served even where its metadata is missing.
    table.setdefault("vif-route-qubes", "vif_route_qubes.cli.main")
    return table
