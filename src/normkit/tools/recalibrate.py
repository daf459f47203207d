"""PreciseBN: recompute BatchNorm's population statistics as a true average over many batches.

Wu & Johnson (2021, "Rethinking 'Batch' in BatchNorm", §3) show that the exponential moving average
BatchNorm keeps during training is a poor estimate of the population statistics: with momentum 0.1
it is dominated by the last few dozen batches, computed with weights that have since changed, and
large learning rates or batches make it worse. PreciseBN freezes the weights, runs N batches and
takes the plain average of the per-batch statistics (every batch with the same weight):

    μ_pop = (1/N) Σ_j μ_Bj,     σ²_pop = (1/N) Σ_j m_j/(m_j - 1) σ²_Bj

which is Ioffe & Szegedy's (2015) Algorithm 2, steps 9-10. About 10^3-10^4 samples suffice (Wu &
Johnson 2021, §3). The variance is the average of the per-batch variances, as in fvcore's and
the paper's implementation, not the variance of all values pooled: it is the quantity BatchNorm
normalizes with in training (pooled statistics are :func:`~normkit.tools.adapt`'s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from normkit.tools._statistics import StatisticsReport, reestimate


def recalibrate(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = 200,
    *,
    inplace: bool = False,
    forward: Callable | None = None,
    progress: bool = True,
) -> tuple[nn.Module, StatisticsReport]:
    """Recompute every BatchNorm's running statistics with PreciseBN (module docstring).

    The BatchNorm layers run in training mode (each normalizes with its batch's statistics, as in
    training, which is what PreciseBN estimates) and every other layer in eval mode (dropout off);
    no gradient is computed and no parameter changes. Every module's mode and every other buffer
    are restored afterwards, also when a batch raises. ``num_batches_tracked`` becomes the number
    of batches averaged. Batches whose statistics are NaN/Inf are left out and counted. Under
    ``torch.distributed`` (a process group is initialised), each rank runs its own batches and the
    averages are taken over every rank's batches; a ``DistributedDataParallel`` wrapper is
    unwrapped. With SyncBatchNorm layers (which communicate in training-mode forwards) every rank
    must run the same number of batches. Layers that keep no running statistics and frozen
    BatchNorm are left as they are.

    Args:
        model: the trained model.
        batches: an iterable of batches: tensors, ``(input, target, ...)`` tuples as a DataLoader
            yields them, or dicts of keyword inputs.
        num_batches: how many batches to use at most (fvcore's default, 200); None for all.
        inplace: update ``model`` itself instead of a deep copy.
        forward: ``forward(model, batch)`` runs one batch, when the default above does not fit.
        progress: show a progress bar (on rank 0).

    Returns:
        ``(model, report)``; ``report.layers`` says how far each layer's statistics moved.

    Example::

        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), nk.BatchNorm1d(8)).eval()
        >>> data = [torch.randn(32, 4) * 3 + 1 for _ in range(10)]
        >>> model, report = nk.tools.recalibrate(model, data, progress=False)
        >>> report.batches, [layer.path for layer in report.layers], model.training
        (10, ['1'], False)
    """
    return reestimate(
        model,
        batches,
        num_batches,
        method="precise",
        inplace=inplace,
        forward=forward,
        progress=progress,
    )
