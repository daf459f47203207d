"""Running statistics: how they are updated, and the guard that keeps them finite.

:func:`update_running_stats` is normkit's own update; ATen's kernels update in place for the
``native`` backend, and the layers with their own averaging rules keep theirs beside their maths
(Batch Renorm's moving deviation, ``_batch_renorm``; Ghost BN's per-virtual-batch blend,
``_ghost_batch_norm``). Every one of them runs inside :func:`guarded_update`, the one guard.

Conventions (DESIGN.md, "Conventions"):

- PyTorch's momentum: ``running = (1 - momentum) * running + momentum * batch``, default 0.1.
  Keras and Flax write the same average with ``decay = 1 - momentum`` (their "momentum" 0.99 is
  PyTorch's 0.01); :func:`momentum_from_decay` converts, and the layers take ``decay=`` directly.
- ``momentum=None`` is the cumulative average: the k-th accepted batch gets weight 1/k, so after k
  batches the running value is the plain mean of the k batch statistics.
- The running variance is unbiased, m / (m - 1) times the batch's biased variance (Ioffe & Szegedy
  2015, Algorithm 2, step 10), while training normalizes with the biased one.

The guard: a batch whose statistics are not finite (NaN/Inf, for example a float16 overflow step that
a GradScaler will skip) never reaches the running buffers. The policy is ``on_nonfinite``:

- ``"skip"`` (default): the running mean/var keep their values, ``num_batches_tracked`` does not count
  the batch and ``num_batches_skipped`` does. No host synchronisation: the choice is made on the
  device with ``torch.where``, so it is free under CUDA streams and ``torch.compile``.
- ``"warn"``: as ``"skip"``, and a ``RuntimeWarning`` (this reads the flag on the host).
- ``"raise"``: restore the buffers and raise :class:`~normkit.errors.NonFiniteStatisticsError`.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from normkit.errors import ConfigError, NonFiniteStatisticsError
from normkit.functional._checks import check_momentum, check_policy
from normkit.functional._moments import unbiased

T = TypeVar("T")


def momentum_from_decay(decay: float) -> float:
    """PyTorch momentum for a Keras/Flax decay: ``momentum = 1 - decay`` (0.99 -> 0.01)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
        raise ConfigError(f"decay must be a number in [0, 1], got {decay!r}")
    return 1.0 - float(decay)


class DefaultMomentum(float):
    """A layer's default ``momentum``: the number itself, told apart by type from the same number
    passed by the caller. So ``decay=`` replaces the default, while an explicit momentum together
    with ``decay=`` is an error whatever its value (a default of plain 0.1 could not tell
    ``BatchNorm(momentum=0.1, decay=0.9)`` from ``BatchNorm(decay=0.9)``). Shown as its number in
    signatures and reprs; the layer stores a plain float."""

    def __repr__(self) -> str:
        return float.__repr__(self)


