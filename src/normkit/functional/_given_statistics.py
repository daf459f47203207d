"""BatchNorm with statistics computed outside the kernel: ATen's kernels, split at the statistics.

Several of the family's ``native`` implementations need BatchNorm's statistics *before* they
normalize — Batch Renorm (r and d correct the affine from them), Batch-Layer (the BN part mixes with
LayerNorm's) — yet want ATen's fast kernels and exact backward. These two helpers split ATen's batch
norm there: :func:`batch_norm_statistics` runs its statistics kernel, and
:func:`batch_norm_given_statistics` normalizes with statistics given beforehand, its backward ATen's
training backward (which differentiates through the statistics, Ioffe & Szegedy 2015, §3).
"""

from __future__ import annotations

import torch

from normkit.functional._moments import stats_dtype


@torch.no_grad()
def batch_norm_statistics(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance from ATen's batch-norm statistics kernel.

    In float32 for half inputs: the kernel computes in float32 and returns that precision when given
    float32 running buffers (scratch ones here, with momentum 0, so nothing is written that matters).
    """
    dtype = stats_dtype(input.dtype)
    channels = input.shape[1]
    scratch_mean = torch.zeros(channels, dtype=dtype, device=input.device)
    scratch_var = torch.ones(channels, dtype=dtype, device=input.device)
    return torch.batch_norm_update_stats(input, scratch_mean, scratch_var, 0.0)


def batch_norm_given_statistics(input, weight, bias, mean, var, eps) -> torch.Tensor:
    """BatchNorm in training with the batch's ``mean`` and biased ``var`` computed beforehand.

    Forward: ATen's inference kernel with (mean, var) as the statistics. Backward: ATen's training
    backward, which differentiates through the statistics (Ioffe & Szegedy 2015, §3). ``weight`` and
    ``bias`` are per channel (never None here) in the dtype of the statistics.
    """
    return _BatchNormGivenStatistics.apply(input, weight, bias, mean, var, eps)


class _BatchNormGivenStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):
        cudnn = torch.backends.cudnn.enabled
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, cudnn)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
        return dx, dweight, dbias, None, None, None
