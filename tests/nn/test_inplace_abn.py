"""nk.InPlaceABN (Rota Bulò et al. 2018): batch norm + an invertible activation over the input's
memory, with a backward from the output alone.

The gradients must be those of the unfused computation (batch norm, then the activation): both
are checked against the float64 oracle, whose own two forms (the unfused chain rule, and §3.2's
recovery from the output) are first checked against each other. The native backend (ATen + torch)
always runs; the triton backend runs under triton's interpreter where triton is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit as nk
from fused_oracle import (
    PARAMS,
    compare,
    expected_batch_norm_act,
    layout_tensor,
    make_case,
)
from helpers import assert_close
from normkit import reference as R
from normkit.benchmark import saved_bytes

ACTIVATIONS = ["leaky_relu", "elu", "identity"]


def test_oracle_recovery_from_the_output_equals_the_unfused_chain_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (6, 3, 4, 5))
    gamma, beta = np.array([1.3, -0.7, 0.4]), np.array([0.2, -0.1, 0.5])
    dz = rng.normal(size=x.shape)
    for name in ACTIVATIONS:
        z, cache, pre = R.batch_norm_act_train(x, gamma, beta, name, 0.3)
        dx, _, dgamma, dbeta = R.batch_norm_act_backward(dz, cache, pre, name, 0.3)
        _, var, _ = R.batch_statistics(x)
        dx2, dgamma2, dbeta2 = R.inplace_abn_backward(dz, z, gamma, beta, var, name, 0.3)
        np.testing.assert_allclose(dx2, dx, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(dgamma2, dgamma, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(dbeta2, dbeta, rtol=1e-9, atol=1e-10)


def _run(backend, case, activation, training, inplace=True, device="cpu"):
    """Forward and backward of the functional op on a non-leaf input (as after a convolution)."""
    leaf = case["x"].to(device, copy=True).requires_grad_()  # the case stays untouched
    x = layout_tensor(leaf, case["layout"]) if case["layout"] != "contiguous" else leaf * 1
    stride = x.stride()
    weight = case["weight"].to(device, copy=True).requires_grad_()
    bias = case["bias"].to(device, copy=True).requires_grad_()
    mean = case["running_mean"].to(device, copy=True)
    var = case["running_var"].to(device, copy=True)
    pointer = x.data_ptr()
    with nk.backend(backend):
        y = nk.functional.inplace_abn(
            x, mean, var, weight, bias, training, 0.1, 1e-5,
            activation=activation, activation_param=PARAMS.get(activation, 0.01), inplace=inplace,
        )  # fmt: skip
    y.backward(case["dy"].to(device=device, dtype=y.dtype))
    return {
        "y": y.detach(),
        "dx": leaf.grad,
        "dweight": weight.grad,
        "dbias": bias.grad,
        "mean": mean,
        "var": var,
        "in_place": y.data_ptr() == pointer,
        "stride_kept": y.stride() == stride,
    }


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_native_float32_equals_the_unfused_computation(activation, training, layout):
    case = make_case((4, 3, 5, 6), torch.float32, layout, seed=4)
    actual = _run("native", case, activation, training)
    expected = expected_batch_norm_act(
        case, training=training, activation=activation, residual=False
    )
    compare(actual, expected, torch.float32, f"{activation} {layout}")
    assert actual["in_place"] and actual["stride_kept"]


def _half_compare(actual, expected, dtype, label):
    """Half precision: the output is stored rounded and x_hat is recovered from it, so the float32
    parameter gradients inherit the half type's rounding (about u (|x_hat| + |beta / gamma|) per
    element, u the unit roundoff): every result is held to the half dtype's tolerance, with
    |beta / gamma| <= 1 in these cases."""
    for key in ("y", "dx", "dweight", "dbias"):
        assert_close(actual[key], expected[key], dtype, f"{label} {key}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_native_half_precision_leaky_relu(dtype):
    case = make_case((4, 3, 5, 6), dtype, "channels_last", seed=5)
    case["bias"] = case["bias"].clamp(-0.5, 0.5)
    actual = _run("native", case, "leaky_relu", True)
    expected = expected_batch_norm_act(case, training=True, activation="leaky_relu", residual=False)
    _half_compare(actual, expected, dtype, str(dtype))


def test_leaf_inputs_are_not_overwritten():
    x = torch.randn(4, 3, 5, requires_grad=True)
    before = x.detach().clone()
    y = nk.InPlaceABN(3)(x)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x.detach(), before)
    y.sum().backward()
    assert x.grad is not None


def test_autograd_catches_a_later_use_of_the_overwritten_input():
    """The input's memory now holds the output: a graph that saved the input sees the change."""
    base = torch.randn(4, 3, 5, requires_grad=True)
    x = base * 1
    other = x.sin()  # saves x for its backward
    nk.InPlaceABN(3)(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.sum().backward()


def test_weights_of_a_plain_batch_norm_give_its_output_even_when_negative():
    plain = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([1.5, -0.8, 0.3, -2.0]))
        plain.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    layer = nk.InPlaceABN(4, activation="leaky_relu", activation_param=0.05)
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(6, 4, 3, 3)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    y = layer(a * 1)
    expected = F.leaky_relu(plain(b), 0.05)
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var, plain.running_var)


