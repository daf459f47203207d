"""Launch helpers: how an (N, C, *) tensor is laid out for the kernels, block sizes, and how a
reduction is split across programs.

Every kernel sees its input as a 4-D strided view (P, A, C, B): statistics are taken per (p, c)
over A and B (and, for group norm, over D consecutive channels). Two layouts cover contiguous and
channels_last inputs of any rank without copies:

- *planar* (contiguous NCHW): B = H*W*... is the contiguous axis. One program per channel reads
  [BLOCK_A, BLOCK_B] tiles, rows of A (samples) by columns of B (positions).
- *interleaved* (channels_last, or any input whose channels are the innermost axis, such as (N, C)):
  B = 1 and the tile is [BLOCK_A, BLOCK_C], rows of positions by a block of contiguous channels.

Batch norm is P = 1, A = N (planar) or N*H*W (interleaved); group norm is P = N, A = 1 or H*W.
Other strided inputs are made contiguous first.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton

# Elements per tile. 4096 fp32 values are 16 per thread at 8 warps: enough loads in flight to
# saturate HBM, few enough registers to avoid spills (vector loads, no spills).
DEFAULT_TILE = 4096
MAX_CHANNEL_BLOCK = 64  # interleaved: 64 contiguous channels = 128-256 bytes per row of a tile
PROGRAMS_PER_SM = 4  # split a reduction until about this many programs per multiprocessor

_overrides: contextvars.ContextVar[dict] = contextvars.ContextVar("normkit_kernel_overrides")


@contextlib.contextmanager
def launch_overrides(*, tile: int | None = None, rows_per_chunk: int | None = None) -> Iterator:
    """Force the tile size and the rows of A per program (the split into chunks) inside the block.

    The tests use it to run the split path with its second-stage merge at tiny sizes; the defaults
    choose both from the shape and the device.
    """
    token = _overrides.set({"tile": tile, "rows_per_chunk": rows_per_chunk})
    try:
        yield
    finally:
        _overrides.reset(token)


def _override(name: str) -> int | None:
    return _overrides.get({}).get(name)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); 4 for the interpreter."""
    if device.type != "cuda":
        return 4
    return _multiprocessors(
        device.index if device.index is not None else torch.cuda.current_device()
    )


@dataclass(frozen=True)
class ChannelView:
    """A tensor as the kernels see it: (P, A, C, B) with strides (see the module docstring)."""

    tensor: torch.Tensor
    P: int
    A: int
    C: int
    B: int
    stride_p: int
    stride_a: int
    stride_c: int
    stride_b: int
    interleaved: bool

    def args(self) -> tuple[int, ...]:
        return (self.A, self.C, self.B, self.stride_p, self.stride_a, self.stride_c, self.stride_b)


def channels_innermost(x: torch.Tensor) -> bool:
    """True when the channel axis (dim 1) is the contiguous one and the rest is dense behind it."""
    return x.dim() >= 2 and x.movedim(1, -1).is_contiguous()


def batch_view(x: torch.Tensor) -> ChannelView:
    """Batch norm: per channel over N and space."""
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    if channels_innermost(x):
        return ChannelView(x, 1, n * s, c, 1, 0, c, 1, 0, True)
    x = x.contiguous()
    return ChannelView(x, 1, n, c, s, 0, c * s, s, 1, False)


def group_view(x: torch.Tensor) -> ChannelView:
    """Group norm: per sample and channel over space (channels are merged into groups later)."""
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    if channels_innermost(x):
        return ChannelView(x, n, s, c, 1, s * c, c, 1, 0, True)
    x = x.contiguous()
    return ChannelView(x, n, 1, c, s, c * s, 0, s, 1, False)


def same_layout(t: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly the strides of ``reference`` (a copy only if they differ)."""
    if t.stride() == reference.stride():
        return t
    return torch.empty_like(reference, dtype=t.dtype).copy_(t)


@dataclass(frozen=True)
class Plan:
    """Block sizes and the split of A into chunks, one program per (channel block, chunk, p)."""

    block_a: int
    block_cols: int
    b_tiles: int
    rows_per_chunk: int
    chunks: int
    channel_programs: int
    num_warps: int

    def grid(self, view: ChannelView) -> tuple[int, int, int]:
        return (self.channel_programs, self.chunks, view.P)


def plan(view: ChannelView) -> Plan:
    """Choose tiles for ``view`` and split A when there are too few programs to fill the device."""
    tile = _override("tile") or DEFAULT_TILE
    if view.interleaved:
        block_cols = min(triton.next_power_of_2(view.C), MAX_CHANNEL_BLOCK, tile)
        channel_programs = triton.cdiv(view.C, block_cols)
        b_tiles = 1
    else:
        block_cols = min(triton.next_power_of_2(view.B), tile)
        channel_programs = view.C
        b_tiles = triton.cdiv(view.B, block_cols)
    block_a = max(1, min(triton.next_power_of_2(view.A), tile // block_cols))
    rows = _override("rows_per_chunk")
    if rows is None:
        programs = view.P * channel_programs
        wanted = PROGRAMS_PER_SM * multiprocessors(view.tensor.device)
        chunks = max(1, min(triton.cdiv(wanted, programs), triton.cdiv(view.A, block_a)))
        rows = triton.cdiv(view.A, chunks)
    rows = max(block_a, triton.cdiv(rows, block_a) * block_a)  # whole tiles per chunk
    chunks = max(1, triton.cdiv(view.A, rows))
    num_warps = 8 if block_a * block_cols >= 4096 else 4 if block_a * block_cols >= 1024 else 2
    return Plan(block_a, block_cols, b_tiles, rows, chunks, channel_programs, num_warps)


def float_or_dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor (the kernel never reads it when absent)."""
    return t if t is not None else like
