"""Statistics per (sample, channel), their merges, and the per-(sample, channel) affine map.

Ghost BN, Batch-Instance and Switchable normalization mix statistics over different sets of elements:
per sample and channel (IN), per sample (LN), per channel (BN), per virtual batch and channel (Ghost
BN). Every one of those sets is a union of (n, c) planes of equal size, so its statistics are a merge
of the *instance statistics* — the mean and biased variance of each plane over the spatial dims — by
the law of total variance (Chan, Golub & LeVeque 1979, the pairwise update with equal counts):

    mean of the union = mean of the plane means
    var of the union  = mean of the plane variances + (biased) variance of the plane means

which never forms E[x^2] - E[x]^2. The merges and the mixtures cost O(N*C); only two steps touch
every element, and both have backward passes written by hand:

- :func:`instance_moments` ``(N, C, *) -> (mean, var)`` of shape (N, C): a sum, then a centred sum
  of squares (two passes of ATen's vectorized reductions; ``torch.var_mean`` is several times slower
  on the CPU). Its backward is ``dx = dmean / S + 2 dvar (x - mean) / S`` with S the plane size.
- :func:`instance_affine` ``y = x * scale[n, c] + shift[n, c]``: one multiply-add per element. Its
  backward reduces ``dy`` and ``dy * x`` per plane.

Both element-wise maps are folded into one multiply-add, as ATen's batch-norm kernels fold theirs: the
folded form loses about u * |mean| / std of relative precision (u the unit roundoff) for inputs far
from zero, which the ``reference`` backend, subtracting the mean first, does not.

Autograd differentiates the small graph between the two, so a new mixture is a few lines of O(N*C)
arithmetic. Statistics and arithmetic run in float32 for half inputs; outputs keep the input's dtype
and memory format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from normkit.functional._moments import stats_dtype


def spatial_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The dims of one (n, c) plane of an (N, C, *) input."""
    return tuple(range(2, x.dim()))


def plane_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """An (N, C) tensor viewed as (N, C, 1, ...) to broadcast against an (N, C, *) input."""
    return t.view(t.shape + (1,) * (ndim - 2))


def instance_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of every (n, c) plane of ``x`` (N, C, *), each of shape (N, C).

    In :func:`~normkit.functional.stats_dtype` (float32 for half inputs). Differentiable, including
    double backward.
    """
    return _InstanceMoments.apply(x)


def instance_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale[n, c] + shift[n, c]`` for ``x`` (N, C, *) and ``scale``, ``shift`` of shape (N, C).

    Computed in the dtype of ``scale``; the output has the dtype and memory format of ``x``.
    """
    return _InstanceAffine.apply(x, scale, shift)


def merge_moments(
    mean: torch.Tensor, var: torch.Tensor, dims: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of the union of equal-sized parts, from each part's mean and biased variance.

    ``mean``, ``var`` index the parts along ``dims``; the result drops those dims. The law of total
    variance: ``var = mean(var_k) + mean((mean_k - mean)^2)``.
    """
    merged = mean.mean(dims, keepdim=True)
    spread = (mean - merged).square().mean(dims)
    return merged.squeeze(dims), var.mean(dims) + spread


# --- element-wise passes, in the fastest form ATen offers for each memory format ---------------------
# On the CPU, reducing a channels_last tensor over its spatial dims is ~2x faster through an
# (N, S, C) view, and a broadcast multiply-add is ~4x faster as mul + add_ for contiguous tensors but
# as addcmul for channels_last ones (measured on (32, 64, 56, 56) float32, 2 CPU threads).


def channels_innermost(t: torch.Tensor) -> bool:
    """Whether an (N, C, *) tensor is laid out with the channels innermost and dense behind them
    (channels_last in any rank), and is not plain contiguous."""
    return t.dim() > 2 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()


def plane_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of every (n, c) plane of ``t`` (N, C, *), shape (N, C)."""
    if t.dim() == 2:
        return t.clone()
    if t.is_contiguous():
        return t.view(t.shape[0], t.shape[1], -1).sum(-1)
    if channels_innermost(t):
        return t.movedim(1, -1).reshape(t.shape[0], -1, t.shape[1]).sum(1)
    return t.sum(spatial_dims(t))


def plane_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale[n, c] + shift[n, c]`` in one allocation, keeping ``x``'s memory format."""
    scale, shift = plane_view(scale, x.dim()), plane_view(shift, x.dim())
    if x.is_contiguous():
        return x.mul(scale).add_(shift)
    return torch.addcmul(shift, x, scale)


def _size(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


class _InstanceMoments(torch.autograd.Function):
    """(mean, var) of each (n, c) plane over its S spatial elements, biased, by two passes.

    Backward: mean = sum(x) / S and var = sum((x - mean)^2) / S give
    dL/dx = dL/dmean / S + dL/dvar * 2 (x - mean) / S (the mean's term in d var / dx sums to zero),
    evaluated as one multiply-add per element.
    """

    @staticmethod
    def forward(ctx, x):
        dtype = stats_dtype(x.dtype)
        xs = x.to(dtype)
        size = _size(x)
        mean = plane_sum(xs) / size  # (N, C)
        if x.dim() == 2:  # one element per plane: the mean is the element, the variance zero
            var = torch.zeros_like(mean)
        else:
            centred = xs - plane_view(mean, x.dim())
            var = plane_sum(centred.square_()) / size
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, dmean, dvar):
        x, mean = ctx.saved_tensors
        dtype = stats_dtype(x.dtype)
        xs = x.to(dtype)
        size = _size(x)
        if x.dim() == 2:
            return dmean.to(x.dtype)
        if torch.is_grad_enabled():  # double backward: the mean as a function of x
            mean = xs.mean(spatial_dims(x))
        slope = dvar.to(dtype) * (2.0 / size)
        return plane_affine(xs, slope, dmean.to(dtype) / size - slope * mean).to(x.dtype)


class _InstanceAffine(torch.autograd.Function):
    """y = x * scale[n, c] + shift[n, c].

    Backward: dL/dx = dL/dy * scale, dL/dscale = sum over the plane of dL/dy * x,
    dL/dshift = sum over the plane of dL/dy.
    """

    @staticmethod
    def forward(ctx, x, scale, shift):
        y = plane_affine(x.to(scale.dtype), scale, shift)
        ctx.save_for_backward(x, scale)
        ctx.shift_dtype = shift.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        dtype = scale.dtype
        dy_s = dy.to(dtype)
        dx = dscale = dshift = None
        if ctx.needs_input_grad[0]:
            dx = dy_s.mul(plane_view(scale, x.dim())).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dscale = plane_sum(dy_s * x.to(dtype))
        if ctx.needs_input_grad[2]:
            dshift = plane_sum(dy_s).to(ctx.shift_dtype)
        return dx, dscale, dshift
