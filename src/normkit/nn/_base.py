"""What every normkit layer shares: compatibility with the installed torch, and named errors.

normkit's drop-ins subclass their ``torch.nn`` namesakes, so parameters, buffers, ``state_dict`` keys,
``reset_parameters``, state-dict version migration and ``isinstance`` checks in other libraries are
torch's own; normkit overrides ``__init__`` (checks and extra options) and ``forward`` (the functional
op). This module holds the small pieces that make that work across torch versions.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from normkit.errors import NormkitError, ShapeError
from normkit.functional._checks import check_eps, check_policy, check_positive_int, shape_str
from normkit.functional._running_stats import momentum_argument


def _accepts_bias(cls: type) -> bool:
    return "bias" in inspect.signature(cls.__init__).parameters


# torch added `bias=` to the BatchNorm/InstanceNorm/GroupNorm constructors after 2.3; normkit
# accepts it everywhere and applies it itself where the installed torch does not.
NORM_BASE_HAS_BIAS = _accepts_bias(nn.modules.batchnorm._NormBase)
GROUP_NORM_HAS_BIAS = _accepts_bias(nn.GroupNorm)


def bias_kwargs(has_bias: bool, bias: bool) -> dict:
    """The ``bias=`` keyword for the parent constructor, when the installed torch takes one."""
    return {"bias": bias} if has_bias else {}


def drop_bias_if_unsupported(module: nn.Module, has_bias: bool, bias: bool) -> None:
    """Emulate ``bias=False`` on a torch whose constructor lacks it (the key then disappears)."""
    if not has_bias and not bias and getattr(module, "bias", None) is not None:
        module.register_parameter("bias", None)


def norm_base_arguments(
    num_features,
    eps,
    momentum,
    affine,
    track_running_stats,
    device,
    dtype,
    bias,
    decay,
    on_nonfinite,
) -> tuple[tuple, dict]:
    """Check a BatchNorm/InstanceNorm constructor's arguments; return those for torch's ``_NormBase``.

    ``momentum`` comes back in PyTorch's convention whether it was given as ``momentum`` or ``decay``.
    """
    check_positive_int(num_features, "num_features")
    check_eps(eps)
    check_policy(on_nonfinite)
    momentum = momentum_argument(momentum, decay)
    args = (num_features, eps, momentum, affine, track_running_stats, device, dtype)
    return args, bias_kwargs(NORM_BASE_HAS_BIAS, bias)


def finish_norm_base(module: nn.Module, bias: bool, on_nonfinite: str, device=None) -> None:
    """What normkit adds after torch's ``_NormBase.__init__``: ``bias=False`` on old torch, the
    non-finite policy, and ``num_batches_skipped`` (batches whose non-finite statistics the guard
    kept out; not persistent, so ``state_dict`` keys stay exactly torch's)."""
    drop_bias_if_unsupported(module, NORM_BASE_HAS_BIAS, bias)
    module.on_nonfinite = on_nonfinite
    tracking = module.track_running_stats
    counter = torch.zeros((), dtype=torch.long, device=device) if tracking else None
    module.register_buffer("num_batches_skipped", counter, persistent=False)


def statistics_arguments(module: nn.Module) -> tuple:
    """``(running_mean, running_var, use_batch_statistics, counters)`` for a batch-statistics layer's
    functional op, with torch.nn's rules: batch statistics in training, and in eval when there are
    no running ones; the running statistics (and ``num_batches_tracked``/``num_batches_skipped`` in
    ``counters``, with ``on_nonfinite``) updated only in training with ``track_running_stats``."""
    training = module.training
    running_mean, running_var = module.running_mean, module.running_var
    update = training and module.track_running_stats
    if training and not update:
        running_mean = running_var = None
    counters = {
        "num_batches_tracked": module.num_batches_tracked if update else None,
        "num_batches_skipped": module.num_batches_skipped if update else None,
        "on_nonfinite": module.on_nonfinite,
    }
    return running_mean, running_var, training or running_mean is None, counters


def named(module: nn.Module, error: NormkitError) -> NormkitError:
    """The same error, its message prefixed with the layer that raised it."""
    return type(error)(f"{module._get_name()}({module.extra_repr()}): {error}")


def check_rank(
    module: nn.Module, input: torch.Tensor, ranks: tuple[int, ...], layout: str, hint: str
) -> None:
    """Raise a ShapeError naming the layer, the expected layout and the fix for a wrong rank."""
    if input.dim() not in ranks:
        expected = " or ".join(f"{r}-D" for r in ranks)
        raise named(
            module,
            ShapeError(
                f"expected a {expected} input {layout}, got a {input.dim()}-D input of shape "
                f"{shape_str(input.shape)}; {hint}"
            ),
        )
