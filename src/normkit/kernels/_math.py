"""Device functions the kernels share: Chan et al.'s merge of moments, and the fused activations.

Moments are kept as (count, mean, M2) triples with M2 the centred sum of squares. A tile's triple is
computed two-pass from registers (its mean, then the squared deviations from it), and triples are
merged with Chan, Golub & LeVeque's pairwise formula (1979):

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,

which never forms E[x^2] - E[x]^2 and costs one division per tile, not per element.

Activations are selected by a compile-time code (``ACTIVATIONS``): the forward map, its derivative
at the pre-activation, and, for the invertible ones (identity, leaky_relu, elu), the inverse and the
derivative read from the output, which is all InPlace-ABN keeps.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "elu": 5}

# Globals read inside @triton.jit functions must be constexpr (a plain float compiles in the
# interpreter but is a CompilationError for a GPU: the ahead-of-time check found it).
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1/sqrt(2), for gelu's erf form
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi), gelu's density


@triton.jit
def tile_moments(x, mask, INTERLEAVED: tl.constexpr):
    """(count, mean, M2) of a [rows, cols] tile: per column when the columns are channels
    (interleaved), else of the whole tile (planar: every value is one channel's). Masked elements
    must be 0 in x."""
    if INTERLEAVED:
        count = tl.sum(mask.to(tl.float32), axis=0)
        mean = tl.sum(x, axis=0) / tl.maximum(count, 1.0)
        centred = tl.where(mask, x - mean[None, :], 0.0)
        m2 = tl.sum(centred * centred, axis=0)
    else:
        count = tl.sum(mask.to(tl.float32))
        mean = tl.sum(x) / tl.maximum(count, 1.0)
        centred = tl.where(mask, x - mean, 0.0)
        m2 = tl.sum(centred * centred)
    return count, mean, m2


@triton.jit
def channel_sum(v, INTERLEAVED: tl.constexpr):
    """Sum of a tile per channel: per column (interleaved) or all of it (planar)."""
    if INTERLEAVED:  # noqa: SIM108 (a constexpr branch reads better in a kernel)
        total = tl.sum(v, axis=0)
    else:
        total = tl.sum(v)
    return total


@triton.jit
def channel_zeros(BLOCK_COLS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """A zero accumulator per channel of a program: BLOCK_COLS of them, or one (planar).

    Planar programs reduce each tile to one value before accumulating, so that no accumulator of
    the tile's width stays live across the loop (16 registers per thread each at 4096 columns)."""
    if INTERLEAVED:  # noqa: SIM108
        zero = tl.zeros([BLOCK_COLS], tl.float32)
    else:
        zero = tl.sum(tl.zeros([BLOCK_COLS], tl.float32))
    return zero


@triton.jit
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge two (count, mean, M2) triples (Chan et al. 1979); empty triples are neutral."""
    count = count_a + count_b
    safe = tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / safe)
    return count, mean, m2


@triton.jit
def merge_columns(count, mean, m2):
    """Merge the per-column triples of a vector into one triple (all partials at once)."""
    total = tl.sum(count, axis=0)
    merged_mean = tl.sum(count * mean, axis=0) / tl.maximum(total, 1.0)
    delta = mean - merged_mean
    return total, merged_mean, tl.sum(m2 + count * delta * delta, axis=0)


@triton.jit
def activation(pre, ACT: tl.constexpr, param):
    """act(pre): 0 identity, 1 relu, 2 leaky_relu(param), 3 silu, 4 gelu (erf), 5 elu(param).
    NaN propagates as in torch (comparisons with NaN are false, so NaN takes the identity branch)."""
    if ACT == 1:
        out = tl.where(pre < 0.0, 0.0, pre)
    elif ACT == 2:
        out = tl.where(pre < 0.0, pre * param, pre)
    elif ACT == 3:
        out = pre / (1.0 + tl.exp(-pre))
    elif ACT == 4:
        out = 0.5 * pre * (1.0 + tl.math.erf(pre * _SQRT_HALF))
    elif ACT == 5:
        out = tl.where(pre > 0.0, pre, param * (tl.exp(pre) - 1.0))
    else:
        out = pre
    return out


@triton.jit
def activation_grad(pre, ACT: tl.constexpr, param):
    """d act / d pre, with torch's value at the kinks (relu'(0) = 0, leaky_relu'(0) = param)."""
    if ACT == 1:
        out = tl.where(pre > 0.0, 1.0, 0.0)
    elif ACT == 2:
        out = tl.where(pre > 0.0, 1.0, param)
    elif ACT == 3:
        sig = 1.0 / (1.0 + tl.exp(-pre))
        out = sig * (1.0 + pre * (1.0 - sig))
    elif ACT == 4:
        cdf = 0.5 * (1.0 + tl.math.erf(pre * _SQRT_HALF))
        out = cdf + pre * _INV_SQRT_2PI * tl.exp(-0.5 * pre * pre)
    elif ACT == 5:
        out = tl.where(pre > 0.0, 1.0, param * tl.exp(pre))
    else:
        out = tl.full(pre.shape, 1.0, tl.float32)
    return out


@triton.jit
def activation_inverse(out, ACT: tl.constexpr, param):
    """pre from act(pre) for the invertible activations (identity, leaky_relu with param > 0, elu)."""
    # (a multiply by 1 / param, one division per program: a division per element costs registers
    # and, on sm_80, spills; benchmarks/aot_check.py)
    if ACT == 2:
        pre = tl.where(out < 0.0, out * (1.0 / param), out)
    elif ACT == 5:
        pre = tl.where(out > 0.0, out, tl.log(1.0 + out * (1.0 / param)))
    else:
        pre = out
    return pre


@triton.jit
def activation_grad_from_output(out, ACT: tl.constexpr, param):
    """d act / d pre read from the output: leaky_relu: 1 or param; elu: 1 or out + param."""
    if ACT == 2:
        grad = tl.where(out > 0.0, 1.0, param)
    elif ACT == 5:
        grad = tl.where(out > 0.0, 1.0, out + param)
    else:
        grad = tl.full(out.shape, 1.0, tl.float32)
    return grad


@triton.jit
def tile_offsets(
    item,
    pid_c,
    A,
    C,
    B,
    stride_a,
    stride_c,
    stride_b,
    b_tiles,
    BLOCK_A: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """Offsets and mask of the ``item``-th tile of a channel (block) (see kernels/_utils.py).

    Interleaved: rows of A by a block of contiguous channels; item i is rows [i BLOCK_A, ...).
    Planar: rows of A by a block of the contiguous axis B of one channel; items walk the B tiles of
    a row block, then the next rows. A program sweeps a contiguous range of items (its chunk), so
    a chunk may cut a row of B: the reduction splits across programs along B as well as along A.
    """
    if INTERLEAVED:
        rows = item * BLOCK_A + tl.arange(0, BLOCK_A)
        cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        offsets = rows.to(tl.int64)[:, None] * stride_a + cols[None, :] * stride_c
        mask = (rows < A)[:, None] & (cols < C)[None, :]
    else:
        rows = (item // b_tiles) * BLOCK_A + tl.arange(0, BLOCK_A)
        cols = (item % b_tiles) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        offsets = (
            rows.to(tl.int64)[:, None] * stride_a
            + cols[None, :] * stride_b
            + pid_c.to(tl.int64) * stride_c
        )
        mask = (rows < A)[:, None] & (cols < B)[None, :]
    return offsets, mask


@triton.jit
def channel_index(pid_c, C, BLOCK_COLS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The channels of a program: a block of them (interleaved) or the single channel ``pid_c``."""
    if INTERLEAVED:  # noqa: SIM108 (a constexpr branch reads better in a kernel)
        channels = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    else:
        channels = pid_c
    return channels, channels < C


@triton.jit
def load_channel(ptr, channels, mask, other, HAS: tl.constexpr):
    """A per-channel value in float32 (``other`` where the tensor is absent or masked)."""
    if not HAS:
        mask = channels < 0  # nothing is read: ``ptr`` is a placeholder
    return tl.load(ptr + channels, mask=mask, other=other).to(tl.float32)


@triton.jit
def as_row(value, INTERLEAVED: tl.constexpr):
    """Broadcast a per-channel value against a tile: a row vector (interleaved) or a scalar."""
    if INTERLEAVED:
        value = value[None, :]
    return value
