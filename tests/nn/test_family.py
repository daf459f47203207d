"""Generic tests over the layers beyond BatchNorm (Batch Renorm, Ghost BN, Batch-Instance, Batch-Layer,
Switchable, Frozen): random shapes against the float64 oracle, float16/bfloat16, channels_last,
state_dict round trips, gradcheck, torch.compile, and errors that name the layer."""

import functools
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit as nk
import normkit.functional as nkf
from helpers import (
    NORMWISE_HALF,
    assert_close,
    assert_normwise_close,
    channels_last_format,
    make_input,
    randomize_parameters,
    run_steps,
)
from normkit import reference as R


def _np(t):
    return t.detach().double().numpy()


# name -> (constructor taking C, the float64 oracle of one training step given the layer and input,
#          the smallest rank the layer takes)
def _renorm_oracle(layer, x):
    sigma = np.sqrt(_np(layer.running_var) + layer.eps)
    return R.batch_renorm_train(
        x, _np(layer.weight), _np(layer.bias), _np(layer.running_mean), sigma,
        layer.r_max, layer.d_max, layer.momentum, layer.eps,
    )[0]  # fmt: skip


LAYERS = {
    "renorm": (
        lambda c: nk.BatchRenorm(c, r_max=1.5, d_max=0.5, momentum=0.2),
        _renorm_oracle,
        2,
    ),
    "ghost": (
        lambda c: nk.GhostBatchNorm(c, virtual_batch_size=2),
        lambda m, x: R.ghost_batch_norm_train(x, _np(m.weight), _np(m.bias), 2, m.eps)[0],
        2,
    ),
    "batch_instance": (
        nk.BatchInstanceNorm,
        lambda m, x: R.batch_instance_norm(x, _np(m.rho), _np(m.weight), _np(m.bias), m.eps),
        3,
    ),
    "batch_layer": (
        nk.BatchLayerNorm,
        lambda m, x: R.batch_layer_norm(x, _np(m.weight), _np(m.bias), m.eps),
        2,
    ),
    "switchable": (
        nk.SwitchableNorm,
        lambda m, x: R.switchable_norm(
            x, _np(m.mean_weight), _np(m.var_weight), _np(m.weight), _np(m.bias), m.eps
        ),
        3,
    ),
    "frozen": (
        nk.FrozenBatchNorm,
        lambda m, x: R.batch_norm_inference(
            x, _np(m.running_mean), _np(m.running_var), _np(m.weight), _np(m.bias), m.eps
        ),
        2,
    ),
}


def _build(name, channels, dtype=torch.float64):
    layer = LAYERS[name][0](channels).to(dtype)
    randomize_parameters(layer)
    if name == "batch_instance":
        with torch.no_grad():
            layer.rho.uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    if name in ("renorm", "frozen"):
        with torch.no_grad():  # running statistics away from 0 and 1 (r, d at work; frozen map)
            layer.running_mean.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(4))
            layer.running_var.uniform_(0.3, 3.0, generator=torch.Generator().manual_seed(5))
    return layer


@st.composite
def _shapes(draw, min_rank):
    rank = draw(st.integers(max(min_rank, 2), 5))
    batch = draw(st.integers(2, 7))
    channels = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 4), min_size=rank - 2, max_size=rank - 2))
    if min_rank == 3 and np.prod(spatial) == 1:
        spatial[0] = 2  # instance statistics need two elements per plane
    return (batch, channels, *spatial)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_random_shapes_match_the_oracle(name, backend_name):
    @settings(max_examples=12)
    @given(shape=_shapes(LAYERS[name][2]), seed=st.integers(0, 2**16))
    def check(shape, seed):
        layer = _build(name, shape[1])
        x = make_input(shape, torch.float64, seed=seed)
        expected = LAYERS[name][1](layer, x.numpy())
        with nk.backend(backend_name):
            y = layer(x)
        assert_close(y, torch.tensor(expected), torch.float64, f"{name} {shape}")

    check()


