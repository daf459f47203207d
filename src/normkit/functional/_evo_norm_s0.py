"""EvoNorm-S0 (Liu et al. 2020): a sample-based normalization-activation layer found by search.

:func:`evo_norm_s0` is the functional form of :class:`normkit.EvoNormS0`. Paper:
https://arxiv.org/abs/2004.02967, Figure 1 / Table 1 (EvoNorm-S0), per sample n and group g of
C/G channels:

    s_g = sqrt(var_{c in g, spatial}(x) + eps)      (the group standard deviation, GroupNorm's)
    y   = x * sigmoid(v * x) / s_g * gamma + beta    (v, gamma, beta per channel)

No batch statistics: training and eval compute the same function.

Implementations (``normkit.backends``):

- ``native``: the group moments in one Welford pass (``torch.var_mean``), the output in four
  elementwise passes, and a hand-derived backward (:class:`_EvoNormS0`) that recomputes the
  sigmoid instead of keeping it.
- ``reference``: the formula as written, differentiated by autograd; also what every program
  transform runs (:mod:`._transforms`).
"""

from __future__ import annotations

import math

import torch

from normkit.functional import _dispatch
from normkit.functional._checks import (
    check_eps,
    check_floating,
    check_groups,
    check_instance_statistics_size,
    check_min_rank,
    check_per_channel,
)
from normkit.functional._filter_response_norm import spatial_dot
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import channel_view
from normkit.functional._transforms import differentiable_backward, transforming


