"""A vif's set elements changed over netlink: one nf_tables transaction.

A per-vif event of the nft backend only adds and deletes elements of the
`allowed` and `downstream` sets (plan/nft.py).  Sent as one nfnetlink batch
(begin, one NEWSETELEM or DELSETELEM message per change, end: the same
transaction `nft -f` makes of the rendered lines), the kernel applies all of
it or none of it.  This spares the event a run of the `nft` program, which
here costs 5-6 ms of its own (it reads the ruleset before it writes) on top
of 8-9 ms for sh's fork of the event's process.

"Add" carries NLM_F_CREATE without NLM_F_EXCL, as `nft add element` does: an
element that is there already is success.  A delete of a missing element
fails the whole batch with ENOENT, as in `nft -f`; the planner deletes only
what it read under the event's lock.
"""

import os

from vif_route_qubes.errors import VifError
from vif_route_qubes.system.nftables import NFPROTO, address_key, one_element_message, pair_key

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11  # linux/netfilter/nfnetlink.h


def _marker(kind: int):
    """The begin or end message of an nf_tables batch."""
    from pyroute2.netlink import NLM_F_REQUEST  # start-up: this part of pyroute2 only when used
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg  # start-up: this part of pyroute2 only when used

    msg = nfgen_msg()
    msg["res_id"] = NFNL_SUBSYS_NFTABLES
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST
    return msg


def element_message(table: str, change):
    """The NEWSETELEM or DELSETELEM message of one plan/elements.py Change."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST  # start-up: this part of pyroute2 only when used
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES  # start-up: this part of pyroute2 only when used
    from pyroute2.netlink.nfnetlink import nftsocket as nfts  # start-up: this part of pyroute2 only when used

    key = pair_key(change.vif, change.address) if change.vif else address_key(change.address)
    msg = one_element_message(table, change.set, key)
    msg["nfgen_family"] = NFPROTO[change.version]
    kind = nfts.NFT_MSG_NEWSETELEM if change.add else nfts.NFT_MSG_DELSETELEM
    msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | kind
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if change.add else 0)
    return msg


# A socket that deleted elements, left open for the process's exit (ElementWriter.close).
_parked: list = []


class ElementWriter:
    """The nfnetlink socket of one event's element changes, opened when first used."""

    def __init__(self) -> None:
        self._sock = None
        self._deleted = False

    def apply(self, table: str, changes, what: str) -> None:
        """All of `changes` in one transaction; a VifError names `what` (the
        transaction as `nft -f` input) and the kernel's reason."""
        from pyroute2.netlink.exceptions import NetlinkError  # start-up: this part of pyroute2 only when used
        from pyroute2.netlink.nfnetlink.nftsocket import NFTSocket  # start-up: this part of pyroute2 only when used

        messages = [_marker(NFNL_MSG_BATCH_BEGIN), *(element_message(table, c) for c in changes),
                    _marker(NFNL_MSG_BATCH_END)]
        try:
            if self._sock is None:
                self._sock = NFTSocket()
            self._deleted = self._deleted or not all(change.add for change in changes)
            self._sock.nlm_request_batch(messages)
        except NetlinkError as exc:
            raise VifError(f"{what}: {os.strerror(exc.code) if exc.code else exc}") from None
        except OSError as exc:
            raise VifError(f"{what}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Close the socket; but one that deleted elements is left for the process's
        exit to close (at most one is kept: a later one closes it).  The kernel's
        release of a netfilter socket waits for the pending deletions to be
        freed after an RCU grace period (10-15 ms here); at exit that wait comes
        after a served event has answered, after the event's lock is gone, and
        after the child has let go of the client's stdio (server/child.py)."""
        if self._sock is None:
            return
        if self._deleted:
            while _parked:
                _parked.pop().close()
            _parked.append(self._sock)
        else:
            self._sock.close()
        self._sock = None
