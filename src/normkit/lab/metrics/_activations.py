"""The distribution of layer inputs during training, as the training batches see it.

Ioffe & Szegedy 2015, Fig. 1(b, c) and Santurkar et al. 2018, Fig. 2 plot percentiles of one unit's
input over training. :class:`ActivationPercentiles` records them from the training forward passes
themselves (forward hooks), so they include what only training sees: batch statistics, dropout,
injected noise. Evaluation-mode forwards are not recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from normkit.errors import ConfigError


class ActivationPercentiles:
    """Quantiles of one channel of several modules' outputs, at every ``every``-th training forward.

    Args:
        modules: ``{name: module}``; each module's output (N, C, *) is recorded.
        channel: the channel (feature) whose values over the batch and space are summarized.
        quantiles: in [0, 1], default the 15th, 50th and 85th percentiles.
        every: record one training-mode forward in ``every`` (quantiles of a 100k-value channel
            cost about as much as a small CNN's training step).

    ``take()`` returns what was recorded since the last ``take()`` and starts counting afresh, so
    a caller that takes at known steps (the lab's evaluation steps, which are also its checkpoint
    points) can place every record on its training step, across a resume too.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        channel: int = 0,
        quantiles: Sequence[float] = (0.15, 0.5, 0.85),
        every: int = 1,
    ):
        if every < 1:
            raise ConfigError(f"ActivationPercentiles: every={every} must be >= 1")
        if not quantiles or not all(0.0 <= q <= 1.0 for q in quantiles):
            raise ConfigError(
                f"ActivationPercentiles: quantiles={tuple(quantiles)} must lie in [0, 1]"
            )
        self.channel, self.every = channel, every
        self.quantiles = torch.tensor(list(quantiles), dtype=torch.float64)
        self._calls = {name: 0 for name in modules}
        self._records: dict[str, list[list[float]]] = {name: [] for name in modules}
        self._hooks = [
            module.register_forward_hook(self._hook(name)) for name, module in modules.items()
        ]

    def _hook(self, name: str):
        def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            if not module.training:
                return
            self._calls[name] += 1
            if self._calls[name] % self.every:
                return
            if output.dim() < 2 or not 0 <= self.channel < output.shape[1]:
                raise ConfigError(
                    f"ActivationPercentiles: {name}'s output has shape {tuple(output.shape)}; "
                    f"channel={self.channel} must index its dimension 1"
                )
            values = output.detach()[:, self.channel].reshape(-1).double()
            quantiles = torch.quantile(values, self.quantiles.to(values.device))
            self._records[name].append([self._calls[name], *quantiles.tolist()])

        return record

    def take(self) -> tuple[int, dict[str, list[list[float]]]]:
        """``(calls, records)`` since the last take: how many training forwards there were, and per
        module the rows ``[k, q_1, ..., q_m]`` of the k-th of those forwards (k = 1..calls)."""
        calls = max(self._calls.values(), default=0)
        records = self._records
        self._calls = dict.fromkeys(self._calls, 0)
        self._records = {name: [] for name in records}
        return calls, records

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
