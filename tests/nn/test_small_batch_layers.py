"""Generic tests over the small-batch layers on (N, C, *) maps (RMSNorm2d, FRN + TLU, EvoNorm-B0/S0, MABN,
Cross-Iteration BN): random shapes against the float64 oracle, gradients against the oracle's
finite differences, float16/bfloat16, channels_last, state_dict round trips, factory strings,
torch.compile(fullgraph=True), torch.func, and errors that name the layer. Each layer's own file
tests what is particular to it (torch/timm parity, running statistics, the papers' schedules;
RMSNorm over the last dims, torch.nn.RMSNorm's drop-in, in test_rms_norm.py)."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit as nk
from helpers import (
    NORMWISE_HALF,
    assert_close,
    assert_normwise_close,
    channels_last_format,
    make_input,
    randomize_parameters,
    reference_directional_derivative,
    run_steps,
)
from normkit import reference as R


def _np(t):
    return t.detach().double().numpy()


# name -> (constructor taking C, float64 oracle (layer, x, params) of one training-mode step,
#          the smallest rank, whether the training step runs under program transforms)
LAYERS = {
    "rms2d": (
        lambda c: nk.RMSNorm2d(c, eps=1e-5),
        lambda m, x, w: R.channel_rms_norm(x, w["weight"], m.eps),
        2,
        True,
    ),
    "frn": (
        nk.FilterResponseNorm,
        lambda m, x, w: R.filter_response_norm(x, w["weight"], w["bias"], w["tau"], m.eps),
        3,
        True,
    ),
    "evonorm_b0": (
        nk.EvoNormB0,
        lambda m, x, w: R.evo_norm_b0(x, w["v"], w["weight"], w["bias"], m.eps)[0],
        3,
        True,
    ),
    "evonorm_s0": (
        lambda c: nk.EvoNormS0(c, groups=2 if c % 2 == 0 else 1),
        lambda m, x, w: R.evo_norm_s0(x, w["v"], w["weight"], w["bias"], m.groups, m.eps),
        3,
        True,
    ),
    "mabn": (
        lambda c: nk.MovingAverageBatchNorm(c, window=2),
        lambda m, x, w: R.mabn_train(
            x,
            w["weight"],
            w["bias"],
            R.MABNState(np.zeros((2, x.shape[1])), np.zeros((2, x.shape[1])), np.ones(x.shape[1])),
            m.eps,
            m.momentum,
            m.warmup_iters,
            m.renorm_iters,
            m.r_max,
        )[0],  # fmt: skip
        2,
        False,
    ),
    "cbn": (
        lambda c: nk.CrossIterationBatchNorm(c, window=3, compensate=False),
        lambda m, x, w: R.batch_norm_train(x, w["weight"], w["bias"], m.eps)[0],
        2,
        False,
    ),
}
NAMES = list(LAYERS)
STATELESS = [n for n in NAMES if LAYERS[n][3]]


def _build(name, channels, dtype=torch.float64):
    layer = LAYERS[name][0](channels).to(dtype)
    randomize_parameters(layer)
    if name == "frn":
        with torch.no_grad():  # thresholds inside the outputs' range: both TLU branches at work
            layer.tau.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    return layer


def _params(layer):
    return {n: _np(p) for n, p in layer.named_parameters()}


@st.composite
def _shapes(draw, min_rank):
    rank = draw(st.integers(max(min_rank, 2), 5))
    batch = draw(st.integers(2, 6))
    channels = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 4), min_size=rank - 2, max_size=rank - 2))
    if min_rank == 3 and np.prod(spatial) == 1:
        spatial[0] = 2  # per-sample statistics over space need two elements
    return (batch, channels, *spatial)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_random_shapes_match_the_oracle(name, backend_name):
    @settings(max_examples=10)
    @given(shape=_shapes(LAYERS[name][2]), seed=st.integers(0, 2**16))
    def check(shape, seed):
        layer = _build(name, shape[1])
        x = make_input(shape, torch.float64, seed=seed)
        expected = LAYERS[name][1](layer, x.numpy(), _params(layer))
        with nk.backend(backend_name):
            y = layer(x)
        assert_close(y, torch.from_numpy(np.asarray(expected)), torch.float64, f"{name} {shape}")

    check()


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("mabn", "cbn")])
@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_gradients_match_the_oracles_derivative(name, backend_name):
    """d/dt sum(w * layer(x + t dx; p + t dp)) by autograd equals the float64 oracle's, for the
    input and every parameter at once (one random direction; helpers' Richardson differences)."""
    shape = (4, 4, 3, 5)
    layer = _build(name, shape[1])
    x = make_input(shape, torch.float64, seed=1).requires_grad_()
    generator = torch.Generator().manual_seed(3)
    weights = torch.randn(shape, generator=generator, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    directions = [torch.randn(shape, generator=generator, dtype=torch.float64)]
    directions += [torch.randn(p.shape, generator=generator, dtype=torch.float64)
                   for p in layer.parameters()]  # fmt: skip
    with nk.backend(backend_name):
        y = layer(x)
    grads = torch.autograd.grad((y * weights).sum(), [x, *layer.parameters()])
    autograd = sum(float((g * d).sum()) for g, d in zip(grads, directions, strict=True))

    def f(x_, *params):
        return LAYERS[name][1](layer, x_, dict(zip(names, params, strict=True)))

    numeric = reference_directional_derivative(
        f, [_np(x), *[_np(p) for p in layer.parameters()]], [d.numpy() for d in directions],
        weights.numpy(), step=1e-4,
    )  # fmt: skip
    assert abs(autograd - numeric) <= 1e-7 * max(1.0, abs(numeric)), (autograd, numeric)


HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("config", list(HALF))
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_against_float64(name, config, backend):
    """Against the same layer in float64 given the same half-rounded parameters, inputs and output
    gradients (helpers' tolerances: two roundings of each element for ``reference``, normwise for
    ATen's kernels)."""
    dtype = HALF[config]
    layer = _build(name, 4, dtype)
    exact = copy.deepcopy(layer).double()
    inputs = [make_input((8, 4, 3, 3), dtype, channels_last=s == 1, seed=s) for s in range(3)]
    flags = [True, True, False]
    mine = run_steps(layer, inputs, flags, grad_dtype=dtype)
    with nk.backend("reference"):
        truth = run_steps(exact, [x.double() for x in inputs], flags, grad_dtype=dtype)
    for step, ((y, dx, grads), (ey, edx, egrads)) in enumerate(zip(mine, truth, strict=True)):
        label = f"{name} {config} step {step}"
        assert y.dtype == dtype and torch.isfinite(y).all(), label
        assert_normwise_close(y, ey, dtype, f"{label} output")
        assert_normwise_close(dx, edx, dtype, f"{label} input grad")
        for key in grads:
            assert_normwise_close(grads[key], egrads[key], dtype, f"{label} grad of {key}")
    assert dtype in NORMWISE_HALF


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (4, 3, 2, 3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", NAMES)
def test_channels_last_in_channels_last_out(name, shape, backend):
    layer = _build(name, 3, torch.float32)
    twin = copy.deepcopy(layer)
    x = make_input(shape, channels_last=True).requires_grad_()
    y = layer(x)
    assert y.is_contiguous(memory_format=channels_last_format(len(shape))), "lost channels_last"
    y.backward(torch.ones_like(y))
    assert_close(y, twin(x.detach().contiguous()), what="channels_last vs contiguous")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    layer = _build(name, 3, torch.float32)
    for seed in range(3):
        layer(make_input((6, 3, 4, 4), seed=seed)).sum().backward()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = LAYERS[name][0](3)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in layer.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    x = make_input((2, 3, 4, 4), seed=9)
    torch.testing.assert_close(other.eval()(x), layer.eval()(x))


FACTORY = {
    "rms": nk.RMSNorm,
    "rms2d": nk.RMSNorm2d,
    "frn": nk.FilterResponseNorm,
    "evonorm_b0": nk.EvoNormB0,
    "evonorm_s0": nk.EvoNormS0,
    "mabn": nk.MovingAverageBatchNorm,
    "cbn": nk.CrossIterationBatchNorm,
}


@pytest.mark.parametrize("spec", list(FACTORY))
def test_factory_strings_build_the_layer(spec):
    layer = nk.create_norm(spec, 8)
    assert type(layer) is FACTORY[spec]
    assert type(nk.create_norm(spec.upper().replace("_", "-"), 8)) is FACTORY[spec]


def test_factory_numbers():
    assert nk.create_norm("evonorm_s0:4", 8).groups == 4
    assert nk.create_norm("evonorm_s0", 24).groups == 24  # the largest divisor up to 32
    assert nk.create_norm("cbn:3", 8).window == 3
    with pytest.raises(nk.errors.ConfigError, match="takes no number"):
        nk.create_norm("frn:2", 8)


# --- program transforms --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(name, training):
    """torch.compile(fullgraph=True) gives the eager numbers; MABN's and CBN's training steps
    refuse (their backward rule and in-forward derivatives cannot be traced), with a clear error."""
    layer = _build(name, 4, torch.float32).train(training)
    for seed in range(2):  # statistics away from their initial values before eval
        layer.train()(make_input((6, 4, 5, 5), seed=seed)).sum().backward()
    layer.train(training)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = make_input((6, 4, 5, 5), seed=5)
    if training and not LAYERS[name][3]:
        with pytest.raises(Exception, match="cannot run under torch.compile"):
            compiled(x)
        return
    torch.testing.assert_close(compiled(x), eager(x))
    for (key, value), other in zip(layer.state_dict().items(), eager.state_dict().values(),
                                   strict=True):  # fmt: skip
        torch.testing.assert_close(value, other, msg=key)


@pytest.mark.parametrize("name", STATELESS)
def test_torch_func_grad_and_vmap(name):
    """torch.func.functional_call, grad (against autograd) and vmap (against a loop)."""
    layer = _build(name, 4, torch.float64)
    if name == "evonorm_b0":
        layer.eval()  # vmap over samples: per-sample maps only (BN's batch statistic is not one)
    params = dict(layer.named_parameters())
    buffers = dict(layer.named_buffers())
    x = make_input((3, 4, 5, 5), torch.float64, seed=2)

    def loss(p, inp):
        return torch.func.functional_call(layer, (p, buffers), (inp,)).square().sum()

    grads = torch.func.grad(loss)(params, x)
    expected = torch.autograd.grad(loss(params, x), list(params.values()))
    for (key, g), e in zip(grads.items(), expected, strict=True):
        torch.testing.assert_close(g, e, msg=key)
    per_sample = torch.func.vmap(lambda inp: layer(inp.unsqueeze(0)).squeeze(0))(x)
    looped = torch.stack([layer(x[i : i + 1]).squeeze(0) for i in range(3)])
    torch.testing.assert_close(per_sample, looped)


@pytest.mark.parametrize("name", NAMES)
def test_errors_name_the_layer(name):
    layer = _build(name, 3, torch.float32)
    with pytest.raises(nk.errors.ShapeError) as info:
        layer(torch.randn(4, 5, 3, 3))
    assert type(layer).__name__ in str(info.value)
    with pytest.raises(nk.errors.DtypeError):
        layer(torch.ones((4, 3, 3, 3), dtype=torch.long))
