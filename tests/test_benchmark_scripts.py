"""The benchmark scripts that call normkit's private C entry points run against the library as it
is (a renamed function breaks them at run time, not at import): benchmarks/bench_plane_sums.py's
reductions agree with float64, and benchmarks/bench_bn_step.py clocks every pass of a step. Tiny
shapes, no timing asserted (timings are benchmarks, never tested)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from helpers import assert_close
from normkit.functional import _batch_norm_compiled, _channel_epilogue, _channel_pass, _plane_sums

pytestmark = pytest.mark.skipif(
    not (_plane_sums.built() and _channel_pass._library() and _channel_epilogue.available()),
    reason="no C compiler with OpenMP to build the C passes",
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # their own `environment` and `timing`
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_plane_sums_reductions_agree_with_float64(monkeypatch):
    bench = _script("bench_plane_sums", monkeypatch)
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, 6, 5, generator=generator) * 3 + 5).contiguous(
        memory_format=torch.channels_last
    )
    dy = torch.randn(4, 16, 6, 5, generator=generator).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(bench._compiled, "MIN_NUMEL", 0)
    for name, (plane, _, want) in bench.reductions(x, dy).items():
        assert_close(plane(), want, torch.float32, name)


@pytest.mark.parametrize("stub", [False, True])
def test_bench_bn_step_clocks_every_pass(stub, monkeypatch):
    bench = _script("bench_bn_step", monkeypatch)
    monkeypatch.setattr(_batch_norm_compiled, "C_MIN_NUMEL", 0)  # a tiny input takes the C passes
    seconds: dict[str, list[float]] = {}
    for module, label in ((_plane_sums, bench._pass_name), (_channel_pass, bench._pass_name),
                          (_channel_epilogue, lambda name, _: "C steps")):  # fmt: skip
        library = module._library()
        monkeypatch.setattr(module, "_library", lambda lib=library, lab=label: bench.Clocked(
            lib, lab, seconds, stub))  # fmt: skip
    row = bench.measure((4, 16, 6, 5), True, 2, seconds)
    assert set(row["parts_ms"]) == {"stats sums", "normalize", "backward sums", "dx", "C steps"}
    assert math.isfinite(row["rest_ms"]) and row["step_ms"] > 0 and row["layout"] == "CL"