def test_weights_near_zero_use_the_floor_and_still_learn():
    """gamma = 0 (a zero-initialised residual branch) runs with gamma = min_abs_weight and gets
    the gradient of that effective gamma, so it moves away from zero."""
    layer = nk.InPlaceABN(2, activation="identity", min_abs_weight=1e-2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.0, -1e-4]))
        layer.bias.zero_()
    x = torch.randn(8, 2, 4) * 3 + 1
    y = layer(x.clone())
    x_hat = (x - x.mean((0, 2), keepdim=True)) / torch.sqrt(
        x.var((0, 2), correction=0, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(y, x_hat * torch.tensor([1e-2, -1e-2]).view(1, 2, 1))
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(layer.weight.grad, (dy * x_hat).sum((0, 2)), rtol=1e-4, atol=1e-4)
    assert (layer.weight.grad.abs() > 0).all()


def test_saved_bytes_are_about_half_of_batch_norm_then_leaky_relu():
    x = torch.randn(8, 16, 10, 10)
    leaf = x.clone().requires_grad_()
    ours = saved_bytes(lambda: nk.InPlaceABN(16)(leaf * 1))
    unfused = saved_bytes(lambda: F.leaky_relu(torch.nn.BatchNorm2d(16)(leaf * 1), 0.01))
    assert ours <= x.nbytes + 64 * 16  # the output, and per-channel values
    assert ours <= 0.55 * unfused


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "relu"}, "relu is not invertible"),
        ({"activation": "leaky_relu", "activation_param": 0.0}, "activation_param > 0"),
        ({"activation": "elu", "activation_param": -1.0}, "activation_param > 0"),
        ({"min_abs_weight": 0.0}, "min_abs_weight must be > 0"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(nk.errors.ConfigError, match=match):
        nk.InPlaceABN(4, **kwargs)


def test_state_dict_and_running_statistics_are_batch_norms():
    layer, plain = nk.InPlaceABN(3, activation="identity"), torch.nn.BatchNorm1d(3)
    assert set(layer.state_dict()) == set(plain.state_dict())
    x = torch.randn(16, 3) * 2 + 1
    layer(x.clone())
    plain(x.clone())
    for name, buffer in plain.named_buffers():
        assert_close(getattr(layer, name), buffer, torch.float32, name)


# --- the triton kernels, under triton's interpreter ---------------------------------------------


@pytest.fixture(scope="module")
def interpreted():
    from kernels_interpreter import KERNEL_DEVICE, interpreted_kernels

    with interpreted_kernels():
        yield KERNEL_DEVICE


TRITON_CASES = [
    ("leaky_relu", True, "contiguous", torch.float32, None),
    ("elu", True, "channels_last", torch.float32, (16, 4)),
    ("identity", False, "contiguous", torch.float32, None),
    ("leaky_relu", True, "channels_last", torch.bfloat16, None),
]


@pytest.mark.parametrize(
    "config", TRITON_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{c[4]}"
)
def test_triton_equals_the_unfused_computation(interpreted, config):
    from normkit.kernels._utils import launch_overrides

    activation, training, layout, dtype, split = config
    case = make_case((4, 3, 5, 6), dtype, layout, seed=6)
    case["bias"] = case["bias"].clamp(-0.5, 0.5)
    tile, rows = split if split else (None, None)
    with launch_overrides(tile=tile, rows_per_chunk=rows):
        actual = _run("triton", case, activation, training, device=interpreted)
    expected = expected_batch_norm_act(
        case, training=training, activation=activation, residual=False
    )
    if dtype == torch.float32:
        compare(actual, expected, dtype, str(config))
    else:
        _half_compare(actual, expected, dtype, str(config))
    assert actual["in_place"] and actual["stride_kept"]
