"""Batch orders for :attr:`normkit.lab.experiment.Setup.batch_order`: non-i.i.d. batches of label
pairs (Ioffe 2017, §4.3), for training and, laid out the same way, for measuring on the test set.
"""

from __future__ import annotations

import torch

from normkit.errors import ConfigError


def _classes(labels: torch.Tensor) -> list[torch.Tensor]:
    members = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    usable = [m for m in members if len(m) >= 2]
    if not usable:
        raise ConfigError("non-i.i.d. pairs need a class with at least two examples")
    return usable


class PairedBatches:
    """Non-i.i.d. batches (Ioffe 2017, §4.3): ``batch_size / 2`` labels drawn with replacement, two
    different examples of each; the first images of all pairs come first, then the second ones, so
    each half of a batch holds one image of every pair. A runner ``Setup.batch_order``."""

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int):
        if batch_size % 2:
            raise ConfigError(f"a batch of pairs needs an even batch size, got {batch_size}")
        self.members = _classes(labels)
        self.pairs = batch_size // 2
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        g = self.generator
        chosen = torch.randint(len(self.members), (self.pairs,), generator=g).tolist()
        first, second = [], []
        for c in chosen:
            members = self.members[c]
            i = int(torch.randint(len(members), (1,), generator=g))
            j = (i + 1 + int(torch.randint(len(members) - 1, (1,), generator=g))) % len(members)
            first.append(members[i])
            second.append(members[j])
        return torch.stack(first + second)

    def state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def paired_test_order(labels: torch.Tensor, pairs_per_batch: int, seed: int) -> torch.Tensor:
    """The test set arranged as consecutive non-i.i.d. batches of ``pairs_per_batch`` pairs (each
    pair two examples of one label, laid out as :class:`PairedBatches` does); every example is used
    at most once. Seeded, so every arm is measured on the same batches."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for members in _classes(labels):
        shuffled = members[torch.randperm(len(members), generator=g)]
        pairs += shuffled[: len(shuffled) // 2 * 2].view(-1, 2).unbind()
    order = torch.randperm(len(pairs), generator=g).tolist()
    batches = []
    for start in range(0, len(order) - pairs_per_batch + 1, pairs_per_batch):
        chosen = [pairs[k] for k in order[start : start + pairs_per_batch]]
        batches.append(torch.stack([p[0] for p in chosen] + [p[1] for p in chosen]))
    return torch.cat(batches)
