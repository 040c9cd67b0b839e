"""The shape of the package: no import cycle, the emulator stands alone, the faces stay faces.

Read from the source with :mod:`ast` (nothing is imported): every ``import`` of a
``bulkoffboard`` module, at module level or inside a function (a lazy import is still a
dependency), except under ``if TYPE_CHECKING:`` (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bulkoffboard"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that the module at ``path`` imports."""
    found: set[str] = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in modules and name != this}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                strong(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            strong(node)
    return found


def without_package_init(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The package's ``__init__`` re-exports the API: every module's import of a sibling
    runs it first, which is the package, not a dependency of the module on the API."""
    return {
        name: {m for m in deps if m != "bulkoffboard"}
        for name, deps in edges.items()
        if name != "bulkoffboard"
    }


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(without_package_init(graph())) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check itself: a made-up graph with a cycle is caught."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_emulator_imports_nothing_of_the_tool() -> None:
    edges = graph()
    for name, deps in edges.items():
        if name.startswith("bulkoffboard.emulator"):
            outside = {d for d in deps if not d.startswith("bulkoffboard.emulator")}
            assert outside == set(), f"{name} imports {outside}"


@pytest.mark.parametrize(
    "module",
    [
        "bulkoffboard.jobs",
        "bulkoffboard.api",
        "bulkoffboard.tenants",
        "bulkoffboard.reports",
        "bulkoffboard.history",
        "bulkoffboard.export",
    ],
)
def test_the_application_layer_never_imports_a_face(module: str) -> None:
    """Data flows one way: the command line and the demo use the application, never the
    reverse."""
    deps = graph()[module]
    assert not deps & {"bulkoffboard.cli", "bulkoffboard.demo"}
