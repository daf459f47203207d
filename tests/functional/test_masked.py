"""Masked statistics for BatchNorm and LayerNorm: equal to the layer applied to the unpadded elements
alone (forward, gradients, running statistics), whatever the padding holds."""

import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters
from normkit import reference as R
from normkit.errors import DtypeError, ShapeError

LENGTHS = [7, 3, 5, 1]  # four sequences padded to 7


def _lengths_mask(lengths, steps):
    return torch.arange(steps) < torch.tensor(lengths)[:, None]  # (N, T)


def _padded(channels=3, fill=1e3):
    """(N, C, T) sequences whose padding holds a large value, which must not matter."""
    x = make_input((len(LENGTHS), channels, max(LENGTHS)), torch.float64)
    mask = _lengths_mask(LENGTHS, max(LENGTHS))
    return x.masked_fill(~mask[:, None], fill), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_batch_norm_equals_batch_norm_of_the_real_elements(dtype, backend):
    x, mask = _padded()
    x = x.to(dtype)
    ours = nk.BatchNorm1d(3, momentum=0.3).to(dtype)
    randomize_parameters(ours)
    theirs = torch.nn.BatchNorm1d(3, momentum=0.3).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    leaf = x.clone().requires_grad_()
    y = ours(leaf, mask=mask)
    real = x.permute(0, 2, 1)[mask].clone().requires_grad_()  # (real elements, C)
    expected = theirs(real)
    assert_close(y.permute(0, 2, 1)[mask], expected, dtype, "real outputs")
    assert torch.equal(y.permute(0, 2, 1)[~mask], torch.zeros_like(y.permute(0, 2, 1)[~mask]))
    dy = make_input(y.shape, dtype, seed=4, scale=1.0, shift=0.0)
    y.backward(dy)
    expected.backward(dy.permute(0, 2, 1)[mask])
    assert_close(leaf.grad.permute(0, 2, 1)[mask], real.grad, dtype, "real input grads")
    assert torch.equal(
        leaf.grad.permute(0, 2, 1)[~mask], torch.zeros(int((~mask).sum()), 3, dtype=dtype)
    )
    for key, value in theirs.state_dict().items():
        if value.is_floating_point():
            assert_close(ours.state_dict()[key], value, dtype, key)
        else:
            assert torch.equal(ours.state_dict()[key], value), key


def test_batch_norm_matches_the_oracle_on_maps(backend):
    """(N, C, H, W) with a mask over (N, H, W), channels_last kept, and eval with the mask."""
    x = make_input((3, 4, 5, 6), torch.float64, channels_last=True)
    mask = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    layer = nk.BatchNorm2d(4).double()
    randomize_parameters(layer)
    gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    expected, mu, var, m = R.masked_batch_norm(x.numpy(), mask.numpy(), gamma, beta, layer.eps)
    y = layer(x, mask=mask)
    assert_close(y, torch.tensor(expected), torch.float64, "masked output")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(layer.running_mean, torch.tensor(0.1 * mu), torch.float64, "running_mean")
    unbiased = 0.9 + 0.1 * var * m / (m - 1)
    assert_close(layer.running_var, torch.tensor(unbiased), torch.float64, "running_var")
    layer.eval()
    y = layer(x, mask=mask)
    plain = layer(x)
    assert torch.equal(y, torch.where(mask[:, None], plain, 0.0))


def test_padding_with_nan_changes_nothing(backend):
    x, mask = _padded(fill=float("nan"))
    layer = nk.BatchNorm1d(3).double()
    leaf = x.clone().requires_grad_()
    y = layer(leaf, mask=mask)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(leaf.grad).all()
    assert torch.isfinite(layer.running_var).all() and int(layer.num_batches_tracked) == 1
    clean, _ = _padded(fill=0.0)
    torch.testing.assert_close(y, nk.BatchNorm1d(3).double()(clean, mask=mask))


