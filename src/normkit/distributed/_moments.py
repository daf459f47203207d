"""Exact global moments from per-rank (count, mean, M2): Chan et al.'s parallel merge.

Each rank reduces its own part of the batch with normkit's moments core (:func:`normkit.functional.
moments`: Welford within a rank, float32 accumulation for half inputs) and contributes, per channel,

    n_k = values per channel on rank k,   mean_k,   M2_k = sum over rank k of (x - mean_k)^2.

The merge is centred, so no digit is lost to E[x^2] - E[x]^2 even when |mean| >> std:

    n    = sum_k n_k
    mean = sum_k n_k mean_k / n
    M2   = sum_k M2_k + sum_k n_k (mean_k - mean)^2

This is Chan, Golub & LeVeque (1979), eq. 2.1, applied to all ranks at once: folding the ranks in
pairwise with ``M2 = M2_a + M2_b + delta^2 n_a n_b / (n_a + n_b)`` gives the same total, because
both equal the within-rank plus the between-rank sum of squares (:func:`normkit.reference.
chan_merge` is the pairwise form, as in the paper). A rank with no values has n_k = 0 and
mean_k = M2_k = 0, so it drops out of every sum by arithmetic, without a mask and without a host
synchronisation; if every rank is empty, n = 0 and the mean is 0/0 = NaN, which the running-statistics
guard keeps out of the buffers.
"""

from __future__ import annotations

import torch

from normkit.functional._batch_norm import batch_dims
from normkit.functional._moments import moments, stats_dtype


def local_moments(input: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """This rank's ``(n, mean, M2)`` per channel of an (N, C, *) input, in its stats dtype.

    ``n`` is a Python int (known from the shape); an empty input gives zeros for mean and M2.
    """
    channels = input.shape[1]
    n = input.numel() // channels if channels else 0
    if n == 0:
        zeros = torch.zeros(channels, dtype=stats_dtype(input.dtype), device=input.device)
        return 0, zeros, zeros.clone()
    mean, var = moments(input, batch_dims(input.dim()), keepdim=False)  # (C,), (C,) biased
    return n, mean, var * n


def merge_moments(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge K partial moments into the moments of their union (module docstring).

    Args:
        counts: (K,) values per channel in each part (zero for an empty part).
        means: (K, C) each part's mean (zero for an empty part).
        m2s: (K, C) each part's centred sum of squares M2 (zero for an empty part).

    Returns:
        ``(n, mean, var)``: the total count (a 0-d tensor), the mean and the *biased* variance
        M2 / n of the union, per channel, in the dtype of the inputs.
    """
    weights = counts.unsqueeze(1)  # (K, 1)
    n = counts.sum()
    mean = (weights * means).sum(0) / n  # (C,)
    m2 = m2s.sum(0) + (weights * (means - mean).square()).sum(0)  # within + between ranks
    return n, mean, m2 / n
