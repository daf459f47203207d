"""nk.accumulate with SyncBatchNorm across two gloo ranks: after k micro-batches of uneven sizes on
each rank, every rank's running statistics equal one training pass of BatchNorm over all ranks'
micro-batches concatenated, in float64 (each micro-batch weighed by its global count)."""

from __future__ import annotations

import torch
from test_sync_batch_norm import run_ranks

import normkit as nk
from helpers import assert_close

SIZES = {0: [3, 2, 4], 1: [1, 5, 2]}  # per rank, per micro-batch: global 4, 7, 6
STEPS = 2


def _data(step: int, rank: int, micro: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    n = SIZES[rank][micro]
    return torch.randn(n, 4, 3, 3, generator=generator, dtype=torch.float64) * (2 + micro) + micro


def _scenario_accumulate(rank, world, store, device):
    torch.manual_seed(0)
    layer = nk.SyncBatchNorm(4, momentum=0.3).double()
    for step in range(STEPS):
        with nk.accumulate(layer, micro_batches=3):
            for micro in range(3):
                x = _data(step, rank, micro).requires_grad_()
                layer(x).square().sum().backward()
    return {key: value.clone() for key, value in layer.state_dict().items()}


def test_sync_batch_norm_accumulates_across_ranks(tmp_path):
    ranks = run_ranks(2, _scenario_accumulate, tmp_path)
    single = torch.nn.BatchNorm2d(4, momentum=0.3).double()
    for step in range(STEPS):
        batch = torch.cat([_data(step, rank, micro) for rank in (0, 1) for micro in range(3)])
        single(batch)
    for rank, state in enumerate(ranks):
        for key in ("running_mean", "running_var"):
            assert_close(state[key], getattr(single, key), torch.float64, f"rank {rank} {key}")
        assert int(state["num_batches_tracked"]) == STEPS
    assert torch.equal(ranks[0]["running_var"], ranks[1]["running_var"])  # bit-identical