def momentum_argument(momentum: float | None, decay: float | None) -> float | None:
    """Resolve a layer's ``momentum=`` / ``decay=`` pair into PyTorch's momentum.

    ``momentum`` is a :class:`DefaultMomentum` when the caller did not give one. A momentum above 0.5
    is almost always a Keras/Flax decay passed under PyTorch's name (the running statistics would
    then follow the last batch), so it gets a warning that names the fix.
    """
    if decay is not None:
        if not isinstance(momentum, DefaultMomentum):
            raise ConfigError(
                f"pass either momentum (PyTorch convention) or decay (Keras/Flax convention), not "
                f"both: got momentum={momentum!r} and decay={decay!r}"
            )
        return momentum_from_decay(decay)
    if isinstance(momentum, DefaultMomentum):
        return float(momentum)
    check_momentum(momentum)
    if momentum is not None and 0.5 < momentum < 1.0:
        warnings.warn(
            f"momentum={momentum} follows PyTorch's convention (the weight of each new batch), so "
            f"the running statistics will track mostly the last batch. If {momentum} is a "
            f"Keras/Flax decay, pass decay={momentum} (= momentum {1 - momentum:.3g}) instead",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    return momentum


def caller_stacklevel() -> int:
    """The ``stacklevel`` of a warning that points at the first frame outside normkit (the user's
    line that built the layer, however many constructors lie in between)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("normkit."):
        frame, level = frame.f_back, level + 1
    return level


def exponential_average_factor(
    momentum: float | None, num_batches_tracked: torch.Tensor | None
) -> float:
    """The weight of this batch: ``momentum``, or 1/k for the k-th batch when ``momentum is None``.

    The cumulative average needs the count on the host, which reads it from the device (as
    ``torch.nn`` does); an exponential average never does.
    """
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ConfigError(
            "momentum=None (cumulative average) needs num_batches_tracked to count the batches"
        )
    return 1.0 / (float(num_batches_tracked) + 1.0)


@torch.no_grad()
def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    n: int,
    momentum: float,
) -> None:
    """Blend one batch's statistics into the running buffers, in place.

    Args:
        running_mean, running_var: the buffers, one value per statistic.
        batch_mean, batch_var: the batch's mean and *biased* variance, same number of elements.
        n: how many elements each statistic was computed from (m in the paper); must be > 1.
        momentum: the weight of this batch.
    """
    mean = batch_mean.reshape(running_mean.shape).to(running_mean.dtype)
    var = unbiased(batch_var, n).reshape(running_var.shape).to(running_var.dtype)
    running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(var, alpha=momentum)


def guarded_update(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    update: Callable[[torch.Tensor, torch.Tensor], T],
    *,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
) -> T:
    """Run ``update`` and keep the running statistics it writes only if they are finite.

    ``update(mean, var)`` writes the new running statistics into the two tensors it is given, in
    place, and returns the layer's output, which is returned here. See the module docstring for the
    policies. The check reads the variance: a non-finite batch mean makes the centred variance
    non-finite too, so one reduction covers both. Cost: a copy of the per-channel buffers and a few
    per-channel ops, never a pass over the input.
    """
    check_policy(on_nonfinite)
    counters = (num_batches_tracked, num_batches_skipped)
    if running_var.device.type == "cpu" and not compiling():
        result, accepted = _guard_on_host(running_mean, running_var, update, *counters)
        if accepted:
            return result
    else:
        result, accepted = _guard_on_device(running_mean, running_var, update, *counters)
        if on_nonfinite == "skip" or bool(accepted):
            return result
    if on_nonfinite == "skip":
        return result
    message = (
        f"the batch's statistics are not finite (NaN or Inf) in one or more of the "
        f"{running_mean.numel()} channels; the running statistics were left unchanged. The input "
        "holds NaN/Inf, or float16 overflowed (a GradScaler would skip this step)"
    )
    if on_nonfinite == "raise":
        raise NonFiniteStatisticsError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return result


def _guard_on_host(running_mean, running_var, update, tracked, skipped):
    """CPU: reading a flag is free, so update the buffers directly and restore them if needed."""
    before = torch.cat((running_mean, running_var))  # one copy of both buffers
    result = update(running_mean, running_var)
    if math.isfinite(float(running_var.amax())):
        if tracked is not None:
            tracked.add_(1)
        return result, True
    # Restore through .data: autograd saved these buffers for a backward that, in training mode,
    # never reads them, and its version check must not turn a skipped step into an error.
    mean_before, var_before = before.split([running_mean.numel(), running_var.numel()])
    running_mean.data.copy_(mean_before.view_as(running_mean))
    running_var.data.copy_(var_before.view_as(running_var))
    if skipped is not None:
        skipped.add_(1)
    return result, False


def _guard_on_device(running_mean, running_var, update, tracked, skipped):
    """Accelerators and compiled graphs: update copies, then select on the device, no host sync."""
    new_mean, new_var = running_mean.clone(), running_var.clone()
    result = update(new_mean, new_var)
    with torch.no_grad():
        finite = torch.isfinite(new_var).all()
        running_mean.copy_(torch.where(finite, new_mean, running_mean))
        running_var.copy_(torch.where(finite, new_var, running_var))
        if tracked is not None:
            tracked.add_(finite)
        if skipped is not None:
            skipped.add_(~finite)
    return result, finite


def compiling() -> bool:
    """Whether torch.compile is tracing this call (False on torch versions without the query)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())