# --- float16 / bfloat16 -----------------------------------------------------------------------------
# (module dtype, input dtype): half modules, and half inputs into float32 parameters (autocast).
HALF = {
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16": (torch.float16, torch.float16),
    "bf16_input_f32_params": (torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("config", list(HALF))
@pytest.mark.parametrize("name", list(LAYERS))
def test_half_precision_against_float64(name, config, backend):
    """Against the same layer in float64 given the same (half-rounded) parameters, inputs and output
    gradients. The ``reference`` backend computes in float32 and rounds once: within two roundings
    per element (helpers.TOLERANCES). ``native`` also rounds once per ATen kernel, and Batch-Layer
    adds its two halves in the half type, so it is held to two roundings of the largest value
    (helpers.NORMWISE_HALF)."""
    module_dtype, input_dtype = HALF[config]
    layer = _build(name, 4, module_dtype)
    exact = _build(name, 4, module_dtype).double()
    exact.load_state_dict(layer.state_dict())
    shape = (8, 4, 3, 3)
    inputs = [make_input(shape, input_dtype, channels_last=s == 1, seed=s) for s in range(3)]
    flags = [True, True, False]
    mine = run_steps(layer, inputs, flags, grad_dtype=input_dtype)
    with nk.backend("reference"):
        truth = run_steps(exact, [x.double() for x in inputs], flags, grad_dtype=input_dtype)
    check = assert_close if backend == "reference" else assert_normwise_close
    for step, ((y, dx, grads), (ey, edx, egrads)) in enumerate(zip(mine, truth, strict=True)):
        label = f"{name} {config} step {step}"
        assert y.dtype == input_dtype and torch.isfinite(y).all(), label
        check(y, ey, input_dtype, f"{label} output")
        check(dx, edx, input_dtype, f"{label} input grad")
        for key in grads:
            assert grads[key].dtype == module_dtype, f"{label} {key}"
            check(grads[key], egrads[key], input_dtype, f"{label} grad of {key}")
    assert input_dtype in NORMWISE_HALF


# --- memory format, state_dict, gradcheck -----------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (4, 3, 2, 3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_channels_last_in_channels_last_out(name, shape, backend):
    layer = _build(name, 3, torch.float32)
    x = make_input(shape, channels_last=True).requires_grad_()
    y = layer(x)
    fmt = channels_last_format(len(shape))
    assert y.is_contiguous(memory_format=fmt), "output lost channels_last"
    y.backward(torch.ones_like(y))
    expected = _build(name, 3, torch.float32)(x.detach().contiguous())
    assert_close(y, expected, what="channels_last vs contiguous")


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_dict_round_trip(name):
    layer = _build(name, 3, torch.float32)
    for seed in range(2):
        layer(make_input((6, 3, 4, 4), seed=seed))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = LAYERS[name][0](3)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in layer.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    x = make_input((2, 3, 4, 4), seed=9)
    torch.testing.assert_close(other.eval()(x), layer.eval()(x))


def _double(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(shape, generator=generator, dtype=torch.float64) * 0.5 + 1.0
    ).requires_grad_()


def _running(c=3):
    return torch.linspace(-0.5, 0.5, c, dtype=torch.float64), torch.linspace(
        0.5, 2, c, dtype=torch.float64
    )


OPS = {
    "batch_renorm": (
        lambda x, w, b: nkf.batch_renorm(x, *_running(), w, b, True, 0.1, 1e-5, 1.2, 0.3),
        (4, 3, 2, 3),
    ),
    "ghost_batch_norm": (
        lambda x, w, b: nkf.ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=2),
        (5, 3, 2, 2),
    ),
    "batch_instance_norm": (
        lambda x, w, b: nkf.batch_instance_norm(x, w.detach() * 0 + 0.4, None, None, w, b, True),
        (3, 3, 2, 3),
    ),
    "batch_instance_norm_eval": (
        lambda x, w, b: nkf.batch_instance_norm(x, torch.full_like(w, 0.6), *_running(), w, b),
        (3, 3, 2, 3),
    ),
    "batch_layer_norm": (
        lambda x, w, b: nkf.batch_layer_norm(x, None, None, w, b, True),
        (4, 3, 2, 2),
    ),
    "switchable_norm": (
        lambda x, w, b: nkf.switchable_norm(
            x,
            torch.tensor([0.2, -0.1, 0.4], dtype=x.dtype),
            torch.tensor([-0.3, 0.1, 0.2], dtype=x.dtype),
            None,
            None,
            w,
            b,
            True,
        ),
        (3, 3, 2, 3),
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck(name, backend):
    fn, shape = OPS[name]
    inputs = [_double(shape), _double(shape[1], 1), _double(shape[1], 2)]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", list(OPS))
def test_gradgradcheck(name, backend):
    fn, shape = OPS[name]
    inputs = [_double(shape), _double(shape[1], 1), _double(shape[1], 2)]
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("name", list(LAYERS))
def test_errors_name_the_layer(name):
    layer = _build(name, 3, torch.float32)
    with pytest.raises(nk.errors.ChannelMismatchError) as info:
        layer(torch.randn(4, 5, 3, 3))
    assert type(layer).__name__ in str(info.value)
    with pytest.raises(nk.errors.DtypeError):
        layer(torch.ones(4, 3, 3, 3, dtype=torch.long))


# --- torch.compile ----------------------------------------------------------------------------------


def _tiny_model(dtype=torch.float32):
    """Every layer of the family in one small conv net: one compilation covers all of them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        nk.BatchRenorm2d(4, r_max=1.5, d_max=0.5),
        torch.nn.ReLU(),
        nk.GhostBatchNorm(4, virtual_batch_size=3),  # 8 samples: two ghost batches of 4
        torch.nn.ReLU(),
        nk.BatchInstanceNorm(4),
        torch.nn.ReLU(),
        nk.BatchLayerNorm(4),
        torch.nn.ReLU(),
        nk.SwitchableNorm(4),
        torch.nn.ReLU(),
        nk.FrozenBatchNorm(4),
    ).to(dtype)
    for layer in model:
        if not isinstance(layer, (torch.nn.Conv2d, torch.nn.ReLU)):
            randomize_parameters(layer)
    with torch.no_grad():
        model[5].rho.uniform_(0.2, 0.8, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("backend_name", ["native", "reference", "auto"])
def test_each_layer_traces_without_graph_breaks(name, backend_name):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False), _build(name, 4, torch.float32)
    )
    with nk.backend(backend_name):
        explanation = torch._dynamo.explain(model)(torch.randn(6, 3, 6, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_family_gives_the_same_numbers():
    """Compiled (inductor) and eager agree on outputs and running statistics over two training steps
    and one eval step; the compiled gradients are as accurate as eager's against float64."""
    eager, compiled, exact = _tiny_model(), _tiny_model(), _tiny_model(torch.float64)
    compiled_fn = torch.compile(compiled)
    weights = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    for step, training in enumerate((True, True, False)):
        for model in (eager, compiled, exact):
            model.train(training).zero_grad()
        x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        y_eager, y_compiled, y_exact = eager(x), compiled_fn(x), exact(x.double())
        torch.testing.assert_close(y_compiled, y_eager, msg=f"step {step} output")
        if not training:
            break
        (y_eager * weights).sum().backward()
        (y_compiled * weights).sum().backward()
        (y_exact * weights.double()).sum().backward()
        named = zip(
            compiled.named_parameters(), eager.parameters(), exact.parameters(), strict=True
        )
        for (name, p), q, r in named:
            compiled_error = (p.grad.double() - r.grad).abs().max().item()
            eager_error = (q.grad.double() - r.grad).abs().max().item()
            assert compiled_error <= max(4 * eager_error, 1e-5 * r.grad.abs().max().item()), name
    for (name, b), c in zip(compiled.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=name)


def test_factory_partial_builds_a_working_model():
    """create_norm as a model's norm_layer argument: every name in one network."""
    layers = [nk.create_norm(spec, 4) for spec in ("renorm", "ghost:2", "batch_instance",
                                                   "batch_layer", "switchable", "frozen")]  # fmt: skip
    model = torch.nn.Sequential(*layers)
    assert model(torch.randn(4, 4, 3, 3)).shape == (4, 4, 3, 3)
    assert isinstance(functools.partial(nk.create_norm, "ghost:2")(4), nk.GhostBatchNorm)
