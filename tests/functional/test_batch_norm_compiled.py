"""The ``compiled`` batch norm on the CPU (normkit.functional._batch_norm_compiled): 8 passes fused by
torch.compile, against the float64 oracle (outputs and running statistics in float32, contiguous
and channels_last, training and eval), every gradient against ATen's in float64, a gradient of the
gradient, and ATen's kernels where compiling cannot pay or cannot work (evaluation, small inputs,
torch.func transforms, tracing). The tests lower ``_compiled.MIN_NUMEL`` so that small inputs compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normkit as nk
import normkit.functional as nkf
from helpers import assert_close, make_input, randomize_parameters
from normkit import reference as R
from normkit.functional import _channel_pass, _compiled

pytestmark = pytest.mark.skipif(
    not _compiled.compiler_available(), reason="torch.compile on the CPU needs a C++ compiler"
)

SHAPE = (6, 4, 5, 7)


def _layout(x, layout):
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


@pytest.mark.parametrize("c_passes", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compiled_batch_norm_matches_the_oracle(layout, c_passes, compile_small, monkeypatch):
    """Float32 through the C passes (plane sums, channel pass) where they build, and through
    Inductor's passes without them."""
    if not c_passes:
        monkeypatch.setattr(_channel_pass, "_library", lambda: None)
    layer = nk.BatchNorm2d(4, momentum=0.3)
    randomize_parameters(layer)
    gamma, beta = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    mean, var = np.zeros(4), np.ones(4)
    for step in range(2):
        x = make_input(SHAPE, torch.float64, seed=step)
        expected, cache = R.batch_norm_train(x.numpy(), gamma, beta, layer.eps)
        mean, var = R.running_average(mean, var, x.numpy(), 0.3)
        dy = make_input(SHAPE, torch.float64, seed=10 + step, scale=1.0, shift=0.0)
        dx, dgamma, dbeta = R.batch_norm_backward(dy.numpy(), cache)
        leaf = _layout(x.float(), layout).requires_grad_()
        layer.zero_grad()
        with nk.backend("compiled"):
            y = layer(leaf)
            y.backward(_layout(dy.float(), layout))
        assert_close(y, torch.tensor(expected), torch.float32, f"step {step} output")
        assert_close(leaf.grad, torch.tensor(dx), torch.float32, f"step {step} dx")
        assert_close(layer.weight.grad, torch.tensor(dgamma), torch.float32, "dgamma")
        assert_close(layer.bias.grad, torch.tensor(dbeta), torch.float32, "dbeta")
        assert_close(layer.running_mean, torch.tensor(mean), torch.float32, "running_mean")
        assert_close(layer.running_var, torch.tensor(var), torch.float32, "running_var")
        assert y.stride() == leaf.stride() and leaf.grad.stride() == leaf.stride()
    layer.eval()
    x = make_input(SHAPE, torch.float64, seed=5)
    expected = R.batch_norm_inference(x.numpy(), mean, var, gamma, beta, layer.eps)
    with nk.backend("compiled"):
        y = layer(_layout(x.float(), layout))
    assert_close(y, torch.tensor(expected), torch.float32, "eval")
    if c_passes and _channel_pass.available(leaf.detach()):  # float32: nothing to compile
        assert compile_small == []
    else:
        assert "_forward_maths" in compile_small and "_backward_maths" in compile_small


