"""The ``compiled`` engine of Ghost BN, Batch-Instance and Switchable Norm
(normkit.functional._instance_stats_compiled): four fused passes over the input, in its own layout, against
the float64 oracle (outputs and running statistics, float32, contiguous and channels_last), the
gradients against the ``native`` engine in float64, a gradient of the gradient, and the cases
where it runs ATen's kernels instead (small inputs, tracing, transforms).

The engine compiles only inputs of at least ``_compiled.MIN_NUMEL`` elements; the tests lower that
bound so that small inputs take the compiled path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters
from normkit import reference as R
from normkit.functional import _compiled, _plane_sums

pytestmark = pytest.mark.skipif(
    not _compiled.compiler_available(), reason="torch.compile on the CPU needs a C++ compiler"
)

SHAPE = (6, 4, 5, 7)


def _numpy(t):
    return t.detach().double().numpy()


def _ghost():
    return nk.GhostBatchNorm(4, virtual_batch_size=2, momentum=0.3)


def _batch_instance():
    return nk.BatchInstanceNorm(4, momentum=0.3)


def _switchable():
    return nk.SwitchableNorm(4, momentum=0.3)


def _expected(name, layer, x):
    """(output, running mean, running var update) of the float64 oracle for one training step."""
    x = x.numpy()
    gamma, beta = _numpy(layer.weight), _numpy(layer.bias)
    if name == "ghost":
        y, _ = R.ghost_batch_norm_train(x, gamma, beta, 2, layer.eps)
        return y, R.ghost_running_average(_numpy(layer.running_mean), _numpy(layer.running_var),
                                          x, 2, 0.3)  # fmt: skip
    stats = R.running_average(_numpy(layer.running_mean), _numpy(layer.running_var), x, 0.3)
    if name == "batch_instance":
        rho = np.clip(_numpy(layer.rho), 0.0, 1.0)
        return R.batch_instance_norm(x, rho, gamma, beta, layer.eps), stats
    y = R.switchable_norm(x, _numpy(layer.mean_weight), _numpy(layer.var_weight), gamma, beta,
                          layer.eps)  # fmt: skip
    return y, stats


LAYERS = {"ghost": _ghost, "batch_instance": _batch_instance, "switchable": _switchable}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_matches_the_oracle(name, layout, compile_small):
    calls = compile_small
    layer = LAYERS[name]()
    randomize_parameters(layer)
    channels_last = layout == "channels_last"
    for step in range(2):
        x = make_input(SHAPE, torch.float64, seed=step)
        expected, (mean, var) = _expected(name, layer, x)
        leaf = (
            x.float()
            .contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )
            .requires_grad_()
        )
        with nk.backend("compiled"):
            y = layer(leaf)
            y.backward(torch.ones_like(y))
        assert_close(y, torch.tensor(expected), torch.float32, f"{name} step {step}")
        assert_close(layer.running_mean, torch.tensor(mean), torch.float32, "running_mean")
        assert_close(layer.running_var, torch.tensor(var), torch.float32, "running_var")
        assert y.stride() == leaf.stride() and leaf.grad.stride() == leaf.stride()
    assert {"_affine_maths", "_input_grad_maths"} <= set(calls)
    reductions = {"_moments_maths", "_sums_maths"}
    if channels_last and _plane_sums.available(leaf.detach()):  # one pass over the rows instead
        assert not reductions & set(calls)
    else:
        assert reductions <= set(calls)


def test_two_dimensional_ghost_batches(compile_small):
    """(N, C) inputs: every plane is one value (its own mean, no variance)."""
    layer = nk.GhostBatchNorm(3, virtual_batch_size=4)
    randomize_parameters(layer)
    x = make_input((16, 3), torch.float64, seed=2)
    expected, _ = R.ghost_batch_norm_train(
        x.numpy(), _numpy(layer.weight), _numpy(layer.bias), 4, layer.eps
    )
    with nk.backend("compiled"):
        y = layer(x.float())
    assert_close(y, torch.tensor(expected), torch.float32, "2-D ghost batches")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_gradients_equal_the_native_engine(name, training, compile_small):
    """Every gradient (input and parameters) in float64: the fused backward's closed form
    against native's (itself held to the oracle's directional derivatives in tests/nn)."""
    results = {}
    x = make_input(SHAPE, torch.float64, seed=3).contiguous(memory_format=torch.channels_last)
    dy = make_input(SHAPE, torch.float64, seed=4, scale=1.0, shift=0.0)
    for backend in ("native", "compiled"):
        torch.manual_seed(0)
        layer = LAYERS[name]().double()
        randomize_parameters(layer)
        if not training:
            layer(make_input(SHAPE, torch.float64, seed=9))  # running statistics to normalize with
            layer.eval()
        leaf = x.clone().requires_grad_()
        with nk.backend(backend):
            y = layer(leaf)
            grads = torch.autograd.grad(y, [leaf, *layer.parameters()], dy, allow_unused=True)
        results[backend] = [y, *grads]
    for got, want in zip(results["compiled"], results["native"], strict=True):
        if want is None:
            assert got is None or not got.abs().max()
            continue
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_gradient_of_the_gradient(name, compile_small):
    """create_graph=True differentiates the native engine's passes: the same second derivatives."""
    results = {}
    x = make_input(SHAPE, torch.float64, seed=5)
    for backend in ("native", "compiled"):
        torch.manual_seed(0)
        layer = LAYERS[name]().double()
        randomize_parameters(layer)
        leaf = x.clone().requires_grad_()
        params = list(layer.parameters())
        with nk.backend(backend):
            y = layer(leaf)
            grads = torch.autograd.grad(y.square().sum(), [leaf, *params], create_graph=True)
            penalty = sum(g.square().sum() for g in grads)
            results[backend] = torch.autograd.grad(penalty, [leaf, *params], allow_unused=True)
    for got, want in zip(results["compiled"], results["native"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_small_inputs_and_traced_calls_run_the_native_engine(monkeypatch):
    def refuse(fn, *args):
        raise AssertionError(f"compiled {fn.__name__} for an input that should run natively")

    monkeypatch.setattr(_compiled.CompiledMaths, "call", refuse)
    layer = _ghost()
    x = make_input(SHAPE)  # far below MIN_NUMEL
    with nk.backend("compiled"):
        y = layer(x)
    with nk.backend("native"):
        torch.testing.assert_close(y, _ghost()(x))
    monkeypatch.setattr(_compiled, "MIN_NUMEL", 0)
    with nk.backend("compiled"):
        traced = torch.jit.trace(_batch_instance().eval(), (x,), check_trace=False)
    with nk.backend("native"):
        torch.testing.assert_close(traced(x), _batch_instance().eval()(x))


@pytest.mark.parametrize("op", ["ghost_batch_norm", "batch_instance_norm", "switchable_norm"])
def test_auto_uses_compiled_for_float32_on_the_cpu(op):
    """`auto` runs the compiled engine for float32 CPU inputs in both layouts (measured faster than
    native, docs/benchmarks.md) and native for the other dtypes; under torch.func, ``reference``."""
    from normkit.functional import _dispatch

    impls = {name: impl.fn for name, impl in _dispatch.implementations(op).items()}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for memory_format in (torch.contiguous_format, torch.channels_last):
            x = torch.zeros(2, 3, 4, 5, dtype=dtype).contiguous(memory_format=memory_format)
            want = "compiled" if dtype == torch.float32 else "native"
            assert _dispatch.resolve(op, x, "auto") is impls[want], (dtype, memory_format)
    seen = []
    torch.func.vmap(lambda t: seen.append(_dispatch.resolve(op, t, "auto")) or t)(x[None])
    assert seen == [impls["reference"]]
