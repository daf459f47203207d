"""Undo and prevent running-statistics updates, for any model (torch.nn's layers and normkit's).

Normalization layers update their running statistics as a side effect of every training-mode forward,
with no way back. Two tools give the way back:

- :func:`snapshot_running_stats` copies the buffers of every normalization layer; ``restore()`` puts
  them back. Take one before a step that may be thrown away (a GradScaler step that found Inf
  gradients, a second forward for sharpness-aware minimization, a recomputation under activation
  checkpointing), and restore it if the step is discarded.
- :func:`frozen_running_stats` is a block in which layers still normalize with batch statistics
  (training behaviour) but whose updates are all undone when the block ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


def _is_stateful_norm(module: nn.Module) -> bool:
    return isinstance(module, _NormBase) or getattr(module, "running_mean", None) is not None


@dataclass
class RunningStatsSnapshot:
    """Copies of the buffers of every normalization layer of a model, taken at one moment."""

    saved: list[tuple[nn.Module, dict[str, torch.Tensor]]] = field(default_factory=list)

    def restore(self) -> None:
        """Write the copies back into the layers' buffers, in place."""
        with torch.no_grad():
            for module, buffers in self.saved:
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)

    def __len__(self) -> int:
        """How many layers the snapshot covers."""
        return len(self.saved)


def snapshot_running_stats(model: nn.Module) -> RunningStatsSnapshot:
    """Copy the buffers (running mean/var, counters) of every normalization layer in ``model``.

    Example::

        snapshot = nk.snapshot_running_stats(model)
        scaler.scale(loss).backward(); scaler.step(optimizer)
        if scaler.get_scale() < scale_before:  # the step was skipped: undo BN's update too
            snapshot.restore()
    """
    saved = []
    for module in model.modules():
        if _is_stateful_norm(module):
            buffers = {
                name: buffer.detach().clone()
                for name, buffer in module.named_buffers(recurse=False)
                if buffer is not None
            }
            if buffers:
                saved.append((module, buffers))
    return RunningStatsSnapshot(saved)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[RunningStatsSnapshot]:
    """Within the block, forwards change no running statistics (they are restored at its end).

    Layers keep their mode: in training mode they still normalize with the batch's statistics.
    """
    snapshot = snapshot_running_stats(model)
    try:
        yield snapshot
    finally:
        snapshot.restore()
