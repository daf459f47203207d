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
- ``"raise"``: leave the buffers as they were and raise
  :class:`~normkit.errors.NonFiniteStatisticsError`.

The guard computes the new statistics into copies, checks them, and only then commits them to the
buffers (:func:`guarded_update`): no reader ever sees a refused value, and a forward that raises
leaves every buffer as it was.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from normkit.errors import ConfigError, NonFiniteStatisticsError
from normkit.functional._checks import check_momentum, check_policy
from normkit.functional._moments import unbiased
from normkit.functional._transforms import (
    HOST_POLICY_UNDER_CAPTURE,
    capturing,
    commit,
    compiling,
    exporting,
    increment,
)

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
) -> float | torch.Tensor:
    """The weight of this batch: ``momentum``, or 1/(k+1) for the (k+1)-th batch when ``momentum is
    None`` (the cumulative average), as a 0-dim tensor beside the counter: read on the device, so it
    needs no host synchronisation and traces into a captured graph (torch.nn reads the count on the
    host, which torch.compile cannot trace). In float64, the precision of torch.nn's Python float.
    """
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ConfigError(
            "momentum=None (cumulative average) needs num_batches_tracked to count the batches"
        )
    dtype = torch.float32 if num_batches_tracked.device.type == "mps" else torch.float64
    return (num_batches_tracked.to(dtype) + 1.0).reciprocal()


def _weight(factor: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return factor.to(like.dtype) if isinstance(factor, torch.Tensor) else factor


@torch.no_grad()
def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    n: int,
    momentum: float | torch.Tensor,
) -> None:
    """Blend one batch's statistics into the running buffers, in place.

    Args:
        running_mean, running_var: the buffers, one value per statistic.
        batch_mean, batch_var: the batch's mean and *biased* variance, same number of elements.
        n: how many elements each statistic was computed from (m in the paper); must be > 1.
        momentum: the weight of this batch (a number, or a 0-dim tensor: the cumulative average).
    """
    mean = batch_mean.reshape(running_mean.shape).to(running_mean.dtype)
    var = unbiased(batch_var, n).reshape(running_var.shape).to(running_var.dtype)
    if isinstance(momentum, torch.Tensor):
        weight = momentum.to(running_mean.dtype)
        running_mean.mul_(1.0 - weight).add_(mean * weight)
        running_var.mul_(1.0 - weight).add_(var * weight)
        return
    running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(var, alpha=momentum)


def average_into(
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float | torch.Tensor,
    kernel: Callable[[torch.Tensor, torch.Tensor, float], T],
) -> T:
    """Run ``kernel(mean, var, momentum)``, an implementation that blends a batch's statistics into
    running ones with a *number* momentum (ATen's and normkit's kernels), for any ``momentum``.

    A tensor momentum (the cumulative average's 1/(k+1), kept on the device) is applied here: the
    kernel writes the batch's statistics into zeroed scratch buffers (momentum 1), which are then
    blended into ``mean`` and ``var`` with it.
    """
    if not isinstance(momentum, torch.Tensor):
        return kernel(mean, var, momentum)
    batch_mean, batch_var = torch.zeros_like(mean), torch.zeros_like(var)
    result = kernel(batch_mean, batch_var, 1.0)
    with torch.no_grad():
        for running, batch in ((mean, batch_mean), (var, batch_var)):
            weight = _weight(momentum, running)
            running.mul_(1.0 - weight).add_(batch * weight)
    return result


def guarded_update(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    update: Callable[[torch.Tensor, torch.Tensor], T],
    *,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
    count: int = 1,
) -> T:
    """Compute the new running statistics, check them, then commit them; return the output.

    ``update(mean, var)`` writes the new running statistics into the two tensors it is given —
    fresh copies of the buffers — and returns the layer's output. The buffers and counters change
    only after it has returned, and only if the new statistics are finite: an error anywhere in
    the forward leaves the state as it was, and another thread reading the layer meanwhile (an
    evaluation thread, a logger) never sees a value that the guard would refuse. The check reads
    the variance: a non-finite batch mean makes the centred variance non-finite too, so one
    reduction covers both. ``count`` is how many batches the update holds (Ghost BN's ghost
    batches), added to ``num_batches_tracked``. See the module docstring for the policies. Cost: a
    copy of the per-channel buffers and a few per-channel ops, never a pass over the input.
    """
    check_policy(on_nonfinite)
    new_mean, new_var = running_mean.clone(), running_var.clone()
    result = update(new_mean, new_var)
    with torch.no_grad():
        finite = torch.isfinite(new_var).all()
    counters = (num_batches_tracked, num_batches_skipped, count)
    if on_nonfinite == "skip" and (running_var.device.type != "cpu" or capturing()):
        # decided on the device: no host synchronisation, and nothing a captured graph cannot hold
        _commit_on_device(running_mean, running_var, new_mean, new_var, finite, *counters)
        return result
    accepted = _read_on_host(finite, on_nonfinite)
    if accepted:
        commit(running_mean, new_mean)
        commit(running_var, new_var)
        if num_batches_tracked is not None:
            increment(num_batches_tracked, count)
        return result
    if num_batches_skipped is not None:
        increment(num_batches_skipped)
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


def _commit_on_device(
    running_mean, running_var, new_mean, new_var, finite, tracked, skipped, count=1
) -> None:
    """Commit the new statistics where ``finite`` (a 0-dim bool tensor) holds, with torch.where:
    the same decisions as on the host, without reading the flag."""
    commit(running_mean, torch.where(finite, new_mean, running_mean))
    commit(running_var, torch.where(finite, new_var, running_var))
    if tracked is not None:
        increment(tracked, finite.long() * count)
    if skipped is not None:
        increment(skipped, (~finite).long())


def _read_on_host(finite: torch.Tensor, on_nonfinite: str) -> bool:
    """The guard's flag, read on the host (free on the CPU; a synchronisation on accelerators,
    which only "warn" and "raise" ask for). A captured graph cannot read it: torch.compile breaks
    the graph here (saying why; an error with fullgraph=True), torch.export and torch.jit.trace
    refuse."""
    if on_nonfinite != "skip":
        if exporting() or torch.jit.is_tracing():
            raise HOST_POLICY_UNDER_CAPTURE.error()
        if compiling():
            torch._dynamo.graph_break(msg=HOST_POLICY_UNDER_CAPTURE.reason)
    return bool(finite)
