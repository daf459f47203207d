"""Batch norm backward (and group norm's, which differs only in which values share statistics).

With g = dL/d(pre-activation) and x_hat the normalized input, over the n values of a statistic
(Ioffe & Szegedy 2015, §3, collected into one expression):

    dL/dx = invstd * (w * g - A - x_hat * B),   A = sum(w * g) / n,   B = sum(w * g * x_hat) / n
    dL/dw = sum(g * x_hat) per channel,          dL/db = sum(g) per channel

(for batch norm w is constant over a statistic, so A = w mean(g), B = w mean(g x_hat); in eval mode
the statistics are constants and dL/dx = invstd * w * g). The activation and the residual are fused:
g = dL/dy * act'(pre) with pre = (x - mean) * invstd * w + b (+ z), recomputed from x exactly as the
forward computed it. InPlace-ABN has no x: it reads its output y instead (FROM_OUTPUT), inverts the
activation to get pre, and x_hat = (pre - b) / w (Rota Bulò et al. 2018, §3).

Two sweeps over (dy, x): the sums (one program per channel, or per chunk with the partial sums of
each chunk written and reduced in a fixed order), then dL/dx (5Ts, docs/benchmarks.md; the second sweep
re-reads what the first one has just brought into L2 when one program owns a whole channel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from normkit.kernels._math import (
    activation_grad,
    activation_grad_from_output,
    activation_inverse,
    as_row,
    channel_index,
    channel_sum,
    channel_zeros,
    load_channel,
    tile_offsets,
)
from normkit.kernels._utils import (
    STAGE_WARPS,
    ChannelView,
    launch,
    plan,
    same_layout,
    stage_blocks,
)
from normkit.kernels.batch_norm_eval import items_per_chunk


@triton.jit
def _pre_activation_grad(
    src,  # x (or y when FROM_OUTPUT), float32 tile
    dy,  # dL/dy, float32 tile
    z,  # residual tile (HAS_Z) or 0.0
    mean,
    invstd,
    scale,  # invstd * w
    w,
    b,
    act_param,
    ACT: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    HAS_Z: tl.constexpr,
):
    """(g, x_hat) of a tile: g = dL/d(pre-activation), x_hat the normalized input."""
    if FROM_OUTPUT:
        g = dy * activation_grad_from_output(src, ACT, act_param)
        x_hat = (activation_inverse(src, ACT, act_param) - b) * (1.0 / w)
    else:
        x_hat = (src - mean) * invstd
        if ACT == 0:
            g = dy
        else:
            pre = (src - mean) * scale + b  # the forward's expression, so kinks agree
            if HAS_Z:
                pre += z
            g = dy * activation_grad(pre, ACT, act_param)
    return g, x_hat


@triton.jit
def input_grad_tiles(
    dy_ptr,  # dL/dy tile base, (A, C, B) of one p
    src_ptr,  # x (or y when FROM_OUTPUT), same strides
    z_ptr,  # residual, same strides (HAS_Z)
    dx_ptr,  # dL/dx out, same strides (WRITE_DX)
    dz_ptr,  # dL/dz out, same strides (HAS_Z)
    pid_c,
    first,  # the chunk's first tile
    items,
    A,
    C,
    B,
    stride_a,
    stride_c,
    stride_b,
    b_tiles,
    mean,  # per-channel values below broadcast against a tile (float32)
    invstd,
    scale,
    w,
    b,
    coef_a,  # A of the module docstring (TRAINING)
    coef_b,  # B of the module docstring (TRAINING)
    act_param,
    BLOCK_A: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    TRAINING: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    HAS_Z: tl.constexpr,
    ACT: tl.constexpr,
    WRITE_DX: tl.constexpr,
):
    for item in range(first, first + items):
        offsets, mask = tile_offsets(
            item, pid_c, A, C, B, stride_a, stride_c, stride_b, b_tiles,
            BLOCK_A, BLOCK_COLS, INTERLEAVED,
        )  # fmt: skip
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        src = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z = 0.0
        if HAS_Z:
            z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g, x_hat = _pre_activation_grad(
            src, dy, z, mean, invstd, scale, w, b, act_param, ACT, FROM_OUTPUT, HAS_Z
        )
        if WRITE_DX:
            if TRAINING:  # noqa: SIM108
                dx = invstd * (w * g - coef_a - x_hat * coef_b)
            else:
                dx = scale * g
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_Z:
            tl.store(dz_ptr + offsets, g.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(
    dy_ptr,  # dL/dy, (P, A, C, B) strided view
    src_ptr,  # x (or y when FROM_OUTPUT), same strides
    z_ptr,  # residual, same strides (HAS_Z)
    mean_ptr,  # (P, K) float32 saved mean
    invstd_ptr,  # (P, K) float32 saved 1/sqrt(var + eps)
    weight_ptr,  # (C,) or placeholder
    bias_ptr,  # (C,) or placeholder
    sum_g_ptr,  # (P, chunks, C) float32 partial sum(g) (split path); (C,) dL/db (FUSED)
    sum_gx_ptr,  # (P, chunks, C) float32 partial sum(g * x_hat); (C,) dL/dw (FUSED)
    dx_ptr,  # dL/dx (FUSED and WRITE_DX), src's strides
    dz_ptr,  # dL/dz (FUSED and HAS_Z), src's strides
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
    chunks,
    inv_count,  # 1 / n, the values per statistic
    act_param,
    BLOCK_A: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    FUSED: tl.constexpr,
    TRAINING: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_Z: tl.constexpr,
    ACT: tl.constexpr,
    WRITE_DX: tl.constexpr,
):
    """First sweep: per-channel sum(g) and sum(g * x_hat). FUSED (one program per channel block,
    batch norm only): then dL/dw, dL/db and, in a second sweep, dL/dx and dL/dz."""
    pid_c = tl.program_id(0)
    pid_chunk = tl.program_id(1)
    pid_p = tl.program_id(2)
    channels, cmask = channel_index(pid_c, C, BLOCK_COLS, INTERLEAVED)
    stat = pid_p * K + channels // D
    mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + stat, mask=cmask, other=1.0)
    w = load_channel(weight_ptr, channels, cmask, 1.0, HAS_W)
    b = load_channel(bias_ptr, channels, cmask, 0.0, HAS_B)
    scale = invstd * w
    mean_r = as_row(mean, INTERLEAVED)
    invstd_r = as_row(invstd, INTERLEAVED)
    scale_r = as_row(scale, INTERLEAVED)
    w_r = as_row(w, INTERLEAVED)
    b_r = as_row(b, INTERLEAVED)
    base = pid_p.to(tl.int64) * stride_p
    first = pid_chunk * items
    sum_g = channel_zeros(BLOCK_COLS, INTERLEAVED)
    sum_gx = channel_zeros(BLOCK_COLS, INTERLEAVED)
    for item in range(first, first + items):
        offsets, mask = tile_offsets(
            item, pid_c, A, C, B, stride_a, stride_c, stride_b, b_tiles,
            BLOCK_A, BLOCK_COLS, INTERLEAVED,
        )  # fmt: skip
        dy = tl.load(dy_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        src = tl.load(src_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        z = 0.0
        if HAS_Z:
            z = tl.load(z_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        g, x_hat = _pre_activation_grad(
            src, dy, z, mean_r, invstd_r, scale_r, w_r, b_r, act_param, ACT, FROM_OUTPUT, HAS_Z
        )
        sum_g += channel_sum(g, INTERLEAVED)  # masked elements have dy = 0, hence g = 0
        sum_gx += channel_sum(g * x_hat, INTERLEAVED)
    if FUSED:
        tl.store(sum_g_ptr + channels, sum_g, mask=cmask)
        tl.store(sum_gx_ptr + channels, sum_gx, mask=cmask)
        if WRITE_DX or HAS_Z:
            coef_a = as_row(w * sum_g * inv_count, INTERLEAVED)
            coef_b = as_row(w * sum_gx * inv_count, INTERLEAVED)
            input_grad_tiles(
                dy_ptr + base, src_ptr + base, z_ptr + base, dx_ptr + base, dz_ptr + base,
                pid_c, first, items, A, C, B, stride_a, stride_c, stride_b, b_tiles,
                mean_r, invstd_r, scale_r, w_r, b_r, coef_a, coef_b, act_param,
                BLOCK_A, BLOCK_COLS, INTERLEAVED, TRAINING, FROM_OUTPUT, HAS_Z, ACT, WRITE_DX,
            )  # fmt: skip
    else:
        partial = (pid_p * chunks + pid_chunk) * C + channels
        tl.store(sum_g_ptr + partial, sum_g, mask=cmask)
        tl.store(sum_gx_ptr + partial, sum_gx, mask=cmask)


@triton.jit
def _grad_coefficients_kernel(
    sum_g_ptr,  # (P, chunks, C) float32 partial sum(g)
    sum_gx_ptr,  # (P, chunks, C) float32 partial sum(g * x_hat)
    weight_ptr,  # (C,) or placeholder
    coef_a_ptr,  # (P, K) float32 out: sum(w g) / n per statistic
    coef_b_ptr,  # (P, K) float32 out: sum(w g x_hat) / n per statistic
    C,
    K,
    D,
    chunks,
    inv_count,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_W: tl.constexpr,
):
    """Second stage of the split path: reduce the partial sums of each statistic in a fixed order,
    BLOCK_J partials of BLOCK_K statistics per tile."""
    pid_k = tl.program_id(0)
    pid_p = tl.program_id(1)
    stats = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    smask = stats < K
    coef_a = tl.zeros([BLOCK_K], tl.float32)
    coef_b = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, chunks * D, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        channels = stats[None, :] * D + (j % D)[:, None]
        partial = (pid_p * chunks + j // D)[:, None] * C + channels
        mask = (j < chunks * D)[:, None] & smask[None, :]
        w = load_channel(weight_ptr, channels, mask, 1.0, HAS_W)
        coef_a += tl.sum(w * tl.load(sum_g_ptr + partial, mask=mask, other=0.0), axis=0)
        coef_b += tl.sum(w * tl.load(sum_gx_ptr + partial, mask=mask, other=0.0), axis=0)
    out = pid_p * K + stats
    tl.store(coef_a_ptr + out, coef_a * inv_count, mask=smask)
    tl.store(coef_b_ptr + out, coef_b * inv_count, mask=smask)


@triton.jit
def _input_grad_kernel(
    dy_ptr,  # dL/dy, (P, A, C, B) strided view
    src_ptr,  # x (or y when FROM_OUTPUT), same strides
    z_ptr,  # residual, same strides (HAS_Z)
    dx_ptr,  # dL/dx out (WRITE_DX)
    dz_ptr,  # dL/dz out (HAS_Z)
    mean_ptr,  # (P, K) float32
    invstd_ptr,  # (P, K) float32
    coef_a_ptr,  # (P, K) float32 (TRAINING)
    coef_b_ptr,  # (P, K) float32 (TRAINING)
    weight_ptr,
    bias_ptr,
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
    act_param,
    BLOCK_A: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    TRAINING: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_Z: tl.constexpr,
    ACT: tl.constexpr,
    WRITE_DX: tl.constexpr,
):
    """Last sweep of the split path (and the only one in eval mode without parameter grads)."""
    pid_c = tl.program_id(0)
    pid_chunk = tl.program_id(1)
    pid_p = tl.program_id(2)
    channels, cmask = channel_index(pid_c, C, BLOCK_COLS, INTERLEAVED)
    stat = pid_p * K + channels // D
    mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + stat, mask=cmask, other=1.0)
    w = load_channel(weight_ptr, channels, cmask, 1.0, HAS_W)
    b = load_channel(bias_ptr, channels, cmask, 0.0, HAS_B)
    coef_a = 0.0
    coef_b = 0.0
    if TRAINING:
        coef_a = as_row(tl.load(coef_a_ptr + stat, mask=cmask, other=0.0), INTERLEAVED)
        coef_b = as_row(tl.load(coef_b_ptr + stat, mask=cmask, other=0.0), INTERLEAVED)
    base = pid_p.to(tl.int64) * stride_p
    input_grad_tiles(
        dy_ptr + base, src_ptr + base, z_ptr + base, dx_ptr + base, dz_ptr + base,
        pid_c, pid_chunk * items, items, A, C, B, stride_a, stride_c, stride_b, b_tiles,
        as_row(mean, INTERLEAVED), as_row(invstd, INTERLEAVED), as_row(invstd * w, INTERLEAVED),
        as_row(w, INTERLEAVED), as_row(b, INTERLEAVED), coef_a, coef_b, act_param,
        BLOCK_A, BLOCK_COLS, INTERLEAVED, TRAINING, FROM_OUTPUT, HAS_Z, ACT, WRITE_DX,
    )  # fmt: skip


def normalization_backward(
    view: ChannelView,
    dy: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    *,
    groups: int,
    training: bool,
    act: int = 0,
    act_param: float = 0.0,
    from_output: bool = False,
    needs_input_grad: bool = True,
    needs_param_grads: bool = True,
    fuse: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dL/dx, dL/dz, dL/dw, dL/db (float32 for w and b) for batch norm (``groups`` = C) or group
    norm (``view`` per sample, ``groups`` = G); ``view.tensor`` is x, or y when ``from_output``.
    """
    src = view.tensor
    p = plan(view)
    dy = same_layout(dy, src)
    z = same_layout(z, src) if z is not None else None
    dx = torch.empty_like(src) if needs_input_grad else None
    dz = torch.empty_like(z) if z is not None else None
    write_dx = needs_input_grad
    n = view.A * view.B * (view.C // groups)
    has_w, has_b = weight is not None, bias is not None
    placeholder = mean
    common = dict(
        BLOCK_A=p.block_a, BLOCK_COLS=p.block_cols, INTERLEAVED=view.interleaved,
        TRAINING=training, FROM_OUTPUT=from_output, HAS_W=has_w, HAS_B=has_b,
        HAS_Z=z is not None, ACT=act, WRITE_DX=write_dx, num_warps=p.num_warps,
    )  # fmt: skip
    pointers = (
        dy,
        src,
        z if z is not None else src,
    )
    params = (weight if has_w else placeholder, bias if has_b else placeholder)
    needs_sums = needs_param_grads or (training and needs_input_grad)
    items = items_per_chunk(p)
    if needs_sums and fuse and p.chunks == 1 and view.P == 1 and groups == view.C:
        sums = torch.empty((2, view.C), device=src.device, dtype=torch.float32)
        launch(
            _grad_sums_kernel, p.grid(view),
            *pointers, mean, invstd, *params, sums[0], sums[1],
            dx if dx is not None else src, dz if dz is not None else src,
            *view.args(), groups, 1, items, p.b_tiles, 1, 1.0 / n, act_param,
            FUSED=True, **common,
        )  # fmt: skip
        return dx, dz, sums[1], sums[0]
    coef_a = coef_b = placeholder
    dweight = dbias = None
    if needs_sums:
        sums = torch.empty((2, view.P, p.chunks, view.C), device=src.device, dtype=torch.float32)
        launch(
            _grad_sums_kernel, p.grid(view),
            *pointers, mean, invstd, *params, sums[0], sums[1], src, src,
            *view.args(), groups, view.C // groups, items, p.b_tiles,
            p.chunks, 1.0 / n, act_param, FUSED=False, **common,
        )  # fmt: skip
        if needs_param_grads:
            dbias, dweight = sums.sum(dim=(1, 2))
        if training and needs_input_grad:
            coef_a = torch.empty((view.P, groups), device=src.device, dtype=torch.float32)
            coef_b = torch.empty_like(coef_a)
            block_j, block_k = stage_blocks(groups)
            launch(
                _grad_coefficients_kernel, (triton.cdiv(groups, block_k), view.P),
                sums[0], sums[1], params[0], coef_a, coef_b,
                view.C, groups, view.C // groups, p.chunks, 1.0 / n,
                BLOCK_J=block_j, BLOCK_K=block_k, HAS_W=has_w, num_warps=STAGE_WARPS,
            )  # fmt: skip
    if needs_input_grad or z is not None:
        launch(
            _input_grad_kernel, p.grid(view),
            *pointers, dx if dx is not None else src, dz if dz is not None else src,
            mean, invstd, coef_a, coef_b, *params,
            *view.args(), groups, view.C // groups, items, p.b_tiles, act_param,
            **common,
        )  # fmt: skip
    return dx, dz, dweight, dbias
