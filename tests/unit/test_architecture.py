"""The package's shape (issue #17): no import cycle among its modules, and every module and class small enough
to read in one sitting. Exceptions to the size limits are listed, with their reasons, in docs/architecture.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "python" / "treasure_engine"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300
EXTENSIONS = {"treasure_engine._core"}
"""Modules that are no Python source (the Rust extension): they import nothing of the package."""


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file: at the top, inside functions, under
    TYPE_CHECKING. `from a.b import c` counts as importing `a.b.c` when that is a module, else `a.b`."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in modules or sub in EXTENSIONS else module)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert len(graph) > 40, "the package's modules were not found"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles_hidden_in_functions(tmp_path: Path) -> None:
    """The check itself: a function-local import closes a cycle as much as a top-level one does."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert _cycle(graph) == ["a", "b", "a"]


def test_the_dlq_never_imports_the_producer() -> None:
    graph = _graph()
    for name, imported in graph.items():
        if name.startswith("treasure_engine.dlq"):
            assert not {m for m in imported if m.startswith("treasure_engine.producer")}, name


def _exceptions() -> dict[str, str]:
    """`path::Class` (or `path`) -> reason, from the size-limit exceptions table of docs/architecture.md."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Exceptions to the size limits", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([^`]+)` \| [^|]+ \| (.+?) \|$", section, re.M))


def _sizes() -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        sizes[rel] = text.count("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                sizes[f"{rel}::{node.name}"] = node.end_lineno - start + 1 if node.end_lineno else 0
    return sizes


def test_no_module_or_class_over_the_size_limits() -> None:
    exceptions = _exceptions()
    over = []
    for where, lines in _sizes().items():
        limit = MAX_CLASS_LINES if "::" in where else MAX_MODULE_LINES
        if lines > limit and where not in exceptions:
            over.append(f"{where}: {lines} lines (limit {limit})")
    assert not over, "over the size limits (split them, or list them with a reason in docs/architecture.md):\n" + (
        "\n".join(over)
    )


def test_every_listed_exception_is_still_needed() -> None:
    sizes = _sizes()
    for where, reason in _exceptions().items():
        assert reason.strip(), f"{where}: give the reason"
        limit = MAX_CLASS_LINES if "::" in where else MAX_MODULE_LINES
        assert where in sizes, f"{where} is listed in docs/architecture.md but does not exist"
        assert sizes[where] > limit, f"{where} is within the limit now: remove it from the exceptions"


@pytest.mark.parametrize("module", ["_core", "errors"])
def test_leaves_import_nothing_of_the_package(module: str) -> None:
    """The bottom of the dependency direction (cli, _demo -> engine -> producer, consumer, monitoring, dlq ->
    kinesis, breaker, config -> _core)."""
    graph = _graph()
    name = f"treasure_engine.{module}"
    assert not graph.get(name, set()) - {"treasure_engine._core"}
