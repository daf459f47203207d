"""Per-channel sums of a BatchNorm-style backward, from ATen's fused kernels.

The layers whose statistics come from more than the batch (MABN's moving averages, Cross-Iteration
BN's pooled window) normalize with *given* per-channel statistics, y = w * (x - mean) / sqrt(var +
eps) + b, but differentiate through them by their own rules. Their backward passes need the same
per-channel reductions as BatchNorm's, which ATen's eval-mode batch-norm backward computes in one
fused pass over dy and x (both memory formats, float32 accumulation for half inputs):

    sum_dy        = sum_{n,spatial} dL/dy
    sum_dy_xhat   = sum_{n,spatial} dL/dy * (x - mean) / sqrt(var + eps)

and its input gradient ``dL/dy * w / sqrt(var + eps)`` (one pass), to which the layers add their
own per-channel terms.
"""

from __future__ import annotations

import torch


def gradient_sums(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_dy, sum_dy_xhat)`` per channel (float32 for half inputs): one fused pass."""
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, torch.ones_like(mean), mean, var, None, None, False, eps, [False, True, True]
    )
    return sum_dy, sum_dy_xhat


def scaled_gradient(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, var: torch.Tensor, eps: float
) -> torch.Tensor:
    """``dy * scale / sqrt(var + eps)`` per channel, in dy's dtype and memory format: one pass."""
    dx, _, _ = torch.ops.aten.native_batch_norm_backward(
        dy, x, scale, torch.zeros_like(var), var, None, None, False, eps, [True, False, False]
    )
    return dx
