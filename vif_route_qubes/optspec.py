"""The options of both programs, written once, as data, and the records their values travel in.

Each row is one option: its flags, environment variable, help, kind and
default.  click's options and `--help` are made from the rows
(cli/options.py).  The records (RunOptions, VifArgs) are plain frozen
dataclasses that take click's values by field name; their fields are the rows'
`dest`s with the rows' defaults, which tests/unit/test_layers.py holds
together.  A new option is one new row and one new field.

Shared by the command line and the layers below it (app, inputs), so it sits
at the bottom, beside model.py, and imports nothing of this package.
"""

from dataclasses import dataclass, fields
from typing import NamedTuple

DEFAULT_LOCK = "/run/vif-route-qubes.lock"


class Opt(NamedTuple):
    dest: str
    flags: tuple[str, ...]  # ("--mac",), ("-v", "--verbose"), ("--harden", "--no-harden") for a switch
    envvar: str | None
    help: str
    kind: str = "str"  # str | seconds | choice | flag | switch | argument | arguments (nargs=-1)
    default: object = None
    low: float = 0.0  # seconds: the smallest value accepted
    choices: tuple[str, ...] = ()
    show_default: bool = False

    @property
    def type(self) -> object:
        """The field's annotation in a record."""
        if self.kind == "str":
            return str | None if self.default is None else str
        return {"seconds": float, "choice": str, "flag": bool, "switch": bool | None, "argument": str | None,
                "arguments": tuple[str, ...] | None}[self.kind]


COMMON = (
    Opt("dry_run", ("--dry-run",), "VIF_ROUTE_DRY_RUN",
        "Change nothing; print the shell script of what would be done.", kind="flag", default=False),
    Opt("verbose", ("-v", "--verbose"), "VIF_ROUTE_VERBOSE", "Log every step to stderr as well.",
        kind="flag", default=False),
    Opt("backend", ("--backend",), "QUBES_NET_BACKEND",
        ("Firewall backend; auto picks nft when the table `ip qubes` exists or Qubes' nftables base "
         "(/etc/qubes/qubes-antispoof.nft) is there to be loaded, else iptables."),
        kind="choice", choices=("auto", "iptables", "nft"), default="auto", show_default=True),
    Opt("lock_file", ("--lock-file",), "VIF_ROUTE_LOCK_FILE", "Lock held around each read-plan-apply cycle.",
        default=DEFAULT_LOCK, show_default=True),
    Opt("lock_timeout", ("--lock-timeout",), "VIF_ROUTE_LOCK_TIMEOUT",
        "Seconds to wait for the lock before failing.", kind="seconds", default=60.0, show_default=True),
    Opt("tool_timeout", ("--tool-timeout",), "VIF_ROUTE_TOOL_TIMEOUT",
        "Seconds before a hung xenstore or qubesdb tool counts as failed.", kind="seconds", low=0.1,
        default=10.0, show_default=True),
)

# Both programs' virtual DNS addresses.
DNS1 = Opt("dns1", ("--dns1",), "VIF_ROUTE_DNS1", "Virtual DNS 1 [default: qubesdb /qubes-netvm-primary-dns].")
DNS2 = Opt("dns2", ("--dns2",), "VIF_ROUTE_DNS2", "Virtual DNS 2 [default: qubesdb /qubes-netvm-secondary-dns].")

# The event commands' positional arguments: VIF (else the variable `vif`) and addresses.
ARGS = (
    Opt("vif", (), "vif", "", kind="argument"),
    Opt("addresses", (), None, "", kind="arguments"),
)

