"""Which normkit layer a parameter or buffer belongs to: a mark that travels with the tensor.

Converters that replace a layer by another class (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
and its copies in other libraries) move the old layer's tensors into the new one: ``weight``,
``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``. normkit's layers mark those
tensors with their class name, so a tool can tell, afterwards, that a torch layer stands where a
normkit layer was (``normkit.tools.doctor``'s ``converted-to-torch-sync`` check). normkit's own
conversions (``normkit.distributed.to_sync_batch_norm``, ``to_batch_norm``) pass the mark to the new
owner, or remove it when that is a torch layer.

The mark is a plain attribute on the tensor objects. It survives ``load_state_dict`` (values are
copied in place), a move to another device or dtype (the layers mark their new buffers), pickling
and ``copy.deepcopy`` of buffers; ``deepcopy`` of a Parameter drops it (torch copies its data only),
and a tensor rebuilt from values (a ``state_dict`` loaded into a new layer) never had it.
"""

from __future__ import annotations

from torch import nn

ORIGIN_ATTRIBUTE = "_normkit_layer"
MARKED = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def mark_origin(module: nn.Module) -> None:
    """Write ``module``'s class name on the tensors a converter would carry over."""
    name = type(module).__name__
    for attribute in MARKED:
        tensor = getattr(module, attribute, None)
        if tensor is not None:
            setattr(tensor, ORIGIN_ATTRIBUTE, name)


def marked_origin(module: nn.Module) -> str | None:
    """The normkit class named on ``module``'s tensors (the first one found), or None."""
    for attribute in MARKED:
        name = getattr(getattr(module, attribute, None), ORIGIN_ATTRIBUTE, None)
        if isinstance(name, str):
            return name
    return None


def forget_origin(module: nn.Module) -> None:
    """Remove the mark from ``module``'s tensors (they now belong to a layer that is not normkit's)."""
    for attribute in MARKED:
        tensor = getattr(module, attribute, None)
        if tensor is not None and hasattr(tensor, ORIGIN_ATTRIBUTE):
            delattr(tensor, ORIGIN_ATTRIBUTE)
