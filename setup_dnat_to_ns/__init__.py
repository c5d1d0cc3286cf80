"""qubes-setup-dnat-to-ns: DNAT the VMs' virtual DNS addresses to the real resolvers."""

from vif_route_qubes import __version__  # noqa: F401  (one version for both programs)
