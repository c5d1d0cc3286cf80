"""Whose rules are in the shared dispatch chain, remembered between events.

With hundreds of VMs the dispatch chain QBS-ANTISPOOF holds a rule per vif
and per address in each family (1,200 rules with 400 vifs), and reading it
at every event made each event slower as VMs were added.  This index, one
small file per network namespace beside the lock file, lists the handles of
each vif's rules, and it is trusted only at the nftables generation it was
written at: any change by anyone else (a rule added by hand, the DNS script,
a firewall daemon, a killed event) bumps the generation, and the next event
reads the whole chain again and rebuilds the index.

Our own changes are followed through the kernel's nftables notifications,
to which an event subscribes before it reads anything: when every generation
it saw was committed by itself or by its iptables-restore children, the
index is written at the last one; otherwise it is dropped.

The index can only save reading, never hide a rule: a vif's listed rules are
read back by handle and decoded at every event (ipt_netlink.py), and a rule
that is gone or changed sends the event back to reading the whole chain.
"""

import os
import socket
import stat
import struct

from vif_route_qubes.antispoof_ipt import DISPATCH
from vif_route_qubes.ipt_netlink import (EXPR_DATA, EXPR_NAME, MATCH_INFO, MATCH_NAME, RULE_CHAIN, RULE_EXPRESSIONS,
                                         RULE_HANDLE, RULE_TABLE, SAFE, TABLE, nf_tables_variant)
from vif_route_qubes.netlink import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, Netlink, _attrs

NFNLGRP_NFTABLES, SO_NETNS_COOKIE = 7, 71
NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_NEWGEN = 2, 5, 6, 8, 15
NFTA_CHAIN_NAME, NFTA_GEN_ID, NFTA_GEN_PROC_PID = 3, 1, 2
VERSIONS = {2: 4, 10: 6}  # NFPROTO_IPV4, NFPROTO_IPV6
MAGIC = "vif-route-qubes raw index 1"
UNTAGGED = "-"  # a rule without a comment naming a vif


def _name(value: bytes) -> bytes:
    return value.split(b"\0", 1)[0]


def tag_of(attrs: dict) -> str:
    """The comment of a rule (the attributes of a GETRULE/NEWRULE/DELRULE
    message), when it could name a vif."""
    for _, expr in _attrs(attrs.get(RULE_EXPRESSIONS, b"")):
        parts = dict(_attrs(expr))
        if _name(parts.get(EXPR_NAME, b"")) == b"match":
            data = dict(_attrs(parts.get(EXPR_DATA, b"")))
            if _name(data.get(MATCH_NAME, b"")) == b"comment":
                text = _name(data.get(MATCH_INFO, b"")).decode("ascii", "replace")
                return text if text and len(text) <= 64 and set(text) <= SAFE - {" "} else UNTAGGED
    return UNTAGGED


