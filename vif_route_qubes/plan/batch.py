"""The batch: every change a command will make, as data that renders itself.

The planner builds a Batch, the applier (system/apply.py) carries it out, and
`--dry-run`, error messages and golden tests all use the same `render()`.
The rendered script, run by `sh` as root, makes the same changes.
"""

from shlex import quote
from typing import NamedTuple

from vif_route_qubes.plan import elements


def _ip(family: int) -> str:
    return "ip -6" if family == 6 else "ip"


class Restore(NamedTuple):
    """One atomic iptables-restore --noflush (family 4 or 6)."""

    family: int
    text: str

    def render(self) -> str:
        tool = "ip6tables-restore" if self.family == 6 else "iptables-restore"
        return f"{tool} -w 10 --noflush <<'EOF'\n{self.text}EOF"


class IpsetCreate(NamedTuple):
    """Create an ipset unless it exists (over netlink)."""

    name: str
    stype: str
    family: int

    def render(self) -> str:
        return f"ipset create -exist {self.name} {self.stype} family {'inet6' if self.family == 6 else 'inet'}"


class IpsetElements(NamedTuple):
    """Add and delete set elements (plan/elements.py Changes), each tolerating
    "already there" or "already gone"; rendered as ipset commands."""

    changes: tuple

    def render(self) -> str:
        return "\n".join(elements.ipset_command(change) for change in self.changes)


class IpsetDestroy(NamedTuple):
    """Destroy an ipset; tolerates its absence."""

    name: str

    def render(self) -> str:
        return f"ipset -q destroy {self.name} || true"


class Sysctl(NamedTuple):
    """Write a /proc/sys value when it differs; `path` is relative to /proc/sys."""

    path: str
    value: str
    tolerant: bool = False  # the file may be gone (interface removed)

    def render(self) -> str:
        # sysctl's dotted form swaps '.' and '/' (interface names hold dots).
        key = ".".join(part.replace(".", "/") for part in self.path.split("/"))
        line = f"sysctl -q -w {quote(key + '=' + self.value)}"
        return f"{line} 2>/dev/null || true" if self.tolerant else line


class Exec(NamedTuple):
    """Run a program (with `stdin` as a here-document); a failure is fatal."""

    argv: tuple[str, ...]
    stdin: str | None = None

    def render(self) -> str:
        line = " ".join(quote(arg) for arg in self.argv)
        return f"{line} <<'EOS'\n{self.stdin}EOS" if self.stdin is not None else line


class ReturnLink(NamedTuple):
    """Move an interface from a namespace back into this one (ours: `$$`)."""

    netns: str
    ifname: str

    def render(self) -> str:
        return f"ip -n {quote(self.netns)} link set dev {quote(self.ifname)} netns $$"


class MoveLink(NamedTuple):
    """Move an interface from this namespace into a named one."""

    ifname: str
    netns: str

    def render(self) -> str:
        return f"ip link set dev {quote(self.ifname)} netns {quote(self.netns)}"


class VethAdd(NamedTuple):
    """A veth pair: `ifname` here, `peer` in the named namespace."""

    ifname: str
    address: str
    peer: str
    peer_address: str | None
    netns: str

    def render(self) -> str:
        peer_mac = f" address {quote(self.peer_address)}" if self.peer_address else ""
        return (f"ip link add {quote(self.ifname)} address {quote(self.address)} type veth "
                f"peer name {quote(self.peer)}{peer_mac} netns {quote(self.netns)}")


class LinkDel(NamedTuple):
    ifname: str

    def render(self) -> str:
        return f"ip link del dev {quote(self.ifname)}"


class Nft(NamedTuple):
    """One atomic nftables transaction."""

    text: str

    def render(self) -> str:
        return f"nft -f - <<'EOF'\n{self.text}EOF"


class NftElements(NamedTuple):
    """One atomic nftables transaction of set element changes only (plan/elements.py
    Changes in table `table` of each change's family); rendered as the `nft -f`
    it is equivalent to, applied over netlink (system/nft_elements.py)."""

    table: str
    changes: tuple

    @property
    def text(self) -> str:
        """The `nft -f` input this transaction is equivalent to."""
        return "".join(elements.nft_command(change, self.table) + "\n" for change in self.changes)

    def render(self) -> str:
        return Nft(self.text).render()


