"""Conversions between local and synchronized batch norm, both ways, with the same state.

The converted layer *shares* the original's parameters and buffers (as
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), so an optimizer built before the
conversion keeps working and ``state_dict`` keys and values are unchanged.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

import normkit.nn as nk_nn

# Layers that *are* batch norm. Subclasses that change the maths (Batch Renorm, Ghost BN, frozen BN)
# are left alone: synchronizing them would silently turn them into plain BN.
LOCAL_BATCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nk_nn.BatchNorm,
    nk_nn.BatchNorm1d,
    nk_nn.BatchNorm2d,
    nk_nn.BatchNorm3d,
)


def to_sync_batch_norm(
    module: nn.Module, process_group=None, *, layer: type | None = None, **options
) -> nn.Module:
    """Replace each batch norm in ``module`` (recursively) by a synchronized one.

    Converts torch.nn's and normkit's ``BatchNorm``/``BatchNorm1d/2d/3d`` and
    ``torch.nn.SyncBatchNorm`` (exact types). Returns the new layer when ``module`` itself is one,
    else ``module`` with its children replaced in place.

    Args:
        module: a layer or a model.
        process_group: the group the new layers synchronize over (default: the whole world; a
            ``torch.nn.SyncBatchNorm`` keeps its own when this is ``None``).
        layer: the class to build (default :class:`normkit.SyncBatchNorm`).
        **options: extra keywords for it (``check_ranks``, ``timeout``, ``on_nonfinite``).
    """
    if layer is None:
        from normkit.distributed.sync_batch_norm import SyncBatchNorm as layer
    output = module
    if type(module) in LOCAL_BATCH_NORMS or type(module) is nn.SyncBatchNorm:
        group = process_group
        if group is None:
            group = getattr(module, "process_group", None)
        output = _rebuild(module, layer, process_group=group, **options)
        if type(module) is not nn.SyncBatchNorm:
            output._converted_from = type(module)  # what to_batch_norm gives back by default
    for name, child in module.named_children():
        new = to_sync_batch_norm(child, process_group, layer=layer, **options)
        if new is not child:
            output.add_module(name, new)
    return output


def to_batch_norm(module: nn.Module, layer: type | None = None) -> nn.Module:
    """Replace each synchronized batch norm (normkit's or ``torch.nn.SyncBatchNorm``) by a local one.

    Args:
        module: a layer or a model.
        layer: the class to build; default: the class a layer was converted from by
            :func:`to_sync_batch_norm`, else :class:`normkit.BatchNorm` (any rank, as SyncBN is).
    """
    from normkit.distributed.sync_batch_norm import SyncBatchNorm

    output = module
    if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        target = layer or getattr(module, "_converted_from", None) or nk_nn.BatchNorm
        output = _rebuild(module, target)
    for name, child in module.named_children():
        new = to_batch_norm(child, layer)
        if new is not child:
            output.add_module(name, new)
    return output


def _rebuild(source: nn.Module, cls: type, **extra) -> nn.Module:
    """A ``cls`` with ``source``'s configuration, sharing its parameters and buffers."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {
        "eps": source.eps,
        "momentum": source.momentum,
        "affine": source.affine,
        "track_running_stats": source.track_running_stats,
    }
    if "bias" in accepted:
        kwargs["bias"] = not source.affine or source.bias is not None
    if "on_nonfinite" in accepted and hasattr(source, "on_nonfinite"):
        kwargs["on_nonfinite"] = source.on_nonfinite
    kwargs.update({k: v for k, v in extra.items() if k in accepted})
    tensors = [*source.parameters(recurse=False), *source.buffers(recurse=False)]
    device = tensors[0].device if tensors else None
    target = cls(source.num_features, device=device, **kwargs)
    with torch.no_grad():
        for name in ("weight", "bias"):
            if name in target._parameters:
                setattr(target, name, getattr(source, name, None))
        for name in ("running_mean", "running_var", "num_batches_tracked", "num_batches_skipped"):
            if name in target._buffers and getattr(source, name, None) is not None:
                setattr(target, name, getattr(source, name))
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target
