"""The raw table of iptables-nft, read and trimmed over nftables netlink.

`iptables-save -t raw` renders every rule of every vif (11 ms with 400 vifs
here, 1.6 ms with none), so a vif event would slow down as VMs are added.
With iptables' nf_tables variant the rules live in the nftables tables
`ip raw` and `ip6 raw`; this reads only what one event needs: the chains
PREROUTING, QBS-ANTISPOOF and the vif's own, turning this vif's rules into
the lines iptables-save prints (the rule forms antispoof_ipt.py writes) and
every other rule into a placeholder.  Anything it cannot read for certain
returns None, and the caller reads iptables-save as before.

Offline deletes by rule handle in one nftables transaction for both
families (raw_delete): no rule lookup by text, and the kernel's wait for
deleted rules to be released (~15 ms here) is paid once instead of twice.
"""

import errno
import os
import socket
import struct

from vif_route_qubes.ipt_state import TableState
from vif_route_qubes.netlink import (NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NLM_F_DUMP, Netlink, _attr, _attrs,
                                     nfgen, nft_msg)

NFT_MSG_GETCHAIN, NFT_MSG_DELCHAIN, NFT_MSG_GETRULE, NFT_MSG_DELRULE = 4, 5, 7, 8
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
TABLE = b"raw\0"
# Attribute numbers of uapi linux/netfilter/nf_tables.h.
RULE_TABLE, RULE_CHAIN, RULE_HANDLE, RULE_EXPRESSIONS = 1, 2, 3, 4
CHAIN_TABLE, CHAIN_NAME, CHAIN_USE = 1, 3, 6
EXPR_NAME, EXPR_DATA = 1, 2
META_KEY, META_IIFNAME = 2, 6
CMP_OP, CMP_DATA, CMP_EQ, CMP_NEQ = 2, 3, 0, 1
PAYLOAD_BASE, PAYLOAD_OFFSET, PAYLOAD_LEN, NETWORK_HEADER = 2, 3, 4, 1
MATCH_NAME, MATCH_INFO = 1, 3
IMMEDIATE_DREG, IMMEDIATE_DATA, DATA_VALUE, DATA_VERDICT, VERDICT_CODE, VERDICT_CHAIN = 1, 2, 1, 2, 1, 2
VERDICTS = {0: "DROP", 1: "ACCEPT", -5: "RETURN"}
NFT_JUMP, NFT_GOTO = -3, -4
SADDR = {4: (12, 4), 6: (8, 16)}  # offset and length of the source address in the network header
SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._- ")


def nf_tables_variant() -> bool:
    """Whether iptables-restore on PATH is iptables' nf_tables variant."""
    for folder in os.environ.get("PATH", "/usr/sbin:/usr/bin").split(os.pathsep):
        path = os.path.join(folder, "iptables-restore")
        if os.path.exists(path):
            target = os.path.basename(os.path.realpath(path))
            return "nft" in target and "legacy" not in target
    return False


def _be32(attrs: dict, kind: int) -> int:
    """A big-endian 32-bit attribute (0 when absent)."""
    return struct.unpack(">i", attrs[kind][:4])[0] if kind in attrs else 0


def _iface(data: bytes) -> str | None:
    """`-i` operand: a name compared with its NUL (exact) or without (NAME+)."""
    exact = data.endswith(b"\0")
    name = data.rstrip(b"\0").decode("ascii", "replace")
    if not name or "\0" in name or not set(name) <= SAFE - {" "}:
        return None
    return name if exact else name + "+"


