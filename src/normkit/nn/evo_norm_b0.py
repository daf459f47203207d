"""``EvoNormB0``: the batch-dependent EvoNorm normalization-activation layer."""

from __future__ import annotations

import torch
from torch import nn

from normkit.errors import NormkitError
from normkit.functional import evo_norm_b0
from normkit.functional._transforms import VMAP_RUNNING_STATISTICS, batched
from normkit.nn._base import NormBase, named


class EvoNormB0(NormBase):
    r"""EvoNorm-B0 (Liu et al. 2020): normalization and activation in one, with batch statistics.

    Paper: https://arxiv.org/abs/2004.02967 (EvoNorm-B0, Figure 1 and Table 1), found by searching
    over computation graphs of normalization and activation together:

    .. math::
        y = \frac{x}{\max\!\left(\sqrt{s^2_{n,spatial}(x) + \epsilon},\
            v x + \sqrt{s^2_{spatial}(x) + \epsilon}\right)} \gamma + \beta

    s²_{n,spatial} is the batch's biased variance per channel (BatchNorm's; in eval the running
    one), s²_{spatial} each sample's own per channel; v, γ, β per channel. No mean is subtracted
    and no separate activation follows: the max is the non-linearity. It replaces BN-ReLU; the
    paper reports it ahead of BN-ReLU on most of the ImageNet classifiers it evaluates (its Tables
    2-3, with the per-model numbers).

    Numerically equal to timm's ``EvoNorm2dB0`` with the same eps and momentum (timm's default eps
    is 1e-3, normkit's BatchNorm's 1e-5), with timm's ``state_dict`` keys (``weight``, ``bias``,
    ``v``, ``running_var``) plus ``num_batches_tracked``: there is no ``running_mean``, since the
    layer uses none. A timm checkpoint loads (the missing counter starts at 0).

    Running statistics follow BatchNorm's conventions (the momentum is PyTorch's; ``momentum=None``
    is the cumulative average; the variance unbiased; a non-finite batch never enters them,
    ``on_nonfinite``), and ``track_running_stats=False`` uses the batch variance in eval too.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, decay,
        on_nonfinite: as :class:`normkit.BatchNorm`.

    Shape:
        Input: (N, C, \*) with at least one spatial dim; output: the same shape, dtype and memory
        format.

    Example::

        >>> import torch, normkit as nk
        >>> layer = nk.EvoNormB0(8)
        >>> y = layer(torch.randn(4, 8, 5, 5))
        >>> sorted(layer.state_dict())
        ['bias', 'num_batches_tracked', 'running_var', 'v', 'weight']
    """

    _layout = "(N, C, *spatial)"

    def _init_parameters(self, factory: dict) -> None:
        self.v = nn.Parameter(torch.ones(self.num_features, **factory))
        self.register_buffer("running_mean", None)  # EvoNorm-B0 tracks the variance only

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "v", None) is not None:
            nn.init.ones_(self.v)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()
            if getattr(self, "num_batches_skipped", None) is not None:
                self.num_batches_skipped.zero_()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        update = self.training and self.track_running_stats
        if update and batched(input):
            raise named(self, VMAP_RUNNING_STATISTICS.error())
        running_var = None if self.training and not update else self.running_var
        try:
            return evo_norm_b0(
                input, self.v, running_var, self.weight, self.bias,
                self.training or running_var is None, self.momentum, self.eps,
                num_batches_tracked=self.num_batches_tracked if update else None,
                num_batches_skipped=self.num_batches_skipped if update else None,
                on_nonfinite=self.on_nonfinite,
            )  # fmt: skip
        except NormkitError as error:
            raise named(self, error) from None