class Index:
    """Rule handles of the dispatch chain by tag and family, at generation `gen`.

    The file's lines (`TAG 4:H,H 6:H`) are kept as one text: an event finds
    and rewrites its own line with string searches, so neither reading nor
    writing the index costs a step per VM in Python."""

    def __init__(self, gen: int, counts: dict[int, int], body: str = "") -> None:
        self.gen, self.counts, self._body = gen, counts, body
        self._entries: dict[str, dict[int, list[int]]] = {}  # parsed, maybe changed since

    @classmethod
    def of_rules(cls, gen: int, rules: dict[int, dict[int, str]]) -> "Index":
        index = cls(gen, {4: 0, 6: 0})
        for version, tags in rules.items():
            for handle, tag in tags.items():
                index.add(tag, version, handle)
        return index

    @classmethod
    def parse(cls, text: str) -> "Index":
        head, _, body = text.partition("\n")
        words = head.split(" ")
        if len(words) != 4 or words[0] != "gen" or not words[2].startswith("4:") or not words[3].startswith("6:"):
            raise ValueError("bad header")
        if body and not body.endswith("\n"):
            raise ValueError("truncated")
        return cls(int(words[1]), {4: int(words[2][2:]), 6: int(words[3][2:])}, body)

    def _span(self, tag: str) -> tuple[int, int] | None:
        """Where the tag's line is in the text (with its newline)."""
        start = 0 if self._body.startswith(tag + " ") else self._body.find("\n" + tag + " ") + 1
        if start == 0 and not self._body.startswith(tag + " "):
            return None
        return start, self._body.index("\n", start) + 1

    def _entry(self, tag: str) -> dict[int, list[int]]:
        if tag not in self._entries:
            entry = {4: [], 6: []}
            span = self._span(tag)
            if span is not None:
                for part in self._body[span[0] : span[1] - 1].split(" ")[1:]:
                    version, _, handles = part.partition(":")
                    entry[int(version)] = [int(h) for h in handles.split(",") if h]
            self._entries[tag] = entry
        return self._entries[tag]

    def handles(self, tag: str, version: int) -> list[int]:
        return list(self._entry(tag)[version])

    def others(self, tag: str, version: int) -> int:
        return self.counts[version] - len(self._entry(tag)[version])

    def add(self, tag: str, version: int, handle: int) -> bool:
        entry = self._entry(tag)[version]
        if handle in entry:
            return False
        entry.append(handle)
        self.counts[version] += 1
        return True

    def remove(self, tag: str, version: int, handle: int) -> bool:
        entry = self._entry(tag)[version]
        if handle not in entry:
            return False
        entry.remove(handle)
        self.counts[version] -= 1
        return True

    def clear(self, version: int) -> None:
        for line in self._body.splitlines():
            self._entry(line.partition(" ")[0])
        for entry in self._entries.values():
            entry[version] = []
        self.counts[version] = 0

    def text(self) -> str:
        for tag, entry in self._entries.items():
            span = self._span(tag)
            if span is not None:
                self._body = self._body[: span[0]] + self._body[span[1] :]
            if entry[4] or entry[6]:
                self._body += " ".join([tag] + [f"{v}:{','.join(map(str, entry[v]))}" for v in (4, 6)]) + "\n"
        self._entries = {}
        return f"gen {self.gen} 4:{self.counts[4]} 6:{self.counts[6]}\n" + self._body


def _folder(lock_file: str) -> str | None:
    """The index folder beside the lock file: ours alone, or not used."""
    folder = (lock_file[:-5] if lock_file.endswith(".lock") else lock_file) + ".d"
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        return None
    return folder


