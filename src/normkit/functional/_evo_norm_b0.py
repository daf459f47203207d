"""EvoNorm-B0 (Liu et al. 2020): a batch-dependent normalization-activation layer found by search.

:func:`evo_norm_b0` is the functional form of :class:`normkit.EvoNormB0`. Paper:
https://arxiv.org/abs/2004.02967, Figure 1 / Table 1 (EvoNorm-B0), per channel c:

    left  = sqrt(s2_{n,spatial}(x) + eps)       the batch's standard deviation (running one in eval)
    right = v * x + sqrt(s2_{spatial}(x) + eps)  per element; s2_{spatial} per (sample, channel)
    y     = x / max(left, right) * gamma + beta

s2 is the biased variance. In training ``running_var`` follows the batch variance by BatchNorm's
exponential average (unbiased by m/(m-1)); in eval ``left`` uses it. The instance term keeps
eval-mode outputs per sample.

Implementations (``normkit.backends``):

- ``native``: the per-(sample, channel) moments in two vectorized passes, the batch's merged from
  them in O(N*C) (:mod:`._instance_stats`: the law of total variance), the output in four
  elementwise passes, and a hand-derived backward (:class:`_EvoNormB0`) that recomputes the
  denominator from x and O(N*C) saved statistics.
- ``reference``: the formula as written, differentiated by autograd; also what every program
  transform runs (:mod:`._transforms`).

At an exact tie left == right the gradient goes to ``left`` in ``native`` (torch.maximum splits it
between the two), a set of inputs of measure zero.
"""

from __future__ import annotations

import math

import torch

from normkit.errors import ConfigError
from normkit.functional import _dispatch
from normkit.functional._checks import (
    check_batch_statistics_size,
    check_eps,
    check_floating,
    check_instance_statistics_size,
    check_min_rank,
    check_per_channel,
)
from normkit.functional._instance_stats import merge_moments, plane_sum, plane_view
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import channel_view
from normkit.functional._running_stats import exponential_average_factor, guarded_update
from normkit.functional._transforms import differentiable_backward, transforming


