"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2020).

:func:`filter_response_norm` is the functional form of :class:`normkit.FilterResponseNorm`. Paper:
https://arxiv.org/abs/1911.09737, eqs. 1-3, per sample n and channel c over the spatial dims:

    nu2   = 1/N sum_i x_i^2                       (eq. 1, the mean squared norm of the filter response)
    x_hat = x / sqrt(nu2 + eps)                   (eq. 2)
    y     = gamma * x_hat + beta                  (eq. 2)
    z     = max(y, tau)                           (eq. 3, TLU; omitted with tau=None)

No batch statistics and no mean subtraction: the output of a sample never depends on the others,
in training or eval.

Implementations (``normkit.backends``):

- ``native``: nu2 from one vectorized reduction (``torch.linalg.vector_norm``), the output in one
  ``addcmul`` and one in-place ``maximum``; a hand-derived backward (:class:`_FilterResponseNorm`)
  that keeps x and the output (the next layer's input, kept anyway), not the pre-activation.
- ``reference``: the equations as written, differentiated by autograd; also what every program
  transform (torch.compile, torch.func, export, tracing) runs (:mod:`._transforms`).

Numerics: statistics in float32 for half inputs; the output keeps the input's dtype and memory
format. The TLU's gradient at an exact tie y == tau goes to tau in ``native`` (torch.maximum
splits it between the two), a set of inputs of measure zero.
"""

from __future__ import annotations

import math

import torch

from normkit.errors import ConfigError
from normkit.functional import _dispatch
from normkit.functional._checks import check_eps, check_floating, check_min_rank, check_per_channel
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import channel_view
from normkit.functional._transforms import differentiable_backward, transforming


def filter_response_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tau: torch.Tensor | None = None,
    eps: float = 1e-6,
    learned_eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """FRN (and TLU when ``tau`` is given) of an (N, C, \\*) input; see
    :class:`normkit.FilterResponseNorm`.

    Args:
        input: (N, C, \\*); an (N, C) input is one value per filter response (eps then matters,
            the paper's §3.1: learn it).
        weight, bias, tau: per-channel gamma, beta and the TLU threshold, or None.
        eps: the constant added to nu2; > 0.
        learned_eps: a per-channel (or scalar) tensor; the epsilon used is ``eps + |learned_eps|``
            (the paper's learned epsilon, §3.1), or None.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_per_channel(input, weight=weight, bias=bias, tau=tau)
    if learned_eps is not None and learned_eps.numel() not in (1, input.shape[1]):
        raise ConfigError(
            f"learned_eps must have one value or one per channel ({input.shape[1]}), got "
            f"{learned_eps.numel()}"
        )
    x = input.unsqueeze(-1) if input.dim() == 2 else input
    if transforming() or learned_eps is not None:
        y = reference_filter_response_norm(x, weight, bias, tau, eps, learned_eps)
    else:
        y = _dispatch.resolve("filter_response_norm", x)(x, weight, bias, tau, eps, None)
    return y.squeeze(-1) if input.dim() == 2 else y


def reference_filter_response_norm(input, weight, bias, tau, eps, learned_eps):
    """The paper's eqs. 1-3 as written, in the statistics dtype; autograd differentiates it."""
    ndim, dtype = input.dim(), stats_dtype(input.dtype)
    spatial = tuple(range(2, ndim))
    x = input.to(dtype)
    eps_total = eps if learned_eps is None else eps + channel_view(learned_eps.abs(), ndim)
    nu2 = x.square().mean(spatial, keepdim=True)  # eq. 1
    y = x * torch.rsqrt(nu2 + eps_total)  # eq. 2
    if weight is not None:
        y = y * channel_view(weight, ndim).to(dtype)
    if bias is not None:
        y = y + channel_view(bias, ndim).to(dtype)
    if tau is not None:
        y = torch.maximum(y, channel_view(tau, ndim).to(dtype))  # eq. 3
    return y.to(input.dtype)


def native_filter_response_norm(input, weight, bias, tau, eps, learned_eps):
    if input.numel() == 0:
        return reference_filter_response_norm(input, weight, bias, tau, eps, learned_eps)
    return _FilterResponseNorm.apply(input, weight, bias, tau, eps)


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(nu2 + eps) per (sample, channel), shape (N, C, 1, ...), in the statistics dtype:
    one pass of a vectorized 2-norm over the spatial dims, no temporary of x's size. For
    channels_last inputs ATen's strided 2-norm is slower than squaring and reducing (2 cores,
    (32, 64, 56, 56): 25 ms against 12 ms), so they take that path."""
    spatial = tuple(range(2, x.dim()))
    n = math.prod(x.shape[2:])
    dtype = stats_dtype(x.dtype)
    if x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous():
        nu2 = torch.square(x.to(dtype)).mean(spatial, keepdim=True)
        return torch.rsqrt(nu2.add_(eps))
    norm = torch.linalg.vector_norm(x, 2, spatial, keepdim=True, dtype=dtype)
    return torch.rsqrt(norm.square_().div_(n).add_(eps))


def spatial_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum over the spatial dims of a * b, per (sample, channel), shape (N, C), in ``dtype``:
    one pass without a temporary when both are contiguous NCHW in ``dtype``."""
    n, c = a.shape[:2]
    if a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype == dtype:
        return torch.linalg.vecdot(a.view(n, c, -1), b.view(n, c, -1))
    return torch.addcmul(a.new_zeros(1, dtype=dtype), a, b).sum(tuple(range(2, a.dim())))


class _FilterResponseNorm(torch.autograd.Function):
    """z = max(gamma * x * r + beta, tau), r = 1/sqrt(mean_s(x^2) + eps) per (n, c).

    Backward, with p = dL/dz where z > tau (0 elsewhere), s the spatial size and
    A = sum_s p * x per (n, c):

        dL/dbeta  = sum_{n,s} p,          dL/dtau = sum_{n,s} dL/dz - dL/dbeta
        dL/dgamma = sum_n r * A
        dL/dx     = gamma * r * (p - r^2 * x * A / s)

    (the last from dr/dx_j = -r^3 x_j / s). Saves x, the output (for the TLU's mask) and r.
    Under ``create_graph=True`` the gradients are autograd's of the reference form,
    differentiable again (double backward).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps):
        ndim, c = x.dim(), x.shape[1]
        r = inverse_rms(x, eps)  # (N, C, 1, ...)
        dtype = r.dtype
        scale = r if weight is None else r * channel_view(weight, ndim).to(dtype)
        shift = (
            torch.zeros((1, c) + (1,) * (ndim - 2), dtype=dtype, device=x.device)
            if bias is None
            else channel_view(bias, ndim).to(dtype)
        )
        z = torch.empty_like(x)
        torch.addcmul(shift, x, scale, out=z)  # one pass, rounded once to x's dtype
        if tau is not None:
            torch.maximum(z, channel_view(tau, ndim).to(z.dtype), out=z)
        ctx.save_for_backward(x, weight, bias, tau, r, z if tau is not None else None)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return z

    @staticmethod
    def backward(ctx, dz):
        x, weight, bias, tau, r, z = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: double backward
            inputs = (x, weight, bias, tau, ctx.eps, None)
            grads = differentiable_backward(
                reference_filter_response_norm, inputs, ctx.needs_input_grad, dz
            )
            return grads[:5]
        ndim, dtype = x.dim(), r.dtype
        rest = (0, *range(2, ndim))
        s = math.prod(x.shape[2:])
        p = dz if tau is None else torch.where(z > channel_view(tau, ndim).to(z.dtype), dz, 0)
        a = spatial_dot(p, x, dtype)  # (N, C)
        r2 = r.view(r.shape[:2])
        dx = dweight = dbias = dtau = None
        if ctx.needs_input_grad[0]:
            g = r2 if weight is None else r2 * weight.to(dtype)  # gamma * r per (n, c)
            k = -g * r2.square() * a / s
            shape = r.shape
            dx = torch.empty_like(x)
            torch.addcmul(torch.mul(p, g.view(shape)), x, k.view(shape), out=dx)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (r2 * a).sum(0).to(weight.dtype)
        needs_sum = (ctx.has_bias and ctx.needs_input_grad[2]) or (
            tau is not None and ctx.needs_input_grad[3]
        )
        if needs_sum:
            sum_p = p.sum(rest, dtype=dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                dbias = sum_p.to(ctx.bias_dtype)
            if tau is not None and ctx.needs_input_grad[3]:
                dtau = (dz.sum(rest, dtype=dtype) - sum_p).to(tau.dtype)
        return dx, dweight, dbias, dtau, None
