"""Remove the bias of a Conv or Linear that feeds a BatchNorm: it is cancelled, so it only costs.

Ioffe & Szegedy (2015, §3.2): in ``BN(Wu + b)`` "the bias b can be ignored since its effect will be
canceled by the subsequent mean subtraction". In training the batch mean contains ``b`` and removes
it, so its gradient is exactly zero and weight decay only shrinks it; in eval mode the running mean
contains it. Removing ``b`` and subtracting it from the running mean therefore leaves the model's
outputs unchanged in both modes, and the parameter disappears.

:func:`absorb_bias` is the maths on tensors; :func:`remove_redundant_bias` finds the pairs by the
model's data flow (torch.fx; ``nn.Sequential`` neighbours when the model does not trace).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from normkit.errors import ConfigError
from normkit.tools import _graph
from normkit.tools._graph import as_inputs
from normkit.tools._norms import has_running_stats, is_batch_norm, split


def _bias_obstacle(layer: nn.Module) -> str | None:
    """Why removing ``layer``'s bias could change what it computes; None when it cannot."""
    from torch.nn.utils import parametrize

    base = next(cls for cls in _graph.WEIGHTED_LAYERS if isinstance(layer, cls))
    if type(layer).forward is not base.forward:
        return f"{type(layer).__name__} overrides {base.__name__}'s forward, which may use its bias"
    if layer._forward_pre_hooks or layer._forward_hooks:
        return f"{type(layer).__name__} has forward hooks, which may read or recompute its bias"
    if parametrize.is_parametrized(layer, "bias"):
        return "its bias is parametrized"
    return None


def absorb_bias(bias: torch.Tensor, running_mean: torch.Tensor) -> torch.Tensor:
    """The running mean of a BatchNorm once the bias ``b`` of the layer before it is removed.

    The BatchNorm then sees ``z - b`` where it saw ``z``; its statistics of ``z - b`` are
    ``μ - b`` and the same variance, so eval outputs ``γ (z - b - (μ - b)) / σ + β`` are unchanged.
    Computed in float64, returned in the running mean's dtype.

    Example::

        >>> absorb_bias(torch.tensor([1.0, -2.0]), torch.tensor([3.0, 3.0]))
        tensor([2., 5.])
    """
    if bias.numel() != running_mean.numel():
        raise ConfigError(
            f"the bias has {bias.numel()} elements and the running mean {running_mean.numel()}; "
            "they must be one per channel of the same layer"
        )
    shifted = running_mean.detach().double() - bias.detach().double().reshape(running_mean.shape)
    return shifted.to(running_mean.dtype)


@dataclass
class BiasRemoved:
    """The bias of ``layer`` removed before the normalizer ``norm``."""

    layer: str
    norm: str


@dataclass
class BiasKept:
    """A layer with a bias that feeds a BatchNorm, kept, and why."""

    layer: str
    norm: str
    reason: str


@dataclass
class BiasReport:
    """What :func:`remove_redundant_bias` did."""

    removed: list[BiasRemoved] = field(default_factory=list)
    kept: list[BiasKept] = field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"removed {len(self.removed)} bias(es), kept {len(self.kept)}"]
        lines += [f"  removed {r.layer}.bias (before {r.norm})" for r in self.removed]
        lines += [f"  kept {k.layer} before {k.norm}: {k.reason}" for k in self.kept]
        return "\n".join(lines)


def remove_redundant_bias(
    model: nn.Module, example_inputs=None, *, inplace: bool = False
) -> tuple[nn.Module, BiasReport]:
    """Remove each Conv/Linear bias that feeds only a BatchNorm, absorbing it into the running mean.

    Outputs are unchanged in training and eval mode (to rounding), the model keeps its class and
    forward, and ``state_dict`` loses the ``<layer>.bias`` keys. Pairs come from the data flow as in
    :func:`~normkit.tools.fold_batchnorm`, with the same rule for a Linear: its outputs are a
    BatchNorm's channels only when they are (N, features), which ``example_inputs`` lets normkit
    check. A bias is kept (and listed with the reason) when the layer also feeds something else,
    when the BatchNorm is called more than once (its running mean cannot absorb two biases), or
    when the normalizer does not subtract the batch mean (frozen BatchNorm, GroupNorm, LayerNorm).
    An optimizer built before still holds the removed parameters: build it after.

    Returns:
        ``(model, report)``: a deep copy unless ``inplace=True``.

    Example::

        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), nk.BatchNorm2d(8))
        >>> cleaned, report = nk.tools.remove_redundant_bias(model)
        >>> cleaned[0].bias is None, [r.layer for r in report.removed]
        (True, ['0'])
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    inputs = as_inputs(example_inputs)
    sites, graph_module, trace_error = _graph.find_sites(target, is_batch_norm, inputs)
    report = BiasReport(traced=graph_module is not None, trace_error=trace_error)
    modules = dict(target.named_modules())
    calls = Counter(site.norm for site in sites)
    for site in sites:
        if site.candidate is None or modules[site.candidate].bias is None:
            continue  # no Conv/Linear with a bias feeds this call
        producer, norm = modules[site.candidate], modules[site.norm]
        reason = site.obstacle
        if reason is None and calls[site.norm] > 1:
            reason = (
                f"'{site.norm}' is called {calls[site.norm]} times in forward, so its running "
                "mean cannot absorb this bias alone"
            )
        if reason is None:
            reason = _graph.channel_obstacle(norm, producer, site.producer_shape)
        if reason is None and isinstance(split(norm), str):
            reason = split(norm)  # a forward normkit does not know may not subtract the mean
        if reason is None:
            reason = _bias_obstacle(producer)
        if reason is not None:
            report.kept.append(BiasKept(site.candidate, site.norm, reason))
            continue
        with torch.no_grad():
            if has_running_stats(norm):
                norm.running_mean.copy_(absorb_bias(producer.bias, norm.running_mean))
        producer.register_parameter("bias", None)
        report.removed.append(BiasRemoved(site.candidate, site.norm))
    return target, report