@pytest.mark.parametrize(
    "gradient, channels_last", [("contiguous", True), ("expanded", False), ("expanded", True)]
)
def test_a_gradient_in_another_layout_is_copied_into_xs(gradient, channels_last, compile_small):
    """The C backward takes dy in x's layout: a contiguous dy for a channels_last x, or the
    expanded (stride 0) dy of ``(3 y).sum().backward()``, is copied into it; nothing compiles, and
    the gradients are ATen's."""
    x = make_input(SHAPE, torch.float32, seed=6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = make_input(SHAPE, torch.float32, seed=7, scale=1.0, shift=0.0)  # contiguous
    grads = {}
    for backend in ("native", "compiled"):
        layer = nk.BatchNorm2d(4)
        randomize_parameters(layer)
        leaf = x.clone().requires_grad_()
        with nk.backend(backend):
            y = layer(leaf)
            y.backward(dy) if gradient == "contiguous" else (y * 3.0).sum().backward()
        grads[backend] = (leaf.grad, layer.weight.grad, layer.bias.grad)
    (dx, dweight, dbias), (dx_aten, dweight_aten, dbias_aten) = grads["compiled"], grads["native"]
    assert_close(dx, dx_aten, torch.float32, "input gradient")
    assert_close(dbias, dbias_aten, torch.float32, "bias gradient")
    if gradient == "contiguous":
        assert_close(dweight, dweight_aten, torch.float32, "weight gradient")
    else:  # dweight = sum(3 x_hat) is 0 up to rounding: a cancellation, bounded by float32's
        # epsilon times the sum of the terms' magnitudes (a few of its roundings)
        var, mean = torch.var_mean(x.double(), (0, 2, 3), correction=0, keepdim=True)
        x_hat = (x.double() - mean) / var.sqrt()
        bound = 8 * torch.finfo(torch.float32).eps * (3 * x_hat.abs()).sum((0, 2, 3))
        assert ((dweight.double() - dweight_aten.double()).abs() <= bound).all(), (dweight, bound)
    if _channel_pass.available(x):
        assert compile_small == []


def test_compiled_gradients_and_second_derivatives_equal_atens(compile_small):
    x = make_input(SHAPE, torch.float64, seed=3).contiguous(memory_format=torch.channels_last)
    dy = make_input(SHAPE, torch.float64, seed=4, scale=1.0, shift=0.0)
    results = {}
    for backend in ("native", "compiled"):
        torch.manual_seed(0)
        layer = nk.BatchNorm2d(4).double()
        randomize_parameters(layer)
        leaf = x.clone().requires_grad_()
        params = list(layer.parameters())
        with nk.backend(backend):
            y = layer(leaf)
            first = torch.autograd.grad(y, [leaf, *params], dy)  # the fused backward
            y = layer(leaf)
            grads = torch.autograd.grad(y, [leaf, *params], dy, create_graph=True)
            second = torch.autograd.grad(
                sum(g.square().sum() for g in grads), [leaf, *params], allow_unused=True,
                materialize_grads=True,
            )  # fmt: skip
        results[backend] = [y, *first, *second]
    for got, want in zip(results["compiled"], results["native"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_transforms_tracing_and_small_inputs_run_atens_kernels(monkeypatch):
    def refuse(fn, *args):
        raise AssertionError(f"compiled {fn.__name__} where ATen's kernels should run")

    monkeypatch.setattr(_compiled.CompiledMaths, "call", refuse)
    x = make_input(SHAPE)
    with nk.backend("compiled"):  # below MIN_NUMEL
        small = nkf.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(small, torch.nn.functional.batch_norm(x, None, None, training=True))
    monkeypatch.setattr(_compiled, "MIN_NUMEL", 0)
    mean, var = torch.rand(4), torch.rand(4) + 0.5
    with nk.backend("compiled"):  # evaluation: ATen's one-pass inference kernel
        evaluated = nkf.batch_norm(x, mean, var, training=False)
    torch.testing.assert_close(evaluated, torch.nn.functional.batch_norm(x, mean, var))
    stack = torch.stack([x, x * 2 + 1])
    with nk.backend("compiled"):
        batched = torch.func.vmap(lambda t: nkf.batch_norm(t, None, None, training=True))(stack)
        traced = torch.jit.trace(nk.BatchNorm2d(4).eval(), (x,), check_trace=False)
    for i in range(2):
        expected = torch.nn.functional.batch_norm(stack[i], None, None, training=True)
        torch.testing.assert_close(batched[i], expected)
    torch.testing.assert_close(traced(x), torch.nn.BatchNorm2d(4).eval()(x))


def test_auto_uses_compiled_for_float32_nchw_and_channels_last_only():
    """`auto` runs the compiled batch norm for float32 CPU inputs, contiguous or channels_last
    (measured faster than ATen's in training, docs/benchmarks.md), native for other dtypes and
    other strided layouts, and ATen's batch norm (composite) under torch.func rather than the
    reference."""
    from normkit.functional import _dispatch

    impls = {name: impl.fn for name, impl in _dispatch.implementations("batch_norm").items()}
    base = torch.zeros(2, 3, 4, 5)
    layouts = {
        "contiguous": base, "channels_last": base.contiguous(memory_format=torch.channels_last),
        "channels_last 3d": torch.zeros(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d),
        "channels_last 1d": torch.zeros(2, 3, 7).transpose(1, 2).contiguous().transpose(1, 2),
        "transposed": base.transpose(2, 3), "sliced": torch.zeros(2, 3, 4, 10)[..., ::2],
    }  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for name, x in layouts.items():
            x = x.to(dtype)
            fast = name in ("contiguous", "channels_last", "channels_last 3d", "channels_last 1d")
            want = "compiled" if dtype == torch.float32 and fast else "native"
            assert _dispatch.resolve("batch_norm", x, "auto") is impls[want], (dtype, name)
    seen = []
    x = torch.zeros(1, 2, 3, 4, 5)
    torch.func.vmap(lambda t: seen.append(_dispatch.resolve("batch_norm", t, "auto")) or t)(x)
    assert seen == [impls["native"]]


def test_the_c_passes_run_from_a_smaller_input_than_inductors(monkeypatch):
    """No compile cost: float32 inputs take the C passes from C_MIN_NUMEL elements (below the
    Inductor passes' MIN_NUMEL), ATen's kernels below it; other dtypes keep MIN_NUMEL."""
    if not _channel_pass.available(torch.zeros(1, 1, 1, 1)):
        pytest.skip("no C compiler with OpenMP to build the C passes")
    from normkit.functional import _batch_norm_compiled

    calls = []
    real = _channel_pass.channel_pass
    monkeypatch.setattr(_channel_pass, "channel_pass", lambda *a: calls.append(1) or real(*a))
    assert _batch_norm_compiled.C_MIN_NUMEL < _compiled.MIN_NUMEL
    at_threshold = make_input((4, 16, 128, 128))  # 2^20 elements
    below = at_threshold[:, :, :127].contiguous()
    for x, runs_c in ((at_threshold, True), (below, False), (at_threshold.double(), False)):
        calls.clear()
        with nk.backend("compiled"):
            y = nkf.batch_norm(x, None, None, training=True)
        assert bool(calls) == runs_c, (x.shape, x.dtype)
        torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("dims", [(0, 2, 3), (2, 3), (0, 2), (0,)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(32, 6, 7, 7), (5, 3, 14, 1), (1, 2, 3, 56)])
def test_sample_mean_averages_at_most_four_positions_along_each_dim(shape, memory_format, dims):
    """The mean of these positions along each reduced dim, the rest kept: spread over the dim,
    never more than four (7: 0, 2, 4, 6, where a stride of 7 // 4 took all seven)."""
    from normkit.functional._batch_norm_compiled import sample_mean

    positions = {1: [0], 2: [0, 1], 3: [0, 1, 2], 5: [0, 2, 4], 6: [0, 2, 4], 7: [0, 2, 4, 6],
                 14: [0, 4, 8, 12], 32: [0, 8, 16, 24], 56: [0, 14, 28, 42]}  # fmt: skip
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=memory_format)
    got = sample_mean(x, dims)
    expected = x
    for d in dims:
        expected = expected.index_select(d, torch.tensor(positions[shape[d]]))
    expected = expected.mean(dims, keepdim=True)
    assert got.shape == tuple(1 if d in dims else size for d, size in enumerate(shape))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)  # float64: same values summed
