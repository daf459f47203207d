"""Per-channel statistics of layer inputs over many batches: what PreciseBN, AdaBN and the doctor share.

A forward pre-hook on each BatchNorm reads its input and adds that batch's per-channel moments to a
:class:`ChannelStatistics`, which keeps, in float64, both quantities the tools need:

- the average of the per-batch means and of the per-batch *unbiased* variances, every batch with the
  same weight (PreciseBN, Wu & Johnson 2021; Ioffe & Szegedy 2015, Algorithm 2, steps 9-10);
- the mean and variance of all the values seen, as if concatenated (AdaBN, Li et al. 2016,
  Algorithm 1), merged batch by batch with Chan et al.'s pairwise formula (no E[x²] - E[x]²).

Under ``torch.distributed`` the per-rank accumulators are combined exactly: sums for the first,
Chan's merge of every rank's (count, mean, M2) for the second.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from normkit.errors import ConfigError
from normkit.functional import moments
from normkit.nn.snapshot import snapshot_running_stats
from normkit.tools._norms import batch_statistics_obstacle, is_batch_norm, is_frozen_batch_norm


class ChannelStatistics:
    """Running sums of one layer's per-channel input statistics, batch by batch, in float64."""

    def __init__(self) -> None:
        self.batches = 0  # batches accepted
        self.skipped = 0  # batches with non-finite statistics or a single value per channel
        self.sum_mean: torch.Tensor | None = None  # Σ_j μ_j
        self.sum_var: torch.Tensor | None = None  # Σ_j m_j/(m_j - 1) σ²_j
        self.count = 0  # values per channel seen (Chan's merge)
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None  # Σ (x - mean)² over every value seen

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add one batch, (N, C, *): the statistics of each channel over N and every other dim."""
        dims = [0, *range(2, x.dim())]
        m = math.prod(x.shape[d] for d in dims)
        if m < 2:
            self.skipped += 1
            return
        mean, var = moments(x.detach(), dims, keepdim=False)  # one pass; float32 for half inputs
        mean, var = mean.double(), var.double()
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            self.skipped += 1
            return
        self.merge(1, mean, var * (m / (m - 1)), m, mean, var * m)

    def merge(self, batches, sum_mean, sum_var, count, mean, m2) -> None:
        """Merge another accumulator's sums (one batch, or another rank's totals)."""
        if count == 0:
            return
        if self.count == 0:
            self.sum_mean, self.sum_var = sum_mean.clone(), sum_var.clone()
            self.mean, self.m2 = mean.clone(), m2.clone()
        else:
            self.sum_mean += sum_mean
            self.sum_var += sum_var
            total = self.count + count
            delta = mean - self.mean
            self.mean += delta * (count / total)
            self.m2 += m2 + delta.square() * (self.count * count / total)
        self.batches += batches
        self.count += count

    def precise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PreciseBN: (E_j[μ_j], E_j[unbiased σ²_j]), equal weight per batch."""
        return self.sum_mean / self.batches, self.sum_var / self.batches

    def population(self) -> tuple[torch.Tensor, torch.Tensor]:
        """AdaBN: mean and unbiased variance of every value seen."""
        return self.mean, self.m2 / (self.count - 1)

    def all_reduce(self) -> None:
        """Combine with the other ranks' accumulators (every rank calls it, same layers, same order).

        Two all-gathers of float64 rows: the channel count (a rank that saw no batch has none), then
        each rank's ``[batches, count, skipped | Σμ | Σσ² | mean | M2]``, merged with Chan's formula.
        """
        import torch.distributed as dist

        world = dist.get_world_size()
        wire = torch.device("cuda", torch.cuda.current_device()) if _nccl() else torch.device("cpu")
        channels = self.mean.numel() if self.mean is not None else 0
        sizes = [torch.zeros(1, dtype=torch.float64, device=wire) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([channels], dtype=torch.float64, device=wire))
        channels = int(max(s.item() for s in sizes))
        row = torch.zeros(3 + 4 * channels, dtype=torch.float64)
        row[2] = self.skipped
        if self.count:
            row[:2] = torch.tensor([self.batches, self.count], dtype=torch.float64)
            row[3:] = torch.cat((self.sum_mean, self.sum_var, self.mean, self.m2)).cpu()
        rows = [torch.zeros_like(row, device=wire) for _ in range(world)]
        dist.all_gather(rows, row.to(wire))
        device = self.mean.device if self.mean is not None else torch.device("cpu")
        merged = ChannelStatistics()
        for other in rows:
            other = other.cpu()
            merged.skipped += int(other[2])
            if other[1] > 0:
                parts = other[3:].to(device).split(channels)
                merged.merge(int(other[0]), parts[0], parts[1], int(other[1]), parts[2], parts[3])
        self.__dict__.update(merged.__dict__)


