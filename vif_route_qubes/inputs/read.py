"""Turning the command line, the environment, xenstore and qubesdb into VifInputs.

The first source that has a value wins (command line, then environment, then
xenstore, then qubesdb).  Every value is parsed strictly before it is kept.
"""

import os
import re
import time

from vif_route_qubes import logsetup
from vif_route_qubes.errors import InputError, VifError
from vif_route_qubes.inputs import parse
from vif_route_qubes.model import VifInputs
from vif_route_qubes.optspec import VifArgs
from vif_route_qubes.plan.mapped import Mapped
from vif_route_qubes.system import sources
from vif_route_qubes.system.tools import ToolMissing

QDB_GATEWAY = "/qubes-netvm-gateway"
QDB_GATEWAY6 = "/qubes-netvm-gateway6"
QDB_DNS = ("/qubes-netvm-primary-dns", "/qubes-netvm-secondary-dns")
QDB_HARDEN = "/qubes-service/harden-network-interfaces"


def given_addresses(arguments: tuple[str, ...]) -> tuple[str, ...] | None:
    """The VM's addresses as given: the arguments, else Xen's variable `ip`; None
    when neither gives any (then xenstore is asked)."""
    env_ip = os.environ.get("ip")
    return arguments or (tuple(env_ip.split()) if env_ip and env_ip.strip() else None)


def list_hooks(folder: str) -> tuple[str, ...]:
    """Executable regular files of the hooks folder, in name order."""
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return ()
    except OSError as exc:
        raise VifError(f"cannot read hooks folder {folder}: {exc.strerror}") from None
    paths = (os.path.join(folder, name) for name in names if not name.startswith("."))
    return tuple(p for p in paths if os.path.isfile(p) and os.access(p, os.X_OK))


def harden_flag(text: str | None) -> bool:
    """qubesdb's hardening flag: 1 on; 0, empty or absent off; anything else off, with a warning."""
    value = parse.service_flag(text)
    if value is None:
        logsetup.get_logger().warning("qubesdb %s is %s, not 1 or 0: hardening stays off",
                                      QDB_HARDEN, parse.shown(text))
        return False
    return value


def qubesdb(keys: list[str]) -> dict[str, str]:
    """The keys qubesdb has; none without qubesdb (a Xen driver domain without Qubes)."""
    try:
        return sources.qubesdb_read(keys)
    except ToolMissing:
        return {}  # a Xen driver domain without Qubes: only options apply


def read_vif_inputs(args: VifArgs) -> VifInputs:
    tap = args.type_if == "tap"
    if not args.vif:
        raise InputError("no interface: give VIF as an argument or set vif in the environment")
    vif, domid = parse.vif_name(args.vif, tap=tap)
    xenbus = parse.xenbus_path(args.xenbus_path, vif) if args.xenbus_path else None

    online = args.command == "online"
    hooks = list_hooks(args.hooks_dir)
    # An offline learns what to undo from the kernel (app/vif.py): qubesdb is never
    # asked, xenstore only for what the kernel cannot tell (CONTRACT section 1).
    want = [key for key, have in ((QDB_GATEWAY, args.gateway), (QDB_GATEWAY6, args.gateway6),
                                  (QDB_DNS[0], args.dns1), (QDB_DNS[1], args.dns2),
                                  (QDB_HARDEN, args.harden)) if have is None] if online else []
    xs: dict[str, str] = {}
    keys = _xenstore_keys(args, vif, bool(hooks)) if xenbus else ()
    if keys:
        # One call: xenstore-read stops at the first missing path, and the keys that
        # may be missing come last (vifname is set only when the toolstack renames).
        xs = sources.xenstore_read([f"{xenbus}/{k}" for k in keys])
        xs = {path.rsplit("/", 1)[1]: value for path, value in xs.items()}

    rename_from = None
    if xs.get("vifname") and xs["vifname"] != vif:
        new, domid = parse.vif_name(xs["vifname"], tap=tap, source=f"{vif}: xenstore vifname")
        vif, rename_from = new, vif

    if args.addresses is not None:
        addrs = tuple(parse.address(a, source=f"{vif}: address") for a in args.addresses)
        addrs = tuple(dict.fromkeys(addrs))
    elif "ip" in xs:
        addrs = parse.address_list(xs["ip"], source=f"{vif}: xenstore ip")
    else:
        addrs = ()
    for addr in addrs:
        if addr.version == 6 and (addr.is_link_local or addr.ipv4_mapped):
            raise InputError(f"{vif}: address {addr} is not a routable IPv6 address")

    mac_text = args.mac if args.mac is not None else xs.get("mac")
    mac = parse.mac(mac_text, source=f"{vif}: MAC") if mac_text is not None else None
    dev_type = parse.device_type(xs["type"], source=f"{vif}: xenstore type") if "type" in xs else args.type_if

    real = next((a for a in addrs if a.version == 4), None)
    mapped_keys = _mapped_keys(real) if real and args.visible_ip is None and online else ()
    qdb = qubesdb(want + list(mapped_keys)) if want or mapped_keys else {}

    def pick(option, key, version, what):
        text = option if option is not None else qdb.get(key)
        if text is None or text == "":
            return None
        return parse.address_of(text, version, source=f"{vif}: {what}")

    dns = tuple(d for d in (pick(args.dns1, QDB_DNS[0], 4, "DNS 1"), pick(args.dns2, QDB_DNS[1], 4, "DNS 2")) if d)
    gateway = pick(args.gateway, QDB_GATEWAY, 4, "gateway")
    mapped = None
    if args.visible_ip:  # an empty --visible-ip says "not mapped" without asking qubesdb
        mapped = _mapped(vif, real, args.visible_ip, args.visible_gateway)
    elif mapped_keys:
        mapped = _mapped_fromqubesdb(vif, real, qdb, mapped_keys, args.mapped_wait)
    if mapped and gateway is None:
        raise InputError(f"{vif}: a mapped address needs the gateway of the vif")
    if not _NETNS_PREFIX.fullmatch(args.netns_prefix):
        raise InputError(f"namespace prefix {args.netns_prefix!r} is not a short name")
    return VifInputs(
        command=args.command,
        vif=vif,
        domid=domid,
        addresses=addrs,
        mac=mac,
        dev_type=dev_type,
        gateway=gateway,
        gateway6=pick(args.gateway6, QDB_GATEWAY6, 6, "IPv6 gateway"),
        dns=dns,
        # offline: None unless given, the kernel tells (app/vif.py)
        harden=args.harden if args.harden is not None or not online else harden_flag(qdb.get(QDB_HARDEN)),
        hooks=hooks,
        hook_timeout=args.hook_timeout,
        xenbus_path=xenbus,
        rename_from=rename_from,
        mapped=mapped,
        netns_prefix=args.netns_prefix,
    )


