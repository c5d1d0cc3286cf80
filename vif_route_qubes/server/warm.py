"""The server's warm-up and its view of the installed code.

load() imports click, pyroute2, sh, every module of both our packages and
every module their code imports (also the imports inside functions, found
in the source), so that a forked child imports nothing.  It only imports:
no netlink socket, thread or event loop exists before a fork.

fingerprint() is what a request compares: the (mtime, size, inode) of the
interpreter, of our modules and of the libraries' packages.  An upgrade changes it, and the
server refuses and exits rather than serve old code with new files beside.
"""

import ast
import functools
import gc
import importlib
import os
import pkgutil
import sys
from collections.abc import Iterator

from vif_route_qubes.server.commands import served

OWN_PACKAGE = __name__.split(".")[0]
LIBRARIES = ("click", "pyroute2", "sh")


@functools.cache
def packages() -> tuple[str, ...]:
    """This package and those of the commands it serves (the DNS command's)."""
    return tuple(dict.fromkeys([OWN_PACKAGE, *(module.split(".")[0] for module in served().values())]))


def _our_modules() -> list[str]:
    names = []
    for package in packages():
        module = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(module.__path__, package + "."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return names


def _imports_in(path: str) -> set[tuple[str, tuple[str, ...]]]:
    """(module, names) of every absolute import statement in a source file."""
    try:
        with open(path, "rb") as handle:
            tree = ast.parse(handle.read(), path)
    except (OSError, SyntaxError, ValueError):
        return set()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(alias.name, ()) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add((node.module, tuple(alias.name for alias in node.names)))
    return found


def load() -> Iterator[None]:
    """The warm-up, one import at a time: it yields before each (the server's
    loop turns there; never in the middle of an import, so a child forked then
    finds no half-made module)."""
    for library in LIBRARIES:
        yield
        importlib.import_module(library)
    wanted = set()
    for name in _our_modules():
        yield
        module = importlib.import_module(name)
        wanted |= _imports_in(getattr(module, "__file__", "") or "")
    for name, attrs in sorted(wanted):
        yield
        try:
            module = importlib.import_module(name)
            for attr in attrs:
                getattr(module, attr, None)  # pyroute2 loads some classes on first access
        except Exception:  # noqa: BLE001  (an optional import that fails in the child too)
            pass
    gc.collect()
    gc.freeze()  # the children's garbage collector leaves these pages shared


def loaded_files(early: bool = False) -> list[str]:
    """The interpreter, every loaded module file of ours and the libraries'
    packages (their __init__: an upgrade rewrites it too), taken once after
    load(); about 50 stats a request (all 440 loaded modules would cost 4 ms).
    `early` (before the warm-up, which reads the served commands' packages):
    this package's, the only one loaded then."""
    tops = (OWN_PACKAGE,) if early else packages()
    files = {os.path.realpath(sys.executable)}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        top = name.split(".")[0]
        if path and (top in tops or name in LIBRARIES):
            files.add(path)
    return sorted(files)


def fingerprint(files: list[str]) -> tuple:
    marks = []
    for path in files:
        try:
            st = os.stat(path)
            marks.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            marks.append((path, None))
    return tuple(marks)
