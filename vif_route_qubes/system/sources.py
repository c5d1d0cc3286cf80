"""Reading xenstore and qubesdb through their command-line tools.

Both tools are called once for several keys.  What they print is untrusted
text: it is returned raw here and parsed strictly by the callers.
"""

import re

from vif_route_qubes.errors import VifError
from vif_route_qubes.system import tools

TOOL_TIMEOUT = 10.0  # seconds (--tool-timeout); a hung xenstore or qubesdb must not hang udev
_XS_MISSING = re.compile(r"couldn't read path (\S+)")


def set_timeout(seconds: float) -> None:
    global TOOL_TIMEOUT
    TOOL_TIMEOUT = seconds


def _run(argv: list[str]) -> tools.Result:
    """Run a tool, its exit status left to the caller; on a timeout its whole group is killed."""
    return tools.run(argv, timeout=TOOL_TIMEOUT, check=False)


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
        if result.exit_code == 0:
            if len(lines) < len(pending):
                raise VifError(f"xenstore-read printed {len(lines)} lines for {len(pending)} paths")
            values.update(zip(pending, lines))
            return values
        missing = _XS_MISSING.search(result.stderr)
        if not missing or missing.group(1) not in pending:
            raise VifError(f"xenstore-read failed: {result.stderr.strip() or 'exit ' + str(result.exit_code)}")
        index = pending.index(missing.group(1))
        values.update(zip(pending[:index], lines[:index]))
        pending = pending[index + 1 :]
    return values


def xenstore_write(pairs: dict[str, str]) -> None:
    argv = ["xenstore-write"]
    for path, value in pairs.items():
        argv += [path, value]
    result = _run(argv)
    if result.exit_code != 0:
        raise VifError(f"xenstore-write failed: {result.stderr.strip() or 'exit ' + str(result.exit_code)}")


def qubesdb_read(paths: list[str]) -> dict[str, str]:
    """Values of the qubesdb keys that exist, from one `qubesdb-read -f` call.

    With -f every value comes as `PATH = value` in the order asked, and each
    missing key is named on stderr (`Failed to read PATH`), so exactly one
    line is due for each key found.  A value holding a line break (which could
    pass for another key's line) makes one line too many and is refused, as
    is any line that is not the next expected `PATH = `.
    """
    if not paths:
        return {}
    result = _run(["qubesdb-read", "-f", *paths])
    if result.exit_code not in (0, 2):
        raise VifError(f"qubesdb-read failed: {result.stderr.strip() or 'exit ' + str(result.exit_code)}")
    missing = {line[len("Failed to read "):] for line in result.stderr.splitlines()
               if line.startswith("Failed to read ")}
    found = [path for path in paths if path not in missing]
    text = result.stdout[:-1] if result.stdout.endswith("\n") else result.stdout
    lines = text.split("\n") if text else []
    if len(lines) != len(found) or (result.exit_code == 2) == (len(found) == len(paths)):
        raise VifError(f"qubesdb-read printed {len(lines)} lines for {len(found)} keys found of {len(paths)}"
                       " (a value with a line break in it?)")
    values: dict[str, str] = {}
    for path, line in zip(found, lines):
        if not line.startswith(path + " = "):
            raise VifError(f"qubesdb-read printed an unexpected line {line[:60]!r}")
        values[path] = line[len(path) + 3 :]
    return values
