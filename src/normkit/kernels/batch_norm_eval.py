"""The normalize pass with given statistics: y = act((x - mean) * invstd * w + b [+ z]).

It is batch norm's eval forward (statistics from the running buffers, 1/sqrt(var + eps) taken in
the kernel: one read of x and one write of y, 2Ts in the byte counts of docs/benchmarks.md), and
the second pass of the split training forward and of group norm (statistics from the merge kernel:
3Ts in all).
The mean is subtracted before scaling (not the folded x * a + c) so that inputs far from zero keep
their precision, as in :func:`normkit.functional.normalize`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from normkit.kernels._math import activation, as_row, channel_index, load_channel, tile_offsets
from normkit.kernels._utils import ChannelView, Plan, batch_view, launch, plan, same_layout


@triton.jit
def normalize_tiles(
    x_ptr,  # input tile base, (A, C, B) of one p
    z_ptr,  # residual, same strides (read only if HAS_Z)
    y_ptr,  # output, same strides
    pid_c,
    first,  # the chunk's first tile
    items,  # tiles in this program's chunk
    A,
    C,
    B,
    stride_a,
    stride_c,
    stride_b,
    b_tiles,
    mean,  # per-channel mean, broadcastable against a tile (float32)
    scale,  # invstd * weight, broadcastable
    shift,  # bias, broadcastable
    act_param,
    BLOCK_A: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_Z: tl.constexpr,
    ACT: tl.constexpr,
):
    for item in range(first, first + items):
        offsets, mask = tile_offsets(
            item, pid_c, A, C, B, stride_a, stride_c, stride_b, b_tiles,
            BLOCK_A, BLOCK_COLS, INTERLEAVED,
        )  # fmt: skip
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        pre = (x - mean) * scale + shift
        if HAS_Z:
            pre += tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = activation(pre, ACT, act_param)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_kernel(
    x_ptr,  # input, (P, A, C, B) strided view
    z_ptr,  # residual added before the activation, x's strides (read only if HAS_Z)
    y_ptr,  # output, x's strides (may be x itself: each element is read, then written, once)
    mean_ptr,  # (P, K) float32 statistics: channel c of sample p uses index p * K + c // D
    stat_ptr,  # (P, K) 1/sqrt(var + eps), or the variance itself when STAT_IS_VAR
    weight_ptr,  # (C,) or placeholder
    bias_ptr,  # (C,) or placeholder
    A,
    C,
    B,
    stride_p,
    stride_a,
    stride_c,
    stride_b,
    K,
    D,
    items,  # tiles per chunk: program (c, k) sweeps items [k * items, (k + 1) * items)
    b_tiles,
    eps,
    act_param,
    BLOCK_A: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    STAT_IS_VAR: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_Z: tl.constexpr,
    ACT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_chunk = tl.program_id(1)
    pid_p = tl.program_id(2)
    channels, cmask = channel_index(pid_c, C, BLOCK_COLS, INTERLEAVED)
    stat = pid_p * K + channels // D
    mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.load(stat_ptr + stat, mask=cmask, other=1.0).to(tl.float32)
    if STAT_IS_VAR:
        invstd = tl.div_rn(1.0, tl.sqrt_rn(invstd + eps))
    scale = invstd * load_channel(weight_ptr, channels, cmask, 1.0, HAS_W)
    shift = load_channel(bias_ptr, channels, cmask, 0.0, HAS_B)
    base = pid_p.to(tl.int64) * stride_p
    normalize_tiles(
        x_ptr + base, z_ptr + base, y_ptr + base, pid_c, pid_chunk * items, items,
        A, C, B, stride_a, stride_c, stride_b, b_tiles,
        as_row(mean, INTERLEAVED), as_row(scale, INTERLEAVED), as_row(shift, INTERLEAVED),
        act_param, BLOCK_A, BLOCK_COLS, INTERLEAVED, HAS_Z, ACT,
    )  # fmt: skip


def items_per_chunk(p: Plan) -> int:
    return p.items_per_chunk


def launch_normalize(
    view: ChannelView,
    p: Plan,
    y: torch.Tensor,
    z: torch.Tensor | None,
    mean: torch.Tensor,
    stat: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    groups: int,
    eps: float,
    stat_is_var: bool,
    act: int,
    act_param: float,
) -> None:
    """Run :func:`_normalize_kernel` over ``view`` into ``y`` (x's strides); ``groups`` = K."""
    x = view.tensor
    launch(
        _normalize_kernel, p.grid(view),
        x, z if z is not None else x, y, mean, stat,
        weight if weight is not None else mean, bias if bias is not None else mean,
        *view.args(), groups, view.C // groups, items_per_chunk(p), p.b_tiles,
        eps, act_param,
        BLOCK_A=p.block_a, BLOCK_COLS=p.block_cols, INTERLEAVED=view.interleaved,
        STAT_IS_VAR=stat_is_var, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_Z=z is not None, ACT=act, num_warps=p.num_warps,
    )  # fmt: skip


def batch_norm_eval_forward(
    x: torch.Tensor,
    z: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: int = 0,
    act_param: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eval-mode batch norm (+ residual, + activation) with the running statistics.

    ``out`` may be ``x`` itself (InPlace-ABN); otherwise a new tensor in x's layout is returned.
    """
    view = batch_view(x)
    p = plan(view)
    y = torch.empty_like(view.tensor) if out is None else out
    z = same_layout(z, view.tensor) if z is not None else None
    launch_normalize(
        view, p, y, z, running_mean, running_var, weight, bias,
        groups=view.C, eps=eps, stat_is_var=True, act=act, act_param=act_param,
    )  # fmt: skip
    return y