def decode(payload: bytes, version: int) -> tuple[int, str, str | None] | None:
    """(handle, chain, the rule as iptables-save prints it or None when it is
    not one of the forms we write) of a GETRULE answer."""
    attrs = dict(_attrs(payload[4:]))
    if RULE_HANDLE not in attrs or RULE_CHAIN not in attrs:
        return None
    handle = struct.unpack(">Q", attrs[RULE_HANDLE][:8])[0]
    chain = attrs[RULE_CHAIN].split(b"\0", 1)[0].decode("ascii", "replace")
    source = iface = comment = target = None
    negate = False
    loaded = None  # what the last load expression put in the register
    for _, expr in _attrs(attrs.get(RULE_EXPRESSIONS, b"")):
        parts = dict(_attrs(expr))
        name = parts.get(EXPR_NAME, b"").split(b"\0", 1)[0]
        data = dict(_attrs(parts.get(EXPR_DATA, b"")))
        if name == b"counter":
            continue
        if name == b"meta" and _be32(data, META_KEY) == META_IIFNAME and loaded is None:
            loaded = "iif"
        elif (name == b"payload" and loaded is None and _be32(data, PAYLOAD_BASE) == NETWORK_HEADER
              and (_be32(data, PAYLOAD_OFFSET), _be32(data, PAYLOAD_LEN))
              == SADDR[version]):
            loaded = "saddr"
        elif name == b"cmp" and loaded is not None:
            op = _be32(data, CMP_OP)
            value = dict(_attrs(data.get(CMP_DATA, b""))).get(DATA_VALUE, b"")
            if loaded == "iif" and op in (CMP_EQ, CMP_NEQ) and iface is None:
                iface, negate = _iface(value), op == CMP_NEQ
                if iface is None:
                    return handle, chain, None
            elif loaded == "saddr" and op == CMP_EQ and source is None and len(value) == SADDR[version][1]:
                family = socket.AF_INET6 if version == 6 else socket.AF_INET
                source = f"{socket.inet_ntop(family, value)}/{len(value) * 8}"
            else:
                return handle, chain, None
            loaded = None
        elif name == b"match" and loaded is None and comment is None:
            if data.get(MATCH_NAME, b"").split(b"\0", 1)[0] != b"comment":
                return handle, chain, None
            comment = data.get(MATCH_INFO, b"").split(b"\0", 1)[0].decode("ascii", "replace")
            if not set(comment) <= SAFE:
                return handle, chain, None
        elif name == b"immediate" and loaded is None and target is None:
            verdict = dict(_attrs(dict(_attrs(data.get(IMMEDIATE_DATA, b""))).get(DATA_VERDICT, b"")))
            code = _be32(verdict, VERDICT_CODE)
            jump_to = verdict.get(VERDICT_CHAIN, b"").split(b"\0", 1)[0].decode("ascii", "replace")
            if code in VERDICTS:
                target = f"-j {VERDICTS[code]}"
            elif code in (NFT_JUMP, NFT_GOTO) and jump_to and set(jump_to) <= SAFE - {" "}:
                target = f"{'-j' if code == NFT_JUMP else '-g'} {jump_to}"
            else:
                return handle, chain, None
        else:
            return handle, chain, None
    if loaded is not None or target is None:
        return handle, chain, None
    words = [f"-A {chain}"]
    if source:
        words.append(f"-s {source}")
    if iface:
        words.append(f"{'! ' if negate else ''}-i {iface}")
    if comment is not None:
        words.append(f'-m comment --comment "{comment}"')  # iptables-save always quotes it
    words.append(target)
    return handle, chain, " ".join(words)


class _Stale(Exception):
    """A rule the index lists is gone or not this vif's: read the whole chain."""


def _by_handle(nl: Netlink, head: bytes, version: int, vif: str, known: tuple) -> tuple[list, list]:
    """The dispatch chain as far as the index knows it: this vif's rules read
    back one by one, and one placeholder for all the others (the planner only
    asks whether there are any)."""
    from vif_route_qubes.antispoof_ipt import DISPATCH

    handles, others = known
    tag = f'--comment "{vif}" '
    lines = []
    for handle in handles:
        try:
            answer = nl.request(nft_msg(NFT_MSG_GETRULE), 0,
                                head + _attr(RULE_TABLE, TABLE) + _attr(RULE_CHAIN, DISPATCH.encode() + b"\0")
                                + _attr(RULE_HANDLE, struct.pack(">Q", handle)))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise _Stale from None
            raise
        decoded = decode(answer[0], version) if answer else None
        if decoded is None or decoded[2] is None or tag not in decoded[2] or decoded[:2] != (handle, DISPATCH):
            raise _Stale
        lines.append(decoded[2])
    return lines + [f"-A {DISPATCH} ?"] * min(others, 1), list(handles) + [None] * min(others, 1)


