"""Batch normalization whose statistics span the ranks of a process group; see
:class:`normkit.SyncBatchNorm` for the maths and conventions.

Training, per layer and step (every rank):

1. local ``(n, mean, M2)`` per channel with normkit's moments core;
2. ONE all-gather of ``[header | mean | M2]`` (:mod:`._collectives`);
3. Chan's merge of every rank's part into the global mean and biased variance (:mod:`._moments`),
   in float64, in rank order: every rank computes bit-identical statistics;
4. normalize with them (:func:`normkit.functional.normalize`), and blend them into the running
   statistics through normkit's guard (:func:`normkit.functional.guarded_update`), the variance
   unbiased with the global count;
5. backward: ONE all-reduce of ``[sum dy | sum dy * x_hat]`` (:class:`_SyncNormalize`).

Outside training, or without an initialised process group of more than one rank, it is
:func:`normkit.functional.batch_norm`, exactly.
"""

from __future__ import annotations

import datetime
import functools

import torch
import torch.distributed as dist

from normkit.distributed import _collectives as wire
from normkit.distributed._moments import local_moments, merge_moments
from normkit.errors import ConfigError, NormkitError
from normkit.functional import batch_norm, normalize
from normkit.functional._batch_norm import batch_dims
from normkit.functional._checks import (
    check_eps,
    check_floating,
    check_min_rank,
    check_per_channel,
    check_policy,
)
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import channel_view, empty_output
from normkit.functional._running_stats import (
    exponential_average_factor,
    guarded_update,
    update_running_stats,
)
from normkit.functional._transforms import SYNCHRONIZED_STEP

CHECK_RANKS = ("auto", "always", "never")


