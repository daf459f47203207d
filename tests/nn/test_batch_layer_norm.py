"""Batch Layer Normalization (Ziaee & Çano 2022): the official code's formula against the float64
oracle, the fixed weights, m from the batch or the constructor, and the documented choices."""

import copy
import math

import numpy as np
import pytest
import torch

import normkit as nk
from helpers import (
    assert_close,
    make_input,
    randomize_parameters,
    reference_directional_derivative,
)
from normkit import reference as R
from normkit.errors import BatchTooSmallError, ConfigError
from normkit.functional import _compiled

SHAPES = [(5, 4), (4, 3, 6), (3, 4, 3, 5), (2, 3, 2, 3, 2)]
# Batch-Layer has a third implementation, the torch.compile'd maths; where no C++ compiler is on
# PATH the compiled backend is unavailable and its cases say so.
BACKENDS = ["native", "reference", "compiled"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test under each of Batch-Layer's backends (this module's own, with ``compiled``)."""
    if request.param == "compiled" and not _compiled.compiler_available():
        pytest.skip("the compiled backend needs a C++ compiler on PATH")
    with nk.backend(request.param):
        yield request.param


DTYPES = [torch.float32, torch.float64]


def _numpy(t):
    return t.detach().double().numpy()


def _expected(layer, x, batch_size=None, stats=(None, None)):
    return R.batch_layer_norm(
        x.numpy(), _numpy(layer.weight), _numpy(layer.bias), layer.eps, batch_size,
        layer.divide_by_sqrt_features, *stats,
    )  # fmt: skip


@pytest.mark.parametrize("options", [{}, {"batch_size": 25}, {"divide_by_sqrt_features": False}])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_and_eval_match_the_official_formula(shape, dtype, options, backend):
    layer = nk.BatchLayerNorm(shape[1], momentum=0.3, **options).to(dtype)
    randomize_parameters(layer)
    mean, var = np.zeros(shape[1]), np.ones(shape[1])
    m = options.get("batch_size")
    for step in range(2):
        x = make_input(shape, torch.float64, seed=step)
        mean, var = R.running_average(mean, var, x.numpy(), 0.3)
        expected = _expected(layer, x, m)
        assert_close(layer(x.to(dtype)), torch.tensor(expected), dtype, f"step {step}")
    assert_close(layer.running_mean, torch.tensor(mean), dtype, "running_mean")
    assert_close(layer.running_var, torch.tensor(var), dtype, "running_var")
    layer.eval()
    x = make_input((3, *shape[1:]), torch.float64, seed=9)
    expected = _expected(layer, x, m, (mean, var))
    assert_close(layer(x.to(dtype)), torch.tensor(expected), dtype, "eval")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_match_the_oracle(training, backend):
    shape = (4, 3, 2, 3)
    rng = np.random.default_rng(3)
    x, w = rng.normal(0.5, 2.0, shape), rng.normal(size=shape)
    gamma, beta = rng.normal(1.0, 0.3, 3), rng.normal(0, 0.3, 3)
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    layer = nk.BatchLayerNorm(3).double().train(training)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(gamma)), layer.bias.copy_(torch.tensor(beta))
        layer.running_mean.copy_(torch.tensor(mean)), layer.running_var.copy_(torch.tensor(var))
    leaf = torch.tensor(x, requires_grad=True)
    (layer(leaf) * torch.tensor(w)).sum().backward()
    stats = (None, None) if training else (mean, var)
    oracle = lambda x_, g_, b_: R.batch_layer_norm(x_, g_, b_, 1e-3, None, True, *stats)
    inputs = [x, gamma, beta]
    for k, grad in enumerate([leaf.grad, layer.weight.grad, layer.bias.grad]):
        directions = [np.zeros_like(a) for a in inputs]
        directions[k] = rng.normal(size=inputs[k].shape)
        expected = reference_directional_derivative(oracle, inputs, directions, w)
        got = (grad * torch.tensor(directions[k])).sum().item()
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-8), f"input {k}"


def test_mixing_weights_are_the_inverse_batch_size():
    """m = 25: 0.04 on LN and 0.96 on BN (minus the code's 1e-4 offsets), over sqrt(d_k)."""
    batch_weight, layer_weight = nk.BatchLayerNorm(16, batch_size=25).mixing_weights()
    assert batch_weight == pytest.approx((1 - 1 / 25 - 1e-4) / 4)
    assert layer_weight == pytest.approx((1 / 25 - 1e-4) / 4)
    assert nk.BatchLayerNorm(16, divide_by_sqrt_features=False).mixing_weights(1) == (
        pytest.approx(-1e-4),
        pytest.approx(1 - 1e-4),
    )
    with pytest.raises(ConfigError, match="mixing_weights"):
        nk.BatchLayerNorm(16).mixing_weights()


def test_batch_of_one_sample_is_layer_norm_over_the_channels(backend):
    """m = 1: the BN weight is -1e-4 and the BN part of one sample's map is tiny; the layer is
    (1 - 1e-4) x LayerNorm2d(C) / sqrt(C) up to that term."""
    layer = nk.BatchLayerNorm(4, affine=False, divide_by_sqrt_features=False)
    x = make_input((1, 4, 5, 5))
    ln = nk.LayerNorm2d(4, eps=1e-3, elementwise_affine=False)
    x_b = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-3)
    with nk.backend("reference"):  # the expectation, whichever backend the layer runs on
        expected = (1 - 1e-4) * ln(x) - 1e-4 * x_b
    assert_close(layer(x), expected, what="m = 1")


@pytest.mark.parametrize("shape", [(1, 5), (1, 5, 1, 1)], ids=str)
def test_one_value_per_channel_trains_as_the_official_code(shape, backend):
    """A batch of one sample on (N, C) (or a 1x1 map): the code's batch moments are mu_B = x,
    sigma2_B = 0, so its BN part is 0 and the output is the LN part plus beta (the float64 oracle
    computes it that way); the gradients are the oracle's; the running statistics and the batch
    counter stay as they were (one value has no variance); BatchNorm still refuses the batch."""
    layer = nk.BatchLayerNorm(5, batch_size=1).double()
    randomize_parameters(layer)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    rng = np.random.default_rng(4)
    x, w = rng.normal(0.5, 2.0, shape), rng.normal(size=shape)
    leaf = torch.tensor(x, requires_grad=True)
    y = layer(leaf)
    gamma, beta = _numpy(layer.weight), _numpy(layer.bias)
    oracle = lambda x_, g_, b_: R.batch_layer_norm(x_, g_, b_, 1e-3, 1)
    assert_close(y, torch.tensor(oracle(x, gamma, beta)), torch.float64, "output at batch 1")
    rows = leaf.detach().view(1, 5)
    x_f = (rows - rows.mean()) / torch.sqrt(rows.var(unbiased=False) + 1e-3)  # LN over the channels
    expected = (1 / 1 - 1e-4) / math.sqrt(5) * x_f * layer.weight.detach() + layer.bias.detach()
    assert_close(y, expected.view(shape), torch.float64, "LN part plus beta, no BN part")
    (y * torch.tensor(w)).sum().backward()
    inputs = [x, gamma, beta]
    for k, grad in enumerate([leaf.grad, layer.weight.grad, layer.bias.grad]):
        directions = [np.zeros_like(a) for a in inputs]
        directions[k] = rng.normal(size=inputs[k].shape)
        expected = reference_directional_derivative(oracle, inputs, directions, w)
        got = (grad * torch.tensor(directions[k])).sum().item()
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-8), f"input {k}"
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed at one value per channel"
    with pytest.raises(BatchTooSmallError, match="more than one value per channel"):
        nk.BatchNorm1d(5).double()(leaf.detach().view(1, 5))


def test_eval_weights_follow_the_eval_batch_unless_batch_size_is_given(backend):
    x = make_input((8, 3, 4))
    floating = nk.BatchLayerNorm(3)
    fixed = nk.BatchLayerNorm(3, batch_size=8)
    floating(x), fixed(x)
    floating.eval(), fixed.eval()
    one = x[:1]
    assert_close(fixed(one), fixed(x)[:1], what="fixed m: a sample's output is batch-independent")
    assert not torch.allclose(floating(one), floating(x)[:1], atol=1e-3)


def test_layout_and_keys(backend):
    layer = nk.BatchLayerNorm(4)
    x = make_input((3, 4, 5, 5), channels_last=True)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)
    assert set(layer.state_dict()) == set(torch.nn.BatchNorm2d(4).state_dict())
    assert math.isclose(layer.eps, 1e-3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_compiled_matches_float64_in_every_dtype_and_layout(dtype, channels_last, training):
    """The compiled maths (float32 parameters, the input's dtype and layout kept) against the same
    layer in float64 on the same rounded input: output, every gradient, running statistics."""
    if not _compiled.compiler_available():
        pytest.skip("the compiled backend needs a C++ compiler on PATH")
    layer = nk.BatchLayerNorm(6, momentum=0.3)
    randomize_parameters(layer)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    exact = copy.deepcopy(layer).double()
    x = make_input((4, 6, 3, 5), dtype, channels_last=channels_last, seed=1).requires_grad_()
    dy = make_input((4, 6, 3, 5), dtype, channels_last=channels_last, seed=2)
    with nk.backend("compiled"):
        y = layer(x)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    with nk.backend("reference"):
        y64 = exact(x64)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.stride() == x.stride(), "dtype and layout kept"
    assert_close(y, y64, dtype, "output")
    assert_close(x.grad, x64.grad, dtype, "input gradient")
    # the parameters' gradients are float32 sums over all elements of a rounded product
    assert_close(layer.weight.grad, exact.weight.grad, dtype, "weight gradient")
    assert_close(layer.bias.grad, exact.bias.grad, dtype, "bias gradient")
    assert_close(layer.running_mean, exact.running_mean, torch.float32, "running_mean")
    assert_close(layer.running_var, exact.running_var, torch.float32, "running_var")


def test_auto_runs_compiled_where_measured_faster():
    """auto picks the compiled maths where the benchmark measured it faster than native (float32
    and bfloat16, NCHW and channels_last; docs/benchmarks.md) and the native kernels elsewhere."""
    from normkit.functional import _dispatch

    impls = _dispatch.implementations("batch_layer_norm")
    faster = "compiled" if _compiled.compiler_available() else "native"
    x = torch.zeros(2, 3, 4, 5)
    for measured in (x, x.to(memory_format=torch.channels_last), x.bfloat16()):
        assert _dispatch.resolve("batch_layer_norm", measured) is impls[faster].fn
    for other in (x.half(), x.double()):
        assert _dispatch.resolve("batch_layer_norm", other) is impls["native"].fn