def test_all_real_mask_is_the_plain_layer(backend):
    x = make_input((4, 3, 5))
    a, b = nk.BatchNorm1d(3), nk.BatchNorm1d(3)
    torch.testing.assert_close(a(x, mask=torch.ones(4, 5, dtype=torch.bool)), b(x))
    torch.testing.assert_close(a.running_var, b.running_var)


def test_channel_with_fewer_than_two_real_elements_skips_the_update():
    layer = nk.BatchNorm1d(3)
    x = make_input((2, 3, 4))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True  # one real element per channel
    y = layer(x, mask=mask)
    assert torch.isfinite(y).all()
    assert int(layer.num_batches_tracked) == 0 and int(layer.num_batches_skipped) == 1
    assert torch.equal(layer.running_var, torch.ones(3))
    strict = nk.BatchNorm1d(3, on_nonfinite="raise")
    with pytest.raises(nk.errors.NonFiniteStatisticsError):
        strict(x, mask=mask)


def test_layer_norm_over_a_padded_sequence(backend):
    """normalized_shape (T, C) spans the time axis: each sequence's statistics over its real steps
    equal LayerNorm of the unpadded sequence."""
    steps, features = max(LENGTHS), 4
    x = make_input((len(LENGTHS), steps, features), torch.float64)
    mask = _lengths_mask(LENGTHS, steps)
    x = x.masked_fill(~mask[..., None], -7.0)
    layer = nk.LayerNorm([steps, features]).double()
    randomize_parameters(layer)
    leaf = x.clone().requires_grad_()
    y = layer(leaf, mask=mask)
    expected = R.masked_layer_norm(
        x.numpy(), mask.numpy(), 2, layer.weight.detach().numpy(), layer.bias.detach().numpy()
    )
    assert_close(y, torch.tensor(expected), torch.float64, "masked layer norm")
    y.backward(torch.ones_like(y))
    for n, length in enumerate(LENGTHS):
        real = x[n, :length].clone().requires_grad_()
        flat = torch.nn.functional.layer_norm(real.reshape(-1), (length * features,), eps=layer.eps)
        out = flat.view(length, features) * layer.weight[:length] + layer.bias[:length]
        assert_close(y[n, :length], out, torch.float64, f"sequence {n}")
        out.backward(torch.ones_like(out))
        assert_close(leaf.grad[n, :length], real.grad, torch.float64, f"grad of sequence {n}")
        assert torch.equal(y[n, length:], torch.zeros_like(y[n, length:]))


def test_layer_norm_over_features_only_zeros_the_padding(backend):
    x = make_input((2, 5, 4))
    mask = _lengths_mask([5, 2], 5)
    layer = nk.LayerNorm(4)
    y = layer(x, mask=mask)
    torch.testing.assert_close(y, torch.where(mask[..., None], layer(x), 0.0))


@pytest.mark.parametrize(
    ("layer", "x", "mask", "error", "fragment"),
    [
        (nk.BatchNorm1d(3), torch.randn(4, 3, 5), torch.ones(4, 5), DtypeError, "mask.bool()"),
        (nk.BatchNorm1d(3), torch.randn(4, 3, 5), torch.ones(4, 3, 5, dtype=torch.bool),
         ShapeError, "(4, 5)"),
        (nk.LayerNorm(5), torch.randn(4, 3, 5), torch.ones(4, 5, dtype=torch.bool), ShapeError,
         "(4, 3)"),
    ],
    ids=["not_bool", "bn_shape", "ln_shape"],
)  # fmt: skip
def test_bad_masks_are_refused_before_any_update(layer, x, mask, error, fragment):
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error) as info:
        layer(x, mask=mask)
    assert fragment in str(info.value)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_no_mask_path_is_unchanged():
    """The mask is keyword-only and optional: positional calls and torch.nn's numbers stay."""
    x = make_input((4, 3, 5))
    torch.testing.assert_close(nk.BatchNorm1d(3)(x), torch.nn.BatchNorm1d(3)(x))
    torch.testing.assert_close(nk.LayerNorm(5)(x), torch.nn.LayerNorm(5)(x))
