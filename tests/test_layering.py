"""The package's dependencies run one way (README, Architecture):

    foundation (errors, metrics, tasks) ← config ← store ← admission ← ledger ← billing ← http
    ← runtime ← cli

A module imports only from its own package or from packages to its left, and no import cycle
exists anywhere, ``TYPE_CHECKING`` imports included: the graph is read with ``ast``, so an
import that only a type checker sees counts like any other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"
# Left to right. A top-level module is a layer of its own; `sidecar` itself holds the version.
LAYERS = (
    ("sidecar", "sidecar.errors", "sidecar.metrics", "sidecar.tasks"),
    ("sidecar.config",),
    ("sidecar.store",),
    ("sidecar.admission",),
    ("sidecar.ledger",),
    ("sidecar.billing",),
    ("sidecar.http",),
    ("sidecar.runtime",),
    ("sidecar.cli", "sidecar.__main__"),
)
FOUNDATION = LAYERS[0]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every sidecar module `name` imports, at any depth of its body (TYPE_CHECKING included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("sidecar"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            if not base.startswith("sidecar"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in known else base


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports_of(name, path, known)) - {name} for name, path in known.items()}


def layer(name: str) -> int:
    for index, members in enumerate(LAYERS):
        if any(name == member or name.startswith(member + ".") for member in members if member != "sidecar"):
            return index
    if name == "sidecar":
        return 0
    raise AssertionError(f"{name} is in no layer: add its package to LAYERS and README's Architecture")


def test_every_module_is_in_a_layer() -> None:
    for name in modules():
        layer(name)


def test_imports_run_right_to_left_only() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if layer(target) > layer(name)
    ]
    assert wrong == []


def test_foundation_modules_import_only_the_errors() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        if name in FOUNDATION
        for target in targets
        if target not in ("sidecar.errors", "sidecar")
    ]
    assert wrong == []


def test_no_import_cycle() -> None:
    edges = graph()
    cycles = [component for component in _strongly_connected(edges) if len(component) > 1]
    assert cycles == []


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative enough for a package of this size."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from sidecar.http import proxy\n", {"sidecar.http.proxy"}),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sidecar.http.app import x\n",
            {"sidecar.http.app"},
        ),
        ("from . import keys\n", {"sidecar.store.redis.keys"}),
    ],
)
def test_the_reader_sees_every_form_of_import(tmp_path: Path, source: str, expected: set[str]) -> None:
    path = tmp_path / "store.py"
    path.write_text(source)
    assert set(imports_of("sidecar.store.redis.store", path, modules())) == expected
