"""Batch Layer Normalization (Ziaee & Çano 2022): BN and LN mixed by the inverse batch size.

:func:`batch_layer_norm` is the functional form of :class:`normkit.BatchLayerNorm`; see it for the
conventions and the decisions where the paper's code and normkit's layout differ. The layer of the
official code (A2Amir/Batch-Layer-Normalization, ``helpers/bln_layer.py``), for a mini-batch of size
m and d_k features (channels):

    x_b = (x - mu_B) / sqrt(sigma2_B + eps)          BatchNorm's normalization
    x_f = (x - mu_F) / sqrt(sigma2_F + eps)          LayerNorm's, over the features of each position
    y   = gamma * [(1/m - 1e-4) x_f + (1 - 1/m - 1e-4) x_b] / sqrt(d_k) + beta

The mixing weights are fixed, not learned, so they fold into the two normalizations' affine
parameters. ``native`` runs ATen's batch-norm and layer-norm kernels side by side on the input with
its channels moved last (one layout for both; see ``_ChannelsLastBatchLayerNorm``); ``reference``
normalizes twice with normkit's :func:`~normkit.functional.normalize_over` and mixes; ``compiled``
writes both parts' forward and backward as pure tensor maths fused by torch.compile in the input's
own layout, which saves the native path's four layout copies on NCHW inputs; for float32
channels_last inputs it runs them as C loops over the rows instead
(:mod:`normkit.functional._batch_layer_rows`: BatchNorm's 8 passes).
"""

from __future__ import annotations

import math

import torch

from normkit.errors import ConfigError
from normkit.functional import _batch_layer_rows, _dispatch
from normkit.functional._batch_instance_norm import mix_with_batch_statistics
from normkit.functional._batch_norm import batch_dims
from normkit.functional._batch_norm_compiled import channel_moments, channel_sum, shifted_moments
from normkit.functional._checks import (
    check_eps,
    check_floating,
    check_min_rank,
    check_per_channel,
    check_positive_int,
)
from normkit.functional._compiled import CompiledMaths, like_input
from normkit.functional._given_statistics import batch_norm_statistics
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import (
    channel_view,
    empty_output,
    normalize,
    normalize_over,
)
from normkit.functional._running_stats import compiling

# The offsets of the official code: the weights are 1/m - 1e-4 and 1 - (1/m + 1e-4).
WEIGHT_OFFSET = 1e-4


