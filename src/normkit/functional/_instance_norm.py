"""Instance normalization (Ulyanov, Vedaldi & Lempitsky 2016): statistics per sample and channel.

With the input's own statistics, instance norm *is* group norm with one channel per group, so it runs
on the ``group_norm`` op — which, unlike ``torch.nn.functional.instance_norm``, keeps channels_last
inputs channels_last. With running statistics (``use_input_stats=False``) it is the fixed affine
transform of :func:`~normkit.functional.normalize`, whose float32 arithmetic keeps half-precision
gradients within one rounding (torch's half kernel path does not). When running statistics are
tracked, each batch contributes the average over samples of the per-instance mean and unbiased
variance, as in ``torch.nn.InstanceNorm*``.
"""

from __future__ import annotations

import torch

from normkit.errors import ConfigError
from normkit.functional import _dispatch
from normkit.functional._checks import (
    check_eps,
    check_floating,
    check_instance_statistics_size,
    check_min_rank,
    check_per_channel,
)
from normkit.functional._moments import moments
from normkit.functional._normalize import channel_view, normalize
from normkit.functional._running_stats import (
    exponential_average_factor,
    guarded_update,
    update_running_stats,
)


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """Instance normalization of an (N, C, *) input; see :class:`normkit.InstanceNorm2d`.

    The arguments of ``torch.nn.functional.instance_norm``, plus the running-statistics options of
    :func:`normkit.functional.batch_norm`.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 3, "(N, C, *spatial)")
    channels = input.shape[1]
    check_per_channel(
        input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ConfigError(
                "instance_norm with use_input_stats=False normalizes with running_mean and "
                "running_var, but they were not given"
            )
        ndim = input.dim()
        return normalize(
            input,
            channel_view(running_mean, ndim),
            channel_view(running_var, ndim),
            channel_view(weight, ndim),
            channel_view(bias, ndim),
            eps,
        )
    check_instance_statistics_size(input)
    impl = _dispatch.resolve("group_norm", input)
    normalized = lambda: impl(input, channels, weight, bias, eps)
    if running_mean is None or running_var is None or input.numel() == 0:
        return normalized()
    factor = exponential_average_factor(momentum, num_batches_tracked)

    def normalize_and_track(new_mean, new_var):
        with torch.no_grad():
            spatial = tuple(range(2, input.dim()))
            mean, var = moments(input.detach(), spatial, keepdim=False)  # (N, C) each
            n = input[0, 0].numel()
            update_running_stats(new_mean, new_var, mean.mean(0), var.mean(0), n, factor)
        return normalized()

    return guarded_update(
        running_mean,
        running_var,
        normalize_and_track,
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )
