"""What pyproject.toml declares is true: every runtime dependency is imported by normkit, and the
torch floor is the torch CI tests (the Makefile's TORCH_SPEC, which ``make test`` installs)."""

import ast
import re
from pathlib import Path

import pytest
import torch

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
MODULE_OF = {"scikit-learn": "sklearn", "dask[distributed]": "distributed"}  # distribution -> import name


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~;\s]", requirement, maxsplit=1)[0]


def imported_modules() -> set[str]:
    found = set()
    for path in (ROOT / "src" / "normkit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_every_runtime_dependency_is_imported_by_normkit():
    info = project()
    declared = info["dependencies"] + info["optional-dependencies"]["lab"]
    declared += info["optional-dependencies"]["dask"]
    imported = imported_modules()
    unused = [r for r in declared if MODULE_OF.get(name_of(r), name_of(r)) not in imported]
    assert unused == [], f"declared but never imported: {unused}"


def version_tuple(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def test_the_torch_floor_is_the_torch_ci_tests():
    floors = [r for r in project()["dependencies"] if name_of(r) == "torch"]
    assert len(floors) == 1 and floors[0].startswith("torch>=")
    floor = version_tuple(floors[0].removeprefix("torch>="))
    tested = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert tested, "the Makefile's TORCH_SPEC names the torch CI installs"
    assert floor == version_tuple(tested.group(1))
    assert version_tuple(torch.__version__) >= floor


@pytest.mark.skipif(__import__("shutil").which("make") is None, reason="needs make")
def test_make_installs_the_cpu_only_torch_from_torch_index(tmp_path):
    import subprocess

    url = "https://download.pytorch.org/whl/cpu"
    venv = tmp_path / "v"
    plan = subprocess.run(["make", "-n", "-C", str(ROOT), f"VENV={venv}", f"TORCH_INDEX={url}",
                           f"{venv}/.torch"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert f'pip install --quiet --index-url {url} "torch==' in plan
    plain = subprocess.run(["make", "-n", "-C", str(ROOT), f"VENV={venv}", f"{venv}/.torch"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert re.search(r'pip install --quiet\s+"torch==', plain) and "--index-url" not in plain
