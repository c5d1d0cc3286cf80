"""Which firewall backend a command uses: iptables or nft.

The backend must match the base ruleset the VM loads at boot, or a vif's
protection lands where no rule reads it.  `auto` picks nft when the nftables
table `ip qubes` exists (Qubes R4.2 and later, or a VM that ran `init
--backend nft`), and also when it does not exist *yet* on a VM whose base is
Qubes' nftables one (its files are there: the base is loaded later in the
boot, by qubes-antispoof.service and qubes-iptables.service); iptables
otherwise.  The table check is one nftables netlink dump (pyroute2), not a
fork of nft.
"""

import os
import time

from vif_route_qubes.errors import InputError, VifError
from vif_route_qubes.model import ALLOWED, DOWNSTREAM, NFT_TABLE as TABLE

BACKENDS = ("auto", "iptables", "nft")
# Files of Qubes' networking package (R4.2+) that make up its nftables base.
QUBES_NFT_BASE = ("/etc/qubes/qubes-antispoof.nft", "/etc/qubes/qubes-ipv4.nft")
BASE_POLL = 0.1  # seconds between two looks for the base
ANTISPOOF_SETS = frozenset({ALLOWED, DOWNSTREAM})


def resolve(choice: str, wait_base: float | None = None) -> str:
    """The backend for `choice`.  With `wait_base` (a vif online), on a VM
    whose base is Qubes' nftables one, an nft command waits up to that many
    seconds for the base's anti-spoofing sets, and fails with nothing changed
    when they do not come: no iptables protection is built that no rule of
    the base reads, and no elements go where the base is not yet."""
    if choice not in BACKENDS:
        raise InputError(f"unknown backend {choice!r} (auto, iptables or nft)")
    if choice == "iptables" or (choice == "nft" and wait_base is None):
        return choice
    qubes = qubes_nft_base()
    if qubes and wait_base is not None:
        if not antispoof_loaded() and not _wait_for_antispoof(wait_base):
            raise VifError(f"Qubes' nftables base ({QUBES_NFT_BASE[0]}: the sets {ALLOWED} and {DOWNSTREAM} "
                           f"of table ip {TABLE}) is not loaded after {wait_base:g} s; is qubes-antispoof.service "
                           "running? Nothing was changed")
        return "nft"
    if choice == "nft" or qubes:
        return "nft"
    from vif_route_qubes.system import ip  # start-up: pyroute2 only when auto must look at the tables

    return "nft" if ip.nft_table_exists(TABLE, 4) else "iptables"


def qubes_nft_base() -> bool:
    """Whether this VM's base is Qubes' nftables one (loaded or not)."""
    return any(os.path.exists(path) for path in QUBES_NFT_BASE)


def antispoof_loaded() -> bool:
    """Whether the IPv4 table holds the sets the vif events fill."""
    from vif_route_qubes.system import nftables  # start-up: pyroute2 only when waiting for Qubes' base

    with nftables.Reader() as reader:
        found = reader.table(4, TABLE)
    return found is not None and ANTISPOOF_SETS <= found[1]


def _wait_for_antispoof(timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(BASE_POLL)
        if antispoof_loaded():
            return True
    return False
