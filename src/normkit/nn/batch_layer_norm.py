"""Batch Layer Normalization: BatchNorm and LayerNorm weighted by the inverse batch size."""

from __future__ import annotations

import torch

from normkit.errors import ConfigError
from normkit.functional import batch_layer_norm
from normkit.functional._batch_layer_norm import mixing_weights
from normkit.functional._checks import check_positive_int
from normkit.nn._base import NormBase


class BatchLayerNorm(NormBase):
    r"""Batch Layer Normalization (Ziaee & Çano 2022): BN and LN mixed by the inverse batch size.

    Paper: https://arxiv.org/abs/2209.08898; the layer follows the official code
    (A2Amir/Batch-Layer-Normalization, ``helpers/bln_layer.py``), for a mini-batch of m samples and
    d_k = C channels:

    .. math::
        y = \gamma \frac{(\tfrac{1}{m} - 10^{-4})\, \hat{x}_L
            + (1 - \tfrac{1}{m} - 10^{-4})\, \hat{x}_B}{\sqrt{d_k}} + \beta

    where :math:`\hat{x}_B` is BatchNorm's normalization (batch statistics in training, running ones
    in eval) and :math:`\hat{x}_L` LayerNorm's over the C channels of each sample and position. The
    weights are fixed: small batches lean on LN, large ones on BN (m = 25: 0.04 / 0.96).

    Decisions where the paper's code and normkit's layout differ (tested):

    - m is ``batch_size`` when given (the code takes the training batch size at construction, so
      eval does not depend on the eval batch), else the input's N, in training and eval (the
      abstract's "based on the inverse size of mini-batches").
    - BN's statistics are per channel over (N, \*spatial), BatchNorm's convention, so the buffers are
      (C,) and any spatial size works; the code (TensorFlow, channels last) reduces over the batch
      axis only, the same for (N, C) inputs, per position for maps. LN's are over the channels at
      each position, as the code's last axis.
    - ``eps`` defaults to the code's 1e-3, and the division by :math:`\sqrt{d_k}` (in the code, not
      in the abstract) is kept; ``divide_by_sqrt_features=False`` drops it.
    - The code sums each batch's statistics over an epoch and chooses, with four switches, between
      those averages and the current batch's at inference. Here the BN part keeps BatchNorm's running
      statistics (exponential average, guarded) and uses them in eval; with
      ``track_running_stats=False`` eval uses the batch's, the code's all-False setting. LN's
      statistics are always the sample's own.
    - Training on one value per channel (an (N=1, C) input), which BatchNorm refuses, is the
      code's: its batch part (x - mu_B)/sqrt(0 + eps) with mu_B = x is 0, so the output is the LN
      part plus beta, and the running statistics are not updated (one value has no variance).

    Args:
        num_features: C (the code's d_k).
        eps: added to both variances; must be > 0. Default: 1e-3.
        momentum, affine, track_running_stats, device, dtype, bias, decay, on_nonfinite: as
            :class:`BatchNorm`.
        batch_size: m in the mixing weights, or None for the input's N. Default: None.
        divide_by_sqrt_features: divide by sqrt(C), as the paper's code. Default: True.

    Shape:
        Input: (N, C, \*); output: the same shape, dtype and memory format.

    Example::

        >>> import torch, normkit as nk
        >>> bln = nk.BatchLayerNorm(16, batch_size=25)
        >>> [round(w * 4, 4) for w in bln.mixing_weights()]  # BN and LN weights, times sqrt(16)
        [0.9599, 0.0399]
        >>> bln(torch.randn(25, 16)).shape
        torch.Size([25, 16])
    """

    def __init__(
        self, num_features: int, eps: float = 1e-3, *args, batch_size: int | None = None,
        divide_by_sqrt_features: bool = True, **kwargs,
    ) -> None:  # fmt: skip
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size")
        super().__init__(num_features, eps, *args, **kwargs)
        self.batch_size = batch_size
        self.divide_by_sqrt_features = divide_by_sqrt_features

    def mixing_weights(self, batch_size: int | None = None) -> tuple[float, float]:
        """(weight of BN, weight of LN) for a batch of ``batch_size`` (default: the layer's m)."""
        m = self.batch_size or batch_size
        if m is None:
            raise ConfigError(
                "this layer takes m from each input's batch size (batch_size=None); pass the "
                "batch size to get its weights, e.g. layer.mixing_weights(25)"
            )
        return mixing_weights(m, self.num_features, self.divide_by_sqrt_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._normalize(
            batch_layer_norm,
            input,
            batch_size=self.batch_size,
            divide_by_sqrt_features=self.divide_by_sqrt_features,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, batch_size={self.batch_size}, "
            f"divide_by_sqrt_features={self.divide_by_sqrt_features}"
        )