def _nccl() -> bool:
    import torch.distributed as dist

    return dist.get_backend() == "nccl"


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@dataclass
class LayerShift:
    """How far one layer's running statistics moved.

    ``mean_shift``: max over channels of |μ_new - μ_old| / sqrt(σ²_old + ε), in old standard
    deviations; ``std_ratio_min``/``std_ratio_max``: the range over channels of
    sqrt((σ²_new + ε) / (σ²_old + ε)). ``batches``: how many batches the new statistics average.
    """

    path: str
    batches: int
    mean_shift: float
    std_ratio_min: float
    std_ratio_max: float


@dataclass
class StatisticsReport:
    """What :func:`~normkit.tools.recalibrate` or :func:`~normkit.tools.adapt` changed."""

    method: str
    batches: int = 0  # batches run through the model (on this rank)
    skipped_batches: int = 0  # batch statistics not used (non-finite, or one value per channel)
    layers: list[LayerShift] = field(default_factory=list)
    untouched: dict[str, str] = field(default_factory=dict)  # layer -> why it was not changed

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{self.method}: {len(self.layers)} layer(s) from {self.batches} batch(es)"]
        lines += [
            f"  {s.path}: mean moved {s.mean_shift:.3g} std, std x [{s.std_ratio_min:.3g}, "
            f"{s.std_ratio_max:.3g}]"
            for s in self.layers
        ]
        lines += [f"  untouched {path}: {why}" for path, why in self.untouched.items()]
        return "\n".join(lines)


def shift(path, batches, old_mean, old_var, new_mean, new_var, eps) -> LayerShift:
    old_mean, old_var = old_mean.double(), old_var.double()
    new_mean, new_var = new_mean.double(), new_var.double()
    old_std = (old_var + eps).sqrt()
    ratio = (new_var + eps).sqrt() / old_std
    return LayerShift(
        path,
        batches,
        ((new_mean - old_mean).abs() / old_std).max().item(),
        ratio.min().item(),
        ratio.max().item(),
    )


def watch_inputs(layers: dict[str, nn.Module], found: dict[str, ChannelStatistics]) -> list:
    """Forward pre-hooks adding each layer's input to its accumulator; returns the handles."""

    def hook(path):
        def add(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor):
                found[path].add(x)

        return add

    return [
        layer.register_forward_pre_hook(hook(path), with_kwargs=True)
        for path, layer in layers.items()
    ]