def _read_family(nl: Netlink, version: int, vif: str, known: tuple | None,
                 tags: dict[int, str] | None) -> TableState | None:
    """One family's raw table; `known` is what the index lists for the
    dispatch chain, else the chain is read whole and `tags` filled in."""
    from vif_route_qubes.antispoof_ipt import DISPATCH, vif_chain

    head = nfgen(version)
    chains, uses = [], {}  # without the table, every chain is ENOENT too
    for chain in ("PREROUTING", DISPATCH, vif_chain(vif)):
        try:
            answer = nl.request(nft_msg(NFT_MSG_GETCHAIN), 0,
                                head + _attr(CHAIN_TABLE, TABLE) + _attr(CHAIN_NAME, chain.encode() + b"\0"))
            chains.append(chain)
            uses[chain] = _be32(dict(_attrs(answer[0][4:])), CHAIN_USE) if answer else -1
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    if known is not None and DISPATCH not in chains and (known[0] or known[1]):
        raise _Stale
    needle = vif.encode() + b"\0"  # in every rule of this vif (its comment), and in few others
    if tags is not None:
        from vif_route_qubes.raw_index import tag_of
    rules, handles = [], []
    for chain in chains:
        if chain == DISPATCH and known is not None:
            # The kernel counts a chain's rules and the jumps to it: the index
            # must account for every rule there, or the whole chain is read.
            jumps = sum(1 for line in dict(rules).get("PREROUTING", ()) if line.endswith(f" -j {DISPATCH}"))
            if uses[DISPATCH] != len(known[0]) + known[1] + jumps:
                raise _Stale
            lines, numbers = _by_handle(nl, head, version, vif, known)
            if lines:
                rules.append((chain, tuple(lines)))
                handles.append((chain, tuple(numbers)))
            continue
        lines, numbers = [], []
        query = head + _attr(RULE_TABLE, TABLE) + _attr(RULE_CHAIN, chain.encode() + b"\0")
        for payload in nl.request(nft_msg(NFT_MSG_GETRULE), NLM_F_DUMP, query):
            if chain == DISPATCH and tags is not None:
                attrs = dict(_attrs(payload[4:]))
                tags[struct.unpack(">Q", attrs[RULE_HANDLE][:8])[0]] = tag_of(attrs)
            if chain == DISPATCH and needle not in payload:
                lines.append(f"-A {chain} ?")  # another vif's rule: counted, not read
                numbers.append(None)
                continue
            decoded = decode(payload, version)
            if decoded is None:
                return None
            handle, _, text = decoded
            if text is None:
                if chain == DISPATCH:
                    return None  # maybe this vif's, in a form we do not write: iptables-save decides
                text = f"-A {chain} ?{handle}"
            lines.append(text)
            numbers.append(handle)
        if lines:
            rules.append((chain, tuple(lines)))
            handles.append((chain, tuple(numbers)))
    return TableState(frozenset(chains), tuple(rules), tuple(handles))


def read_raw(vif: str, index=None) -> tuple[TableState, TableState] | None:
    """The raw tables (IPv4, IPv6) as far as an event of `vif` needs them,
    with rule handles; None when iptables-save must be read instead.

    `index` (a raw_index.Session) saves reading the whole dispatch chain when
    it can be trusted, and is rebuilt from it when it cannot."""
    if index is None and not nf_tables_variant():  # a session exists only for that variant
        return None
    try:
        nl = index.nl if index is not None else Netlink(NETLINK_NETFILTER)
    except OSError:
        return None
    try:
        if index is not None and index.trusted:
            try:
                states = tuple(_read_family(nl, version, vif, (index.index.handles(vif, version),
                                                              index.index.others(vif, version)), None)
                               for version in (4, 6))
                index.read = index.spared = None not in states
                return None if None in states else states
            except _Stale:
                index.distrust()
        tags = {4: {}, 6: {}} if index is not None else {4: None, 6: None}
        states = tuple(_read_family(nl, version, vif, None, tags[version]) for version in (4, 6))
        if index is not None and None not in states:
            index.rebuilt(tags)
            index.read = True
    except OSError:
        return None
    finally:
        if index is None:
            nl.close()
    return None if None in states else states


def raw_delete(ops: tuple) -> None:
    """Carry out (version, kind, chain, handle) deletions, kind being "rule"
    (by handle), "flush" (every rule of the chain) or "chain", as one
    nftables transaction: all of them, or none and OSError."""
    body = []
    for version, kind, chain, handle in ops:
        head = nfgen(version)
        if kind == "chain":
            body.append((nft_msg(NFT_MSG_DELCHAIN), head + _attr(CHAIN_TABLE, TABLE)
                         + _attr(CHAIN_NAME, chain.encode() + b"\0")))
        else:
            attrs = _attr(RULE_TABLE, TABLE) + _attr(RULE_CHAIN, chain.encode() + b"\0")
            if kind == "rule":
                attrs += _attr(RULE_HANDLE, struct.pack(">Q", handle))
            body.append((nft_msg(NFT_MSG_DELRULE), head + attrs))
    if not body:
        return
    nl = Netlink(NETLINK_NETFILTER)
    try:
        nl.batch(struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(NFNL_SUBSYS_NFTABLES)),
                 NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, body)
    finally:
        nl.close()
