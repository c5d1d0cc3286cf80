"""Reading xenstore and qubesdb through their command-line tools.

Both tools are called once for several keys.  What they print is untrusted
text: it is returned raw here and parsed strictly by the callers.
"""

import re
import subprocess

from vif_route_qubes.errors import VifError

TOOL_TIMEOUT = 10.0  # seconds; a hung xenstore or qubesdb must not hang udev
_XS_MISSING = re.compile(r"couldn't read path (\S+)")


def _run(argv: list[str], timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout)
    except FileNotFoundError:
        raise VifError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise VifError(f"{argv[0]} did not answer within {timeout:g} s") from None


def xenstore_read(paths: list[str]) -> dict[str, str]:
    """Values of the paths that exist; missing ones are left out.

    xenstore-read stops at the first missing path, so on a miss we read again
    from the path after it: one call when nothing (or only the last key) is
    missing, which is why callers put optional keys last.
    """
    values: dict[str, str] = {}
    pending = list(paths)
    while pending:
        result = _run(["xenstore-read", *pending])
        lines = result.stdout.split("\n")
        if result.returncode == 0:
            if len(lines) < len(pending):
                raise VifError(f"xenstore-read printed {len(lines)} lines for {len(pending)} paths")
            values.update(zip(pending, lines))
            return values
        missing = _XS_MISSING.search(result.stderr)
        if not missing or missing.group(1) not in pending:
            raise VifError(f"xenstore-read failed: {result.stderr.strip() or 'exit ' + str(result.returncode)}")
        index = pending.index(missing.group(1))
        values.update(zip(pending[:index], lines[:index]))
        pending = pending[index + 1 :]
    return values


def xenstore_write(pairs: dict[str, str]) -> None:
    argv = ["xenstore-write"]
    for path, value in pairs.items():
        argv += [path, value]
    result = _run(argv)
    if result.returncode != 0:
        raise VifError(f"xenstore-write failed: {result.stderr.strip() or 'exit ' + str(result.returncode)}")


def qubesdb_read(paths: list[str]) -> dict[str, str]:
    """Values of the qubesdb keys that exist, in one `qubesdb-read -f -q` call.

    With -f every value comes as `PATH = value` in the order asked, so a key
    that is missing (no line) cannot shift the others.  A line that is not the
    next expected `PATH = ` is refused rather than guessed at.
    """
    if not paths:
        return {}
    result = _run(["qubesdb-read", "-f", "-q", *paths])
    if result.returncode not in (0, 2):
        raise VifError(f"qubesdb-read failed: {result.stderr.strip() or 'exit ' + str(result.returncode)}")
    values: dict[str, str] = {}
    remaining = list(paths)
    text = result.stdout[:-1] if result.stdout.endswith("\n") else result.stdout
    for line in text.split("\n") if text else []:
        for index, path in enumerate(remaining):
            if line.startswith(path + " = "):
                values[path] = line[len(path) + 3 :]
                remaining = remaining[index + 1 :]
                break
        else:
            raise VifError(f"qubesdb-read printed an unexpected line {line[:60]!r}")
    return values