VIF = (
    Opt("mac", ("--mac",), "VIF_ROUTE_MAC", "Peer MAC for permanent neighbour entries [default: xenstore mac]."),
    Opt("gateway", ("--gateway",), "VIF_ROUTE_GATEWAY",
        "IPv4 gateway put on the vif as /32 [default: qubesdb /qubes-netvm-gateway]."),
    Opt("gateway6", ("--gateway6",), "VIF_ROUTE_GATEWAY6",
        "IPv6 gateway put on the vif as /128 [default: qubesdb /qubes-netvm-gateway6]."),
    DNS1,
    DNS2,
    Opt("harden", ("--harden", "--no-harden"), "VIF_ROUTE_HARDEN",
        "Hardening sysctls on the vif [default: qubesdb /qubes-service/harden-network-interfaces is 1].",
        kind="switch"),
    Opt("hooks_dir", ("--hooks-dir",), "VIF_ROUTE_HOOKS_DIR",
        "Every executable file here runs as HOOK online|offline VIF TYPE [ADDR].",
        default="/rw/config/network-hooks.d", show_default=True),
    Opt("hook_timeout", ("--hook-timeout",), "VIF_ROUTE_HOOK_TIMEOUT",
        "Seconds before a hook is killed (it is logged, never fatal).", kind="seconds", low=0.1, default=10.0,
        show_default=True),
    Opt("visible_ip", ("--visible-ip",), "VIF_ROUTE_VISIBLE_IP",
        "Address the VM sees instead of its real one [default: qubesdb /mapped-ip/IP4/visible-ip]."),
    Opt("visible_gateway", ("--visible-gateway",), "VIF_ROUTE_VISIBLE_GATEWAY",
        "Gateway the mapped VM sees [default: qubesdb /mapped-ip/IP4/visible-gateway]."),
    Opt("mapped_wait", ("--mapped-wait",), "VIF_ROUTE_MAPPED_WAIT",
        "Seconds to wait for mapped entries qubesdb announced but does not hold yet.", kind="seconds",
        default=5.0, show_default=True),
    Opt("base_wait", ("--base-wait",), "VIF_ROUTE_BASE_WAIT",
        "Seconds an online waits for Qubes' nftables base when its files are there but it is not "
        "loaded yet (early in the boot).", kind="seconds", default=10.0, show_default=True),
    Opt("netns_prefix", ("--netns-prefix",), "VIF_ROUTE_NETNS_PREFIX",
        "Prefix of the namespace a mapped vif gets (its name is PREFIX + VIF).", default=""),
    Opt("type_if", ("--type-if",), "type_if", "Xen device kind (Xen passes type_if=...).", kind="choice",
        choices=("vif", "tap"), default="vif", show_default=True),
    Opt("xenbus_path", ("--xenbus-path",), "XENBUS_PATH",
        "xenstore backend path of the vif, backend/vif/D/N or /local/domain/X/backend/vif/D/N; "
        "inputs are read and status written there."),
)

DNS = (
    DNS1,
    DNS2,
    Opt("dns6_1", ("--dns6-1",), "VIF_ROUTE_DNS6_1",
        "Virtual IPv6 DNS 1 [default: qubesdb /qubes-netvm-primary-dns6]."),
    Opt("dns6_2", ("--dns6-2",), "VIF_ROUTE_DNS6_2",
        "Virtual IPv6 DNS 2 [default: qubesdb /qubes-netvm-secondary-dns6]."),
    Opt("resolv_conf", ("--resolv-conf",), "QUBES_RESOLV_CONF",
        "Where the upstream resolvers are read (nameserver lines); when it names 127.0.0.53, "
        "systemd-resolved is asked over D-Bus.", default="/etc/resolv.conf", show_default=True),
    Opt("firewall_flag", ("--firewall-flag",), "QUBES_FIREWALL_FLAG",
        "When this file exists, qubes-firewall.service is reloaded after a change.",
        default="/run/qubes-service/qubes-firewall", show_default=True),
    *COMMON,
)

EVENT = (*VIF, *COMMON)  # the options of online, offline, add, remove and check
INIT = (
    Opt("gateway6", ("--gateway6",), "VIF_ROUTE_GATEWAY6",
        "Route IPv6 for the VMs [default: when qubesdb has /qubes-netvm-gateway6]."),
    *COMMON,
)


class _FromParams:
    @classmethod
    def from_params(cls, params: dict, **fixed):
        """The record from click's values (by field name); `fixed` sets the other fields."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params and f.name not in fixed},
                   **fixed)


@dataclass(frozen=True)
class RunOptions(_FromParams):
    """How a command runs: the options every command takes (the rows of COMMON)."""

    dry_run: bool = False
    verbose: bool = False
    backend: str = "auto"
    lock_file: str = DEFAULT_LOCK
    lock_timeout: float = 60.0
    tool_timeout: float = 10.0


@dataclass(frozen=True)
class VifArgs(_FromParams):
    """What the command line and the environment said for a vif event (raw text, not
    yet parsed): the command, then one field per row of ARGS and VIF."""

    command: str
    vif: str | None = None
    addresses: tuple[str, ...] | None = None
    mac: str | None = None
    gateway: str | None = None
    gateway6: str | None = None
    dns1: str | None = None
    dns2: str | None = None
    harden: bool | None = None
    hooks_dir: str = "/rw/config/network-hooks.d"
    hook_timeout: float = 10.0
    visible_ip: str | None = None
    visible_gateway: str | None = None
    mapped_wait: float = 5.0
    base_wait: float = 10.0
    netns_prefix: str = ""
    type_if: str = "vif"
    xenbus_path: str | None = None
