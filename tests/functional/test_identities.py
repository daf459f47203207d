"""The family is one idea: identities between normalizers (Wu & He 2018, Fig. 2)."""

import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input

SHAPES = [(3, 6, 4, 5), (2, 6, 7), (2, 6, 3, 2, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_group_norm_with_one_group_is_layer_norm_over_channels_and_space(shape, backend):
    x = make_input(shape, torch.float64).requires_grad_()
    gn = nk.GroupNorm(1, shape[1], affine=False).double()
    ln = nk.LayerNorm(shape[1:], elementwise_affine=False).double()
    y_gn, y_ln = gn(x), ln(x)
    assert_close(y_gn, y_ln, torch.float64, "GN(1) vs LN")
    dy = make_input(y_gn.shape, torch.float64, seed=1)  # not seed 0: that would be x itself
    (g_gn,) = torch.autograd.grad(y_gn, x, dy)
    (g_ln,) = torch.autograd.grad(y_ln, x, dy)
    assert_close(g_gn, g_ln, torch.float64, "gradients")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_group_norm_with_one_channel_per_group_is_instance_norm(shape, backend):
    x = make_input(shape, torch.float64).requires_grad_()
    channels = shape[1]
    gn = nk.GroupNorm(channels, channels).double()
    inorm = nk.InstanceNorm2d(channels, affine=True).double() if len(shape) == 4 else None
    inorm = (
        inorm
        or {3: nk.InstanceNorm1d, 5: nk.InstanceNorm3d}[len(shape)](channels, affine=True).double()
    )
    with torch.no_grad():
        for layer in (gn, inorm):
            layer.weight.copy_(torch.linspace(0.5, 2.0, channels))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    y_gn, y_in = gn(x), inorm(x)
    assert_close(y_gn, y_in, torch.float64, "GN(C) vs IN")
    dy = make_input(y_gn.shape, torch.float64, seed=1)  # not seed 0: that would be x itself
    assert_close(
        torch.autograd.grad(y_gn, x, dy)[0],
        torch.autograd.grad(y_in, x, dy)[0],
        torch.float64,
        "gradients",
    )


def test_batch_norm_on_a_transposed_batch_is_layer_norm(backend):
    """BN over the batch of a (features, batch) matrix normalizes what LN does on (batch, features)."""
    x = make_input((5, 7), torch.float64)
    bn = nk.BatchNorm1d(5, affine=False, track_running_stats=False).double()
    ln = nk.LayerNorm(7, elementwise_affine=False).double()
    assert_close(bn(x.t().contiguous()).t(), ln(x), torch.float64, "BN(x^T)^T vs LN(x)")


def test_layer_norm_2d_is_layer_norm_with_channels_last(backend):
    x = make_input((2, 6, 3, 4), torch.float64)
    ln2d = nk.LayerNorm2d(6).double()
    ln = nk.LayerNorm(6).double()
    assert_close(ln2d(x), ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), torch.float64, "LN2d")


def test_training_output_has_zero_mean_unit_variance(backend):
    """Semantics, not only closeness: γ=1, β=0 at init, so the output is standardized per channel."""
    bn = nk.BatchNorm2d(4)
    y = bn(make_input((16, 4, 3, 3), torch.float32, scale=5.0, shift=3.0))
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        y.var((0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3, rtol=0
    )  # eps = 1e-5 against a variance of 25: 1 - 25/(25 + 1e-5) = 4e-7, plus rounding
    assert torch.equal(bn.weight, torch.ones(4)) and torch.equal(bn.bias, torch.zeros(4))
