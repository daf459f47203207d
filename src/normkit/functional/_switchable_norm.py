"""Switchable Normalization (Luo, Ren & Peng 2018): learned mixtures of IN, LN and BN statistics.

:func:`switchable_norm` is the functional form of :class:`normkit.SwitchableNorm`; see it for the
conventions. The paper's eq. 3 (arXiv 1806.10779), for k in (IN, LN, BN):

    y = gamma * (x - sum_k w_k mu_k) / sqrt(sum_k w'_k sigma2_k + eps) + beta
    w = softmax(mean_weight),  w' = softmax(var_weight)

with mu_k, sigma2_k the mean and biased variance over each normalizer's set: IN over the spatial dims
of one (n, c) plane, LN over (C, *spatial) of one sample, BN over (N, *spatial) of one channel (the
running statistics in eval). ``native`` computes the IN statistics once and merges them into LN's and
BN's by the law of total variance, as the paper's code does (but in the form that never subtracts two
large numbers), mixes them, and applies one per-plane affine map
(:mod:`normkit.functional._instance_stats`). ``reference`` computes each set's statistics directly
with :func:`~normkit.functional.moments` and lets autograd differentiate the formula.
"""

from __future__ import annotations

import torch

from normkit.errors import ConfigError
from normkit.functional import _dispatch
from normkit.functional._batch_instance_norm import mix_with_batch_statistics
from normkit.functional._batch_norm import batch_dims
from normkit.functional._checks import (
    check_batch_statistics_size,
    check_eps,
    check_floating,
    check_instance_statistics_size,
    check_min_rank,
    check_per_channel,
    shape_str,
)
from normkit.functional._compiled import worth_compiling
from normkit.functional._instance_stats import (
    instance_affine,
    instance_moments,
    merge_moments,
    spatial_dims,
)
from normkit.functional._instance_stats_compiled import plane_norm
from normkit.functional._moments import moments, stats_dtype
from normkit.functional._normalize import channel_view, empty_output

KINDS = ("IN", "LN", "BN")


def switchable_norm(
    input: torch.Tensor,
    mean_weight: torch.Tensor,
    var_weight: torch.Tensor,
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
    """Switchable normalization of an (N, C, \\*spatial) input; see :class:`normkit.SwitchableNorm`.

    ``mean_weight`` and ``var_weight`` are the importance logits, 3 each, in (IN, LN, BN) order. The
    BN part follows :func:`normkit.functional.batch_norm`: batch statistics when ``training``
    (running statistics updated when given), the running statistics otherwise.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 3, "(N, C, *spatial)")
    check_per_channel(
        input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    for name, logits in (("mean_weight", mean_weight), ("var_weight", var_weight)):
        if logits.shape != (3,):
            raise ConfigError(
                f"{name} holds one logit per statistic in (IN, LN, BN) order, shape (3,), but has "
                f"shape {shape_str(logits.shape)}"
            )
    check_instance_statistics_size(input)
    if input.numel() == 0:  # an empty batch: an empty output, the running statistics untouched
        ndim = input.dim()
        return empty_output(input, channel_view(weight, ndim), channel_view(bias, ndim))
    impl = _dispatch.resolve("switchable_norm", input)
    if not training:
        if running_mean is None or running_var is None:
            raise ConfigError(
                "switchable_norm with training=False takes the BN statistics from running_mean "
                "and running_var, but they were not given; pass them, or training=True"
            )
        return impl(input, mean_weight, var_weight, weight, bias, running_mean, running_var, eps)[0]
    check_batch_statistics_size(input)
    return mix_with_batch_statistics(
        impl,
        input,
        (mean_weight, var_weight, weight, bias),
        running_mean,
        running_var,
        momentum,
        eps,
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )


def importance(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax of the (IN, LN, BN) logits, in the statistics' dtype."""
    return torch.softmax(logits.to(dtype), dim=0)


def _switchable_affine(mean_in, var_in, mean_weight, var_weight, weight, bias, running_mean,
                       running_var, eps):  # fmt: skip
    """(scale, shift) per plane, (N, C), and the BN part's (mean, var), (C,): the IN, LN and BN
    moments, the LN and BN ones merged from the IN ones, mixed by the softmax importances."""
    dtype = mean_in.dtype
    mean_ln, var_ln = merge_moments(mean_in, var_in, 1)  # (N,)
    if running_mean is None:
        mean_bn, var_bn = merge_moments(mean_in, var_in, 0)  # (C,)
    else:
        mean_bn, var_bn = running_mean.to(dtype), running_var.to(dtype)
    w, v = importance(mean_weight, dtype), importance(var_weight, dtype)
    mean = w[0] * mean_in + w[1] * mean_ln.unsqueeze(1) + w[2] * mean_bn
    var = v[0] * var_in + v[1] * var_ln.unsqueeze(1) + v[2] * var_bn
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift, mean_bn, var_bn


def native_switchable_norm(
    input, mean_weight, var_weight, weight, bias, running_mean, running_var, eps
):
    mean_in, var_in = instance_moments(input)  # (N, C)
    scale, shift, mean_bn, var_bn = _switchable_affine(
        mean_in, var_in, mean_weight, var_weight, weight, bias, running_mean, running_var, eps
    )
    return instance_affine(input, scale, shift), mean_bn, var_bn


def compiled_switchable_norm(
    input, mean_weight, var_weight, weight, bias, running_mean, running_var, eps
):
    """The same maths in four fused passes over the input (:mod:`._instance_stats_compiled`); native for
    small inputs and under tracing or transforms (``_compiled.worth_compiling``)."""
    if not worth_compiling(input):
        return native_switchable_norm(
            input, mean_weight, var_weight, weight, bias, running_mean, running_var, eps
        )
    return plane_norm(
        input, _switchable_affine, mean_weight, var_weight, weight, bias, running_mean,
        running_var, eps,
    )  # fmt: skip


def reference_switchable_norm(
    input, mean_weight, var_weight, weight, bias, running_mean, running_var, eps
):
    ndim = input.dim()
    dtype = stats_dtype(input.dtype)
    x = input.to(dtype)
    mean_in, var_in = moments(x, spatial_dims(x))  # (N, C, 1, ...)
    mean_ln, var_ln = moments(x, tuple(range(1, ndim)))  # (N, 1, 1, ...)
    if running_mean is None:
        mean_bn, var_bn = moments(x, batch_dims(ndim))  # (1, C, 1, ...)
    else:
        mean_bn, var_bn = channel_view(running_mean, ndim), channel_view(running_var, ndim)
        mean_bn, var_bn = mean_bn.to(dtype), var_bn.to(dtype)
    w, v = importance(mean_weight, dtype), importance(var_weight, dtype)
    mean = w[0] * mean_in + w[1] * mean_ln + w[2] * mean_bn
    var = v[0] * var_in + v[1] * var_ln + v[2] * var_bn
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * channel_view(weight.to(dtype), ndim)
    if bias is not None:
        y = y + channel_view(bias.to(dtype), ndim)
    return y.to(input.dtype), mean_bn.reshape(-1), var_bn.reshape(-1)
