"""The ``compiled`` backend: BatchNormAct's fused maths compiled by torch.compile on the CPU.

Against the float64 oracle (forward, every gradient, running statistics) in float32 and bfloat16
(statistics and arithmetic in float32, one rounding at the end: helpers.TOLERANCES), both layouts
and both modes; where `auto` uses it (only where docs/benchmarks.md measured it faster); and the
fallback when the compiler fails. Each new configuration compiles (a few seconds), so the cases are
few and chosen to cover the branches of the maths.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normkit as nk
from fused_oracle import PARAMS, compare, expected_batch_norm_act, make_case, run_batch_norm_act
from normkit.functional import _batch_norm_act, _compiled, _dispatch

pytestmark = pytest.mark.skipif(
    not _compiled.compiler_available(),
    reason="torch.compile on the CPU needs a C++ compiler (g++, c++ or clang++) on PATH",
)

CASES = [  # dtype, layout, activation, residual, training
    (torch.float32, "contiguous", "relu", True, True),
    (torch.bfloat16, "channels_last", "silu", False, True),
    (torch.float32, "channels_last", "gelu", True, False),
]


def _fn(activation, training):
    def fn(x, z, mean, var, weight, bias):
        with nk.backend("compiled"):
            return nk.functional.batch_norm_act(
                x, mean, var, weight, bias, training, 0.1, 1e-5,
                activation=activation, activation_param=PARAMS.get(activation, 0.01), residual=z,
            )  # fmt: skip

    return fn


@pytest.mark.parametrize("config", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_compiled_against_float64(config):
    dtype, layout, activation, residual, training = config
    case = make_case((4, 5, 3, 6), dtype, layout, seed=3)
    actual = run_batch_norm_act(
        _fn(activation, training), case, training=training, residual=residual
    )
    expected = expected_batch_norm_act(
        case, training=training, activation=activation, residual=residual
    )
    compare(actual, expected, dtype, str(config))
    assert actual["y_stride"] == actual["x_stride"]


def test_a_failing_compiler_falls_back_to_the_same_maths_eagerly(monkeypatch):
    def broken(fn):
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(_compiled, "compiled", broken)
    monkeypatch.setattr(_compiled.CompiledMaths, "broken", False)
    case = make_case((4, 3, 5), torch.float32, seed=1)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        actual = run_batch_norm_act(_fn("relu", True), case, training=True, residual=False)
    expected = expected_batch_norm_act(case, training=True, activation="relu", residual=False)
    compare(actual, expected, torch.float32, "eager fallback")


def test_auto_uses_compiled_only_where_measured_faster(monkeypatch):
    """Every entry of the preference table is a measured CPU row; everything else stays native."""
    op = "batch_norm_act"
    native = _dispatch.implementations(op)["native"].fn
    preferences = dict(_dispatch.AUTO_PREFERENCES)
    for (entry_op, device, dtype, layout), order in preferences.items():
        assert device == "cpu", "only measured CPU entries"
        if entry_op != op:  # Batch-Layer's entries are tested in test_batch_layer_norm.py
            continue
        x = torch.zeros(2, 3, 4, 5, dtype=dtype)
        if layout == "strided":
            x = x.to(memory_format=torch.channels_last)
        assert _dispatch.resolve(op, x) is _dispatch.implementations(op)[order[0]].fn
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for layout in ("contiguous", "strided"):
            if (op, "cpu", dtype, layout) in preferences:
                continue
            x = torch.zeros(2, 3, 4, 5, dtype=dtype)
            if layout == "strided":
                x = x.to(memory_format=torch.channels_last)
            assert _dispatch.resolve(op, x) is native, (dtype, layout)
    # without a compiler, auto falls back to native everywhere
    monkeypatch.setitem(
        _dispatch._REGISTRY[op],
        "compiled",
        _dispatch.Implementation(_batch_norm_act.compiled_batch_norm_act, lambda t: False),
    )
    assert _dispatch.resolve(op, torch.zeros(2, 3)) is native


@pytest.mark.parametrize("make", [lambda: nk.BatchNormAct(4), lambda: nk.BatchLayerNorm(4)])
def test_compiled_layers_inside_a_users_torch_compile(make):
    """Under the user's own torch.compile the compiled backend's maths join the user's graph:
    no graph break (no nested compile, no PATH lookup traced), and the same numbers as eager."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), make())
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = copy.deepcopy(model)
    y, y_eager = torch.compile(model)(x), eager(x)
    torch.testing.assert_close(y, y_eager)
    y.sum().backward(), y_eager.sum().backward()
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        # float32 sums over the batch in another order: a few roundings of the largest sum
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
