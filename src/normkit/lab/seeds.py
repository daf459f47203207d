"""Seeds and batch orders: every trial's randomness comes from its own seed, whatever process runs it.

A trial seeded ``s`` draws its initial weights from ``derived_seed(s, 0)``, its batch order from
``derived_seed(s, 1)`` and dropout (torch's global generator) from ``derived_seed(s, 2)``, so a
trial computes the same numbers in the parent, in a worker process or on a Dask worker; arms that
share ``s`` see the same batches (they are paired by seed).
"""

from __future__ import annotations

import numpy as np
import torch

from normkit.errors import ConfigError

WEIGHTS, BATCHES, GLOBAL = 0, 1, 2  # the streams of derived_seed(trial_seed, stream)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, for independent streams (weights, batches, dropout)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)


class BatchOrder:
    """Mini-batches drawn without replacement from a seeded permutation; a new one every epoch
    (the last incomplete batch of an epoch is dropped, so every step sees ``batch_size`` examples)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if batch_size > size:
            raise ConfigError(f"batch_size={batch_size} exceeds the {size} training examples")
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(size, generator=self.generator)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator)
            self.cursor = 0
        batch = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "cursor": self.cursor}

    def load(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.cursor = state["order"], state["cursor"]