class Session:
    """One event's use of the index: opened before the raw tables are read,
    committed after the batch was applied."""

    def __init__(self, nl: Netlink, watch: socket.socket, path: str) -> None:
        self.nl, self.watch, self.path = nl, watch, path
        self.gen = nl.generation()
        self.index = self._load()
        self.read = False  # set once the raw tables were read through this session
        self.spared = False  # ... and without reading every vif's rules

    @property
    def trusted(self) -> bool:
        """The index was written at the generation read (or rebuilt from the chain)."""
        return self.index is not None and self.index.gen == self.gen

    def _load(self) -> Index | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as handle:
                text = handle.read().decode("ascii")
            magic, _, rest = text.partition("\n")
            return Index.parse(rest) if magic == MAGIC else None
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    def rebuilt(self, rules: dict[int, dict[int, str]]) -> None:
        """The whole chain was read (both families): {version: {handle: tag}}."""
        self.index = Index.of_rules(self.gen, rules)

    def distrust(self) -> None:
        self.index = None

    def commit(self, writers: set[int]) -> None:
        """Follow the changes made since the read; write the index at the new
        generation when all of them were ours, drop it otherwise."""
        gen = self._follow(writers) if self.read and self.index is not None else None
        if gen is None or not any(self.index.counts.values()):  # nothing to trust, or nothing to index
            try:
                os.unlink(self.path)
            except OSError:
                pass
            return
        if gen == self.gen and self.spared:
            return  # nothing changed: the file holds exactly this index
        self.index.gen = gen
        temporary = f"{self.path}.{os.getpid()}"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                data = (MAGIC + "\n" + self.index.text()).encode()
                if os.write(fd, data) != len(data):
                    raise OSError("short write")
            finally:
                os.close(fd)
            os.rename(temporary, self.path)
        except OSError:
            # Only a cache: the next event reads the whole chain instead.
            for path in (temporary, self.path):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _follow(self, writers: set[int]) -> int | None:
        gen = self.gen
        while True:
            try:
                data = self.watch.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return gen
            except OSError:
                return None  # ENOBUFS: notifications were lost
            offset = 0
            while offset + 16 <= len(data):
                size, kind = struct.unpack_from("=IH", data, offset)
                payload = data[offset + 16 : offset + size]
                offset += (size + 3) & ~3
                if kind >> 8 != NFNL_SUBSYS_NFTABLES or len(payload) < 4:
                    continue
                if kind & 0xFF == NFT_MSG_NEWGEN:
                    attrs = dict(_attrs(payload[4:]))
                    new = struct.unpack(">I", attrs.get(NFTA_GEN_ID, b"\0\0\0\0")[:4])[0]
                    pid = struct.unpack(">I", attrs.get(NFTA_GEN_PROC_PID, b"\0\0\0\0")[:4])[0]
                    # Only transactions of ours are followed, whose messages we know
                    # (no rule replaced in place, say); a gap means a lost message.  In a
                    # PID namespace the kernel's pid is not ours: never trusted, only slower.
                    if new != gen + 1 or pid not in writers:
                        return None
                    gen = new
                elif not self._change(kind & 0xFF, VERSIONS.get(payload[0]), payload):
                    return None

    def _change(self, kind: int, version: int | None, payload: bytes) -> bool:
        """Apply one notification to the index; False when it cannot be followed."""
        if kind not in (NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE):
            return True
        attrs = dict(_attrs(payload[4:]))
        if version is None or _name(attrs.get(RULE_TABLE, b"")) + b"\0" != TABLE:
            return True  # RULE_TABLE, NFTA_CHAIN_TABLE and NFTA_TABLE_NAME are all attribute 1
        if kind == NFT_MSG_DELTABLE or (kind == NFT_MSG_DELCHAIN
                                        and _name(attrs.get(NFTA_CHAIN_NAME, b"")) == DISPATCH.encode()):
            self.index.clear(version)
            return True
        if kind == NFT_MSG_DELCHAIN or _name(attrs.get(RULE_CHAIN, b"")) != DISPATCH.encode():
            return True
        if RULE_HANDLE not in attrs:
            return False
        handle = struct.unpack(">Q", attrs[RULE_HANDLE][:8])[0]
        if kind == NFT_MSG_NEWRULE:
            return self.index.add(tag_of(attrs), version, handle)
        return self.index.remove(tag_of(attrs), version, handle)

    def close(self) -> None:
        self.watch.close()
        self.nl.close()


def open_session(lock_file: str) -> Session | None:
    """A session for this network namespace, or None where the index cannot
    be used (legacy iptables, no netns cookie, a folder that is not ours)."""
    if not nf_tables_variant():
        return None
    try:
        nl = Netlink(NETLINK_NETFILTER)
    except OSError:
        return None
    watch = None
    try:
        cookie = struct.unpack("=Q", nl.sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        folder = _folder(lock_file)
        if folder is None:
            nl.close()
            return None
        # Subscribed before the generation is read: no change can slip between.
        watch = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        watch.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        return Session(nl, watch, os.path.join(folder, f"raw-index-{cookie}"))
    except OSError:
        if watch is not None:
            watch.close()
        nl.close()
        return None