def evo_norm_s0(
    input: torch.Tensor,
    v: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    groups: int = 32,
    eps: float = 1e-5,
) -> torch.Tensor:
    """EvoNorm-S0 of an (N, C, \\*) input; see :class:`normkit.EvoNormS0`.

    Args:
        input: (N, C, \\*) with at least one spatial dim.
        v: the per-channel gate of the sigmoid, or None for no activation: then
            ``x / s_g * gamma + beta``, GroupNorm without the mean.
        weight, bias: per-channel gamma and beta, or None.
        groups: G, which must divide C.
        eps: added to the group variance; > 0.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 3, "(N, C, *spatial)")
    check_groups(groups, int(input.shape[1]))  # an int even under torch.jit.trace
    check_per_channel(input, v=v, weight=weight, bias=bias)
    if input.shape[1] // groups == 1:
        check_instance_statistics_size(input)
    if transforming() or input.numel() == 0:
        return reference_evo_norm_s0(input, v, weight, bias, groups, eps)
    return _dispatch.resolve("evo_norm_s0", input)(input, v, weight, bias, groups, eps)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *) viewed as (N, G, C/G, *): a view in any memory format (dim 1 is split)."""
    n, c = x.shape[:2]
    return x.view(n, groups, c // groups, *x.shape[2:])


def group_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per (sample, group), shape (N, G), in the statistics dtype."""
    xg = _grouped(x.to(stats_dtype(x.dtype)), groups)
    var, mean = torch.var_mean(xg, dim=tuple(range(2, xg.dim())), correction=0)
    return mean, var


def reference_evo_norm_s0(input, v, weight, bias, groups, eps):
    """The formula as written, in the statistics dtype; autograd differentiates it."""
    ndim, dtype = input.dim(), stats_dtype(input.dtype)
    x = input.to(dtype)
    xg = _grouped(x, groups)
    var = xg.var(dim=tuple(range(2, xg.dim())), correction=0, keepdim=True)
    std = torch.sqrt(var + eps).expand_as(xg).reshape(x.shape)  # s_g at every element
    numerator = x if v is None else x * torch.sigmoid(x * channel_view(v, ndim).to(dtype))
    y = numerator / std
    if weight is not None:
        y = y * channel_view(weight, ndim).to(dtype)
    if bias is not None:
        y = y + channel_view(bias, ndim).to(dtype)
    return y.to(input.dtype)


def native_evo_norm_s0(input, v, weight, bias, groups, eps):
    return _EvoNormS0.apply(input, v, weight, bias, groups, eps)


def _per_channel(t: torch.Tensor, groups: int, channels: int, ndim: int) -> torch.Tensor:
    """A per-(sample, group) tensor (N, G) repeated over each group's channels: (N, C, 1, ...)."""
    n = t.shape[0]
    return t.repeat_interleave(channels // groups, dim=1).view((n, channels) + (1,) * (ndim - 2))


class _EvoNormS0(torch.autograd.Function):
    """y = a * q + beta with a = x * sigmoid(v x), q = gamma * s per (n, c), s = 1/sqrt(var_g + eps).

    Backward, with sigma = sigmoid(v x), h = dL/dy * q * sigma, e = h * (x - a) and M the
    elements of a group:

        dL/dx     = h + v * e + (x - mu_g) * k,   k = -s^3 / M * sum_{c in g} gamma_c D_nc
        D_nc      = sum_spatial dL/dy * a          (so dL/dgamma = sum_n s * D)
        dL/dv     = sum_{n,spatial} e * x,         dL/dbeta = sum dL/dy

    (sigma' = sigma (1 - sigma) gives da/dx = sigma * (1 + v * x (1 - sigma)), and
    x (1 - sigma) = x - a; the variance term is GroupNorm's.) Saves x and the per-group mean and
    s; the sigmoid is recomputed. Under ``create_graph=True`` the gradients are autograd's of the
    reference form, differentiable again (double backward).
    """

    @staticmethod
    def forward(ctx, x, v, weight, bias, groups, eps):
        ndim, c = x.dim(), x.shape[1]
        mean, var = group_moments(x, groups)  # (N, G)
        s = torch.rsqrt(var + eps)
        dtype = s.dtype
        q = _per_channel(s, groups, c, ndim)  # (N, C, 1, ...)
        if weight is not None:
            q = q * channel_view(weight, ndim).to(dtype)
        a = _numerator(x, v, ndim, dtype)
        y = torch.empty_like(x)
        if bias is None:
            torch.mul(a, q, out=y)
        else:
            torch.addcmul(channel_view(bias, ndim).to(dtype), a, q, out=y)
        ctx.save_for_backward(x, v, weight, bias, mean, s)
        ctx.groups, ctx.eps = groups, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, v, weight, bias, mean, s = ctx.saved_tensors
        groups = ctx.groups
        if torch.is_grad_enabled():  # create_graph=True: double backward
            inputs = (x, v, weight, bias, groups, ctx.eps)
            return differentiable_backward(reference_evo_norm_s0, inputs, ctx.needs_input_grad, dy)
        ndim, (n, c) = x.dim(), x.shape[:2]
        dtype = s.dtype
        per_channel = (n, c) + (1,) * (ndim - 2)
        rest = (0, *range(2, ndim))
        sigma = None if v is None else _sigmoid(x, v, ndim, dtype)
        a = x.to(dtype) if v is None else torch.mul(x, sigma)
        d = spatial_dot(dy, a, dtype)  # (N, C): sum over space of dL/dy * a
        s_c = s.repeat_interleave(c // groups, dim=1)  # (N, C)
        gamma = None if weight is None else weight.to(dtype)
        dx = dv = dweight = dbias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            q = s_c if gamma is None else s_c * gamma
            h = torch.mul(dy, q.view(per_channel))  # dL/da
            if sigma is not None:
                h.mul_(sigma)
                e = torch.sub(x, a).mul_(h)  # h * (x - a)
            gd = d if gamma is None else d * gamma
            m = math.prod(x.shape[2:]) * (c // groups)
            k = -(s**3) / m * gd.view(n, groups, -1).sum(2)  # (N, G)
            k_c = _per_channel(k, groups, c, ndim)
            shift = -_per_channel(mean * k, groups, c, ndim)  # -mu_g * k
            if ctx.needs_input_grad[0]:
                grad = h if sigma is None else h.addcmul_(e, channel_view(v, ndim).to(dtype))
                dx = torch.empty_like(x)
                torch.addcmul(grad.add_(shift), x, k_c, out=dx)
            if sigma is not None and ctx.needs_input_grad[1]:
                dv = spatial_dot(e, x, dtype).sum(0).to(v.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            dweight = (s_c * d).sum(0).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            dbias = dy.sum(rest, dtype=dtype).to(ctx.bias_dtype)
        return dx, dv, dweight, dbias, None, None


def _sigmoid(x, v, ndim, dtype) -> torch.Tensor:
    return torch.mul(x, channel_view(v, ndim).to(dtype)).sigmoid_()


def _numerator(x, v, ndim, dtype) -> torch.Tensor:
    """x * sigmoid(v x) in the statistics dtype (x itself without v)."""
    if v is None:
        return x
    return _sigmoid(x, v, ndim, dtype).mul_(x)
