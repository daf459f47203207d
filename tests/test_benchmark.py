"""The benchmark harness behind benchmarks/bench_kernels.py, bench_memory.py and `normkit bench`:
rows, byte formulas, saved-bytes accounting, and the command's wiring (timings are benchmarks,
never tested; these runs use tiny shapes and one short timing)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from normkit import benchmark as B
from normkit.cli.main import app

TINY = {"bn": [(2, 32, 4, 4)], "gn": [(2, 32, 4, 4)], "ln": [(8, 16)]}
QUICK = B.Timing(rounds=1, min_run_time=0.01, clock="cpu", calls=1)


def test_speed_rows_report_the_minimum_bytes():
    rows = B.speed_table(["bn", "ln_fwd"], shapes=TINY, backend="native", timing=QUICK)
    assert {(r.op, r.layout) for r in rows} == {("bn", "NCHW"), ("bn", "NHWC"), ("ln_fwd", "rows")}
    for row in rows:
        multiple = {"bn": 5, "ln_fwd": 2}[row.op]
        expected = multiple * math.prod(row.shape) * 4 / (row.ours_ms / 1e3) / 1e9
        assert row.gbps == pytest.approx(expected)
        assert row.ratio == pytest.approx(row.ours_ms / row.torch_ms)
        assert row.bytes_formula == f"{multiple}Ts"
    table = B.format_table(rows)
    assert "ours/torch" in table and "% copy" in table
    assert json.loads(B.to_json(rows, None, "cpu"))["speed"][0]["op"] == "bn"


def test_unknown_op_is_refused():
    with pytest.raises(B.nk.errors.ConfigError, match="unknown op"):
        B.speed_table(["bn_relux"], shapes=TINY, timing=QUICK)


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(4, 8, requires_grad=True)

    def twice():
        y = x * 2
        return (y * y).sum()  # y saved twice by one multiplication: counted once

    assert B.saved_bytes(twice) == x.nbytes


def test_memory_table_states_the_halving():
    rows = {r["variant"]: r for r in B.memory_table(shape=(2, 8, 6, 6), backend="native")}
    unfused = rows["torch BatchNorm2d -> LeakyReLU"]["layer_saved_bytes"]
    assert rows["nk.InPlaceABN(leaky_relu)"]["layer_saved_bytes"] <= 0.55 * unfused
    assert all(r["step_peak_bytes"] > 0 for r in rows.values())


def test_bench_command_runs_the_table(monkeypatch):
    seen, real = {}, B.speed_table

    def fake_speed_table(ops, **kwargs):
        seen.update(kwargs, ops=ops)
        return real(["bn_eval"], shapes=TINY, backend="native", timing=QUICK)

    monkeypatch.setattr(B, "speed_table", fake_speed_table)
    result = CliRunner().invoke(app, ["bench", "--op", "bn_eval", "--dtype", "bfloat16", "--quick"])
    assert result.exit_code == 0, result.output
    assert "bn_eval" in result.output and "ours/torch" in result.output
    assert seen["ops"] == ["bn_eval"] and seen["dtypes"] == [torch.bfloat16]
    assert seen["device"] == "cpu" and seen["backend"] == "auto"


def test_bench_command_refuses_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["bench", "--device", "cuda"])
    assert result.exit_code != 0
    assert "no CUDA device" in str(result.exception)
