"""Batch norm training forward: per-channel statistics of the batch, then the normalize pass.

Two paths, chosen by :func:`normkit.kernels._utils.plan`:

- one program per channel (planar) or block of channels (interleaved) when that alone fills the
  device: the program reduces its channels, finalizes mean and 1/std, updates the running
  statistics, and normalizes in a second sweep over the same data, which its first sweep has just
  brought into L2 (2Ts to 3Ts, docs/benchmarks.md);
- otherwise each channel's N*H*W values are split into chunks across programs: every program writes
  the centred partial (count, mean, M2) of its chunk, a second-stage kernel merges the partials in a
  fixed order with Chan et al.'s formula (deterministic; no atomics), and the normalize kernel of
  ``batch_norm_eval`` writes y (3Ts).

Statistics are float32 whatever the input dtype; the saved mean and 1/sqrt(var + eps) are float32.
The running variance is unbiased by n / (n - 1) (Ioffe & Szegedy 2015, Algorithm 2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from normkit.kernels._math import (
    as_row,
    chan_merge,
    channel_index,
    channel_zeros,
    load_channel,
    merge_columns,
    tile_moments,
    tile_offsets,
)
from normkit.kernels._utils import (
    STAGE_WARPS,
    ChannelView,
    Plan,
    batch_view,
    launch,
    plan,
    same_layout,
    stage_blocks,
)
from normkit.kernels.batch_norm_eval import items_per_chunk, launch_normalize, normalize_tiles


@triton.jit
def _moments_kernel(
    x_ptr,  # input, (P, A, C, B) strided view
    z_ptr,  # residual (FUSED only), x's strides
    y_ptr,  # output (FUSED only), x's strides
    count_ptr,  # partial counts, (P, chunks, C) float32 (split path)
    mean_ptr,  # partial means, (P, chunks, C) float32 (split path)
    m2_ptr,  # partial centred sums of squares, (P, chunks, C) float32 (split path)
    stat_mean_ptr,  # (C,) float32 batch mean (FUSED only)
    stat_invstd_ptr,  # (C,) float32 1/sqrt(var + eps) (FUSED only)
    running_mean_ptr,  # (C,) running mean, updated in place when HAS_RUNNING (FUSED only)
    running_var_ptr,  # (C,) running variance (unbiased), likewise
    weight_ptr,  # (C,) or placeholder
    bias_ptr,  # (C,) or placeholder
    A,
    C,
    B,
    stride_p,
    stride_a,
    stride_c,
    stride_b,
    items,  # tiles per chunk: program (c, k) sweeps items [k * items, (k + 1) * items)
    b_tiles,
    chunks,
    eps,
    momentum,
    unbias,  # n / (n - 1) for the running variance
    act_param,
    BLOCK_A: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_Z: tl.constexpr,
    ACT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_chunk = tl.program_id(1)
    pid_p = tl.program_id(2)
    base = pid_p.to(tl.int64) * stride_p
    first = pid_chunk * items
    count = channel_zeros(BLOCK_COLS, INTERLEAVED)
    mean = channel_zeros(BLOCK_COLS, INTERLEAVED)
    m2 = channel_zeros(BLOCK_COLS, INTERLEAVED)
    for item in range(first, first + items):
        offsets, mask = tile_offsets(
            item, pid_c, A, C, B, stride_a, stride_c, stride_b, b_tiles,
            BLOCK_A, BLOCK_COLS, INTERLEAVED,
        )  # fmt: skip
        x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        tile_count, tile_mean, tile_m2 = tile_moments(x, mask, INTERLEAVED)
        count, mean, m2 = chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    channels, cmask = channel_index(pid_c, C, BLOCK_COLS, INTERLEAVED)
    if FUSED:
        var = m2 / tl.maximum(count, 1.0)
        invstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
        tl.store(stat_mean_ptr + channels, mean, mask=cmask)
        tl.store(stat_invstd_ptr + channels, invstd, mask=cmask)
        if HAS_RUNNING:
            running_mean = tl.load(running_mean_ptr + channels, mask=cmask).to(tl.float32)
            running_var = tl.load(running_var_ptr + channels, mask=cmask).to(tl.float32)
            running_mean = (1.0 - momentum) * running_mean + momentum * mean
            running_var = (1.0 - momentum) * running_var + momentum * (var * unbias)
            tl.store(running_mean_ptr + channels, running_mean, mask=cmask)
            tl.store(running_var_ptr + channels, running_var, mask=cmask)
        scale = invstd * load_channel(weight_ptr, channels, cmask, 1.0, HAS_W)
        shift = load_channel(bias_ptr, channels, cmask, 0.0, HAS_B)
        normalize_tiles(
            x_ptr + base, z_ptr + base, y_ptr + base, pid_c, first, items,
            A, C, B, stride_a, stride_c, stride_b, b_tiles,
            as_row(mean, INTERLEAVED), as_row(scale, INTERLEAVED), as_row(shift, INTERLEAVED),
            act_param, BLOCK_A, BLOCK_COLS, INTERLEAVED, HAS_Z, ACT,
        )  # fmt: skip
    else:
        partial = (pid_p * chunks + pid_chunk) * C + channels
        tl.store(count_ptr + partial, count, mask=cmask)
        tl.store(mean_ptr + partial, mean, mask=cmask)
        tl.store(m2_ptr + partial, m2, mask=cmask)


@triton.jit
def _merge_moments_kernel(
    count_ptr,  # partial counts, (P, chunks, C) float32
    mean_ptr,  # partial means, (P, chunks, C)
    m2_ptr,  # partial centred sums of squares, (P, chunks, C)
    stat_mean_ptr,  # (P, K) float32 out: mean of each statistic
    stat_invstd_ptr,  # (P, K) float32 out: 1/sqrt(var + eps)
    running_mean_ptr,  # (K,) updated in place when HAS_RUNNING (P == 1)
    running_var_ptr,  # (K,) unbiased running variance, likewise
    C,
    K,
    D,  # channels per statistic (1 for batch norm, C/G for group norm)
    chunks,
    eps,
    momentum,
    unbias,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
):
    """Second stage: merge the chunks x D partials of each statistic, in a fixed order.

    The partials are read BLOCK_J at a time for BLOCK_K statistics (one tile, all loads in
    flight together); each tile's partials are merged at once (the count-weighted mean, then
    M2 = sum_j (M2_j + n_j (mean_j - mean)^2)) and the tiles one after another with Chan et al.'s
    formula.
    """
    pid_k = tl.program_id(0)
    pid_p = tl.program_id(1)
    stats = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    smask = stats < K
    count = tl.zeros([BLOCK_K], tl.float32)
    mean = tl.zeros([BLOCK_K], tl.float32)
    m2 = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, chunks * D, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        partial = (pid_p * chunks + j // D)[:, None] * C + stats[None, :] * D + (j % D)[:, None]
        mask = (j < chunks * D)[:, None] & smask[None, :]
        n = tl.load(count_ptr + partial, mask=mask, other=0.0)
        tile_count, tile_mean, tile_m2 = merge_columns(
            n, tl.load(mean_ptr + partial, mask=mask, other=0.0),
            tl.load(m2_ptr + partial, mask=mask, other=0.0),
        )  # fmt: skip
        count, mean, m2 = chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    var = m2 / tl.maximum(count, 1.0)
    out = pid_p * K + stats
    tl.store(stat_mean_ptr + out, mean, mask=smask)
    tl.store(stat_invstd_ptr + out, tl.div_rn(1.0, tl.sqrt_rn(var + eps)), mask=smask)
    if HAS_RUNNING:
        running_mean = tl.load(running_mean_ptr + stats, mask=smask).to(tl.float32)
        running_var = tl.load(running_var_ptr + stats, mask=smask).to(tl.float32)
        running_mean = (1.0 - momentum) * running_mean + momentum * mean
        running_var = (1.0 - momentum) * running_var + momentum * (var * unbias)
        tl.store(running_mean_ptr + stats, running_mean, mask=smask)
        tl.store(running_var_ptr + stats, running_var, mask=smask)


def launch_moments(
    view: ChannelView,
    p: Plan,
    *,
    groups: int,
    eps: float,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split path: partial moments per chunk, then the merge. Returns (mean, invstd), (P, groups)."""
    x = view.tensor
    partials = torch.empty((3, view.P, p.chunks, view.C), device=x.device, dtype=torch.float32)
    mean = torch.empty((view.P, groups), device=x.device, dtype=torch.float32)
    invstd = torch.empty_like(mean)
    launch(
        _moments_kernel, p.grid(view),
        x, x, x, partials[0], partials[1], partials[2], mean, invstd, mean, mean, mean, mean,
        *view.args(), items_per_chunk(p), p.b_tiles, p.chunks,
        eps, 0.0, 1.0, 0.0,
        BLOCK_A=p.block_a, BLOCK_COLS=p.block_cols, INTERLEAVED=view.interleaved, FUSED=False,
        HAS_RUNNING=False, HAS_W=False, HAS_B=False, HAS_Z=False, ACT=0, num_warps=p.num_warps,
    )  # fmt: skip
    has_running = running_mean is not None and running_var is not None
    n = view.A * view.B * (view.C // groups)
    block_j, block_k = stage_blocks(groups)
    launch(
        _merge_moments_kernel, (triton.cdiv(groups, block_k), view.P),
        partials[0], partials[1], partials[2], mean, invstd,
        running_mean if has_running else mean, running_var if has_running else mean,
        view.C, groups, view.C // groups, p.chunks, eps, momentum, n / max(n - 1, 1),
        BLOCK_J=block_j, BLOCK_K=block_k, HAS_RUNNING=has_running, num_warps=STAGE_WARPS,
    )  # fmt: skip
    return mean, invstd


def batch_norm_train_forward(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    act: int = 0,
    act_param: float = 0.0,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training batch norm (+ residual z, + activation) of an (N, C, *) tensor.

    Returns ``(y, mean, invstd)`` with float32 per-channel statistics; updates the running
    statistics in place when given. ``out`` may be ``x`` itself (InPlace-ABN).
    """
    view = batch_view(x)
    p = plan(view)
    y = torch.empty_like(view.tensor) if out is None else out
    z = same_layout(z, view.tensor) if z is not None else None
    has_running = running_mean is not None and running_var is not None
    if p.chunks > 1:
        mean, invstd = launch_moments(
            view, p, groups=view.C, eps=eps, momentum=momentum,
            running_mean=running_mean, running_var=running_var,
        )  # fmt: skip
        launch_normalize(
            view, p, y, z, mean, invstd, weight, bias,
            groups=view.C, eps=eps, stat_is_var=False, act=act, act_param=act_param,
        )  # fmt: skip
        return y, mean.view(-1), invstd.view(-1)
    mean = torch.empty(view.C, device=x.device, dtype=torch.float32)
    invstd = torch.empty_like(mean)
    n = view.A * view.B
    src = view.tensor
    launch(
        _moments_kernel, p.grid(view),
        src, z if z is not None else src, y, mean, mean, mean, mean, invstd,
        running_mean if has_running else mean, running_var if has_running else mean,
        weight if weight is not None else mean, bias if bias is not None else mean,
        *view.args(), items_per_chunk(p), p.b_tiles, 1,
        eps, momentum, n / max(n - 1, 1), act_param,
        BLOCK_A=p.block_a, BLOCK_COLS=p.block_cols, INTERLEAVED=view.interleaved, FUSED=True,
        HAS_RUNNING=has_running, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_Z=z is not None, ACT=act, num_warps=p.num_warps,
    )  # fmt: skip
    return y, mean, invstd