def synchronizing_group(process_group=None):
    """The process group to synchronize over, or ``None`` when there is no one to synchronize with
    (torch.distributed unavailable or not initialised, or a group of one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(process_group)
    if world < 0:
        raise ConfigError(
            f"this process (global rank {dist.get_rank()}) is not a member of the process_group "
            "given to SyncBatchNorm; give each rank a group it belongs to (every rank calls "
            "torch.distributed.new_group for every group, then picks its own)"
        )
    if world == 1:
        return None
    return dist.group.WORLD if process_group is None else process_group


def check_check_ranks(check_ranks: str) -> None:
    if check_ranks not in CHECK_RANKS:
        raise ConfigError(f"check_ranks must be one of {CHECK_RANKS}, got {check_ranks!r}")


def synchronized_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    process_group=None,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
    check_ranks: str = "auto",
    timeout: float | datetime.timedelta | None = None,
    step: int | None = None,
    layer: str = "synchronized_batch_norm",
) -> torch.Tensor:
    """Batch normalization over the union of every rank's batch; see :class:`normkit.SyncBatchNorm`.

    The arguments of :func:`normkit.functional.batch_norm`, plus:

    Args:
        process_group: the ranks that share statistics (default: the whole world).
        check_ranks: when to read the gathered headers on the host and check that the ranks agree
            (``"auto"``: every step on the CPU, where it is free, and on a layer's first step
            (``step == 0``, or ``step=None``) on accelerators; ``"always"``; ``"never"``).
        timeout: seconds (or a timedelta) to wait for each collective; ``None``: the group's own.
        step: how many synchronized steps the calling layer has taken (sent to check that the
            ranks are in step); ``None`` when the caller does not count.
        layer: the caller's name, used in error messages.
    """
    group = synchronizing_group(process_group) if training else None
    if group is None:
        return batch_norm(
            input,
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
    check_eps(eps)
    check_policy(on_nonfinite)
    check_check_ranks(check_ranks)
    wait = wire.as_timeout(timeout)
    per_channel = {
        "running_mean": running_mean,
        "running_var": running_var,
        "weight": weight,
        "bias": bias,
    }
    num_features = next(
        (t.numel() for t in per_channel.values() if t is not None),
        input.shape[1] if input.dim() >= 2 else 0,
    )
    # Checks that only look at this rank's input: a rank that fails one still joins the
    # collective (with an error code), so that every rank raises instead of waiting for it.
    local_error = None
    try:
        check_floating(input)
        check_min_rank(input, 2, "(N, C, *)")
        check_per_channel(input, **per_channel)
    except NormkitError as error:
        local_error = error

    tracking = running_mean is not None and running_var is not None
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    device = input.device
    if local_error is None:
        count, mean, m2 = local_moments(input)
    else:
        count = 0
        mean = m2 = torch.zeros(num_features, dtype=wire.WIRE_DTYPE, device=device)
    header = wire.make_header(
        error=local_error,
        num_features=num_features,
        channels=input.shape[1] if input.dim() >= 2 else -1,
        dtype=input.dtype,
        count=count,
        eps=eps,
        momentum=momentum if tracking else wire.MOMENTUM_UNUSED,
        tracking=tracking,
        needs_grad=needs_grad,
        step=step,
    )
    row = wire.pack_row(header, mean, m2)
    rows = wire.all_gather_rows(row, group, wait, f"the statistics all-gather of {layer}")

    verify = check_ranks == "always" or (
        check_ranks == "auto" and (device.type == "cpu" or step is None or step == 0)
    )
    total = None
    if verify:
        header_rows = rows[:, : wire.HEADER_SIZE].tolist()  # the one host read (free on the CPU)
        total = wire.verify_rows(header_rows, local_error, layer)
    elif local_error is not None:
        raise local_error  # the other ranks' statistics turn NaN below, without a host read

    h = wire.HEADER_SIZE
    counts, means, m2s = (
        rows[:, wire.COUNT],
        rows[:, h : h + num_features],
        rows[:, h + num_features :],
    )
    # float64, in rank order: bit-identical on every rank
    n, global_mean, global_var = merge_moments(counts, means, m2s)
    if not verify:
        failed = rows[:, wire.ERROR].ne(0).any()
        global_mean = torch.where(failed, torch.nan, global_mean)

    ndim = input.dim()
    if total == 0:  # every rank is empty: nothing to normalize, nothing to learn from
        return empty_output(input, channel_view(weight, ndim), channel_view(bias, ndim))
    dtype = stats_dtype(input.dtype)
    output = _SyncNormalize.apply(
        input,
        weight,
        bias,
        global_mean.to(dtype),
        global_var.to(dtype),
        n,
        eps,
        group,
        wait,
        layer,
    )
    if tracking:
        factor = exponential_average_factor(momentum, num_batches_tracked)
        count_for_bessel = n if total is None else total
        guarded_update(
            running_mean,
            running_var,
            lambda mean_out, var_out: update_running_stats(
                mean_out, var_out, global_mean, global_var, count_for_bessel, factor
            ),
            num_batches_tracked=num_batches_tracked,
            num_batches_skipped=num_batches_skipped,
            on_nonfinite=on_nonfinite,
        )
    return output


class _SyncNormalize(torch.autograd.Function):
    """y = w * (x - mean) / sqrt(var + eps) + b with the *global* mean and variance.

    Backward over the union of the ranks' batches (Ioffe & Szegedy 2015, §3, with every sum over
    all ranks and m = n, the global count), g = dL/dy * w:

        dL/dx = w / sqrt(var + eps) * (dL/dy - sum(dL/dy) / n - x_hat * sum(dL/dy * x_hat) / n)

    The two sums per channel are this rank's, all-reduced: ONE collective, only when ``x`` needs a
    gradient. ``dL/dw = sum(dL/dy * x_hat)`` and ``dL/db = sum(dL/dy)`` stay this rank's own
    share: DistributedDataParallel sums (averages) parameter gradients across ranks itself, and
    the shares add up to single-process BN's gradients on the concatenated batch.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, count, eps, group, timeout, layer):
        ndim = input.dim()
        output = normalize(
            input,
            channel_view(mean, ndim),
            channel_view(var, ndim),
            channel_view(weight, ndim),
            channel_view(bias, ndim),
            eps,
        )
        ctx.save_for_backward(input, weight, mean, var, count)
        ctx.eps, ctx.group, ctx.timeout, ctx.layer = eps, group, timeout, layer
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the all-reduced backward is first-order
            raise SYNCHRONIZED_STEP.error()
        input, weight, mean, var, count = ctx.saved_tensors
        ndim, dims = input.dim(), batch_dims(input.dim())
        dtype = stats_dtype(input.dtype)
        invstd = torch.rsqrt(var + ctx.eps)  # (C,)
        x_mu = input.to(dtype) - channel_view(mean, ndim)  # centred: no cancellation below
        dy = grad_output.to(dtype)
        sum_dy = dy.sum(dims)  # (C,) this rank's share
        sum_dy_xhat = (dy * x_mu).sum(dims) * invstd  # (C,)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat((sum_dy, sum_dy_xhat)).to(wire.WIRE_DTYPE)
            wire.all_reduce_sum(
                sums, ctx.group, ctx.timeout, f"the gradient all-reduce of {ctx.layer}"
            )
            mean_dy, mean_dy_xhat = (sums / count).to(dtype).chunk(2)  # global, over n values
            # dx = a * dy + b * (x - mean) + c, per channel:
            #   a = w / sigma,  b = -a * mean(dy * x_hat) / sigma,  c = -a * mean(dy)
            a = invstd if weight is None else invstd * weight.to(dtype)
            b, c = -a * mean_dy_xhat * invstd, -a * mean_dy
            view = functools.partial(channel_view, ndim=ndim)
            grad_input = torch.addcmul(torch.addcmul(view(c), view(a), dy), view(b), x_mu)
            grad_input = grad_input.to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None
