"""docs/layout.md, the map from a layer's one name to its pieces, against the files: every path in
it exists, the names line up, and every layer, module, op, kernel and per-layer test file is in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import normkit as nk
from normkit import reference

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "layout.md"
BASES = {
    "module": "src/normkit",
    "functional form": "src/normkit",
    "kernels": "src/normkit",
    "tests": "tests",
    "benchmark": "benchmarks",
}
# Layers without a functional form of their own, and what stands in for it.
NO_OWN_FUNCTIONAL = {"frozen_batch_norm": "_batch_norm.py"}
# The functional core every form is built from (not a layer's form).
CORE = {"moments", "normalize"}
# Test files that run every layer through the same checks (the map's last paragraph).
GENERIC_TESTS = {
    "test_base.py",
    "test_family.py",
    "test_parity_torch.py",
    "test_state_dict.py",
    "test_state_under_failure.py",
    "test_torch_module_tests.py",
    "test_transform_matrix.py",
}


def _rows() -> list[dict[str, list[str]]]:
    lines = [line for line in MAP.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append({k: re.findall(r"`([^`]+)`", v) for k, v in zip(header, cells, strict=True)})
    return rows


ROWS = _rows()
NAMES = [row["name"][0] for row in ROWS]


def test_the_map_is_linked_from_the_readme():
    assert "(docs/layout.md)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("row", ROWS, ids=NAMES)
def test_every_entry_exists(row):
    for column, base in BASES.items():
        for path in row[column]:
            assert (ROOT / base / path).is_file(), f"{column}: {base}/{path}"
    for name in row["reference"]:
        assert callable(getattr(reference, name, None)), f"reference.{name}"
    for layer in row["layer"]:
        assert isinstance(getattr(nk, layer, None), type), f"nk.{layer}"


@pytest.mark.parametrize("row", ROWS, ids=NAMES)
def test_names_line_up(row):
    name = row["name"][0]
    package = Path(row["module"][0]).parent.name  # nn, or distributed for SyncBatchNorm
    assert row["module"][0] == f"{package}/{name}.py"
    functional = f"{'functional' if package == 'nn' else package}/_{name}.py"
    own = NO_OWN_FUNCTIONAL.get(name)
    assert row["functional form"][0] == (f"functional/{own}" if own else functional)
    assert row["tests"][0] == f"{package}/test_{name}.py"
    if own is None:
        op = getattr(nk.functional, name, None) or getattr(
            nk.distributed, "synchronized_" + name[5:]
        )
        assert callable(op)


def test_every_layer_and_file_is_in_the_map():
    listed = {column: {p for row in ROWS for p in row[column]} for column in BASES}
    layers = {layer for row in ROWS for layer in row["layer"]}
    public = {n for n in nk.__all__ if isinstance(getattr(nk, n), type)}
    assert public - {"RunningStatsSnapshot"} == layers  # a snapshot of buffers is not a layer
    src = ROOT / "src" / "normkit"
    modules = {f"nn/{p.name}" for p in (src / "nn").glob("[!_]*.py")} - {"nn/snapshot.py"}
    assert modules <= listed["module"]
    names = set(nk.functional.__all__) - CORE
    ops = {f"functional/_{n}.py" for n in names if (src / f"functional/_{n}.py").exists()}
    assert ops <= listed["functional form"]
    kernels = {f"kernels/{p.name}" for p in (src / "kernels").glob("[!_]*.py")}
    assert kernels <= listed["kernels"]
    per_layer = {f"nn/{p.name}" for p in (ROOT / "tests" / "nn").glob("test_*.py")}
    assert per_layer - {f"nn/{n}" for n in GENERIC_TESTS} <= listed["tests"]
