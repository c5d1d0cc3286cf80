"""File-backed stand-ins for xenstore and qubesdb (tests only).

Each key is one file in $FAKE_XENSTORE_DIR or $FAKE_QUBESDB_DIR, named by the
key with every character but ASCII letters, digits and `_.-~` percent-encoded
(its UTF-8 bytes, uppercase hex: urllib.parse.quote(key, safe=""), which the
tests use, without importing urllib, ~7 ms of each stand-in's start); the file
holds the value with no trailing newline.  Writes are atomic (rename).
A relative xenstore path is resolved as xenstored does, against the caller's
home /local/domain/<own domid>/ ($FAKE_XENSTORE_DOMID, default 0).
"""

import os
import sys

_UNQUOTED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def quote(key: str) -> str:
    """urllib.parse.quote(key, safe=""): a key that is not UTF-8 fails alike (UnicodeEncodeError)."""
    return "".join(chr(byte) if byte in _UNQUOTED else f"%{byte:02X}" for byte in key.encode("utf-8"))


def key_file(directory: str, key: str) -> str:
    return os.path.join(directory, quote(key))


def read(directory: str, key: str):
    try:
        with open(key_file(directory, key), encoding="utf-8", errors="surrogateescape") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def write(directory: str, key: str, value: str) -> None:
    os.makedirs(directory, exist_ok=True)
    path = key_file(directory, key)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write(value)
    os.replace(tmp, path)


def store(env: str) -> str:
    directory = os.environ.get(env)
    if not directory:
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: {env} is not set\n")
        sys.exit(1)
    return directory


def xenstore_key(path: str) -> str:
    """The absolute xenstore path that `path` names (xenstored's rule for a relative one)."""
    if path.startswith("/"):
        return path
    domid = os.environ.get("FAKE_XENSTORE_DOMID") or "0"
    return f"/local/domain/{domid}/{path}"
