"""nk.BatchNormAct: batch norm, an optional residual and an activation in one layer.

The native backend (ATen's kernels with the fused backward) and the reference backend (the unfused
definition) against the float64 oracle, in training and eval, for every activation, with and
without the residual, contiguous and channels_last. float32 is held to helpers.TOLERANCES. In half
precision the native backend runs torch's half kernels, as torch's own BatchNorm2d -> activation
does; it must be no less accurate than that unfused torch computation (largest error at most 1.5x
torch's, or within two roundings of the largest value; the criterion of test_half_precision.py).
The compiled backend is in test_compiled_backend.py, the triton one in test_kernels_batch_norm.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit as nk
from fused_oracle import (
    PARAMS,
    compare,
    expected_batch_norm_act,
    layout_tensor,
    make_case,
    run_batch_norm_act,
)
from helpers import NORMWISE_HALF, assert_close
from normkit.benchmark import saved_bytes

ACTIVATIONS = ["relu", "leaky_relu", "silu", "gelu", "identity"]


def _functional(backend, activation, training):
    param = PARAMS.get(activation, 0.01)

    def fn(x, z, mean, var, weight, bias):
        with nk.backend(backend):
            return nk.functional.batch_norm_act(
                x, mean, var, weight, bias, training, 0.1, 1e-5,
                activation=activation, activation_param=param, residual=z,
            )  # fmt: skip

    return fn


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_against_float64(backend, layout, residual, training, activation):
    case = make_case((4, 5, 3, 6), torch.float32, layout, seed=1)
    actual = run_batch_norm_act(
        _functional(backend, activation, training), case, training=training, residual=residual
    )
    expected = expected_batch_norm_act(
        case, training=training, activation=activation, residual=residual
    )
    compare(actual, expected, torch.float32, f"{backend} {activation}")
    assert actual["y_stride"] == actual["x_stride"]
    if (
        backend == "native"
    ):  # the fused backward keeps the layout (the reference's autograd may not)
        assert actual["dx_stride"] == actual["x_stride"]


def _torch_unfused(activation, training):
    param = PARAMS.get(activation, 0.01)

    def fn(x, z, mean, var, weight, bias):
        y = F.batch_norm(x, mean, var, weight, bias, training, 0.1, 1e-5)
        y = y + z if z is not None else y
        return nk.functional._activation.apply(y, activation, param)

    return fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_native_half_no_worse_than_torch(dtype, layout, activation, training):
    case = make_case((4, 5, 3, 6), dtype, layout, seed=2)
    ours = run_batch_norm_act(
        _functional("native", activation, training), case, training=training, residual=True
    )
    theirs = run_batch_norm_act(
        _torch_unfused(activation, training), case, training=training, residual=True
    )
    expected = expected_batch_norm_act(
        case, training=training, activation=activation, residual=True
    )
    for key in ("y", "dx", "dz", "dweight", "dbias"):
        e = expected[key]
        ours_error = (ours[key].double() - e).abs().max().item()
        torch_error = (theirs[key].double() - e).abs().max().item()
        bound = max(1.5 * torch_error, NORMWISE_HALF[dtype] * e.abs().max().item())
        assert ours_error <= bound, f"{key}: {ours_error:.3g} > {bound:.3g}"
    assert_close(ours["mean"], expected["mean"], torch.float32, "running mean")


def test_layer_state_dict_is_a_batch_norms():
    """BatchNorm's keys and numbers, but not a torch _BatchNorm: converters that look for batch
    norms would replace it by one and drop the activation (nk.nn._base.NormBase)."""
    layer = nk.BatchNormAct(6, activation="silu")
    assert isinstance(layer, torch.nn.modules.batchnorm._NormBase)
    assert not isinstance(layer, (torch.nn.modules.batchnorm._BatchNorm, nk.BatchNorm))
    plain = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.running_var.uniform_(0.5, 2)
    plain.num_batches_tracked.fill_(7)
    layer.load_state_dict(plain.state_dict())  # strict: the same keys
    assert set(layer.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(layer.weight, plain.weight)
    nk.BatchNorm2d(6).load_state_dict(layer.state_dict())
    layer.eval()
    plain.eval()
    x = torch.randn(2, 6, 3, 3)
    with nk.backend("native"):
        torch.testing.assert_close(layer(x), F.silu(plain(x)))


def test_layer_semantics_and_running_statistics():
    """After a step the pre-activation has mean 0 and variance 1 per channel; the running buffers
    follow PyTorch's momentum with the unbiased variance; momentum=None is the cumulative average."""
    layer = nk.BatchNormAct(3, activation="identity", momentum=None)
    batches = [torch.randn(8, 3, 4) * 3 + 2 for _ in range(3)]
    with nk.backend("native"):
        for x in batches:
            y = layer(x)
    torch.testing.assert_close(y.mean((0, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var((0, 2), correction=0), torch.ones(3), atol=1e-4, rtol=0)
    means = torch.stack([x.mean((0, 2)) for x in batches]).mean(0)
    variances = torch.stack([x.var((0, 2)) for x in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, means)
    torch.testing.assert_close(layer.running_var, variances)
    assert int(layer.num_batches_tracked) == 3


def test_non_finite_batch_is_kept_out_of_the_running_statistics():
    layer = nk.BatchNormAct(3)
    before = layer.running_mean.clone(), layer.running_var.clone()
    with nk.backend("native"):
        layer(torch.full((4, 3, 2), float("nan")))
    assert torch.equal(layer.running_mean, before[0])
    assert torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_skipped) == 1 and int(layer.num_batches_tracked) == 0


def test_saved_for_backward():
    """native keeps x and, for relu, the output (its sign is the derivative), as BatchNorm2d ->
    ReLU does; silu recomputes from x; nothing else of the input's size is saved."""
    x = torch.randn(8, 16, 10, 10)
    leaf = x.clone().requires_grad_()
    layer = nk.BatchNormAct(16)
    torch_pair = torch.nn.Sequential(torch.nn.BatchNorm2d(16), torch.nn.ReLU())
    small = 64 * 16  # parameters and per-channel statistics
    with nk.backend("native"):
        relu = saved_bytes(lambda: layer(leaf * 1))
        silu = saved_bytes(lambda: nk.BatchNormAct(16, activation="silu")(leaf * 1))
    unfused = saved_bytes(lambda: torch_pair(leaf * 1))
    assert 2 * x.nbytes <= relu <= 2 * x.nbytes + small
    assert x.nbytes <= silu <= x.nbytes + small
    assert relu <= unfused


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"activation": "tanh"}, nk.errors.ConfigError, "one of the activations"),
        ({"activation": "leaky_relu", "activation_param": float("nan")}, nk.errors.ConfigError, "finite"),
    ],
)  # fmt: skip
def test_bad_configuration_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        nk.BatchNormAct(4, **kwargs)


