"""What a synchronized batch norm sends between ranks, and how it waits for it.

Forward: every rank contributes one float64 row and receives every rank's row, in ONE all-gather
per layer per step (not an all-reduce of sums: Chan's merge needs each rank's own mean and M2):

    row = [header (HEADER_SIZE values) | mean (C) | M2 (C)]        # (HEADER_SIZE + 2C,)

The header travels in the same collective, so the checks it allows cost nothing extra on the wire:
which rank hit a bad input (so that every rank raises instead of the others waiting for it), the
input's channels and dtype, eps, momentum, whether running statistics are updated, whether the
input needs a gradient (else backward would wait on the ranks that skip it), and how many
synchronized steps the layer has taken (a rank that skipped the layer is out of step). float64
holds counts exactly up to 2^53 and keeps the merge exact for float32 and half inputs.

Backward: one all-reduce (sum) of ``[sum dy (C) | sum dy * x_hat (C)]``, also in float64.

Bounded waits: each collective is issued asynchronously and waited on with the layer's ``timeout``
when one is given (a host wait, free on the CPU), else with the process group's own timeout. Either
way a collective that does not complete raises :class:`RankSyncError`, naming the likely causes,
instead of hanging.
"""

from __future__ import annotations

import datetime
import math

import torch
import torch.distributed as dist

from normkit.errors import (
    BatchTooSmallError,
    ChannelMismatchError,
    ConfigError,
    DtypeError,
    NormkitError,
    RankMismatchError,
    RankSyncError,
    ShapeError,
)

WIRE_DTYPE = torch.float64
MAGIC = 20150211.0  # marks a row as a normkit SyncBatchNorm's (arXiv 1502.03167, wire version 1)

# Header fields, in order.
MAGIC_FIELD, ERROR, NUM_FEATURES, CHANNELS, DTYPE, COUNT, EPS, MOMENTUM, FLAGS, STEP = range(10)
HEADER_SIZE = 10

FLAG_UPDATES_RUNNING_STATS = 1
FLAG_INPUT_NEEDS_GRAD = 2
MOMENTUM_CUMULATIVE = -1.0  # momentum=None
MOMENTUM_UNUSED = -2.0  # no running statistics to update

DTYPE_CODES = {torch.float16: 1.0, torch.bfloat16: 2.0, torch.float32: 3.0, torch.float64: 4.0}
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in DTYPE_CODES.items()}

# A rank whose input fails a local check still joins the collective, with one of these codes.
ERROR_CODES: dict[type[NormkitError], float] = {
    DtypeError: 1.0,
    ShapeError: 2.0,
    ChannelMismatchError: 3.0,
}
_ERROR_CLASSES = {code: cls for cls, code in ERROR_CODES.items()}


def error_code(error: NormkitError | None) -> float:
    if error is None:
        return 0.0
    return ERROR_CODES.get(type(error), 9.0)


def dtype_code(dtype: torch.dtype) -> float:
    return DTYPE_CODES.get(dtype, 0.0)


def make_header(
    *,
    error: NormkitError | None,
    num_features: int,
    channels: int,
    dtype: torch.dtype,
    count: int,
    eps: float,
    momentum: float | None,
    tracking: bool,
    needs_grad: bool,
    step: int | None,
) -> list[float]:
    """This rank's header: what the other ranks check before trusting its statistics.

    ``channels`` is the input's dim 1 (-1 without one), ``count`` its values per channel,
    ``momentum`` ``None`` for the cumulative average, ``step`` ``None`` when not counted.
    """
    header = [0.0] * HEADER_SIZE
    header[MAGIC_FIELD] = MAGIC
    header[ERROR] = error_code(error)
    header[NUM_FEATURES] = float(num_features)
    header[CHANNELS] = float(channels)
    header[DTYPE] = dtype_code(dtype)
    header[COUNT] = float(count)
    header[EPS] = float(eps)
    header[MOMENTUM] = MOMENTUM_CUMULATIVE if momentum is None else float(momentum)
    header[FLAGS] = float(
        (FLAG_UPDATES_RUNNING_STATS if tracking else 0)
        | (FLAG_INPUT_NEEDS_GRAD if needs_grad else 0)
    )
    header[STEP] = -1.0 if step is None else float(step)
    return header


