"""AdaBN: re-estimate BatchNorm's statistics on a new domain's data, without labels.

Li, Wang, Shi, Liu & Hou (2016, "Revisiting Batch Normalization For Practical Domain Adaptation",
arXiv 1603.04779, Algorithm 1): a network's weights carry the task, its BatchNorm statistics carry
the domain. To adapt it to a target domain, replace each BatchNorm's statistics by the mean and
variance of that layer's responses over the target domain's data,

    μ_j^t = E[x_j^t],     σ_j^t² = Var[x_j^t]      (over all target samples and positions)

and keep every weight. Wu & Johnson (2021, §5) find the same on ImageNet-C: recomputing population
statistics on the target domain improves the results.

Decision: Algorithm 1 does not say how the layers before a BatchNorm normalize while its responses are
gathered; normkit runs them as in training (each BatchNorm normalizes with its batch's statistics), in
one pass over the data. Statistics are pooled over every value seen (unbiased variance), merged batch
by batch with Chan et al.'s formula.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from normkit.tools._statistics import StatisticsReport, reestimate


def adapt(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    *,
    inplace: bool = False,
    forward: Callable | None = None,
    progress: bool = True,
) -> tuple[nn.Module, StatisticsReport]:
    """Replace every BatchNorm's running statistics by the target domain's (AdaBN, module docstring).

    Runs like :func:`~normkit.tools.recalibrate` (BatchNorm layers in training mode, the rest in eval
    mode, no gradients, modes and other buffers restored, ranks combined under torch.distributed),
    but keeps the statistics of all values pooled rather than the average of per-batch ones.

    Args:
        model: the model trained on the source domain.
        batches: unlabelled batches of the target domain (tensors, ``(input, ...)`` tuples or dicts).
        num_batches: how many to use at most; None (the default) for all of them.
        inplace: update ``model`` itself instead of a deep copy.
        forward: ``forward(model, batch)`` runs one batch, when the default does not fit.
        progress: show a progress bar (on rank 0).

    Returns:
        ``(model, report)``; ``report.layers`` says how far each layer's statistics moved, a
        measure of the domain shift layer by layer.
    """
    return reestimate(
        model,
        batches,
        num_batches,
        method="population",
        inplace=inplace,
        forward=forward,
        progress=progress,
    )
