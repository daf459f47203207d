"""Batch Renormalization (Ioffe 2017): batch statistics corrected toward the running ones by r and d.

:func:`batch_renorm` is the functional form of :class:`normkit.BatchRenorm`; see it for the maths and
the conventions. Algorithm 1 of the paper (https://arxiv.org/abs/1702.03275), per channel:

    sigma_B = sqrt(var_B + eps),  sigma = sqrt(running_var + eps)
    r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = gamma * (x_hat * r + d) + beta  =  (gamma * r) * x_hat + (gamma * d + beta)
    mu    += momentum * (mu_B - mu)
    sigma += momentum * (sigma_B - sigma)      (the moving *standard deviation*)

Because r and d are constants for the backward pass, Batch Renorm is BatchNorm with the per-channel
affine (gamma * r, gamma * d + beta): the ``native`` version runs ATen's batch-norm kernels with that
corrected affine — the statistics kernel, the inference kernel fed with the batch's statistics, and
the training backward — so it costs what BatchNorm costs. The ``reference`` version is the same
algebra on normkit's own :func:`~normkit.functional.normalize_over`.
"""

from __future__ import annotations

import torch

from normkit.errors import ConfigError
from normkit.functional import _dispatch
from normkit.functional._batch_norm import batch_dims, batch_norm
from normkit.functional._checks import (
    check_batch_statistics_size,
    check_eps,
    check_floating,
    check_min_rank,
    check_per_channel,
)
from normkit.functional._given_statistics import batch_norm_given_statistics, batch_norm_statistics
from normkit.functional._moments import moments
from normkit.functional._normalize import channel_view, empty_output, normalize_over
from normkit.functional._running_stats import exponential_average_factor, guarded_update

Bound = float | torch.Tensor


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.01,
    eps: float = 1e-5,
    r_max: Bound = 3.0,
    d_max: Bound = 5.0,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """Batch Renormalization of an (N, C, \\*) input; see :class:`normkit.BatchRenorm`.

    The arguments of :func:`normkit.functional.batch_norm`, plus the clipping bounds ``r_max`` (>= 1)
    and ``d_max`` (>= 0), each a number or a 0-dim tensor (a schedule evaluated on the device).
    Running statistics are required: they are what r and d correct toward. In training they are
    updated as in the paper (``running_var`` holds sigma^2 - eps for the moving deviation sigma); in
    eval this is :func:`normkit.functional.batch_norm` with the running statistics.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    if running_mean is None or running_var is None:
        raise ConfigError(
            "batch_renorm needs running_mean and running_var: r and d correct the batch's "
            "statistics toward them. Without running statistics use batch_norm"
        )
    check_per_channel(
        input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    check_bound(r_max, "r_max", 1.0)
    check_bound(d_max, "d_max", 0.0)
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    check_batch_statistics_size(input)
    if input.numel() == 0:
        ndim = input.dim()
        return empty_output(input, channel_view(weight, ndim), channel_view(bias, ndim))
    impl = _dispatch.resolve("batch_renorm", input)
    factor = exponential_average_factor(momentum, num_batches_tracked)
    return guarded_update(
        running_mean,
        running_var,
        lambda mean, var: impl(input, mean, var, weight, bias, factor, eps, r_max, d_max),
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )


def check_bound(value: Bound, name: str, minimum: float) -> None:
    """r_max >= 1 and d_max >= 0 (checked for numbers; a tensor bound is a schedule's value)."""
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ConfigError(
            f"{name} must be a number >= {minimum:g} or a schedule (a callable of the step), got "
            f"{value!r}; {name}={minimum:g} with the other at its minimum is plain BatchNorm"
        )


@torch.no_grad()
def renorm_corrections(
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    r_max: Bound,
    d_max: Bound,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r and d of Algorithm 1, per channel, in the dtype of the batch statistics (no gradient)."""
    # detached: no_grad stops backward, not forward-mode AD's tangents (torch.func.jvp)
    batch_mean, batch_var = batch_mean.detach(), batch_var.detach()
    dtype = batch_mean.dtype
    sigma = torch.sqrt(running_var.to(dtype) + eps)
    r_max = r_max.to(dtype) if isinstance(r_max, torch.Tensor) else float(r_max)
    d_max = d_max.to(dtype) if isinstance(d_max, torch.Tensor) else float(d_max)
    r = torch.clamp(torch.sqrt(batch_var + eps) / sigma, 1.0 / r_max, r_max)
    d = torch.clamp((batch_mean - running_mean.to(dtype)) / sigma, -d_max, d_max)
    return r, d


@torch.no_grad()
def update_renorm_statistics(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    eps: float,
    momentum: float | torch.Tensor,
) -> None:
    """The paper's moving averages, in place: of the mean, and of sigma = sqrt(var + eps).

    ``running_var`` keeps BatchNorm's meaning for inference (``sqrt(running_var + eps)`` is the
    sigma that divides), so it is written as sigma^2 - eps (never negative: sigma >= sqrt(eps)).
    """
    dtype = batch_mean.dtype
    if isinstance(momentum, torch.Tensor):  # the cumulative average's 1/(k+1), on the device
        momentum = momentum.to(dtype)
    sigma = torch.sqrt(running_var.to(dtype) + eps)
    sigma = torch.lerp(sigma, torch.sqrt(batch_var + eps), momentum)
    running_mean.copy_(torch.lerp(running_mean.to(dtype), batch_mean, momentum))
    running_var.copy_((sigma.square() - eps).clamp_(min=0.0))


def corrected_affine(weight, bias, r, d) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's affine that gives Batch Renorm: (gamma * r, gamma * d + beta)."""
    if weight is None:
        w, b = r, d
    else:
        w, b = weight.to(r.dtype) * r, weight.to(r.dtype) * d
    return w, b if bias is None else b + bias.to(r.dtype)


def native_batch_renorm(
    input, running_mean, running_var, weight, bias, momentum, eps, r_max, d_max
):
    mean, var = batch_norm_statistics(input)
    r, d = renorm_corrections(mean, var, running_mean, running_var, eps, r_max, d_max)
    update_renorm_statistics(running_mean, running_var, mean, var, eps, momentum)
    w, b = corrected_affine(weight, bias, r, d)
    return batch_norm_given_statistics(input, w, b, mean, var, eps)


def reference_batch_renorm(
    input, running_mean, running_var, weight, bias, momentum, eps, r_max, d_max
):
    ndim = input.dim()
    dims = batch_dims(ndim)
    with torch.no_grad():
        mean, var = moments(input, dims, keepdim=False)
    r, d = renorm_corrections(mean, var, running_mean, running_var, eps, r_max, d_max)
    update_renorm_statistics(running_mean, running_var, mean, var, eps, momentum)
    w, b = corrected_affine(weight, bias, r, d)
    y, _, _ = normalize_over(input, dims, channel_view(w, ndim), channel_view(b, ndim), eps)
    return y
