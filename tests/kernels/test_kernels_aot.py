"""Ahead-of-time compilation of normkit's Triton kernels for the A100 (sm_80) and the H100 (sm_90)
on a machine without a GPU (normkit.kernels._aot, benchmarks/aot_check.py): every kernel compiles
in float32, bfloat16 and float16 for both targets with no spill and registers for at least two CTAs
per SM; the occupancy formula is NVIDIA's calculator's; the check fails on a compile error, on
spills and on register-hungry kernels.

Compilation runs in subprocesses: this test session may have imported triton under its
interpreter (tests/kernels_interpreter.py), which cannot compile for a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the ahead-of-time check needs triton (the dev extra)")

ROOT = Path(__file__).resolve().parents[2]
KERNEL_SOURCES = sorted((ROOT / "src" / "normkit" / "kernels").glob("*.py"))


def _kernel_names() -> set[str]:
    """Every @triton.jit kernel (a function named *_kernel) in normkit's sources."""
    names = set()
    for path in KERNEL_SOURCES:
        names |= set(re.findall(r"@triton\.jit\ndef (\w+_kernel)\(", path.read_text()))
    return names


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    return env


def test_occupancy_follows_the_cuda_occupancy_calculator():
    from normkit.kernels._aot import SM80, SM90, occupancy

    # 128 registers: 4096 per warp, 16 warps by registers: two CTAs of 8 warps.
    assert occupancy(128, 8, 0, SM90).by_registers == 2
    # 129 registers are allocated as 136 (units of 256 per warp): 4352 per warp, 15 warps, 1 CTA.
    assert occupancy(129, 8, 0, SM90).by_registers == 1
    # 64 registers x 4 warps: 8 CTAs by registers, 16 by threads (2048 / 128): 8 resident.
    assert occupancy(64, 4, 0, SM80).by_registers == 8
    assert occupancy(64, 4, 0, SM80).by_threads == 16
    assert occupancy(64, 4, 0, SM80).ctas == 8
    # 100 KiB of shared memory (+1 KiB reserved per CTA): 1 CTA in sm_80's 164 KiB, 2 in 228 KiB.
    assert occupancy(32, 4, 100 * 1024, SM80).by_shared == 1
    assert occupancy(32, 4, 100 * 1024, SM90).by_shared == 2
    # tiny CTAs stop at 32 per SM
    assert occupancy(16, 1, 0, SM90).ctas == 32


def test_every_kernel_compiles_for_both_targets_in_every_dtype(tmp_path):
    """The CI selection of benchmarks/aot_check.py (the heaviest configuration per kernel, path and
    dtype), compiled for sm_80 and sm_90 from scratch (an empty triton cache)."""
    rows_file = tmp_path / "aot.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aot_check.py"), "--ci", "--jobs", "2",
         "--json", str(rows_file), "--failures-only"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert isinstance(rows, list)
    for row in rows:
        assert {"kernel", "config", "target", "registers", "spills"} <= row.keys()
        assert row["ok"] and row["spills"] == 0 and row["ctas_by_registers"] >= 2, row
        assert 0 < row["registers"] <= 255, row
    compiled = {(r["kernel"], r["dtype"], r["target"]) for r in rows}
    targets = {"sm_80 (A100)", "sm_90 (H100)"}
    assert {r["target"] for r in rows} == targets
    assert {r["kernel"] for r in rows} == _kernel_names()
    second_stages = {"_merge_moments_kernel", "_grad_coefficients_kernel"}  # float32 partials
    for kernel in _kernel_names() - second_stages:
        for dtype in ("float32", "bfloat16", "float16"):
            for target in targets:
                assert (kernel, dtype, target) in compiled, (kernel, dtype, target)
    for kernel in second_stages:
        assert {(kernel, "float32", t) for t in targets} <= compiled


BAD_KERNELS = '''
import triton
import triton.language as tl

SCALE = 0.5  # a plain global: the interpreter reads it, a GPU compile refuses it


@triton.jit
def global_kernel(x_ptr, N, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < N)
    tl.store(x_ptr + offsets, x * SCALE, mask=offsets < N)


@triton.jit
def row_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    """A whole row in registers: BLOCK values over the program's threads."""
    row = tl.program_id(0).to(tl.int64) * N
    offsets = tl.arange(0, BLOCK)
    mask = offsets < N
    x = tl.load(x_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x) / N
    centred = tl.where(mask, x - mean, 0.0)
    y = centred / tl.sqrt(tl.sum(centred * centred) / N + 1e-5)
    tl.store(y_ptr + row + offsets, y, mask=mask)
'''

CHECK_BAD_KERNELS = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import bad_kernels
from normkit.kernels._utils import Launch
from normkit.kernels._aot import SM90, compile_launch

x = torch.empty(64, 65536, device="meta")
launches = {
    "error": Launch(bad_kernels.global_kernel, (1,), (x, 1024), {"BLOCK": 1024}, 4),
    "spills": Launch(bad_kernels.row_kernel, (64,), (x, x, 65536), {"BLOCK": 65536}, 4),
    "one CTA": Launch(bad_kernels.row_kernel, (64,), (x, x, 32768), {"BLOCK": 32768}, 16),
    "fine": Launch(bad_kernels.row_kernel, (64,), (x, x, 1024), {"BLOCK": 1024}, 4),
}
print(json.dumps({k: compile_launch(v, SM90).as_dict() for k, v in launches.items()}))
"""


def test_the_check_fails_on_compile_errors_spills_and_register_hungry_kernels(tmp_path):
    (tmp_path / "bad_kernels.py").write_text(BAD_KERNELS)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHECK_BAD_KERNELS), str(tmp_path)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert not rows["error"]["ok"] and "SCALE" in rows["error"]["error"]
    assert not rows["spills"]["ok"] and rows["spills"]["spills"] > 0
    assert rows["spills"]["spill_stores"] > 0 and rows["spills"]["spill_loads"] > 0
    hungry = rows["one CTA"]
    assert not hungry["ok"] and hungry["spills"] == 0 and hungry["ctas_by_registers"] < 2
    assert hungry["registers"] > 64  # 2 CTAs of 16 warps need <= 64 registers per thread
    assert rows["fine"]["ok"] and rows["fine"]["problems"] == []
