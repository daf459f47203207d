"""Batch-Instance Normalization (Nam & Kim 2018): a per-channel gate between BN and IN.

:func:`batch_instance_norm` is the functional form of :class:`normkit.BatchInstanceNorm`; see it for
the conventions. The equation (arXiv 1805.07925, eq. 6-7), per channel c:

    y = (rho * x_hat_B + (1 - rho) * x_hat_I) * gamma + beta,     rho in [0, 1]

with x_hat_B BatchNorm's normalization (batch statistics in training, running ones in eval) and
x_hat_I InstanceNorm's (always per sample). Both are per-(n, c) affine maps of x, so their mixture is
one: ``native`` computes the instance statistics, merges them into the batch statistics, mixes the
two normalizations into one scale and shift per plane and applies it in one pass
(:mod:`normkit.functional._instance_stats`). ``reference`` normalizes twice with normkit's
:func:`~normkit.functional.normalize_over` and mixes the results.
"""

from __future__ import annotations

import torch

from normkit.errors import ConfigError
from normkit.functional import _dispatch
from normkit.functional._batch_norm import batch_dims
from normkit.functional._checks import (
    check_batch_statistics_size,
    check_eps,
    check_floating,
    check_instance_statistics_size,
    check_min_rank,
    check_per_channel,
)
from normkit.functional._compiled import worth_compiling
from normkit.functional._instance_stats import (
    instance_affine,
    instance_moments,
    merge_moments,
    spatial_dims,
)
from normkit.functional._instance_stats_compiled import plane_norm
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import (
    channel_view,
    empty_output,
    normalize,
    normalize_over,
)
from normkit.functional._running_stats import (
    exponential_average_factor,
    guarded_update,
    update_running_stats,
)


def batch_instance_norm(
    input: torch.Tensor,
    rho: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
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
    """Batch-Instance normalization of an (N, C, \\*spatial) input; see :class:`normkit.BatchInstanceNorm`.

    ``rho`` is the per-channel gate, used clamped to [0, 1]. The BN part follows
    :func:`normkit.functional.batch_norm`: batch statistics when ``training`` (running statistics
    updated when given), the running statistics otherwise.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 3, "(N, C, *spatial)")
    check_per_channel(
        input,
        rho=rho,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
    )
    check_instance_statistics_size(input)
    if input.numel() == 0:  # an empty batch: an empty output, the running statistics untouched
        ndim = input.dim()
        return empty_output(input, channel_view(weight, ndim), channel_view(bias, ndim))
    gate = rho.clamp(0.0, 1.0)
    if not training:
        if running_mean is None or running_var is None:
            raise ConfigError(
                "batch_instance_norm with training=False normalizes the BN part with "
                "running_mean and running_var, but they were not given; pass them, or training=True"
            )
        return _resolve(input)(input, gate, weight, bias, running_mean, running_var, eps)[0]
    check_batch_statistics_size(input)
    return mix_with_batch_statistics(
        _resolve(input),
        input,
        (gate, weight, bias),
        running_mean,
        running_var,
        momentum,
        eps,
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )


def _resolve(input):
    return _dispatch.resolve("batch_instance_norm", input)


def mix_with_batch_statistics(
    impl,
    input,
    arguments,
    running_mean,
    running_var,
    momentum,
    eps,
    *,
    num_batches_tracked,
    num_batches_skipped,
    on_nonfinite,
):
    """Training of a normalizer whose BN part uses batch statistics: run ``impl`` with them and, when
    running statistics are given, blend the batch's into them under the non-finite guard.

    ``impl(input, *arguments, None, None, eps)`` returns ``(y, batch_mean, batch_var)``.
    """
    if input.numel() == 0 or running_mean is None or running_var is None:
        return impl(input, *arguments, None, None, eps)[0]
    factor = exponential_average_factor(momentum, num_batches_tracked)
    count = input.numel() // input.shape[1]

    def normalize_and_track(new_mean, new_var):
        y, mean, var = impl(input, *arguments, None, None, eps)
        update_running_stats(new_mean, new_var, mean.detach(), var.detach(), count, factor)
        return y

    return guarded_update(
        running_mean,
        running_var,
        normalize_and_track,
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )


def batch_part(mean_in, var_in, running_mean, running_var):
    """The BN part's statistics: merged from the instance ones (training) or the running ones."""
    if running_mean is None:
        return merge_moments(mean_in, var_in, 0)  # (C,) each
    dtype = mean_in.dtype
    return running_mean.to(dtype), running_var.to(dtype)


def _batch_instance_affine(mean_in, var_in, gate, weight, bias, running_mean, running_var, eps):
    """(scale, shift) per plane, (N, C), and the BN part's (mean, var), (C,), from the instance
    statistics: rho (x - mu_B) / sigma_B + (1 - rho) (x - mu_I) / sigma_I = x * scale + shift."""
    mean_bn, var_bn = batch_part(mean_in, var_in, running_mean, running_var)  # (C,)
    dtype = mean_in.dtype
    gate = gate.to(dtype)
    invstd_bn, invstd_in = torch.rsqrt(var_bn + eps), torch.rsqrt(var_in + eps)
    scale_bn, scale_in = gate * invstd_bn, (1.0 - gate) * invstd_in
    scale = scale_bn + scale_in
    shift = -(scale_bn * mean_bn) - scale_in * mean_in
    if weight is not None:
        scale, shift = scale * weight.to(dtype), shift * weight.to(dtype)
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift, mean_bn, var_bn


def native_batch_instance_norm(input, gate, weight, bias, running_mean, running_var, eps):
    mean_in, var_in = instance_moments(input)  # (N, C)
    scale, shift, mean_bn, var_bn = _batch_instance_affine(
        mean_in, var_in, gate, weight, bias, running_mean, running_var, eps
    )
    return instance_affine(input, scale, shift), mean_bn, var_bn


def compiled_batch_instance_norm(input, gate, weight, bias, running_mean, running_var, eps):
    """The same maths in four fused passes over the input (:mod:`._instance_stats_compiled`); native for
    small inputs and under tracing or transforms (``_compiled.worth_compiling``)."""
    if not worth_compiling(input):
        return native_batch_instance_norm(input, gate, weight, bias, running_mean, running_var, eps)
    return plane_norm(
        input, _batch_instance_affine, gate, weight, bias, running_mean, running_var, eps
    )


def reference_batch_instance_norm(input, gate, weight, bias, running_mean, running_var, eps):
    ndim = input.dim()
    dtype = stats_dtype(input.dtype)
    x = input.to(dtype)  # normalize in float32 for half inputs, and round once at the end
    if running_mean is None:
        x_hat_b, mean_bn, var_bn = normalize_over(x, batch_dims(ndim), None, None, eps)
    else:
        mean_bn, var_bn = running_mean, running_var
        x_hat_b = normalize(x, channel_view(mean_bn, ndim), channel_view(var_bn, ndim), eps=eps)
    x_hat_i, _, _ = normalize_over(x, spatial_dims(x), None, None, eps)
    rho = channel_view(gate.to(dtype), ndim)
    y = rho * x_hat_b + (1.0 - rho) * x_hat_i
    if weight is not None:
        y = y * channel_view(weight.to(dtype), ndim)
    if bias is not None:
        y = y + channel_view(bias.to(dtype), ndim)
    return y.to(input.dtype), mean_bn.reshape(-1), var_bn.reshape(-1)
