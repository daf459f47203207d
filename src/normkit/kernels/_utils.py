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

Every launcher starts its kernels through :func:`launch`, and its grid comes from :func:`plan_grid`,
a pure function of the view's sizes and the multiprocessor count. Inside :func:`recording` the
launches are recorded (and, unless told to run them, not started), so the launch plans and the
ahead-of-time compilation (:mod:`normkit.kernels._aot`, :mod:`normkit.kernels._launch_plans`) see
exactly what the launchers would start on a GPU, from tensors on the ``meta`` device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

# Elements per tile. 4096 fp32 values are 16 per thread at 8 warps: enough loads in flight to
# saturate HBM, few enough registers to avoid spills (vector loads, no spills).
DEFAULT_TILE = 4096
MAX_CHANNEL_BLOCK = 64  # interleaved: 64 contiguous channels = 128-256 bytes per row of a tile
MIN_TILE = 1024  # tiles shrink to this (4 warps, 8 values per thread) to fill the device
PROGRAMS_PER_SM = 4  # split a reduction until about this many programs per multiprocessor
MIN_PROGRAMS_PER_SM = 2  # shrink tiles while the tensor has fewer tiles than this per SM
REGISTERS_PER_SM = 65536  # sm_80 and sm_90
MIN_CTAS_PER_SM = 2  # every kernel keeps registers for at least this many of its CTAs per SM


