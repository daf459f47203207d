"""Moments over given dims: where normkit's own code computes a mean and a variance.

Every normalizer is a choice of dims on this function (DESIGN.md, "The one idea underneath"):
BatchNorm reduces over (N, *spatial) per channel, LayerNorm over the trailing dims per sample,
InstanceNorm over *spatial per sample and channel, GroupNorm over (C/G, *spatial) per group. The
``reference`` backend and the tools use it. The other places statistics are computed, and why each
exists:

- the ``native`` backend: ATen's kernels (``torch.batch_norm`` and friends;
  ``_given_statistics.batch_norm_statistics`` for the layers that need BN's statistics before
  normalizing) — PyTorch's speed and cuDNN;
- ``_instance_stats``: per-(sample, channel) moments and their merges, from which Ghost BN,
  Batch-Instance and Switchable build BN's and LN's statistics in O(N*C) instead of a pass each;
- ``_masked.masked_moments``: moments over the real elements of a padded batch;
- the ``compiled`` maths (``_batch_norm_act``, ``_batch_layer_norm``): ``torch.var_mean`` inside a
  graph torch.compile fuses;
- ``normkit.kernels``: the Triton kernels' own reductions (Welford and Chan merges per tile);
- ``normkit.distributed._moments``: the exact merge of every rank's (count, mean, M2);
- ``normkit.reference``: the float64 NumPy oracle the tests hold all of the above to.

Numerical care, in one place:

- float16 and bfloat16 inputs are accumulated in float32 (:func:`stats_dtype`); float32 and float64
  keep their own precision, and ATen's CPU reduction accumulates float32 in double.
- The variance is a centred second moment: ``torch.var_mean`` runs Welford's update and merges
  partial results with Chan et al.'s formula, accumulating float32 in double on the CPU. Never
  E[x^2] - E[x]^2, which in float32 loses every digit when |mean| / std is about 1e3 or more.
- The returned variance is the biased one (divide by the count), which is what training normalizes
  with (Ioffe & Szegedy 2015, Algorithm 1); :func:`unbiased` applies m / (m - 1) for running averages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_HALF = (torch.float16, torch.bfloat16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed and kept in: float32 for half types, else the input's."""
    return torch.float32 if dtype in _HALF else dtype


def moments(
    x: torch.Tensor, dims: Sequence[int], *, keepdim: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` over ``dims``, in :func:`stats_dtype` of ``x``.

    Args:
        x: any floating-point tensor.
        dims: the dims that share statistics (all other dims index separate statistics).
        keepdim: keep the reduced dims as size 1 so the results broadcast against ``x``.

    Returns:
        ``(mean, var)``, both in float32 for float16/bfloat16 inputs.
    """
    x = x.to(stats_dtype(x.dtype))
    var, mean = torch.var_mean(x, dim=tuple(dims), correction=0, keepdim=keepdim)
    return mean, var


def count(shape: Sequence[int], dims: Sequence[int]) -> int:
    """How many elements share one statistic when reducing ``shape`` over ``dims``."""
    return math.prod(shape[d] for d in dims)


def unbiased(var: torch.Tensor, n: int) -> torch.Tensor:
    """Bessel's correction n / (n - 1) of a biased variance over ``n`` elements (n > 1)."""
    return var * (n / (n - 1))
