"""The console entry point of qubes-setup-dnat-to-ns: offer the event to the
command server, else run it in-process (vif_route_qubes.server.client).
Imports nothing heavy."""

from vif_route_qubes.server.client import run


def main() -> None:
    run("qubes-setup-dnat-to-ns", "setup_dnat_to_ns.cli")
