"""Normalize and apply the affine: y = w * (x - mean) / sqrt(var + eps) + b in normkit's own code.

The ``reference`` backend's one place for it; the ``native``, ``compiled`` and ``triton`` backends
compute the same map in ATen's, torch.compile's and normkit's Triton kernels, and
``_instance_stats.instance_affine`` folds it into one multiply-add per (sample, channel) for the
mixtures (see ``_moments`` for why each exists).

Two cases, and only two:

- :func:`normalize` uses statistics given from outside (running statistics in eval mode): the map is
  affine in ``x`` and autograd differentiates it as it is.
- :func:`normalize_over` uses the statistics of ``x`` itself over ``dims`` (training BatchNorm, and
  LayerNorm/InstanceNorm/GroupNorm always). Its backward is derived by hand, as in Ioffe & Szegedy
  (2015), §3, and saves only ``x``, the weight and the per-group mean and 1/std.

``weight`` and ``bias`` must broadcast against ``x`` (a per-channel vector viewed as (1, C, 1, ...), or
LayerNorm's trailing-shape tensor). Arithmetic runs in :func:`~normkit.functional.stats_dtype`
(float32 for half inputs) and the output has the input's dtype and memory format.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from normkit.functional._moments import moments, stats_dtype
from normkit.functional._transforms import composite_required


def _affine(
    xhat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    if weight is not None:
        xhat = xhat * weight.to(xhat.dtype)
    if bias is not None:
        xhat = xhat + bias.to(xhat.dtype)
    return xhat


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Normalize with fixed statistics: ``(x - mean) * rsqrt(var + eps) * weight + bias``.

    This is the inference transform of Ioffe & Szegedy (2015), Algorithm 2, step 11. The subtraction
    comes first (rather than the folded ``x * a + c``) so inputs far from zero keep their precision.
    """
    dtype = stats_dtype(x.dtype)
    scale = torch.rsqrt(var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    y = (x.to(dtype) - mean.to(dtype)) * scale
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def normalize_over(
    x: torch.Tensor,
    dims: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize ``x`` with its own mean and biased variance over ``dims``.

    Returns ``(y, mean, var)``; ``mean`` and ``var`` keep the reduced dims (size 1) and carry no
    gradient, ready for a running-statistics update. Under torch.func's transforms, forward-mode
    AD and torch.jit.trace the same maths is differentiated by autograd instead of the hand-written
    backward (functional/_transforms.py).
    """
    if composite_required():
        mean, var = moments(x, tuple(dims))
        y = _affine((x.to(mean.dtype) - mean) * torch.rsqrt(var + eps), weight, bias)
        return y.to(x.dtype), mean.detach(), var.detach()
    return _NormalizeOver.apply(x, weight, bias, tuple(dims), eps)


class _NormalizeOver(torch.autograd.Function):
    """y = w * x_hat + b with x_hat = (x - mu_B) / sqrt(sigma2_B + eps), statistics over ``dims``.

    Backward (Ioffe & Szegedy 2015, §3), with g = dL/dx_hat = dL/dy * w and means over ``dims``:

        dL/dx = 1/sqrt(sigma2_B + eps) * (g - mean(g) - x_hat * mean(g * x_hat))
        dL/dw = sum(dL/dy * x_hat),   dL/db = sum(dL/dy)   (summed to the shape of w and b)

    which is the paper's chain through dL/dsigma2_B and dL/dmu_B collected into one expression.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dims, eps):
        mean, var = moments(x, dims)
        invstd = torch.rsqrt(var + eps)
        y = _affine((x.to(mean.dtype) - mean) * invstd, weight, bias).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.dims, ctx.eps = dims, eps
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = ctx.dims
        if torch.is_grad_enabled():
            # create_graph=True: recompute the statistics with autograd on, so the gradient is
            # itself differentiable with respect to x (double backward, e.g. gradient penalties).
            mean, var = moments(x, dims)
            invstd = torch.rsqrt(var + ctx.eps)
        dtype = stats_dtype(x.dtype)
        dy = dy.to(dtype)
        xhat = (x.to(dtype) - mean) * invstd
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            g = dy if weight is None else dy * weight.to(dtype)
            dx = invstd * (
                g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True)
            )
            dx = dx.to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (dy * xhat).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            dbias = dy.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None


def channel_view(tensor: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """A per-channel vector viewed as (1, C, 1, ...) to broadcast against an (N, C, *) input."""
    if tensor is None:
        return None
    return tensor.view((1, -1) + (1,) * (ndim - 2))


def empty_output(input, weight, bias):
    """The (empty) output of an empty batch, still connected to weight and bias for autograd."""
    y = input
    if weight is not None:
        y = y * weight.to(input.dtype)
    if bias is not None:
        y = y + bias.to(input.dtype)
    return y.clone() if y is input else y
