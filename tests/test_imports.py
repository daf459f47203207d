"""The shape of the house, read from the source (ast): import cycles, the layer order of DESIGN.md,
private names, and the name ``F``.

Every import statement counts, at the top of a module or inside a function, and so does a literal
``importlib.import_module("normkit....")`` (how the triton backend reaches the kernels).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "normkit"

# DESIGN.md, "Layout": imports run one way, functional <- backends <- nn <- distributed <- tools <-
# lab <- cli; a unit imports only units before it. Placed among them: errors and the float64
# reference (torch-free, below everything), the factory (builds nn and distributed layers), the
# package's public API (normkit/__init__, which tools and the lab use as a user would), and
# benchmark (the `normkit bench` machinery the cli calls).
LAYERS = (
    "errors",
    "reference",
    "functional",
    "kernels",
    "backends",
    "nn",
    "distributed",
    "factory",
    "normkit",
    "tools",
    "benchmark",
    "lab",
    "cli",
)
# kernels/ is reached only through the triton backend (and imports triton, which `import normkit`
# must not).
KERNELS_IMPORTERS = {"backends", "kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module a dotted name lives in (``normkit.nn.BatchNorm`` -> ``normkit.nn``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported normkit module, line) for every import in ``module``'s source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        for name in names:
            owner = _owner(name) if name.split(".")[0] == "normkit" else None
            if owner is not None and owner != module:
                yield owner, node.lineno


EDGES = {module: sorted(set(_imports(module, path))) for module, path in MODULES.items()}


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "normkit"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_sees_imports_inside_functions():
    """The parser finds what it must: an import inside a function (the factory's of
    SyncBatchNorm), a literal import_module (the triton backend's), and a cycle."""
    assert "normkit.distributed" in {m for m, _ in EDGES["normkit.factory"]}
    assert "normkit.kernels.ops" in {m for m, _ in EDGES["normkit.backends"]}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = {module: {target for target, _ in edges} for module, edges in EDGES.items()}
    assert _cycles(graph) == []


def test_imports_run_one_way():
    order = {layer: rank for rank, layer in enumerate(LAYERS)}
    assert {_layer(m) for m in MODULES} <= set(order), "a new unit: place it in LAYERS"
    backwards = [
        f"{MODULES[module].relative_to(ROOT)}:{line}: {module} imports {target}"
        for module, edges in EDGES.items()
        for target, line in edges
        if order[_layer(target)] > order[_layer(module)]
    ]
    assert backwards == []


def test_kernels_are_reached_only_through_the_backends():
    reaching = [
        f"{module} imports {target}"
        for module, edges in EDGES.items()
        for target, _ in edges
        if _layer(target) == "kernels" and _layer(module) not in KERNELS_IMPORTERS
    ]
    assert reaching == []


def test_no_module_imports_another_modules_private_name():
    """``from normkit.x import _name`` or ``x._name`` on a normkit module, where ``_name`` is not a
    module: a name its module keeps to itself."""
    found = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> the normkit module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normkit"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in MODULES:
                        aliases[alias.asname or alias.name] = full
                    elif alias.name.startswith("_"):
                        found.append(
                            f"{module}:{node.lineno}: from {node.module} import {alias.name}"
                        )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("normkit") and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and f"{aliases[node.value.id]}.{node.attr}" not in MODULES
            ):
                found.append(f"{module}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == []


@pytest.mark.parametrize("folder", ["src", "tests", "benchmarks"])
def test_normkit_functional_is_never_called_F(folder):
    """``F`` means torch.nn.functional to every reader; normkit's functional forms go by their names
    (``from normkit.functional import batch_norm``) or ``nkf``."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bound = [(a.name, a.asname) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module in ("normkit", "normkit.nn"):
                bound = [(f"normkit.{a.name}", a.asname) for a in node.names]
            else:
                continue
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}"
                for name, asname in bound
                if name == "normkit.functional" and asname == "F"
            ]
    assert found == []
