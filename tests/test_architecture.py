"""The architecture: dependencies point one way (command line -> commands -> library), without cycles or imports
hidden in functions; every module imports on its own in a fresh process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import surm

ROOT = Path(surm.__file__).parent
#: The command line: it may import anything.
CLI = ("surm.cli", "surm.__main__")
#: The commands: they may import the library, never the command line.
COMMANDS = "surm.commands"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def surm_module(name: str) -> str | None:
    """The surm module that ``name`` (a module or a name inside one) refers to, or None if it is not surm's."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported surm module, line, whether the import is inside a function) of every import in ``module``."""
    path = MODULES[module]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = (resolve(module, path.name == "__init__.py", child.level, child.module) if child.level
                        else child.module or "")
                names = [f"{base}.{alias.name}" for alias in child.names]
            for name in names:
                target = surm_module(name)
                if target is not None and target != module:
                    found.append((target, child.lineno, in_function))
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def layer(module: str) -> str:
    if module in CLI:
        return "cli"
    return "commands" if module == COMMANDS or module.startswith(COMMANDS + ".") else "library"


def test_dependencies_point_from_the_command_line_to_the_commands_to_the_library():
    allowed = {"cli": {"cli", "commands", "library"}, "commands": {"commands", "library"}, "library": {"library"}}
    wrong = [f"{m}:{line} imports {t} ({layer(m)} -> {layer(t)})" for m in MODULES for t, line, _ in imports(m)
             if layer(t) not in allowed[layer(m)]]
    assert not wrong


def test_no_surm_module_is_imported_inside_a_function():
    hidden = [f"{m}:{line} imports {t}" for m in MODULES for t, line, in_function in imports(m) if in_function]
    assert not hidden


def test_there_is_no_import_cycle():
    graph = {m: {t for t, _, _ in imports(m)} for m in MODULES}
    state: dict[str, str] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def dependency_order() -> list[str]:
    """Every module after the modules it imports (a topological order of the import graph)."""
    graph = {m: {t for t, _, _ in imports(m)} for m in MODULES}
    order: list[str] = []

    def place(module: str) -> None:
        if module not in order:
            for dependency in sorted(graph[module]):
                if dependency not in order:
                    place(dependency)
            order.append(module)

    for module in sorted(graph):
        place(module)
    return order


@pytest.mark.slow  # a fresh interpreter
def test_every_module_imports_in_dependency_order_in_a_fresh_process():
    """A new interpreter imports each module after its dependencies, leaves first: each import must succeed with only
    what it declares already loaded (a module that works only after some other import would fail here)."""
    order = [m for m in dependency_order() if m != "surm.__main__"]  # running it is the command line
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