def batch_layer_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-3,
    batch_size: int | None = None,
    divide_by_sqrt_features: bool = True,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """Batch Layer normalization of an (N, C, \\*) input; see :class:`normkit.BatchLayerNorm`.

    ``batch_size`` is the m of the mixing weights (default: the input's N). The BN part follows
    :func:`normkit.functional.batch_norm`: batch statistics when ``training`` (running statistics
    updated when given), the running statistics otherwise; the LN part is always per position.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_per_channel(
        input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    if input.numel() == 0:  # an empty batch: an empty output, the running statistics untouched
        ndim = input.dim()
        return empty_output(input, channel_view(weight, ndim), channel_view(bias, ndim))
    batch_weight, layer_weight = mixing_weights(
        batch_size or max(input.shape[0], 1), input.shape[1], divide_by_sqrt_features
    )
    impl = _dispatch.resolve("batch_layer_norm", input)
    arguments = (batch_weight, layer_weight, weight, bias)
    if not training:
        if running_mean is None or running_var is None:
            raise ConfigError(
                "batch_layer_norm with training=False normalizes the BN part with running_mean "
                "and running_var, but they were not given; pass them, or training=True"
            )
        return impl(input, *arguments, running_mean, running_var, eps)[0]
    if input.shape[0] * math.prod(input.shape[2:]) == 1:
        return _one_value_per_channel(impl, input, layer_weight, weight, bias, eps)
    return mix_with_batch_statistics(
        impl,
        input,
        arguments,
        running_mean,
        running_var,
        momentum,
        eps,
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )


def _one_value_per_channel(impl, input, layer_weight, weight, bias, eps):
    """Training on one value per channel (an (1, C) input, or one sample's 1x1 map), as the
    official code computes it: its batch moments over one sample are mu_B = x, sigma2_B = 0, so
    x_b = (x - x) / sqrt(0 + eps) = 0 and only the LN part and beta remain (value and gradient).
    The running statistics are left as they are: one value has no variance (the code's unbiased
    correction m / (m - 1) divides by zero there). BatchNorm keeps its BatchTooSmallError."""
    constant = torch.zeros(input.shape[1], dtype=stats_dtype(input.dtype), device=input.device)
    # the BN part weighted 0 against constant statistics: exactly its x_b = 0 and zero gradients
    return impl(input, 0.0, layer_weight, weight, bias, constant, constant + 1.0, eps)[0]


def mixing_weights(batch_size: int, features: int, divide: bool) -> tuple[float, float]:
    """(weight of x_b, weight of x_f): (1 - 1/m - 1e-4, 1/m - 1e-4), over sqrt(d_k) if ``divide``."""
    scale = 1.0 / math.sqrt(features) if divide else 1.0
    inverse = 1.0 / batch_size
    return (1.0 - (inverse + WEIGHT_OFFSET)) * scale, (inverse - WEIGHT_OFFSET) * scale


def _per_channel(weight, factor: float, channels: int, dtype, device) -> torch.Tensor:
    if weight is None:
        return torch.full((channels,), factor, dtype=dtype, device=device)
    return weight.to(dtype) * factor


def _mixed_parameters(input, batch_weight, layer_weight, weight, bias, running_mean, running_var):
    """(w_b, b, w_f, mean, var) in the statistics dtype: γ scaled by each part's mixing weight."""
    dtype = stats_dtype(input.dtype)
    channels = input.shape[1]
    w_b = _per_channel(weight, batch_weight, channels, dtype, input.device)
    w_f = _per_channel(weight, layer_weight, channels, dtype, input.device)
    b = torch.zeros(channels, dtype=dtype, device=input.device) if bias is None else bias.to(dtype)
    stats = (
        (None, None) if running_mean is None else (running_mean.to(dtype), running_var.to(dtype))
    )
    return w_b, b, w_f, *stats


def native_batch_layer_norm(
    input, batch_weight, layer_weight, weight, bias, running_mean, running_var, eps
):
    parameters = _mixed_parameters(
        input, batch_weight, layer_weight, weight, bias, running_mean, running_var
    )
    return _ChannelsLastBatchLayerNorm.apply(input, *parameters, eps)


class _ChannelsLastBatchLayerNorm(torch.autograd.Function):
    """y = BN(x; w_b, b) + LN_C(x; w_f) on the (M, C) matrix of the input with channels last.

    Both halves are ATen's fastest CPU kernels on that layout (BatchNorm of a 2-D input, LayerNorm
    over a contiguous last dim), and they share it: the input moves to channels-last once (free
    for channels_last and (N, C) inputs), the output grad once, and each half's backward is ATen's,
    called directly so that its grad and input have the same layout. BatchNorm's statistics come
    from ATen's statistics kernel and are returned for the running update.
    """

    @staticmethod
    def forward(ctx, x, w_b, b, w_f, running_mean, running_var, eps):
        channels = x.shape[1]
        rows = x.movedim(1, -1).contiguous().view(-1, channels)  # (M, C)
        training = running_mean is None
        mean, var = batch_norm_statistics(rows) if training else (running_mean, running_var)
        cudnn = torch.backends.cudnn.enabled
        y = torch.batch_norm(rows, w_b, b, mean, var, False, 0.0, eps, cudnn)
        y_f, mean_f, rstd_f = torch.native_layer_norm(rows, (channels,), w_f, None, eps)
        y = y.add_(y_f).view(x.movedim(1, -1).shape).movedim(-1, 1)
        ctx.save_for_backward(x, rows, w_b, w_f, mean, var, mean_f, rstd_f)
        ctx.training, ctx.eps = training, eps
        ctx.mark_non_differentiable(mean, var)
        return _like_input(y, x), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, rows, w_b, w_f, mean, var, mean_f, rstd_f = ctx.saved_tensors
        channels = x.shape[1]
        if torch.is_grad_enabled():  # double backward: the rows as a function of x
            rows = x.movedim(1, -1).contiguous().view(-1, channels)
        grad = dy.movedim(1, -1).contiguous().view(-1, channels)
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[2]]
        if ctx.training:
            invstd = torch.rsqrt(var + ctx.eps)
            dx, dw_b, db = torch.ops.aten.native_batch_norm_backward(
                grad, rows, w_b, None, None, mean, invstd, True, ctx.eps, mask
            )
        else:  # the running statistics are constants: ATen's inference backward
            dx, dw_b, db = torch.ops.aten.native_batch_norm_backward(
                grad, rows, w_b, mean, var, None, None, False, ctx.eps, mask
            )
        dx_f, dw_f, _ = torch.ops.aten.native_layer_norm_backward(
            grad, rows, (channels,), mean_f, rstd_f, w_f, None, [needs[0], needs[3], False]
        )
        if dx is not None:
            dx = dx.add_(dx_f) if not torch.is_grad_enabled() else dx + dx_f
            dx = _like_input(dx.view(x.movedim(1, -1).shape).movedim(-1, 1), x)
        return dx, dw_b, db, dw_f, None, None, None


