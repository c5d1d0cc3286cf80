"""Strict parsers for every text that comes from outside the process.

Each returns a typed value or raises InputError with one line that names the
source of the text.  Nothing here touches the system.
"""

import ipaddress
import re

from vif_route_qubes.errors import InputError
from vif_route_qubes.model import VIF_NAME

MAX_DOMID = 32752
IFNAMSIZ = 15  # usable characters of a Linux interface name

# A vif's interface name (model.VIF_NAME); the -emu suffix only where a name from Xen is parsed.
_VIF_RE = re.compile(VIF_NAME.pattern + r"(-emu)?")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# Relative (xl devd, the kernel's uevent: resolved against this domain's home) or absolute.
_XENBUS_RE = re.compile(r"(?:/local/domain/(0|[1-9][0-9]{0,4})/)?backend/vif/(0|[1-9][0-9]{0,4})/(0|[1-9][0-9]{0,4})")
_ADDR_CHARS = re.compile(r"[0-9a-fA-F.:]+")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _show(text: str) -> str:
    """Quote untrusted text for an error message, on one line."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


_PLAIN = re.compile(r"[A-Za-z0-9_.:/-]{1,80}")


def shown(text: str) -> str:
    """Untrusted text as it may appear in a message: as is when plain, quoted otherwise."""
    return text if _PLAIN.fullmatch(text) else _show(text)


def vif_name(text: str, *, tap: bool = False, source: str = "interface") -> tuple[str, int]:
    """Return (name, domid) of `vifD.N` (`vifD.N-emu` for a tap), D <= 32752."""
    match = _VIF_RE.fullmatch(text)
    if not match or len(text) > IFNAMSIZ or bool(match.group(3)) != tap:
        form = "vifD.N-emu" if tap else "vifD.N"
        raise InputError(f"{source} {_show(text)} is not a {form} interface name")
    domid = int(match.group(1))
    if domid > MAX_DOMID:
        raise InputError(f"{source} {_show(text)}: domain id {domid} is above {MAX_DOMID}")
    return text, domid


def address(text: str, *, source: str) -> IPAddress:
    """One IPv4 or IPv6 address, nothing else (no prefix, no scope, no spaces)."""
    if not _ADDR_CHARS.fullmatch(text):
        raise InputError(f"{source} {_show(text)} is not an IP address")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise InputError(f"{source} {_show(text)} is not an IP address") from None
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        raise InputError(f"{source} {_show(text)} is not a unicast host address")
    return addr


def address_of(text: str, version: int, *, source: str) -> IPAddress:
    addr = address(text, source=source)
    if addr.version != version:
        raise InputError(f"{source} {_show(text)} is not an IPv{version} address")
    return addr


def address_list(text: str, *, source: str) -> tuple[IPAddress, ...]:
    """Space-separated addresses (Xen's `ip` key); duplicates are dropped, order kept."""
    if any(not char.isprintable() for char in text):
        raise InputError(f"{source} {_show(text)} has control characters")
    words = text.split(" ")
    words = [word for word in words if word]
    if not words:
        raise InputError(f"{source} is empty")
    seen: dict[IPAddress, None] = {}
    for word in words:
        seen.setdefault(address(word, source=source), None)
    return tuple(seen)


def mac(text: str, *, source: str) -> str:
    value = text.lower()
    if not _MAC_RE.fullmatch(value) or len(text) != 17:
        raise InputError(f"{source} {_show(text)} is not a MAC address")
    if int(value[:2], 16) & 1:
        raise InputError(f"{source} {_show(text)} is a multicast MAC address")
    if value == "00:00:00:00:00:00":
        raise InputError(f"{source} {_show(text)} is the null MAC address")
    return value


def xenbus_path(text: str, vif: str) -> str:
    """XENBUS_PATH of `vif` (vifD.N): `backend/vif/D/N` or `/local/domain/X/backend/vif/D/N`,
    returned as given (xenstore resolves the relative form).  Another device's path
    is refused: it may be another VM's, and nothing may be written there."""
    match = _XENBUS_RE.fullmatch(text)
    if not match:
        raise InputError(f"XENBUS_PATH {_show(text)} is not a Xen vif backend path")
    device = _VIF_RE.fullmatch(vif)
    if not device or match.group(2, 3) != device.group(1, 2):
        raise InputError(f"XENBUS_PATH {_show(text)} is not the backend of {shown(vif)}")
    return text


_TYPE_RE = re.compile(r"[a-z][a-z0-9_-]{0,15}")


def device_type(text: str, *, source: str = "xenstore type") -> str:
    """The `type` key passed to hooks: a short lowercase word (vif, ioemu, ...)."""
    if not _TYPE_RE.fullmatch(text):
        raise InputError(f"{source} {_show(text)} is not a device type word")
    return text


def service_flag(text: str | None) -> bool | None:
    """A qubesdb /qubes-service/ flag, which Qubes writes as 1 or 0: True for 1; False
    for 0, empty or absent; None for anything else (the caller warns, and it is off)."""
    if text is None or text in ("", "0"):
        return False
    return True if text == "1" else None


def xenbus_path_ok(text: str, vif: str) -> bool:
    """Whether `text` is `vif`'s own XENBUS_PATH, so that a failure may be reported there."""
    try:
        xenbus_path(text, vif)
    except InputError:
        return False
    return True