def private_copy(batch):
    """``batch`` with its tensors copied (at the top level of a tuple, list or dict): a model whose
    first layer writes over its input (InPlaceABN, ReLU(inplace=True)) must not change the
    caller's data."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, (tuple, list)):
        return type(batch)(x.clone() if isinstance(x, torch.Tensor) else x for x in batch)
    if isinstance(batch, dict):
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def default_forward(model: nn.Module, batch) -> None:
    """A tensor is the input; a tuple or list (as a DataLoader yields) has it first; a dict is
    passed as keyword arguments."""
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)) and batch:
        model(batch[0])
    elif isinstance(batch, dict):
        model(**batch)
    else:
        raise ConfigError(
            f"a batch must be a tensor, a (input, ...) tuple/list or a dict of keyword inputs, got "
            f"{type(batch).__name__}; pass forward=lambda model, batch: ... to say how to run one"
        )


def collect(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable,
    num_batches: int | None,
    forward: Callable | None,
    progress: bool,
    description: str,
) -> tuple[dict[str, ChannelStatistics], int]:
    """Run the batches through ``model`` and accumulate each layer's input statistics.

    Returns the accumulators and the number of batches run. Nothing is reset or restored here.
    """
    forward = forward or default_forward
    found = {path: ChannelStatistics() for path in layers}
    handles = watch_inputs(layers, found)
    total = num_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    show = progress and not (distributed() and torch.distributed.get_rank() != 0)
    run = 0
    try:
        from rich.progress import Progress

        with Progress(transient=True, disable=not show) as bar, torch.no_grad():
            task = bar.add_task(description, total=total)
            for batch in itertools.islice(batches, num_batches):
                forward(model, private_copy(batch))
                run += 1
                bar.advance(task)
    finally:
        for handle in handles:
            handle.remove()
    return found, run


def reestimate(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None,
    *,
    method: str,
    inplace: bool,
    forward: Callable | None,
    progress: bool,
) -> tuple[nn.Module, StatisticsReport]:
    """Replace the running statistics of every BatchNorm by ones estimated from ``batches``.

    ``method`` is ``"precise"`` (average of per-batch statistics) or ``"population"`` (statistics
    of all values). The BatchNorm layers run in training mode (each normalizes with the batch's
    statistics, as in training), every other layer in eval mode (dropout off, as at inference);
    no gradient is computed. Modes and every other buffer are restored afterwards, also on error.
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ConfigError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wrapped = getattr(model, "module", None)
    if isinstance(model, nn.parallel.DistributedDataParallel) and wrapped is not None:
        model = wrapped  # the wrapper's forward would also broadcast buffers from rank 0
    target = model if inplace else copy.deepcopy(model)
    report = StatisticsReport("PreciseBN" if method == "precise" else "AdaBN")
    layers = {}
    for path, module in target.named_modules():
        if not (is_batch_norm(module) or is_frozen_batch_norm(module)):
            continue
        reason = batch_statistics_obstacle(module)
        if reason is None:
            layers[path] = module
        else:
            report.untouched[path] = reason
    if not layers:
        raise ConfigError(
            "the model has no BatchNorm layer with running statistics to re-estimate"
            + "".join(f"; '{path}': {why}" for path, why in report.untouched.items())
        )
    modes = {module: module.training for module in target.modules()}
    snapshot = snapshot_running_stats(target)
    try:
        target.eval()
        for layer in layers.values():
            # The layer alone: its children (timm's drop path, an activation) stay in eval mode.
            layer.training = True
        found, report.batches = collect(
            target, layers, batches, num_batches, forward, progress, report.method
        )
    finally:
        snapshot.restore()  # every running buffer as it was, whatever the passes did
        for module, training in modes.items():
            module.train(training)
    if report.batches == 0:
        raise ConfigError("batches yielded no batch; pass at least one")
    for path, layer in layers.items():
        statistics = found[path]
        if distributed():
            statistics.all_reduce()
        report.skipped_batches += statistics.skipped
        if statistics.batches == 0:
            report.untouched[path] = "no usable batch reached it"
            continue
        mean, var = statistics.precise() if method == "precise" else statistics.population()
        report.layers.append(
            shift(path, statistics.batches, layer.running_mean, layer.running_var, mean, var,
                  layer.eps)
        )  # fmt: skip
        with torch.no_grad():
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            layer.running_var.copy_(var.to(layer.running_var.dtype))
            if isinstance(getattr(layer, "num_batches_tracked", None), torch.Tensor):
                layer.num_batches_tracked.fill_(statistics.batches)
    return target, report
