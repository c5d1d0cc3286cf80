"""Every import points down the layers the README draws, no import is made
inside a function without saying why, and the option records hold the option
table's fields.  Read with `ast` from the sources: nothing is imported."""

import ast
import dataclasses
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("vif_route_qubes", "setup_dnat_to_ns")

# Top to bottom.  A module may import its own layer (no circle, see below) and any lower one.
LAYERS = ("cli", "server", "client", "app", "inputs/facts/check", "plan", "system", "model")

# Module (or package prefix) -> layer; the longest prefix wins.  One line of reason each.
WHERE = {
    # The light entry points: started at every event, they import only protocol, timing and logsetup
    # (cli.main and the DNS cli by name, through importlib); the served child imports note_mode.
    "vif_route_qubes.server.client": "client",
    "setup_dnat_to_ns.client": "client",
    "vif_route_qubes.server.protocol": "model",  # the wire format: data the client, child and loop share
    "vif_route_qubes.cli": "cli",
    "vif_route_qubes.__main__": "cli",
    "setup_dnat_to_ns.cli": "cli",
    "setup_dnat_to_ns.commands": "cli",
    "setup_dnat_to_ns.__main__": "cli",
    # The server forks the commands' click entries (found by entry point name, not imported).
    "vif_route_qubes.server": "server",
    "vif_route_qubes.app": "app",
    "setup_dnat_to_ns.run": "app",  # sequences a DNS run: inputs, lock, facts, plan, apply
    "vif_route_qubes.inputs": "inputs/facts/check",
    "vif_route_qubes.facts": "inputs/facts/check",
    "vif_route_qubes.check": "inputs/facts/check",
    "setup_dnat_to_ns.facts": "inputs/facts/check",  # reads nft and /proc/sys
    "setup_dnat_to_ns.resolvers": "inputs/facts/check",  # reads resolv.conf and systemd-resolved
    "setup_dnat_to_ns.check": "inputs/facts/check",
    "vif_route_qubes.plan": "plan",
    "setup_dnat_to_ns.plan": "plan",
    "setup_dnat_to_ns.nft_dns": "plan",  # the DNS chain's nft lines, pure
    # The steps and their element changes are the data plan hands to system/apply: below system.
    "vif_route_qubes.plan.batch": "model",
    "vif_route_qubes.plan.elements": "model",
    "vif_route_qubes.system": "system",
    "vif_route_qubes.logsetup": "system",  # stderr and syslog, used from system up
    "vif_route_qubes.timing": "model",  # a clock, imported first by the client: nothing of ours
    "vif_route_qubes.model": "model",
    "vif_route_qubes.optspec": "model",  # the option table and its records: cli builds them, app reads them
    "vif_route_qubes.errors": "model",
    "vif_route_qubes": "model",  # __init__: the version
    "setup_dnat_to_ns": "model",  # __init__: nothing but a docstring and the version
}

# An import inside a function is allowed only where the start-up cost of a heavy
# library (click, pyroute2, sh, json for the light client) is the reason, said in a
# `start-up:` comment on its line or the line above.
REASON = "start-up:"


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> str:
    for prefix in sorted(WHERE, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return WHERE[prefix]
    raise AssertionError(f"{module} is in no layer: add it to WHERE")


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: pathlib.Path):
    """(imported module of ours, line, inside a function) of every import that runs."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue  # for type checkers only: never runs
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, in_function
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([child.module] if child.module else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    yield (full if full in MODULES else base), child.lineno, in_function
            yield from walk(child, inside)

    yield from walk(tree, False)


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


GRAPH = {name: [(target, line, fn) for target, line, fn in _imports(name, path)] for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) not in LAYERS] == []


def test_every_import_points_down_or_sideways():
    wrong = []
    for name, imports in GRAPH.items():
        for target, line, _ in imports:
            if _ours(target) and LAYERS.index(layer_of(target)) < LAYERS.index(layer_of(name)):
                wrong.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {layer_of(name)} {name} -> "
                             f"{layer_of(target)} {target}")
    assert wrong == []


def test_no_import_circle():
    edges = {name: {t for t, _, _ in imports if t in MODULES and t != name} for name, imports in GRAPH.items()}
    # A package's __init__ is imported before its modules: not an edge back.
    edges = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in edges.items()}
    state, circles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_imports_inside_functions_say_why():
    unexplained = []
    for name, imports in GRAPH.items():
        lines = MODULES[name].read_text().splitlines()
        for target, line, in_function in imports:
            if in_function and REASON not in lines[line - 1] and REASON not in lines[line - 2]:
                unexplained.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {target}")
    assert unexplained == []


def test_the_checker_sees_a_wrong_arrow_and_a_circle(tmp_path):
    """The checks above can fail: an upward import, a circle and an unexplained lazy import are found."""
    path = tmp_path / "plan_mod.py"
    path.write_text("from vif_route_qubes.app import vif\n\ndef f():\n    import vif_route_qubes.cli\n")
    found = list(_imports("vif_route_qubes.plan.example", path))
    assert ("vif_route_qubes.app.vif", 1, False) in found and ("vif_route_qubes.cli", 4, True) in found
    assert LAYERS.index(layer_of("vif_route_qubes.app.vif")) < LAYERS.index(layer_of("vif_route_qubes.plan.x"))


# -- the option records hold the option table's fields -----------------------

def _records():
    from vif_route_qubes import optspec

    return [(optspec.RunOptions, (), optspec.COMMON),
            (optspec.VifArgs, ("command",), optspec.ARGS + optspec.VIF)]


@pytest.mark.parametrize("record, head, rows", _records(), ids=lambda v: getattr(v, "__name__", ""))
def test_option_records_have_one_field_per_row_with_its_default_and_type(record, head, rows):
    fields = dataclasses.fields(record)
    assert [f.name for f in fields] == [*head, *(row.dest for row in rows)]
    for field, row in zip(fields[len(head):], rows):
        assert (field.name, field.default, field.type) == (row.dest, row.default, row.type)
    assert record.__dataclass_params__.frozen
