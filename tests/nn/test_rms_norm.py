"""RMSNorm: an exact drop-in for torch.nn.RMSNorm (arguments, keys, dtype rules, default eps, numbers)
on every backend, its float64 oracle, and RMSNorm2d over the channels of a map."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit as nk
from helpers import assert_close, assert_normwise_close, make_input, randomize_parameters
from normkit import reference as R

BACKENDS = ["native", "reference"]


def test_same_constructor_and_keys_as_torch():
    def parameters(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert parameters(nk.RMSNorm) == parameters(torch.nn.RMSNorm)
    for args in [(8,), ([4, 8],), (8, 1e-3, False)]:
        ours, theirs = nk.RMSNorm(*args), torch.nn.RMSNorm(*args)
        assert isinstance(ours, torch.nn.RMSNorm)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert repr(ours) == repr(theirs)
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(
    "shape, normalized, eps",
    [((6, 16), 16, None), ((3, 5, 16), 16, 1e-5), ((2, 3, 4, 5), [4, 5], 1e-6), ((7, 1), 1, 1e-3)],
)
def test_matches_torch_forward_and_backward(shape, normalized, eps, backend_name):
    """fp32 against torch.nn.RMSNorm within helpers' float32 tolerance (the reduction order
    differs); float64 too, where only rounding separates them."""
    for dtype in (torch.float32, torch.float64):
        ours = nk.RMSNorm(normalized, eps).to(dtype)
        randomize_parameters(ours)
        theirs = torch.nn.RMSNorm(normalized, eps).to(dtype)
        theirs.load_state_dict(ours.state_dict())
        x = make_input(shape, dtype, seed=3)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        with nk.backend(backend_name):
            ya = ours(a)
        yb = theirs(b)
        dy = make_input(shape, dtype, seed=4)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(ya, yb, dtype, "output")
        assert_close(a.grad, b.grad, dtype, "input grad")
        assert_close(ours.weight.grad, theirs.weight.grad, dtype, "weight grad")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_against_the_float64_oracle(backend_name):
    @settings(max_examples=15)
    @given(
        rows=st.lists(st.integers(1, 4), min_size=1, max_size=3),
        features=st.integers(1, 9),
        seed=st.integers(0, 2**16),
    )
    def check(rows, features, seed):
        layer = nk.RMSNorm(features, 1e-5).double()
        randomize_parameters(layer, seed=seed)
        x = make_input((*rows, features), torch.float64, seed=seed)
        with nk.backend(backend_name):
            y = layer(x)
        expected = R.rms_norm(x.numpy(), 1, layer.weight.detach().numpy(), 1e-5)
        assert_close(y, torch.from_numpy(expected), torch.float64, f"{rows}x{features}")

    check()


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_like_torch(dtype, backend_name):
    """Half inputs: same output dtype as torch (also with a float32 weight), statistics in
    float32 and torch's default eps (float32's machine epsilon), within two roundings."""
    for weight_dtype in (dtype, torch.float32):
        ours = nk.RMSNorm(32).to(weight_dtype)
        randomize_parameters(ours)
        theirs = copy.deepcopy(ours).double()
        x = make_input((4, 7, 32), dtype, seed=1)
        tiny = torch.full((1, 1, 32), 1e-4, dtype=dtype)  # where eps matters
        for inp in (x, tiny):
            a = inp.clone().requires_grad_()
            with nk.backend(backend_name):
                y = ours(a)
            assert y.dtype == torch.nn.RMSNorm(32).to(weight_dtype)(inp).dtype
            e = inp.double().requires_grad_()
            expected = torch.rms_norm(e, [32], theirs.weight, torch.finfo(torch.float32).eps)
            assert_normwise_close(y, expected, dtype, "output")
            dy = torch.ones_like(y)
            y.backward(dy)
            expected.backward(dy.double())
            assert_normwise_close(a.grad, e.grad, dtype, "input grad")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_rms_norm_2d_is_torch_over_the_channels(channels_last, backend_name):
    layer = nk.RMSNorm2d(6, eps=1e-5)
    randomize_parameters(layer)
    torch_layer = torch.nn.RMSNorm(6, eps=1e-5)
    torch_layer.load_state_dict(layer.state_dict())  # the same keys and shapes
    x = make_input((3, 6, 4, 5), channels_last=channels_last).requires_grad_()
    with nk.backend(backend_name):
        y = layer(x)
    expected = torch_layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert_close(y, expected, what="output")
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    grads = torch.autograd.grad(y.square().sum(), [x, layer.weight])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, torch_layer.weight])
    for g, e in zip(grads, expected_grads, strict=True):
        assert_close(g, e)


def test_compile_fullgraph_and_torch_func():
    layer = nk.RMSNorm(16)
    randomize_parameters(layer)
    x = make_input((4, 3, 16), seed=2)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
    params = dict(layer.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(
        params
    )
    expected = torch.autograd.grad(layer(x).square().sum(), layer.weight)[0]
    torch.testing.assert_close(grads["weight"], expected)
    per_row = torch.func.vmap(layer)(x)
    torch.testing.assert_close(per_row, layer(x))


def test_errors():
    layer = nk.RMSNorm(8)
    with pytest.raises(nk.errors.ShapeError, match="RMSNorm"):
        layer(torch.randn(2, 7))
    with pytest.raises(nk.errors.ConfigError):
        nk.RMSNorm(8, eps=0.0)
    with pytest.raises(nk.errors.DtypeError):
        layer(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(nk.errors.ChannelMismatchError, match="RMSNorm2d"):
        nk.RMSNorm2d(4)(torch.randn(2, 5, 3))
