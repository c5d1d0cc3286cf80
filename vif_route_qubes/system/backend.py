"""Which firewall backend a command uses: iptables or nft.

`auto` picks nft when the nftables table `ip qubes` exists (Qubes R4.2 and
later, or a VM that ran `init --backend nft`), iptables otherwise.  The check
is one nftables netlink dump (pyroute2), not a fork of nft.
"""

from vif_route_qubes.errors import InputError

BACKENDS = ("auto", "iptables", "nft")


def resolve(choice: str) -> str:
    if choice not in BACKENDS:
        raise InputError(f"unknown backend {choice!r} (auto, iptables or nft)")
    if choice != "auto":
        return choice
    from vif_route_qubes.system import ip

    return "nft" if ip.nft_table_exists("qubes", 4) else "iptables"