def evo_norm_b0(
    input: torch.Tensor,
    v: torch.Tensor,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """EvoNorm-B0 of an (N, C, \\*) input; see :class:`normkit.EvoNormB0`.

    Args:
        input: (N, C, \\*) with at least one spatial dim.
        v: the per-channel coefficient of x in the instance branch.
        running_var: the running batch variance (unbiased), updated in place in training; None
            to use the batch's in eval too.
        weight, bias: per-channel gamma and beta, or None.
        training: use (and track) the batch variance; else ``running_var``.
        momentum, eps, num_batches_tracked, num_batches_skipped, on_nonfinite: as
            :func:`normkit.functional.batch_norm`.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 3, "(N, C, *spatial)")
    check_per_channel(input, v=v, running_var=running_var, weight=weight, bias=bias)
    check_instance_statistics_size(input)
    if training:
        check_batch_statistics_size(input)
    elif running_var is None:
        raise ConfigError(
            "evo_norm_b0 with training=False uses running_var, which was not given; pass it, or "
            "training=True to use the batch's variance"
        )
    impl = (
        reference_evo_norm_b0
        if transforming() or input.numel() == 0
        else _dispatch.resolve("evo_norm_b0", input)
    )
    if not training:
        return impl(input, v, running_var, weight, bias, False, 0.0, eps)
    if running_var is None:
        return impl(input, v, None, weight, bias, True, 0.0, eps)
    factor = exponential_average_factor(momentum, num_batches_tracked)
    return guarded_update(
        torch.zeros_like(running_var),  # the guard's mean slot: EvoNorm-B0 keeps no mean
        running_var,
        lambda _mean, var: impl(input, v, var, weight, bias, True, factor, eps),
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )


@torch.no_grad()
def _update_running_var(running_var, batch_var, count, momentum) -> None:
    """BatchNorm's exponential average of the unbiased batch variance, in place."""
    unbiased = batch_var * (count / (count - 1))
    running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def reference_evo_norm_b0(input, v, running_var, weight, bias, training, momentum, eps):
    """The formula as written, in the statistics dtype; autograd differentiates it."""
    if training and running_var is not None and input.numel() > 0:
        x = input.to(stats_dtype(input.dtype)).detach()
        var_b = x.var(dim=(0, *range(2, input.dim())), correction=0)
        _update_running_var(running_var, var_b, input.numel() // input.shape[1], momentum)
    left = None if training else torch.sqrt(running_var.to(stats_dtype(input.dtype)) + eps)
    return composite_evo_norm_b0(input, v, weight, bias, left, eps)


def composite_evo_norm_b0(input, v, weight, bias, left, eps):
    """y = x / max(left, v x + sqrt(s2_spatial + eps)) * gamma + beta in plain tensor ops, with
    ``left`` given per channel (eval: from the running variance) or, None, the batch's
    sqrt(s2_{n,spatial} + eps) as a function of x (training). What the reference runs and what
    double backward differentiates."""
    ndim, dtype = input.dim(), stats_dtype(input.dtype)
    x = input.to(dtype)
    batch_dims, spatial = (0, *range(2, ndim)), tuple(range(2, ndim))
    if left is None:
        left = torch.sqrt(x.var(dim=batch_dims, correction=0) + eps)
    left = channel_view(left.to(dtype), ndim)
    right = x * channel_view(v, ndim).to(dtype)
    right = right + torch.sqrt(x.var(dim=spatial, correction=0, keepdim=True) + eps)
    y = x / torch.maximum(left, right)
    if weight is not None:
        y = y * channel_view(weight, ndim).to(dtype)
    if bias is not None:
        y = y + channel_view(bias, ndim).to(dtype)
    return y.to(input.dtype)


def native_evo_norm_b0(input, v, running_var, weight, bias, training, momentum, eps):
    return _EvoNormB0.apply(input, v, running_var, weight, bias, training, momentum, eps)


def _composite_in_order(x, v, left, weight, bias, eps):
    return composite_evo_norm_b0(x, v, weight, bias, left, eps)


def plane_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of every (n, c) plane, (N, C), in the statistics dtype: a sum,
    then a centred sum of squares (ATen's vectorized reductions; no E[x^2] - E[x]^2)."""
    xs = x.to(stats_dtype(x.dtype))
    size = math.prod(x.shape[2:])
    mean = plane_sum(xs) / size
    centred = xs - plane_view(mean, x.dim())
    return mean, plane_sum(centred.square_()) / size


class _EvoNormB0(torch.autograd.Function):
    """y = gamma * x / d + beta, d = max(left_c, v x + sd_nc) per element.

    Backward, with t = dL/dd = -dL/dy * gamma * x / d^2, R where the instance branch wins (L the
    rest), S the plane size and M = N * S:

        dL/dx = dL/dy * gamma / d + v * t_R + (x - mu_nc) * T_nc / (S sd_nc)
                                            + (x - mu_c) * T_c / (M left_c)   (training only)
        T_nc = sum_spatial t_R,  T_c = sum_{n,spatial} t_L,  dL/dv = sum t_R * x,
        dL/dgamma = sum dL/dy * x / d,  dL/dbeta = sum dL/dy

    (d sqrt(var + eps) / dx = (x - mu) / (count * sqrt(var + eps))). Saves x, v, gamma and the
    O(N*C) statistics; d is recomputed. Under ``create_graph=True`` the gradients are autograd's
    of :func:`composite_evo_norm_b0`, differentiable again (double backward).
    """

    @staticmethod
    def forward(ctx, x, v, running_var, weight, bias, training, momentum, eps):
        c = x.shape[1]
        mean_nc, var_nc = plane_moments(x)  # (N, C)
        dtype = mean_nc.dtype
        if training:
            mean_c, var_c = merge_moments(mean_nc, var_nc, 0)  # the batch's, (C,)
            if running_var is not None:
                _update_running_var(running_var, var_c, x.numel() // c, momentum)
        else:
            mean_c, var_c = None, running_var.to(dtype)
        left = torch.sqrt(var_c + eps)  # (C,)
        sd = torch.sqrt(var_nc + eps)  # (N, C)
        d = _denominator(x, v, left, sd)
        y = torch.empty_like(x)
        torch.div(x, d, out=d)  # x / d, in place over d
        _affine(d, weight, bias, out=y)
        ctx.save_for_backward(x, v, weight, bias, left, sd, mean_nc, mean_c)
        ctx.training, ctx.eps = training, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, v, weight, bias, left, sd, mean_nc, mean_c = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: double backward
            inputs = (x, v, None if ctx.training else left, weight, bias, ctx.eps)
            needs = ctx.needs_input_grad
            grads = differentiable_backward(
                _composite_in_order, inputs, (*needs[:2], False, *needs[3:5]), dy
            )
            return (*grads[:2], None, *grads[3:5], None, None, None)
        ndim, n = x.dim(), x.shape[0]
        dtype = sd.dtype
        size = math.prod(x.shape[2:])
        rest = (0, *range(2, ndim))
        d = _denominator(x, v, left, sd)
        left_wins = d.le(channel_view(left, ndim))  # d == left exactly where left is the max
        g = dy if weight is None else torch.mul(dy, channel_view(weight, ndim).to(dtype))
        q = torch.div(g, d)  # dL/dy * gamma / d: the direct term of dL/dx
        t = torch.mul(q, x).div_(d).neg_()  # dL/dd
        t_right = t.masked_fill(left_wins, 0.0)
        dx = dv = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            sum_right = plane_sum(t_right)  # (N, C)
            k = sum_right / (size * sd)  # (N, C)
            shift = -(mean_nc * k)
            if ctx.training:
                sum_left = plane_sum(t).sum(0) - sum_right.sum(0)  # (C,)
                k_c = sum_left / (n * size * left)
                k = k + k_c
                shift = shift - mean_c * k_c
            grad = q.addcmul_(t_right, channel_view(v, ndim).to(dtype))
            grad = grad.add_(plane_view(shift, ndim))
            dx = torch.empty_like(x)
            torch.addcmul(grad, x, plane_view(k, ndim), out=dx)
        if ctx.needs_input_grad[1]:
            dv = plane_sum(t_right.mul_(x)).sum(0).to(v.dtype)
        if weight is not None and ctx.needs_input_grad[3]:
            dweight = plane_sum(torch.div(x, d).mul_(dy)).sum(0).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            dbias = dy.sum(rest, dtype=dtype).to(ctx.bias_dtype)
        return dx, dv, None, dweight, dbias, None, None, None


def _denominator(x, v, left, sd) -> torch.Tensor:
    """max(left_c, v x + sd_nc), a new tensor of x's shape and memory format (statistics dtype)."""
    ndim = x.dim()
    dtype = sd.dtype
    d = torch.empty_like(x, dtype=dtype)
    torch.addcmul(plane_view(sd, ndim), x, channel_view(v, ndim).to(dtype), out=d)
    return torch.maximum(d, channel_view(left, ndim), out=d)


def _affine(t, weight, bias, out) -> torch.Tensor:
    ndim, dtype = t.dim(), t.dtype
    if weight is None and bias is None:
        return out.copy_(t)
    if weight is None:
        return torch.add(t, channel_view(bias, ndim).to(dtype), out=out)
    if bias is None:
        return torch.mul(t, channel_view(weight, ndim).to(dtype), out=out)
    w, b = channel_view(weight, ndim).to(dtype), channel_view(bias, ndim).to(dtype)
    return torch.addcmul(b, t, w, out=out)