def register_budget(num_warps: int) -> int:
    """Registers per thread that keep MIN_CTAS_PER_SM CTAs of ``num_warps`` warps resident (at most
    255, in ptxas's units of 8), passed to every launch as triton's ``maxnreg`` (PTX ``.maxnreg``).

    Without it ptxas picks a register count from its own occupancy heuristics and at times spills
    a few bytes (a loop-invariant kept in local memory at 32 or 80 registers, while 40 or 88 would
    do): the ahead-of-time check (benchmarks/aot_check.py) found such spills on sm_80. With the
    budget stated, ptxas uses what the kernel needs, up to it.
    """
    return min(255, REGISTERS_PER_SM // (MIN_CTAS_PER_SM * 32 * num_warps) // 8 * 8)


STAGE_WARPS = 4  # the second-stage kernels (merges of per-chunk partials over a few channels)
STAGE_TILE = 2048  # partials per tile of a second-stage kernel (16 per thread at 4 warps)
MAX_STAGE_STATS = 128  # statistics per second-stage program

_overrides: contextvars.ContextVar[dict] = contextvars.ContextVar("normkit_kernel_overrides")


@contextlib.contextmanager
def launch_overrides(
    *,
    tile: int | None = None,
    rows_per_chunk: int | None = None,
    multiprocessors: int | None = None,
) -> Iterator:
    """Force the tile size, the rows of A per program (the split into chunks) and the device's
    multiprocessor count inside the block.

    The tests use the first two to run the split path with its second-stage merge at tiny sizes;
    the launch plans use the third to plan for an H100 (132) or an A100 (108) without one. The
    defaults choose from the shape and the device.
    """
    given = {"tile": tile, "rows_per_chunk": rows_per_chunk, "multiprocessors": multiprocessors}
    outer = _overrides.get({})  # a nested block keeps what an outer one forced, unless it forces
    token = _overrides.set(outer | {k: v for k, v in given.items() if v is not None})
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
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); 4 for the interpreter;
    the count forced by :func:`launch_overrides` when there is one."""
    forced = _override("multiprocessors")
    if forced is not None:
        return forced
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
    """Block sizes and the split of each channel's tiles into chunks: one program per (channel
    block, chunk, p); a chunk is ``items_per_chunk`` consecutive tiles."""

    block_a: int
    block_cols: int
    b_tiles: int
    items_per_chunk: int
    chunks: int
    channel_programs: int
    num_warps: int

    def grid(self, view: ChannelView) -> tuple[int, int, int]:
        return (self.channel_programs, self.chunks, view.P)


def plan(view: ChannelView) -> Plan:
    """Choose tiles for ``view`` and split its tiles when there are too few programs to fill the
    device (:func:`plan_grid` with the device's multiprocessors and any forced sizes)."""
    return plan_grid(
        view.P, view.A, view.C, view.B, view.interleaved, multiprocessors(view.tensor.device),
        tile=_override("tile"), rows_per_chunk=_override("rows_per_chunk"),
    )  # fmt: skip


def _blocks(A: int, C: int, B: int, interleaved: bool, tile: int) -> tuple[int, int, int, int]:
    """(block_a, block_cols, b_tiles, channel_programs) for tiles of at most ``tile`` elements."""
    if interleaved:
        block_cols = min(triton.next_power_of_2(C), MAX_CHANNEL_BLOCK, tile)
        channel_programs = triton.cdiv(C, block_cols)
        b_tiles = 1
    else:
        block_cols = min(triton.next_power_of_2(B), tile)
        channel_programs = C
        b_tiles = triton.cdiv(B, block_cols)
    block_a = max(1, min(triton.next_power_of_2(A), tile // block_cols))
    return block_a, block_cols, b_tiles, channel_programs


def plan_grid(
    P: int,
    A: int,
    C: int,
    B: int,
    interleaved: bool,
    multiprocessors: int,
    *,
    tile: int | None = None,
    rows_per_chunk: int | None = None,
) -> Plan:
    """The launch plan of a (P, A, C, B) view on a device with ``multiprocessors`` SMs (pure).

    Tiles hold DEFAULT_TILE elements, halved (down to MIN_TILE) while the whole tensor has fewer
    tiles than MIN_PROGRAMS_PER_SM programs per multiprocessor. Each channel's tiles are then split
    into chunks, one program each, until there are about PROGRAMS_PER_SM programs per
    multiprocessor, or one tile per chunk: the split runs along A and, in the planar layout, along
    B too, so no channel is left to one program with a long loop. ``tile`` and ``rows_per_chunk``
    force the tile size and the rows of A per chunk (the tests' small splits).
    """
    size = tile or DEFAULT_TILE
    while True:
        block_a, block_cols, b_tiles, channel_programs = _blocks(A, C, B, interleaved, size)
        tiles_per_channel = triton.cdiv(A, block_a) * b_tiles
        total = P * channel_programs * tiles_per_channel
        if tile or size <= MIN_TILE or total >= MIN_PROGRAMS_PER_SM * multiprocessors:
            break
        size //= 2
    if rows_per_chunk is not None:
        items = triton.cdiv(max(rows_per_chunk, 1), block_a) * b_tiles
    else:
        programs = P * channel_programs
        wanted = PROGRAMS_PER_SM * multiprocessors
        chunks = max(1, min(triton.cdiv(wanted, programs), tiles_per_channel))
        items = triton.cdiv(tiles_per_channel, chunks)
    items = min(items, tiles_per_channel)
    chunks = triton.cdiv(tiles_per_channel, items)
    elements = block_a * block_cols
    num_warps = 8 if elements >= 4096 else 4 if elements >= 1024 else 2
    return Plan(block_a, block_cols, b_tiles, items, chunks, channel_programs, num_warps)


def stage_blocks(statistics: int) -> tuple[int, int]:
    """(BLOCK_J, BLOCK_K) of a second-stage kernel: BLOCK_K statistics per program, BLOCK_J of
    their partials per tile, so that one tile holds STAGE_TILE values."""
    block_k = min(triton.next_power_of_2(statistics), MAX_STAGE_STATS)
    return STAGE_TILE // block_k, block_k


def float_or_dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor (the kernel never reads it when absent)."""
    return t if t is not None else like


@dataclass
class Launch:
    """One kernel launch as a launcher asked for it: the kernel, its grid, its arguments by
    position, its compile-time constants and warps; ``compiled`` is what triton returned when the
    launch ran (on a GPU: the CompiledKernel, with the driver's register count)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    num_warps: int
    maxnreg: int | None = None
    compiled: Any = None
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def named_args(self) -> dict[str, Any]:
        """Every argument by its parameter name, the compile-time constants included."""
        return dict(zip(self.kernel.arg_names, self.args, strict=False)) | self.constexprs


@dataclass
class _Recorder:
    launches: list[Launch]
    execute: bool


_recorder: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "normkit_kernel_recorder", default=None
)


@contextlib.contextmanager
def recording(*, execute: bool = False) -> Iterator[list[Launch]]:
    """Record every kernel launch inside the block into the yielded list; with ``execute`` the
    kernels also run (and each record keeps the compiled kernel), otherwise none starts, so the
    launchers can be planned from tensors on the ``meta`` device without a GPU."""
    launches: list[Launch] = []
    token = _recorder.set(_Recorder(launches, execute))
    try:
        yield launches
    finally:
        _recorder.reset(token)


def launch(kernel, grid: tuple[int, ...], *args, num_warps: int, **constexprs) -> Any:
    """``kernel[grid](*args, num_warps=num_warps, maxnreg=register_budget(num_warps),
    **constexprs)``, or its record (see :func:`recording`). Runtime arguments go by position,
    compile-time constants by name."""
    maxnreg = register_budget(num_warps)
    recorder = _recorder.get()
    if recorder is None:
        return kernel[grid](*args, num_warps=num_warps, maxnreg=maxnreg, **constexprs)
    record = Launch(kernel, tuple(grid), args, constexprs, num_warps, maxnreg)
    recorder.launches.append(record)
    if recorder.execute:
        record.compiled = kernel[grid](*args, num_warps=num_warps, maxnreg=maxnreg, **constexprs)
    return record.compiled