class Group(NamedTuple):
    """The interface group (the nft backend matches vifs by group 2)."""

    ifname: str
    group: int
    tolerant: bool = False

    def render(self) -> str:
        line = f"ip link set dev {quote(self.ifname)} group {self.group}"
        return f"{line} 2>/dev/null || true" if self.tolerant else line


class Rename(NamedTuple):
    old: str
    new: str

    def render(self) -> str:
        return f"ip link set dev {quote(self.old)} name {quote(self.new)}"


class Link(NamedTuple):
    ifname: str
    up: bool
    tolerant: bool = False

    def render(self) -> str:
        line = f"ip link set dev {quote(self.ifname)} {'up' if self.up else 'down'}"
        return f"{line} 2>/dev/null || true" if self.tolerant else line


class Addr(NamedTuple):
    """An address on the interface; add=False removes it, tolerating absence."""

    ifname: str
    address: str
    prefixlen: int
    family: int
    add: bool

    def render(self) -> str:
        verb = "replace" if self.add else "del"
        line = f"{_ip(self.family)} addr {verb} {self.address}/{self.prefixlen} dev {quote(self.ifname)}"
        return line if self.add else f"{line} 2>/dev/null || true"


class Route(NamedTuple):
    ifname: str
    address: str
    family: int
    metric: int
    add: bool

    def render(self) -> str:
        verb = "replace" if self.add else "del"
        plen = 128 if self.family == 6 else 32
        line = f"{_ip(self.family)} route {verb} {self.address}/{plen} dev {quote(self.ifname)} metric {self.metric}"
        return line if self.add else f"{line} 2>/dev/null || true"


class Neigh(NamedTuple):
    ifname: str
    address: str
    family: int
    mac: str
    add: bool

    def render(self) -> str:
        if self.add:
            return (f"{_ip(self.family)} neigh replace {self.address} lladdr {self.mac} "
                    f"dev {quote(self.ifname)} nud permanent")
        return f"{_ip(self.family)} neigh del {self.address} dev {quote(self.ifname)} 2>/dev/null || true"


class ConntrackPurge(NamedTuple):
    """Delete connection-tracking entries to or from these addresses (IPv4 and IPv6)."""

    addresses: tuple[str, ...]

    def render(self) -> str:
        return "\n".join(
            f"conntrack -D -f {'ipv6' if ':' in address else 'ipv4'} {flag} {address} >/dev/null 2>&1 || true"
            for address in self.addresses for flag in ("-s", "-d", "--reply-src")
        )


class Hook(NamedTuple):
    """Run one hook; a failure or a timeout is logged, never fatal."""

    path: str
    args: tuple[str, ...]
    timeout: float

    def render(self) -> str:
        argv = " ".join(quote(arg) for arg in (self.path, *self.args))
        return f"timeout {self.timeout:g} {argv} || true"


class XenstoreWrite(NamedTuple):
    pairs: tuple[tuple[str, str], ...]

    def render(self) -> str:
        return "xenstore-write " + " ".join(f"{quote(k)} {quote(v)}" for k, v in self.pairs)


class Run(NamedTuple):
    """Run a program whose failure is logged, never fatal (service reloads)."""

    argv: tuple[str, ...]

    def render(self) -> str:
        return " ".join(quote(arg) for arg in self.argv) + " || true"


class Note(NamedTuple):
    """Something the run logs instead of doing (rendered as a comment)."""

    message: str
    error: bool = False

    def render(self) -> str:
        return "# " + self.message.replace("\n", " ")


Step = (Restore | IpsetCreate | IpsetElements | IpsetDestroy | Nft | Group | Exec | ReturnLink | MoveLink | VethAdd
        | LinkDel | Sysctl | Rename | Link | Addr | Route | Neigh
        | ConntrackPurge | Hook | XenstoreWrite | Run | Note)


class Batch(NamedTuple):
    title: str
    steps: tuple[Step, ...] = ()

    def render(self) -> str:
        lines = ["#!/bin/sh", f"# {self.title}"]
        lines += [step.render() for step in self.steps]
        return "\n".join(lines) + "\n"

    @property
    def changes(self) -> bool:
        return any(not isinstance(step, Note) for step in self.steps)
