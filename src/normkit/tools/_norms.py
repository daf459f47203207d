"""What the tools need to know about a module: is it a normalizer, which kind, and what it computes.

The tools work on any PyTorch model: torch.nn's layers, normkit's, and layers from other libraries that
follow torch's conventions (``running_mean``/``running_var`` buffers, ``weight``/``bias`` for γ/β,
``eps``). Three families matter to them:

- *batch-statistics* normalizers (BatchNorm and the layers that equal it in eval mode: SyncBatchNorm,
  Batch Renorm, Ghost BN): in training they normalize with the batch's statistics and update running
  ones; in eval mode (Ioffe & Szegedy 2015, Algorithm 2, step 11) they are a fixed per-channel affine
  map ``y = γ (x - μ) / sqrt(σ² + ε) + β``, which is what folding and recalibration rely on;
- *frozen* BatchNorm (normkit's ``FrozenBatchNorm``, torchvision's ``FrozenBatchNorm2d``): that affine
  map always, with statistics as buffers;
- every other normalizer (LayerNorm, GroupNorm, InstanceNorm, the mixtures): statistics of the sample.

A class is trusted to behave like BatchNorm in eval mode only when its ``forward`` is one whose eval
behaviour normkit knows (torch's, normkit's, and normkit's BN-equivalent layers); a subclass that
overrides ``forward`` may compute anything, so the tools leave it alone and say why.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

# normkit layers whose eval-mode forward is BatchNorm's (Algorithm 2) with their running statistics.
_BN_EQUIVALENT_NAMES = (
    "BatchNorm",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm",
    "SyncBatchNorm",
)
# ... and normkit's batch-statistics layers that are not torch _BatchNorms (their output is not BN's).
_BATCH_STATISTICS_NAMES = (*_BN_EQUIVALENT_NAMES, "BatchNormAct", "InPlaceABN")
_NORMALIZER_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _normkit_classes(names) -> list[type]:
    import normkit

    found = []
    for name in names:
        # hasattr-free lookup: normkit's module __getattr__ raises AttributeError for unknown names
        cls = getattr(normkit, name, None)
        if isinstance(cls, type):
            found.append(cls)
    return found


def _known_eval_forwards() -> set:
    forwards = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
    forwards.update(cls.forward for cls in _normkit_classes(_BN_EQUIVALENT_NAMES))
    return forwards


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """normkit's ``FrozenBatchNorm`` or a look-alike (torchvision's ``FrozenBatchNorm2d``): the eval
    map of BatchNorm with γ, β, μ, σ² as buffers, whatever the mode."""
    frozen = _normkit_classes(("FrozenBatchNorm",))
    if frozen and isinstance(module, tuple(frozen)):
        return True
    return type(module).__name__.startswith("FrozenBatchNorm") and all(
        isinstance(getattr(module, name, None), torch.Tensor)
        for name in ("weight", "bias", "running_mean", "running_var")
    )


def is_batch_norm(module: nn.Module) -> bool:
    """A batch-statistics normalizer with BatchNorm's parameters and buffers (torch's or normkit's
    BatchNorm, SyncBatchNorm, Batch Renorm, Ghost BN), whether or not its forward is one normkit
    knows. Frozen BatchNorm is not included (:func:`is_frozen_batch_norm`)."""
    if is_frozen_batch_norm(module):
        return False
    return isinstance(module, (_BatchNorm, *_normkit_classes(_BATCH_STATISTICS_NAMES)))


def is_normalizer(module: nn.Module) -> bool:
    """Any normalization layer: torch.nn's, normkit's, and frozen BatchNorm look-alikes."""
    if isinstance(module, _NORMALIZER_TYPES) or is_frozen_batch_norm(module):
        return True
    cls = type(module)
    return cls.__module__.startswith("normkit.") and "Norm" in cls.__name__


def has_running_stats(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def num_channels(module: nn.Module) -> int | None:
    """The number of channels a per-channel normalizer expects, or None."""
    for name in ("num_features", "num_channels"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    if has_running_stats(module):
        return module.running_mean.numel()
    return None


def eval_affine_obstacle(module: nn.Module) -> str | None:
    """Why ``module`` is *not* now a fixed per-channel affine map of its input; None when it is.

    True for frozen BatchNorm always, and for a batch-statistics normalizer in eval mode that has
    running statistics and a forward normkit knows.
    """
    if is_frozen_batch_norm(module):
        return None
    if not is_batch_norm(module):
        return f"{type(module).__name__} normalizes with statistics of each sample, not fixed ones"
    if type(module).forward not in _known_eval_forwards():
        return (
            f"{type(module).__name__} overrides forward, so its eval-mode output is not known to be "
            "BatchNorm's"
        )
    if module.training:
        return (
            "it is in training mode, where it normalizes with each batch's statistics; call "
            "model.eval() before folding"
        )
    if not has_running_stats(module) or not getattr(module, "track_running_stats", True):
        return (
            "it keeps no running statistics (track_running_stats=False), so it normalizes with the "
            "batch's statistics in eval mode too"
        )
    return None


def eval_statistics(module: nn.Module):
    """``(mean, var, eps, gamma, beta)`` of a module for which :func:`eval_affine_obstacle` is None;
    ``gamma``/``beta`` are None when the layer has no affine parameters."""
    return (
        module.running_mean,
        module.running_var,
        float(module.eps),
        getattr(module, "weight", None),
        getattr(module, "bias", None),
    )


def batch_statistics_obstacle(module: nn.Module) -> str | None:
    """Why ``module``'s running statistics cannot be re-estimated from batches; None when they can.

    Recalibration runs the layer in training mode and reads its input, so it needs a layer that
    normalizes with batch statistics in training and keeps running statistics for eval.
    """
    if is_frozen_batch_norm(module):
        return "frozen BatchNorm never uses batch statistics (convert it back to re-estimate)"
    if not is_batch_norm(module):
        return f"{type(module).__name__} keeps no population statistics"
    if not has_running_stats(module) or not getattr(module, "track_running_stats", True):
        return "it keeps no running statistics (track_running_stats=False)"
    return None