def _like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (channels-last strides) in ``x``'s layout: unchanged for channels-last and (N, C)
    inputs, copied to contiguous otherwise."""
    return t if x.dim() == 2 or not x.is_contiguous() else t.contiguous()


def _compiled_forward_maths(x, w_b, b, w_f, running_mean, running_var, eps: float):
    """y = w_b·x̂_B + w_f·x̂_F + b in the input's layout; BN's (mean, biased var) and LN's
    (mean, 1/σ) per position, all in the statistics dtype."""
    ndim = x.dim()
    xs = x.to(stats_dtype(x.dtype))
    # one pass of shifted sums per statistic, where var_mean's Welford update divides per element
    if running_mean is None:
        mean, var = channel_moments(xs)
    else:
        mean, var = channel_view(running_mean, ndim), channel_view(running_var, ndim)
    mean_f, var_f = shifted_moments(xs, (1,))
    invstd_f = torch.rsqrt(var_f + eps)
    y = (
        (xs - mean) * (torch.rsqrt(var + eps) * channel_view(w_b, ndim))
        + (xs - mean_f) * invstd_f * channel_view(w_f, ndim)
        + channel_view(b, ndim)
    )
    return y.to(x.dtype), mean.reshape(-1), var.reshape(-1), mean_f, invstd_f


def _compiled_backward_maths(
    dy, x, w_b, w_f, mean, var, mean_f, invstd_f, eps: float, training: bool
):
    """Each part's normalization backward (Ioffe & Szegedy §3 over the batch for x̂_B; the same
    over the channels for x̂_F, whose statistics always depend on x), summed; and the per-channel
    sums Σ dy·x̂_B, Σ dy, Σ dy·x̂_F that are the gradients of w_b, b and w_f."""
    ndim = x.dim()
    dtype = stats_dtype(x.dtype)
    xs, g = x.to(dtype), dy.to(dtype)
    invstd = torch.rsqrt(channel_view(var, ndim) + eps)
    x_b = (xs - channel_view(mean, ndim)) * invstd
    x_f = (xs - mean_f) * invstd_f
    sum_g = channel_view(channel_sum(g), ndim)  # by blocks of positions for channels_last
    sum_gx_b = channel_view(channel_sum(g * x_b), ndim)
    sum_gx_f = channel_view(channel_sum(g * x_f), ndim)
    scale = invstd * channel_view(w_b, ndim)
    if training:
        n = x.numel() // x.shape[1]
        dx = scale * (g - sum_g / n - x_b * (sum_gx_b / n))
    else:  # the running statistics are constants
        dx = scale * g
    g_f = g * channel_view(w_f, ndim)
    dx = dx + invstd_f * (g_f - g_f.mean(1, keepdim=True) - x_f * (g_f * x_f).mean(1, keepdim=True))
    return dx.to(x.dtype), sum_gx_b.reshape(-1), sum_g.reshape(-1), sum_gx_f.reshape(-1)


class _CompiledBatchLayerNorm(torch.autograd.Function):
    """y = BN(x; w_b, b) + LN_C(x; w_f) as two pure-tensor passes forward and two backward, fused
    by torch.compile in the input's own layout (no channels-last copies); saves x, the float32
    per-channel and per-position statistics. Under ``create_graph=True`` the backward is autograd's
    of the same maths, so it is twice differentiable."""

    @staticmethod
    def forward(ctx, x, w_b, b, w_f, running_mean, running_var, eps):
        ctx.rows = not compiling() and _batch_layer_rows.available(x)
        if ctx.rows:  # float32 channels_last: the C passes over the rows
            y, mean, var, mean_f, invstd_f = _batch_layer_rows.forward(
                x, w_b, b, w_f, eps, running_mean, running_var
            )
        else:
            y, mean, var, mean_f, invstd_f = CompiledMaths.call(
                _compiled_forward_maths, x, w_b, b, w_f, running_mean, running_var, eps
            )
        if running_mean is not None:
            mean, var = running_mean, running_var
        y = like_input(y, x)
        ctx.save_for_backward(x, w_b, w_f, mean, var, mean_f, invstd_f)
        ctx.eps, ctx.training = eps, running_mean is None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, w_b, w_f, mean, var, mean_f, invstd_f = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: double backward
            grads = _differentiable_backward(dy, x, w_b, w_f, mean, var, ctx)
            return (*grads, None, None, None)
        if ctx.rows:  # its per-position statistics are for the C backward; dy in x's layout
            dy = like_input(dy, x)
            dx, dw_b, db, dw_f = _batch_layer_rows.backward(
                dy, x, w_b, w_f, mean, var, mean_f, invstd_f, ctx.eps, ctx.training
            )
        else:
            args = (dy, x, w_b, w_f, mean, var, mean_f, invstd_f, ctx.eps, ctx.training)
            dx, dw_b, db, dw_f = CompiledMaths.call(_compiled_backward_maths, *args)
        dx = like_input(dx, x)
        needs = ctx.needs_input_grad
        grads = (dx, dw_b, db, dw_f)
        return (
            *(g if need else None for g, need in zip(grads, needs, strict=False)),
            None,
            None,
            None,
        )


def _differentiable_backward(dy, x, w_b, w_f, mean, var, ctx):
    """The backward under ``create_graph=True``: the gradients of w_b·x̂_B + w_f·x̂_F (+ b) by
    autograd, recomputing the statistics from x (the batch's in training; the running ones are
    constants in eval), so that they are differentiable again."""
    ndim, dims, dtype = x.dim(), batch_dims(x.dim()), stats_dtype(x.dtype)
    needs = ctx.needs_input_grad
    flags = (needs[0], needs[1], needs[3])
    wanted = [t if need else None for t, need in zip((x, w_b, w_f), flags, strict=True)]
    with torch.enable_grad():
        xs = x.to(dtype)
        if ctx.training:
            var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)
        else:
            mean, var = channel_view(mean, ndim), channel_view(var, ndim)
        var_f, mean_f = torch.var_mean(xs, (1,), correction=0, keepdim=True)
        y = (xs - mean) * torch.rsqrt(var + ctx.eps) * channel_view(w_b, ndim) + (
            xs - mean_f
        ) * torch.rsqrt(var_f + ctx.eps) * channel_view(w_f, ndim)
        inputs = [t for t in wanted if t is not None]
        grads = iter(torch.autograd.grad(y.to(x.dtype), inputs, dy, create_graph=True))
    dx, dw_b, dw_f = (next(grads) if t is not None else None for t in wanted)
    db = dy.to(dtype).sum(dims) if needs[2] else None
    return dx, dw_b, db, dw_f


def compiled_batch_layer_norm(
    input, batch_weight, layer_weight, weight, bias, running_mean, running_var, eps
):
    if input.numel() == 0:
        return native_batch_layer_norm(
            input, batch_weight, layer_weight, weight, bias, running_mean, running_var, eps
        )
    parameters = _mixed_parameters(
        input, batch_weight, layer_weight, weight, bias, running_mean, running_var
    )
    return _CompiledBatchLayerNorm.apply(input, *parameters, eps)


def reference_batch_layer_norm(
    input, batch_weight, layer_weight, weight, bias, running_mean, running_var, eps
):
    ndim = input.dim()
    dtype = stats_dtype(input.dtype)
    x = input.to(dtype)  # normalize in float32 for half inputs, and round once at the end
    if running_mean is None:
        x_b, mean, var = normalize_over(x, batch_dims(ndim), None, None, eps)
    else:
        mean, var = running_mean, running_var
        x_b = normalize(x, channel_view(mean, ndim), channel_view(var, ndim), eps=eps)
    x_f, _, _ = normalize_over(x, (1,), None, None, eps)
    y = batch_weight * x_b + layer_weight * x_f
    if weight is not None:
        y = y * channel_view(weight.to(dtype), ndim)
    if bias is not None:
        y = y + channel_view(bias.to(dtype), ndim)
    return y.to(input.dtype), mean.reshape(-1), var.reshape(-1)
