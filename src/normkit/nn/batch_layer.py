"""Batch Layer Normalization: BatchNorm and LayerNorm weighted by the inverse batch size."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _NormBase

from normkit.errors import ConfigError, NormkitError
from normkit.functional._batch_layer import batch_layer_norm, mixing_weights
from normkit.functional._checks import check_positive_int
from normkit.nn._base import (
    finish_norm_base,
    named,
    norm_base_arguments,
    statistics_arguments,
)


class BatchLayerNorm(_NormBase):
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
        self,
        num_features: int,
        eps: float = 1e-3,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        batch_size: int | None = None,
        divide_by_sqrt_features: bool = True,
        bias: bool = True,
        decay: float | None = None,
        on_nonfinite: str = "skip",
    ) -> None:
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size")
        args, kwargs = norm_base_arguments(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias,
            decay,
            on_nonfinite,
        )
        super().__init__(*args, **kwargs)
        finish_norm_base(self, bias, on_nonfinite, device)
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

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass  # any (N, C, *): checked by the functional op

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        running_mean, running_var, batch_statistics, counters = statistics_arguments(self)
        try:
            return batch_layer_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                batch_statistics,
                self.momentum,
                self.eps,
                self.batch_size,
                self.divide_by_sqrt_features,
                **counters,
            )
        except NormkitError as error:
            raise named(self, error) from None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, batch_size={self.batch_size}, "
            f"divide_by_sqrt_features={self.divide_by_sqrt_features}"
        )