def test_bad_residuals_are_refused_before_any_state_changes():
    with_residual, without = nk.BatchNormAct(3, residual=True), nk.BatchNormAct(3)
    x = torch.randn(4, 3, 5)
    with pytest.raises(nk.errors.ConfigError, match=r"layer\(x, z\)"):
        with_residual(x)
    with pytest.raises(nk.errors.ConfigError, match="residual=True"):
        without(x, x)
    with pytest.raises(
        nk.errors.ShapeError, match=r"residual must have the input's shape \(4, 3, 5\)"
    ):
        with_residual(x, torch.randn(4, 3, 4))
    assert int(with_residual.num_batches_tracked) == 0
    assert torch.equal(with_residual.running_mean, torch.zeros(3))


def test_extra_repr_names_the_activation():
    text = repr(nk.BatchNormAct(4, activation="leaky_relu", activation_param=0.2, residual=True))
    assert "activation='leaky_relu'" in text and "activation_param=0.2" in text
    assert "residual=True" in text


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=5),
    activation=st.sampled_from(ACTIVATIONS),
    channels_last=st.booleans(),
    residual=st.booleans(),
)
def test_random_shapes_native(shape, activation, channels_last, residual):
    shape = (max(shape[0], 2), *shape[1:])
    layout = "channels_inner" if channels_last and len(shape) > 2 else "contiguous"
    case = make_case(tuple(shape), torch.float32, layout, seed=len(shape))
    actual = run_batch_norm_act(
        _functional("native", activation, True), case, training=True, residual=residual
    )
    expected = expected_batch_norm_act(
        case, training=True, activation=activation, residual=residual
    )
    compare(actual, expected, torch.float32, f"{shape} {activation}")


def test_layout_helper_keeps_values():
    x = torch.randn(2, 3, 4, 5)
    for layout in ("contiguous", "channels_last", "channels_inner", "strided"):
        torch.testing.assert_close(layout_tensor(x, layout), x)