def as_timeout(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    """A layer's ``timeout`` (seconds or a timedelta) as a timedelta; ``None`` stays ``None``."""
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise ConfigError(f"timeout must be seconds (a number) or a timedelta, got {timeout!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=seconds)


def pack_row(header: list[float], mean: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """``[header | mean | M2]`` as one float64 vector on the statistics' device.

    The header is built on the host; on an accelerator it goes through pinned memory with a
    non-blocking copy, so building it never waits for the device.
    """
    head = torch.tensor(header, dtype=WIRE_DTYPE)
    if mean.device.type != "cpu":
        head = head.pin_memory().to(mean.device, non_blocking=True)
    return torch.cat((head, mean.to(WIRE_DTYPE), m2.to(WIRE_DTYPE)))


def all_gather_rows(row: torch.Tensor, group, timeout, what: str) -> torch.Tensor:
    """Every rank's ``row``, stacked in rank order: (world, len(row)). One collective."""
    world = dist.get_world_size(group)
    rows = row.new_empty((world, row.numel()))
    if dist.get_backend(group) == "gloo":
        # gloo's all_gather flattens into one buffer itself; this form works on every torch >= 2.3
        work = dist.all_gather(list(rows.unbind(0)), row, group=group, async_op=True)
    else:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = gather(rows.view(-1), row, group=group, async_op=True)
    _wait(work, group, timeout, what)
    return rows


def all_reduce_sum(values: torch.Tensor, group, timeout, what: str) -> torch.Tensor:
    """``values`` summed over the ranks, in place. One collective."""
    work = dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group, async_op=True)
    _wait(work, group, timeout, what)
    return values


def _wait(work, group, timeout, what: str) -> None:
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except RuntimeError as error:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        waited = "" if timeout is None else f" within {timeout.total_seconds():g} s"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RankSyncError(
            f"{what} did not complete{waited} on rank {rank} of {world} ({first_line}). Every "
            "rank of the process group must run this layer in training mode, the same number "
            "of times and in the same order, forward and backward. Usual causes: a rank in eval "
            "mode (call model.train() or model.eval() on every rank), control flow that skips "
            "or repeats the layer on some ranks, a rank that raised or exited (see its log), "
            "or models whose layers differ in size between ranks"
        ) from error


def verify_rows(
    header_rows: list[list[float]], local_error: NormkitError | None, layer: str
) -> int:
    """Check the gathered headers and return the total values per channel over all ranks.

    Raises the same kind of error on every rank if the ranks disagree: every rank runs this on
    the same rows, so every rank reaches the same verdict. A rank whose own input failed raises
    its own (detailed) error; the others raise the same class, naming it.
    """
    for r, row in enumerate(header_rows):
        if row[MAGIC_FIELD] != MAGIC:
            raise RankMismatchError(
                f"rank {r} sent data that is not a SyncBatchNorm's statistics to {layer}: the "
                "ranks are running different collectives at this point (control flow that "
                "differs across ranks, or a different model on some rank)"
            )
    failed = [r for r, row in enumerate(header_rows) if row[ERROR] != 0]
    if failed:
        if local_error is not None:
            raise local_error
        r = failed[0]
        row = header_rows[r]
        cls = _ERROR_CLASSES.get(row[ERROR], ConfigError)
        raise cls(
            f"rank {r} could not normalize its input ({cls.__name__}: its input has "
            f"{_channels(row)} for num_features={int(row[NUM_FEATURES])}, dtype "
            f"{_DTYPE_NAMES.get(row[DTYPE], 'not float16/bfloat16/float32/float64')}); every rank "
            f"stops here rather than wait for it. Rank {r}'s own error has the details"
        )
    dtypes = {row[DTYPE] for row in header_rows}
    if len(dtypes) > 1:
        found = ", ".join(
            f"rank {r}: {_DTYPE_NAMES.get(row[DTYPE], '?')}" for r, row in enumerate(header_rows)
        )
        raise DtypeError(
            f"the ranks' inputs to {layer} have different dtypes ({found}); every rank must feed "
            "the same dtype (cast the inputs, or use the same autocast settings on every rank)"
        )
    checks = (
        ("eps", [row[EPS] for row in header_rows], EPS),
        ("momentum", [row[MOMENTUM] for row in header_rows], MOMENTUM),
        (
            "track_running_stats",
            [float(int(row[FLAGS]) & FLAG_UPDATES_RUNNING_STATS) for row in header_rows],
            FLAGS,
        ),
    )
    for name, values, field in checks:
        if len(set(values)) > 1:
            raise RankMismatchError(
                f"the ranks' {layer} layers differ in {name} ({_per_rank(values, field)}); build "
                "the same model on every rank"
            )
    needs_grad = [bool(int(row[FLAGS]) & FLAG_INPUT_NEEDS_GRAD) for row in header_rows]
    if len(set(needs_grad)) > 1:
        raise RankMismatchError(
            f"the input to {layer} needs a gradient on some ranks and not on others "
            f"({', '.join(f'rank {r}: {g}' for r, g in enumerate(needs_grad))}); backward would "
            "wait forever on the ranks that skip it. Run every rank under the same "
            "torch.no_grad()/requires_grad settings"
        )
    steps = [row[STEP] for row in header_rows]
    if len(set(steps)) > 1:
        found = ", ".join(f"rank {r}: {int(s)}" for r, s in enumerate(steps))
        raise RankMismatchError(
            f"the ranks are out of step at {layer}: it has run a different number of "
            f"synchronized steps on each rank ({found}). A rank skipped or repeated this layer "
            "(control flow that differs across ranks, or a rank that was in eval mode)"
        )
    total = sum(int(row[COUNT]) for row in header_rows)
    if total == 1:
        holder = next(r for r, row in enumerate(header_rows) if row[COUNT] == 1)
        raise BatchTooSmallError(
            f"training {layer} needs more than one value per channel over all ranks together, "
            f"but there is 1 in total (on rank {holder}); give the ranks larger batches, or "
            "call .eval() to normalize with the running statistics"
        )
    return total


def _channels(row: list[float]) -> str:
    channels = int(row[CHANNELS])
    return "no channel dimension" if channels < 0 else f"{channels} channels"


def _per_rank(values: list[float], field: int) -> str:
    def show(v: float) -> str:
        if field == MOMENTUM and v == MOMENTUM_CUMULATIVE:
            return "None"
        if field == MOMENTUM and v == MOMENTUM_UNUSED:
            return "(not tracking)"
        if field == FLAGS:
            return str(bool(v))
        return f"{v:g}"

    return ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(values))
