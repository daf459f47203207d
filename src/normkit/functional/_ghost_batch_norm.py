"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017): BatchNorm over virtual sub-batches.

:func:`ghost_batch_norm` is the functional form of :class:`normkit.GhostBatchNorm`; see it for the
maths and the conventions. The batch of N samples is split, in order, into G = max(1, N // v) ghost
batches of as equal sizes as possible (sizes differ by at most one, and none is smaller than v unless
N < v); each is normalized with its own per-channel mean and biased variance. The running statistics
are an exponential average over the ghost batches, updated once per ghost batch in order, as in the
paper's code — computed here in closed form, without a loop:

    running <- (1 - a)^G running + sum_k a (1 - a)^(G - 1 - k) stat_k        (momentum a)
    running <- (t running + sum_k stat_k) / (t + G)                          (momentum=None)

``num_batches_tracked`` counts ghost batches (t above). Both backends are vectorized over the ghost
batches: ``native`` merges instance statistics per ghost batch and applies one per-plane affine map
(:mod:`normkit.functional._instance_stats`); ``compiled`` does the same in four passes fused by
torch.compile in the input's layout (:mod:`normkit.functional._instance_stats_compiled`); ``reference``
views the batch as (G, N/G, C, *) and normalizes over (N/G, *) with normkit's
:func:`~normkit.functional.normalize_over`.
"""

from __future__ import annotations

import math

import torch

from normkit.errors import BatchTooSmallError, ConfigError
from normkit.functional import _dispatch
from normkit.functional._batch_norm import batch_norm
from normkit.functional._checks import (
    check_eps,
    check_floating,
    check_min_rank,
    check_per_channel,
    check_positive_int,
    shape_str,
)
from normkit.functional._compiled import worth_compiling
from normkit.functional._instance_stats import instance_affine, instance_moments, merge_moments
from normkit.functional._instance_stats_compiled import plane_norm
from normkit.functional._moments import unbiased
from normkit.functional._normalize import channel_view, empty_output, normalize_over
from normkit.functional._running_stats import exponential_average_factor, guarded_update


def ghost_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    virtual_batch_size: int = 32,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """Ghost batch normalization of an (N, C, \\*) input; see :class:`normkit.GhostBatchNorm`.

    The arguments of :func:`normkit.functional.batch_norm`, plus ``virtual_batch_size`` (v). With
    ``training=False`` this is BatchNorm with the running statistics, at any batch size.
    ``num_batches_tracked`` is advanced by the number of ghost batches whose statistics entered the
    running ones.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_positive_int(virtual_batch_size, "virtual_batch_size")
    check_per_channel(
        input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    if not training:
        if running_mean is None or running_var is None:
            raise ConfigError(
                "ghost_batch_norm with training=False normalizes with running_mean and "
                "running_var, but they were not given; pass them, or training=True"
            )
        return batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    sizes = ghost_batch_sizes(int(input.shape[0]), virtual_batch_size)
    if input.numel() == 0:
        ndim = input.dim()
        return empty_output(input, channel_view(weight, ndim), channel_view(bias, ndim))
    _check_ghost_size(input, sizes, virtual_batch_size)
    impl = _dispatch.resolve("ghost_batch_norm", input)
    if running_mean is None or running_var is None:
        return impl(input, sizes, weight, bias, eps)[0]
    factor = exponential_average_factor(momentum, num_batches_tracked)

    def normalize_and_track(new_mean, new_var):
        y, means, variances = impl(input, sizes, weight, bias, eps)
        with torch.no_grad():
            plane = math.prod(input.shape[2:])
            counts = torch.tensor(sizes, dtype=variances.dtype, device=variances.device) * plane
            variances = unbiased(variances, counts.unsqueeze(1))  # per ghost batch: m / (m - 1)
            if momentum is None:  # the cumulative average weighs by the ghost batches seen
                blend_cumulative(new_mean, means, num_batches_tracked)
                blend_cumulative(new_var, variances, num_batches_tracked)
            else:
                blend_exponential(new_mean, means, factor)
                blend_exponential(new_var, variances, factor)
        return y

    return guarded_update(
        running_mean,
        running_var,
        normalize_and_track,
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
        count=len(sizes),
    )


def ghost_batch_sizes(batch: int, virtual_batch_size: int) -> tuple[int, ...]:
    """The sizes of the ghost batches, in order: G = max(1, N // v) of them, as equal as possible.

    The first N % G ghost batches hold one sample more, so no ghost batch is smaller than v (unless
    the whole batch is). Examples: N=64, v=16 -> (16, 16, 16, 16); N=33, v=16 -> (17, 16);
    N=8, v=16 -> (8,).
    """
    if batch == 0:
        return ()
    count = max(1, batch // virtual_batch_size)
    size, extra = divmod(batch, count)
    return (size + 1,) * extra + (size,) * (count - extra)


def blend_exponential(running: torch.Tensor, stats: torch.Tensor, momentum: float) -> None:
    """Apply ``running <- (1 - a) running + a stat_k`` for k = 0..G-1 in order, in closed form."""
    count = stats.shape[0]
    decay = 1.0 - momentum
    weights = [momentum * decay ** (count - 1 - k) for k in range(count)]
    w = torch.tensor(weights, dtype=stats.dtype, device=stats.device).unsqueeze(1)
    blended = (w * stats).sum(0).reshape(running.shape).to(running.dtype)
    running.mul_(decay**count).add_(blended)


def blend_cumulative(running: torch.Tensor, stats: torch.Tensor, seen: torch.Tensor) -> None:
    """The cumulative average after G more statistics: ``(t running + sum_k stat_k) / (t + G)``,
    with t, the ghost batches ``seen`` so far, read on the device."""
    count = stats.shape[0]
    total = stats.sum(0).reshape(running.shape).to(running.dtype)
    seen = seen.to(running.dtype)
    running.mul_(seen / (seen + count)).add_(total / (seen + count))


def _check_ghost_size(input, sizes, virtual_batch_size) -> None:
    plane = math.prod(input.shape[2:])
    if min(sizes) * plane < 2:
        raise BatchTooSmallError(
            f"a ghost batch of {min(sizes)} sample(s) has {min(sizes) * plane} value per channel in "
            f"the input of shape {shape_str(input.shape)} (virtual_batch_size="
            f"{virtual_batch_size}), too few for batch statistics; use a larger batch or "
            "virtual_batch_size, or call .eval() to use the running statistics"
        )


def _blocks(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """The ghost batches as at most two runs of equal size: [(count, size), ...]."""
    runs: list[tuple[int, int]] = []
    for size in sizes:
        if runs and runs[-1][1] == size:
            runs[-1] = (runs[-1][0] + 1, size)
        else:
            runs.append((1, size))
    return runs


def _ghost_affine(mean, var, weight, bias, sizes, eps):
    """(scale, shift) per plane, (N, C), and the ghost batches' (mean, var), (G, C), from the
    instance statistics ``mean``, ``var`` (N, C): the ghost batches' moments merged by the law of
    total variance, each sample normalized with its ghost batch's."""
    means, variances, per_sample_mean, per_sample_var = [], [], [], []
    start = 0
    for count, size in _blocks(sizes):  # at most two runs of equal-sized ghost batches
        stop = start + count * size
        block_mean, block_var = merge_moments(
            mean[start:stop].unflatten(0, (count, size)),
            var[start:stop].unflatten(0, (count, size)),
            1,
        )  # (count, C)
        means.append(block_mean)
        variances.append(block_var)
        per_sample_mean.append(block_mean.repeat_interleave(size, dim=0))
        per_sample_var.append(block_var.repeat_interleave(size, dim=0))
        start = stop
    ghost_mean, ghost_var = torch.cat(means), torch.cat(variances)  # (G, C)
    sample_mean, sample_var = torch.cat(per_sample_mean), torch.cat(per_sample_var)  # (N, C)
    scale = torch.rsqrt(sample_var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -sample_mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return scale, shift, ghost_mean, ghost_var


def native_ghost_batch_norm(input, sizes, weight, bias, eps):
    mean, var = instance_moments(input)  # (N, C)
    scale, shift, ghost_mean, ghost_var = _ghost_affine(mean, var, weight, bias, sizes, eps)
    y = instance_affine(input, scale, shift)
    return y, ghost_mean.detach(), ghost_var.detach()


def compiled_ghost_batch_norm(input, sizes, weight, bias, eps):
    """The same maths in four fused passes over the input (:mod:`._instance_stats_compiled`); native for
    small inputs and under tracing or transforms (``_compiled.worth_compiling``)."""
    if not worth_compiling(input):
        return native_ghost_batch_norm(input, sizes, weight, bias, eps)
    return plane_norm(input, _ghost_affine, weight, bias, sizes, eps)


def reference_ghost_batch_norm(input, sizes, weight, bias, eps):
    ndim = input.dim()
    w = None if weight is None else weight.view((1, 1, -1) + (1,) * (ndim - 2))
    b = None if bias is None else bias.view((1, 1, -1) + (1,) * (ndim - 2))
    outputs, means, variances = [], [], []
    start = 0
    for count, size in _blocks(sizes):  # at most two runs of equal-sized ghost batches
        block = input[start : start + count * size].unflatten(0, (count, size))  # (k, v, C, *)
        y, mean, var = normalize_over(block, (1, *range(3, ndim + 1)), w, b, eps)
        outputs.append(y.flatten(0, 1))
        means.append(mean.reshape(count, -1))
        variances.append(var.reshape(count, -1))
        start += count * size
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return y, torch.cat(means), torch.cat(variances)
