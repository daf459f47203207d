"""Batch normalization (Ioffe & Szegedy 2015): statistics per channel over the batch and spatial dims.

:func:`batch_norm` is ``torch.nn.functional.batch_norm`` with normkit's checks, the non-finite guard
on the running statistics and the cumulative average for ``momentum=None``; see
:class:`normkit.BatchNorm` for the maths and conventions. The arithmetic comes from the backend in
force; normkit's own version (:func:`reference_batch_norm`) is registered here as ``reference``.
"""

from __future__ import annotations

import torch

from normkit.errors import ConfigError
from normkit.functional import _dispatch
from normkit.functional._checks import (
    check_batch_statistics_size,
    check_eps,
    check_floating,
    check_min_rank,
    check_per_channel,
)
from normkit.functional._masked import masked_batch_norm
from normkit.functional._normalize import channel_view, empty_output, normalize, normalize_over
from normkit.functional._running_stats import (
    average_into,
    exponential_average_factor,
    guarded_update,
    update_running_stats,
)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
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
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch normalization of an input of shape (N, C, *); see :class:`normkit.BatchNorm`.

    Same arguments and results as ``torch.nn.functional.batch_norm``, plus:

    Args:
        momentum: ``None`` for the cumulative average (needs ``num_batches_tracked``).
        num_batches_tracked: a long scalar tensor counting the accepted updates; incremented here.
        num_batches_skipped: a long scalar tensor counting updates refused by the guard.
        on_nonfinite: ``"skip"``, ``"warn"`` or ``"raise"`` when the batch's statistics are not
            finite (see :func:`normkit.functional.guarded_update`).
        mask: a bool tensor of shape (N, *), True where an element is real: statistics over the
            real elements only, zeros at padded positions (see
            :mod:`normkit.functional._masked`). Default: None, every element is real.

    Running statistics are updated in place when ``training`` and both are given. An empty batch
    returns an empty output and leaves them (and the counters) unchanged.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_per_channel(
        input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    if training:
        check_batch_statistics_size(input)
    elif running_mean is None or running_var is None:
        raise ConfigError(
            "batch_norm with training=False normalizes with running_mean and running_var, but "
            "they were not given; pass them, or training=True to use the batch's statistics"
        )
    if mask is not None:
        return masked_batch_norm(
            input,
            mask,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            num_batches_tracked=num_batches_tracked,
            num_batches_skipped=num_batches_skipped,
            on_nonfinite=on_nonfinite,
        )
    impl = _dispatch.resolve("batch_norm", input)
    tracked = training and running_mean is not None and running_var is not None
    if not training:
        return impl(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if not tracked or input.numel() == 0:
        return impl(input, None, None, weight, bias, True, 0.0, eps)
    factor = exponential_average_factor(momentum, num_batches_tracked)
    return guarded_update(
        running_mean,
        running_var,
        lambda mean, var: average_into(
            mean, var, factor, lambda m, v, f: impl(input, m, v, weight, bias, True, f, eps)
        ),
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )


def batch_dims(ndim: int) -> tuple[int, ...]:
    """The dims BatchNorm reduces over: N and every spatial dim."""
    return (0, *range(2, ndim))


def reference_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """normkit's own batch norm, with the same contract as ``torch.batch_norm``."""
    ndim = input.dim()
    w, b = channel_view(weight, ndim), channel_view(bias, ndim)
    if not training:
        return normalize(
            input, channel_view(running_mean, ndim), channel_view(running_var, ndim), w, b, eps
        )
    if input.numel() == 0:
        return empty_output(input, w, b)
    dims = batch_dims(ndim)
    y, mean, var = normalize_over(input, dims, w, b, eps)
    if running_mean is not None:
        n = input.numel() // input.shape[1]
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return y
