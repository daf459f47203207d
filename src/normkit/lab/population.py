"""BatchNorm's statistics at inference: the instruments the inference experiments share.

Used by ``population-stats``, ``train-test-gap``, ``variance-bias``, ``domain-shift`` and
``sequence-norms`` (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; Ioffe & Szegedy 2015,
Algorithm 2):

- :func:`batch_norm_layers`: the layers of a model that keep running statistics;
- :func:`error_rate`: top-1 error in whatever mode the model is in;
- :func:`training_batches` and :func:`precise`: PreciseBN (the plain average of the statistics of
  N fresh batches with frozen weights, :func:`normkit.tools.recalibrate`) on seeded batches;
- :func:`batch_statistics`: a context in which a model normalizes with batch statistics (train
  mode) and no running statistic changes;
- :class:`EmaTracker`: exponential moving averages of the statistics at other momenta, kept beside
  the layers' own from the same batches, with Adam's bias correction (Kingma & Ba 2015, §3).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit as nk
from normkit.functional import moments
from normkit.lab.evaluation import accuracy_and_loss


def batch_norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm-like layer (torch's, normkit's, Ghost BN) that keeps running statistics."""
    family = (_BatchNorm, nk.BatchRenorm, nk.GhostBatchNorm, nk.BatchNormAct, nk.InPlaceABN)
    return {path: module for path, module in model.named_modules()
            if isinstance(module, family) and module.running_mean is not None}  # fmt: skip


@torch.no_grad()
def error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Top-1 error of ``model`` on ``(x, y)`` in whatever mode the model is in."""
    accuracy, _ = accuracy_and_loss(model, x, y, chunk)
    return 1.0 - accuracy


def training_batches(x: torch.Tensor, batch_size: int, samples: int, seed: int) -> list[torch.Tensor]:
    """``ceil(samples / batch_size)`` batches of rows of ``x`` drawn without replacement from a
    seeded permutation (a new permutation when one is used up); smaller ``samples`` give a prefix."""
    generator = torch.Generator().manual_seed(seed)
    batches, order, cursor = [], torch.randperm(len(x), generator=generator), 0
    for _ in range(max(1, math.ceil(samples / batch_size))):
        if cursor + batch_size > len(x):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        batches.append(x[order[cursor : cursor + batch_size]])
        cursor += batch_size
    return batches


def precise(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` in eval mode with PreciseBN statistics from ``batches``."""
    recalibrated, _ = nk.tools.recalibrate(model, batches, num_batches=None, progress=False)
    return recalibrated.eval()


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Inside, ``model`` is in train mode (every normalizer uses the statistics of the batch it is
    given) with its running statistics frozen; afterwards every module's mode is restored."""
    modes = {m: m.training for m in model.modules()}
    try:
        with nk.frozen_running_stats(model):
            model.train()
            yield model
    finally:
        for module, training in modes.items():
            module.train(training)


class EmaTracker(nn.Module):
    """A network plus exponential moving averages of its BatchNorm statistics at ``momenta``.

    One EMA per momentum m, updated by a forward pre-hook from the training batches with the
    layer's conventions (mean and unbiased variance over N and the spatial dims, start at 0 and 1):
    ``ema ← (1 − m) ema + m batch``. The buffers are in the state dict, so a resumed run continues
    them; ``steps`` counts training forwards (one per optimizer step in the runner).

    :meth:`use` swaps EMA k into the layers. With ``corrected`` it is bias-corrected as in Adam:
    after t updates the initial value still has weight λᵗ (λ = 1 − m), so the estimate is
    ``(ema − λᵗ·initial) / (1 − λᵗ)``, a weighted average of the batch statistics alone.
    """

    def __init__(self, net: nn.Module, momenta: tuple[float, ...]):
        super().__init__()
        self.net, self.momenta = net, tuple(momenta)
        self.layers = batch_norm_layers(net)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        for k in range(len(self.momenta)):
            for path, layer in self.layers.items():
                mean, var = torch.zeros_like(layer.running_mean), torch.ones_like(layer.running_var)
                self.register_buffer(self._name(k, path, "mean"), mean)
                self.register_buffer(self._name(k, path, "var"), var)
        for path, layer in self.layers.items():
            layer.register_forward_pre_hook(self._hook(path))

    @staticmethod
    def _name(k: int, path: str, what: str) -> str:
        return f"ema{k}_{path.replace('.', '_')}_{what}"

    def _hook(self, path: str):
        def update(layer, args):
            # Only this wrapper's training forwards: a copy of the net made by a tool (PreciseBN)
            # shares the hook but runs with the wrapper in eval mode.
            if not (self.training and layer.training and self.momenta):
                return
            x = args[0].detach()
            dims = [0, *range(2, x.dim())]
            count = math.prod(x.shape[d] for d in dims)
            mean, var = moments(x, dims, keepdim=False)
            var = var * (count / (count - 1))
            with torch.no_grad():
                for k, momentum in enumerate(self.momenta):
                    for what, batch in (("mean", mean), ("var", var)):
                        running = getattr(self, self._name(k, path, what))
                        running.lerp_(batch.to(running.dtype), momentum)

        return update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.steps += 1
        return out

    def ema(self, k: int, corrected: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """EMA ``k`` per layer path: ``(mean, var)``, bias-corrected with ``corrected``."""
        weight = (1.0 - self.momenta[k]) ** int(self.steps)  # of the initial values (0, 1)
        found = {}
        for path in self.layers:
            mean, var = (getattr(self, self._name(k, path, w)) for w in ("mean", "var"))
            if corrected and weight < 1.0:
                mean, var = mean / (1.0 - weight), (var - weight) / (1.0 - weight)
            found[path] = (mean, var)
        return found

    @torch.no_grad()
    def use(self, k: int, corrected: bool = False) -> nk.RunningStatsSnapshot:
        """Copy EMA ``k`` into the layers; ``.restore()`` the returned snapshot to undo it."""
        snapshot = nk.snapshot_running_stats(self.net)
        for path, (mean, var) in self.ema(k, corrected).items():
            self.layers[path].running_mean.copy_(mean)
            self.layers[path].running_var.copy_(var)
        return snapshot