def _xenstore_keys(args: VifArgs, vif: str, hooks: bool) -> tuple[str, ...]:
    """What an event asks xenstore.  online: the VM's addresses and MAC (unless
    given), the device type when a hook will get it, and `vifname`.  offline:
    the type for a hook, and `vifname` only when no interface has the event's
    name (the toolstack may have renamed it, which the kernel cannot tell)."""
    if args.command == "online":
        wanted = [k for k, have in (("ip", args.addresses), ("mac", args.mac)) if have is None]
        return (*wanted, *(("type",) if hooks else ()), "vifname")
    renamed = not os.path.isdir(f"/proc/sys/net/ipv4/conf/{vif}")
    return (*(("type",) if hooks else ()), *(("vifname",) if renamed else ()))


_NETNS_PREFIX = re.compile(r"[A-Za-z0-9_.-]{0,32}")
MAPPED_POLL = 0.1  # seconds between two looks at qubesdb while waiting


def _mapped_keys(real) -> tuple[str, str, str]:
    """(announcement, visible-ip, visible-gateway) keys for the VM's real address."""
    base = f"/mapped-ip/{real}"
    return base, f"{base}/visible-ip", f"{base}/visible-gateway"


def _mapped(vif, real, visible_text, gateway_text):
    """Mapped(real, visible, visible gateway), or None when visible == real."""
    if real is None:
        raise InputError(f"{vif}: a mapped address needs an IPv4 address of the VM")
    visible = parse.address_of(visible_text, 4, source=f"{vif}: visible address")
    if not gateway_text:
        raise InputError(f"{vif}: visible address {visible} has no visible gateway")
    visible_gw = parse.address_of(gateway_text, 4, source=f"{vif}: visible gateway")
    if visible == real:
        return None
    if visible_gw == visible:
        raise InputError(f"{vif}: visible gateway {visible_gw} is the visible address itself")
    return Mapped(real, visible, visible_gw)


def _mapped_fromqubesdb(vif, real, qdb, keys, wait: float):
    """Mapped entries from qubesdb, waiting for late ones (qubes-issues #9318).

    Rule: dom0 may write the two entries after the hotplug script started.  When
    qubesdb announces a mapped VM (the key /mapped-ip/<ip4> exists) or holds only
    one of the two entries, we poll qubesdb until both are there, at most `wait`
    seconds, then fail rather than configure the VM without its mapping.  With
    neither the announcement nor an entry, the VM is not mapped: no wait.
    """
    announce, visible_key, gateway_key = keys
    deadline = time.monotonic() + wait
    while True:
        have = [k in qdb for k in (visible_key, gateway_key)]
        if all(have):
            return _mapped(vif, real, qdb[visible_key], qdb[gateway_key])
        if not any(have) and announce not in qdb:
            return None
        if time.monotonic() >= deadline:
            raise VifError(f"{vif}: mapped address entries for {real} did not appear in qubesdb "
                           f"within {wait:g} s")
        time.sleep(MAPPED_POLL)
        qdb = qubesdb(list(keys))
