"""Masked statistics: BatchNorm and LayerNorm whose statistics skip padded elements.

Variable-length sequences are padded to a common length; with BatchNorm the padding enters every
channel's mean and variance, so a sequence's output depends on how much padding its batch-mates
carry (the seed's §5.2 on BN for RNNs). A boolean ``mask``, True where an element is real, keeps the
padding out:

- BatchNorm (input (N, C, \\*), mask (N, \\*) — the input without the channel dim): each channel's
  statistics are the mean and biased variance of its real elements; the running variance is
  unbiased with the number of real elements, m / (m - 1).
- LayerNorm (input (\\*, \\*normalized_shape), mask = the input without its last dim, whose features
  are real or padded together): each sample's statistics over ``normalized_shape`` count only its
  real elements.

Decisions (documented with the layers, tested):

- Padded positions of the output are 0, in training and in eval, and no gradient reaches padded
  inputs. So the real positions' outputs and gradients are exactly those of the layer applied to the
  real elements alone, whatever the padding holds (even NaN), and padding stays padding downstream.
- A channel (BatchNorm) with fewer than two real elements gives no running-statistics update: its
  unbiased variance is undefined, reported as NaN, so the non-finite guard skips the batch (or warns,
  or raises, as ``on_nonfinite`` says). This needs no host synchronisation. A LayerNorm group with no
  real element outputs zeros.

The statistics are centred two-pass sums over the real elements (float32 for half inputs); this path
is normkit's own implementation under every backend, differentiated by autograd.
"""

from __future__ import annotations

import torch

from normkit.errors import DtypeError, ShapeError
from normkit.functional import _dispatch
from normkit.functional._checks import shape_str
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import channel_view
from normkit.functional._running_stats import exponential_average_factor, guarded_update


def check_mask(input: torch.Tensor, mask: torch.Tensor, expected: tuple[int, ...], where: str):
    """A boolean tensor of the input's shape without its channel (or feature) dim, on its device."""
    if not isinstance(mask, torch.Tensor):
        raise DtypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise DtypeError(
            f"mask must have dtype torch.bool (True where an element is real), got {mask.dtype}; "
            "pass mask.bool() or, for lengths, torch.arange(T) < lengths[:, None]"
        )
    if tuple(mask.shape) != expected:
        raise ShapeError(
            f"mask must have shape {shape_str(expected)}, the input's shape "
            f"{shape_str(input.shape)} without {where}, but has shape {shape_str(mask.shape)}"
        )
    if mask.device != input.device:
        raise ShapeError(f"mask is on {mask.device} but the input is on {input.device}")


def masked_moments(x: torch.Tensor, real: torch.Tensor, dims: tuple[int, ...]):
    """(mean, biased var, count) of the elements of ``x`` where ``real`` (broadcast) is True.

    Padded elements are replaced by 0 before any arithmetic, so they cannot leak NaN or Inf into the
    statistics or their gradients. ``count`` is a tensor; a group without real elements gets mean 0
    and variance 0.
    """
    count = real.to(x.dtype).expand(x.shape).sum(dims, keepdim=True)
    safe = count.clamp(min=1.0)
    x = torch.where(real, x, 0.0)
    mean = x.sum(dims, keepdim=True) / safe
    centred = torch.where(real, x - mean, 0.0)
    var = centred.square().sum(dims, keepdim=True) / safe
    return mean, var, count


def masked_batch_norm(
    input,
    mask,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    *,
    num_batches_tracked,
    num_batches_skipped,
    on_nonfinite,
):
    """BatchNorm with statistics over the real elements; see :func:`normkit.functional.batch_norm`,
    which calls it after its checks."""
    ndim = input.dim()
    check_mask(input, mask, (input.shape[0], *input.shape[2:]), "its channel dim 1")
    real = mask.unsqueeze(1)  # (N, 1, *)
    dtype = stats_dtype(input.dtype)
    w, b = channel_view(weight, ndim), channel_view(bias, ndim)
    if not training:  # the layer's eval output (from the backend in force), padding zeroed
        impl = _dispatch.resolve("batch_norm", input)
        y = impl(input, running_mean, running_var, weight, bias, False, 0.0, eps)
        return _keep_format(torch.where(real, y, 0.0), input)
    x = input.to(dtype)
    dims = (0, *range(2, ndim))

    def normalize_batch():
        mean, var, count = masked_moments(x, real, dims)
        y = (torch.where(real, x, 0.0) - mean) * torch.rsqrt(var + eps)
        if w is not None:
            y = y * w.to(dtype)
        if b is not None:
            y = y + b.to(dtype)
        y = _keep_format(torch.where(real, y, 0.0).to(input.dtype), input)
        return y, mean, var, count

    if running_mean is None or running_var is None or input.numel() == 0:
        return normalize_batch()[0]
    factor = exponential_average_factor(momentum, num_batches_tracked)

    def normalize_and_track(new_mean, new_var):
        y, mean, var, count = normalize_batch()
        with torch.no_grad():
            # m / (m - 1) with m real elements; undefined (NaN) for m < 2, so the guard skips.
            correction = torch.where(count > 1, count / (count - 1), torch.nan)
            unbiased_var = (var * correction).reshape(new_var.shape).to(new_var.dtype)
            weight = factor.to(new_mean.dtype) if isinstance(factor, torch.Tensor) else factor
            new_mean.lerp_(mean.reshape(new_mean.shape).to(new_mean.dtype), weight)
            new_var.lerp_(unbiased_var, weight)
        return y

    return guarded_update(
        running_mean,
        running_var,
        normalize_and_track,
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )


def masked_layer_norm(input, mask, normalized_shape, weight, bias, eps):
    """LayerNorm over the trailing ``normalized_shape`` with statistics over the real elements."""
    check_mask(input, mask, tuple(input.shape[:-1]), "its last (feature) dim")
    real = mask.unsqueeze(-1)  # (*, 1)
    dtype = stats_dtype(input.dtype)
    x = input.to(dtype)
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    mean, var, _ = masked_moments(x, real, dims)
    y = (torch.where(real, x, 0.0) - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return _keep_format(torch.where(real, y, 0.0).to(input.dtype), input)


def _keep_format(y: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``y`` in the memory format of ``input`` (channels_last stays channels_last)."""
    if input.is_contiguous() or input.dim() not in (4, 5):
        return y
    fmt = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
    if input.is_contiguous(memory_format=fmt) and not y.is_contiguous(memory_format=fmt):
        return y.contiguous(memory_format=fmt)
    return y
