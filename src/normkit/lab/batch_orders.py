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
    each half of a batch holds one image of every pair. A runner ``Setup.batch_order``.

    ``classes_per_batch`` k: each batch first draws k distinct classes and its labels only from
    them, so that a batch is non-i.i.d. even when the data set has few classes (the paper's 16
    labels of 1,000 classes; with 10 classes, 16 labels drawn from all of them cover about 8)."""

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int,
                 classes_per_batch: int | None = None):  # fmt: skip
        if batch_size % 2:
            raise ConfigError(f"a batch of pairs needs an even batch size, got {batch_size}")
        if classes_per_batch is not None and classes_per_batch < 1:
            raise ConfigError(f"classes_per_batch={classes_per_batch} must be >= 1")
        self.members = _classes(labels)
        self.pairs, self.classes_per_batch = batch_size // 2, classes_per_batch
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        g, k = self.generator, self.classes_per_batch
        if k is None:
            chosen = torch.randint(len(self.members), (self.pairs,), generator=g).tolist()
        else:
            pool = torch.randperm(len(self.members), generator=g)[:k]
            chosen = pool[torch.randint(len(pool), (self.pairs,), generator=g)].tolist()
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


def paired_test_order(labels: torch.Tensor, pairs_per_batch: int, seed: int,
                      classes_per_batch: int | None = None) -> torch.Tensor:  # fmt: skip
    """The test set arranged as consecutive non-i.i.d. batches of ``pairs_per_batch`` pairs (each
    pair two examples of one label, laid out as :class:`PairedBatches` does, with at most
    ``classes_per_batch`` classes in a batch); every example is used at most once. Seeded, so every
    arm is measured on the same batches."""
    g = torch.Generator().manual_seed(seed)
    pools = []
    for members in _classes(labels):
        shuffled = members[torch.randperm(len(members), generator=g)]
        pools.append(list(shuffled[: len(shuffled) // 2 * 2].view(-1, 2).unbind()))
    if classes_per_batch is not None:
        return _grouped_test_order(pools, pairs_per_batch, classes_per_batch, g)
    pairs = [pair for pool in pools for pair in pool]
    order = torch.randperm(len(pairs), generator=g).tolist()
    batches = []
    for start in range(0, len(order) - pairs_per_batch + 1, pairs_per_batch):
        chosen = [pairs[k] for k in order[start : start + pairs_per_batch]]
        batches.append(torch.stack([p[0] for p in chosen] + [p[1] for p in chosen]))
    return torch.cat(batches)


def _grouped_test_order(pools: list[list], pairs_per_batch: int, k: int, g: torch.Generator):
    """Batches of pairs drawn from k classes with pairs left (fewer when fewer are left), until no
    full batch can be made."""
    batches = []
    while True:
        live = [c for c, pool in enumerate(pools) if pool]
        chosen = [live[i] for i in torch.randperm(len(live), generator=g)[:k].tolist()]
        if sum(len(pools[c]) for c in chosen) < pairs_per_batch:
            break
        taken = []
        while len(taken) < pairs_per_batch:
            options = [c for c in chosen if pools[c]]
            taken.append(pools[options[int(torch.randint(len(options), (1,), generator=g))]].pop())
        batches.append(torch.stack([p[0] for p in taken] + [p[1] for p in taken]))
    if not batches:
        raise ConfigError(f"too few test pairs for one batch of {pairs_per_batch} from {k} classes")
    return torch.cat(batches)
