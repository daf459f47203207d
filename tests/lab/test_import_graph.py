"""No import cycle in the lab: the graph of every import between normkit.lab's modules (at the top
of a file, inside functions, under TYPE_CHECKING, and the catalog's discovery of the experiments)
has no cycle, so moving any import to the top of its file cannot break ``import normkit.lab``.

Edges go to the module named (``from normkit.lab import models`` is an edge to normkit.lab.models);
the implicit import of a parent package's ``__init__`` is not an edge, or every package would be a
cycle with its own submodules.
"""

import ast
from pathlib import Path

import normkit.lab

ROOT = Path(normkit.lab.__file__).parent
PACKAGE = "normkit.lab"
EXPERIMENTS = f"{PACKAGE}.experiments"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module"):  # fmt: skip
                targets.add("<dynamic>")
        if "<dynamic>" in targets and EXPERIMENTS in targets:  # the catalog's discovery
            targets |= {m for m in modules if m.startswith(EXPERIMENTS + ".")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_lab_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_imports_inside_functions_and_the_discovery():
    graph = import_graph()
    # experiment.py imports Evaluation helpers inside a function; the catalog discovers every file
    assert f"{PACKAGE}.evaluation" in graph[f"{PACKAGE}.experiment"]
    assert f"{EXPERIMENTS}.placement" in graph[f"{PACKAGE}.catalog"]
    # and a cycle, once added, is found
    graph[f"{PACKAGE}.seeds"].add(f"{PACKAGE}.catalog")
    assert find_cycle(graph) is not None


def test_experiments_import_neither_each_other_nor_the_runner():
    graph = import_graph()
    inside = {"runner", "runfolder", "executors", "trial", "catalog"}
    experiments = [m for m in graph if m.startswith(EXPERIMENTS + ".")]
    assert {f"{EXPERIMENTS}.{n}" for n in ("ioffe2015_mnist", "placement", "batch_size")} <= set(experiments)
    for name in experiments:
        imports = graph[name]
        assert not {i for i in imports if i.startswith(EXPERIMENTS + ".")}, name
        assert not {i for i in imports if i.rpartition(".")[2] in inside}, name
