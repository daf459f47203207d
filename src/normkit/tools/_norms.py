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

Some layers compute more than their normalization: normkit's ``BatchNormAct`` and ``InPlaceABN``
(an activation, a residual), timm's ``BatchNormAct2d``, ``SyncBatchNormAct`` and
``FrozenBatchNormAct2d`` (a drop module, then an activation module). :func:`split` takes such a layer
apart into its normalization alone and what follows it, so that a tool can replace or fold the
normalization and keep the rest (:class:`normkit.tools.NormAct`). A normalizer whose ``forward``
normkit does not know is never split or replaced: :func:`split` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

# normkit layers whose eval-mode forward is BatchNorm's (Algorithm 2) with their running statistics.
_BN_EQUIVALENT_NAMES = (
    "BatchNorm",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm",
    "SyncBatchNorm",
    "CrossIterationBatchNorm",
)
# normkit layers whose eval-mode forward is BatchNorm's with mean 0 (no running_mean): MABN.
_MEANLESS_NAMES = ("MovingAverageBatchNorm",)
# ... and normkit's batch-statistics layers that are not torch _BatchNorms (their output is not BN's).
_BATCH_STATISTICS_NAMES = (
    *_BN_EQUIVALENT_NAMES,
    *_MEANLESS_NAMES,
    "BatchNormAct",
    "InPlaceABN",
    "EvoNormB0",
)
# the batch-statistics layers built for small batches (the doctor does not warn about them)
SMALL_BATCH_NAMES = ("MovingAverageBatchNorm", "CrossIterationBatchNorm")
_NORMALIZER_TYPES = (
    _NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
# normkit layers whose forward is a normalization and nothing else.
_PLAIN_NORMKIT_NAMES = (
    *_BN_EQUIVALENT_NAMES,
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm",
    "GroupNorm",
    "LayerNorm",
    "LayerNorm2d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "BatchInstanceNorm",
    "BatchLayerNorm",
    "SwitchableNorm",
    *_MEANLESS_NAMES,
    "RMSNorm",
    "RMSNorm2d",
)
# timm's BatchNorm + activation layers: forward is act(drop(batch_norm(x))), with ``drop`` and ``act``
# child modules (timm.layers.norm_act).
_TIMM_NORM_ACT_NAMES = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")


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
    forwards.update(
        cls.forward for cls in _normkit_classes((*_BN_EQUIVALENT_NAMES, *_MEANLESS_NAMES))
    )
    return forwards


def is_meanless(module: nn.Module) -> bool:
    """MABN: BatchNorm's eval map with mean 0 and only a running variance (its second moment)."""
    return isinstance(module, tuple(_normkit_classes(_MEANLESS_NAMES)))


def is_small_batch_layer(module: nn.Module) -> bool:
    """A batch-statistics layer built for small batches (MABN, Cross-Iteration BN)."""
    return isinstance(module, tuple(_normkit_classes(SMALL_BATCH_NAMES)))


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
    """Any normalization layer: torch.nn's, normkit's, and frozen BatchNorm look-alikes.
    :class:`~normkit.tools.NormAct` is a container, not one (its ``norm`` is)."""
    from normkit.tools.norm_act import NormAct

    if isinstance(module, NormAct):
        return False
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
    statistics = (
        isinstance(getattr(module, "running_var", None), torch.Tensor)
        if is_meanless(module)
        else has_running_stats(module)
    )
    if not statistics or not getattr(module, "track_running_stats", True):
        return (
            "it keeps no running statistics (track_running_stats=False), so it normalizes with the "
            "batch's statistics in eval mode too"
        )
    return None


def eval_statistics(module: nn.Module):
    """``(mean, var, eps, gamma, beta)`` of a module for which :func:`eval_affine_obstacle` is None;
    ``gamma``/``beta`` are None when the layer has no affine parameters (mean 0 for MABN)."""
    mean = module.running_mean
    if mean is None and is_meanless(module):
        mean = torch.zeros_like(module.running_var)
    return (
        mean,
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
    if is_meanless(module):
        return (
            "MABN's running statistic is a moving average of the second moment over its own "
            "training steps, not a mean and variance that batches can re-estimate"
        )
    if not is_batch_norm(module):
        return f"{type(module).__name__} keeps no population statistics"
    if not has_running_stats(module) or not getattr(module, "track_running_stats", True):
        return "it keeps no running statistics (track_running_stats=False)"
    return None


def _plain_forwards() -> set:
    forwards = {
        _BatchNorm.forward,
        nn.SyncBatchNorm.forward,
        _InstanceNorm.forward,
        nn.GroupNorm.forward,
        nn.LayerNorm.forward,
        nn.LocalResponseNorm.forward,
    }
    forwards.update(cls.forward for cls in _normkit_classes(_PLAIN_NORMKIT_NAMES))
    return forwards


@dataclass
class Split:
    """A layer as its normalization alone and what it computes after it:
    ``act(drop(norm(x)) [+ residual])``.

    ``norm`` is the layer itself when it computes nothing else (:attr:`plain`); otherwise a new
    plain normalization layer with the layer's state (same tensors' values, mode, device and dtype).
    ``kept`` describes, for reports, what follows the normalization.
    """

    norm: nn.Module
    drop: nn.Module | None = None
    act: nn.Module | None = None
    residual: bool = False
    kept: list[str] = field(default_factory=list)

    @property
    def plain(self) -> bool:
        return self.drop is None and self.act is None and not self.residual


def _copy_own_state(source: nn.Module, target: nn.Module, **replace: torch.Tensor) -> nn.Module:
    """``target`` with ``source``'s own parameters and buffers (by name; ``replace`` overrides some),
    its requires_grad flags, mode, device and dtype."""
    tensors = [*source.parameters(recurse=False), *source.buffers(recurse=False)]
    if tensors:
        target.to(device=tensors[0].device)
        floating = [t for t in tensors if t.is_floating_point()]
        if floating:
            target.to(dtype=floating[0].dtype)
    with torch.no_grad():
        for name, value in [*source.named_parameters(recurse=False),
                            *source.named_buffers(recurse=False)]:  # fmt: skip
            mine = getattr(target, name, None)
            if not isinstance(mine, torch.Tensor):
                continue
            value = replace.get(name, value)
            mine.copy_(value.detach())
            if isinstance(mine, nn.Parameter):
                mine.requires_grad_(value.requires_grad)
    target.train(source.training)
    return target


def _normkit_plain_batch_norm(module: nn.Module, **replace) -> nn.Module:
    import normkit as nk

    new = nk.BatchNorm(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        bias=(module.bias is not None) if module.affine else True,
        on_nonfinite=getattr(module, "on_nonfinite", "skip"),
    )
    return _copy_own_state(module, new, **replace)


def _split_normkit(module: nn.Module) -> Split | None:
    import normkit as nk
    from normkit.tools.norm_act import activation_module

    cls = type(module)
    act_layer = getattr(nk, "BatchNormAct", None)
    abn = getattr(nk, "InPlaceABN", None)
    activation = getattr(module, "activation", None)
    param = getattr(module, "activation_param", 0.01)
    if act_layer is not None and cls.forward is act_layer.forward:
        split = Split(_normkit_plain_batch_norm(module), residual=module.residual)
    elif abn is not None and cls.forward is abn.forward:
        from normkit.functional._inplace_abn import effective_weight

        replace = {}
        if module.weight is not None:
            with torch.no_grad():
                replace["weight"] = effective_weight(module.weight.detach(), module.min_abs_weight)
            replace["weight"].requires_grad_(module.weight.requires_grad)
        split = Split(_normkit_plain_batch_norm(module, **replace))
        split.kept.append(
            f"weight as InPlaceABN uses it (|weight| floored at {module.min_abs_weight:g})"
        )
    else:
        return None
    if activation != "identity":
        split.act = activation_module(activation, param)
        split.kept.insert(0, f"activation {split.act!r}")
    if split.residual:
        split.kept.append("the residual input added before the activation")
    return split


def _split_timm(module: nn.Module) -> Split | None:
    cls = type(module)
    base = next(
        (
            b
            for b in cls.__mro__
            if b.__module__.startswith("timm.") and b.__name__ in _TIMM_NORM_ACT_NAMES
        ),
        None,
    )
    if base is None or cls.forward is not base.forward:
        return None
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if base.__name__ == "FrozenBatchNormAct2d":
        import normkit as nk

        norm = _copy_own_state(module, nk.FrozenBatchNorm(module.running_mean.numel(), module.eps))
    elif base.__name__ == "SyncBatchNormAct":
        norm = nn.SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, module.process_group,
        )  # fmt: skip
        norm = _copy_own_state(module, norm)
    else:
        norm = nn.BatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        norm = _copy_own_state(module, norm)
    split = Split(norm)
    if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
        split.drop = drop
        split.kept.append(f"drop {drop!r}")
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        split.act = act
        split.kept.append(f"activation {act!r}")
    return split


def split(module: nn.Module) -> Split | str:
    """``module`` as its normalization and what follows it (:class:`Split`), or why normkit cannot
    tell what it computes: a class that overrides ``forward`` with code normkit does not know may
    compute more than a normalization (an activation, a drop path), which a tool must not lose."""
    from normkit.tools.norm_act import NormAct

    if isinstance(module, NormAct):
        return f"{type(module).__name__} is a container: its 'norm' is the normalization"
    cls = type(module)
    if cls.forward in _plain_forwards():
        return Split(module)
    known = _split_normkit(module) or _split_timm(module)
    if known is not None:
        return known
    if is_frozen_batch_norm(module) and not list(module.children()):
        return Split(module)  # a look-alike (torchvision's FrozenBatchNorm2d): the affine map alone
    return (
        f"{cls.__name__} overrides forward with code normkit does not know, so what it computes "
        "besides normalizing (an activation, a drop path, ...) could not be kept; convert it with "
        "a callable that builds the whole replacement"
    )
