"""SyncBatchNorm on GPUs: NCCL across two or more GPUs, and CUDA tensors over gloo on one GPU.

Skipped where there is no GPU (the CPU suite covers the same maths over gloo). On a machine with
GPUs, run ``pytest tests/distributed/test_sync_batch_norm_gpu.py``:

- two or more GPUs: NCCL, one GPU per rank, against single-process BN (outputs, input and
  parameter gradients, running statistics, collective counts), DDP, and no host synchronisation
  after a layer's first step: ``torch.cuda.set_sync_debug_mode("error")`` turns any ``.item()``,
  ``.cpu()`` or blocking copy into an error;
- one GPU: two ranks share it over gloo (NCCL refuses two ranks on one device), which runs the
  CUDA code path (pinned header copy, device-side merge) with the same checks but the sync one
  (gloo copies CUDA tensors to the host itself).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_sync_batch_norm import (
    Case,
    CollectiveCounter,
    _check_ddp,
    _ddp_steps,
    check_case,
    gather_name,
    run_ranks,
    run_sync_case,
)

import normkit as nk

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NCCL = GPUS >= 2 and dist.is_available() and dist.is_nccl_available()

GPU_CASES = [
    Case("gpu_uneven", (3, 5)),
    Case("gpu_empty_rank", (0, 6)),
    Case("gpu_channels_last", (2, 3), channels_last=True),
    Case("gpu_float64", (4, 1), dtype=torch.float64),
    Case("gpu_bfloat16", (3, 5), dtype=torch.bfloat16),
    Case("gpu_momentum_none", (4, 4), kwargs={"momentum": None}, steps=3),
]


def _no_host_sync_after_first_step(device) -> int:
    """Steps 2..4 of a layer (after its first, verified step) under the CUDA sync checker."""
    layer = nk.SyncBatchNorm(8).to(device)
    x = torch.randn(4, 8, 6, 6, device=device)
    for step in range(4):
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            leaf = x.clone().requires_grad_(True)
            layer(leaf).backward(torch.ones_like(x))
        finally:
            if step == 3:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return int(layer.num_batches_tracked)


def _scenario_gpu(rank, world, store, device):
    counter = CollectiveCounter()
    result = {case.name: run_sync_case(case, rank, counter, device=device) for case in GPU_CASES}
    result["ddp"] = _ddp_steps(rank, counter, device)
    if dist.get_backend() == "nccl":
        result["steps_without_sync"] = _no_host_sync_after_first_step(device)
    return result


@pytest.mark.skipif(not NCCL, reason="needs two or more GPUs and NCCL")
def test_nccl_across_gpus(tmp_path):
    ranks = run_ranks(2, _scenario_gpu, tmp_path, backend="nccl", device="cuda")
    for case in GPU_CASES:
        check_case(case, [r[case.name] for r in ranks], gather_name("nccl"))
    _check_ddp([r["ddp"] for r in ranks], gather_name("nccl"))
    assert all(r["steps_without_sync"] == 4 for r in ranks)


@pytest.mark.skipif(GPUS == 0, reason="needs a GPU")
def test_cuda_tensors_over_gloo_on_one_gpu(tmp_path):
    ranks = run_ranks(2, _scenario_gpu, tmp_path, backend="gloo", device="cuda")
    for case in GPU_CASES:
        check_case(case, [r[case.name] for r in ranks], gather_name("gloo"))
    _check_ddp([r["ddp"] for r in ranks], gather_name("gloo"))
