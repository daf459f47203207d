"""Switchable Normalization: learned softmax mixtures of IN, LN and BN statistics."""

from __future__ import annotations

import torch
from torch import nn

from normkit.functional import switchable_norm
from normkit.functional._switchable_norm import importance
from normkit.nn._base import NormBase


class SwitchableNorm(NormBase):
    r"""Switchable Normalization (Luo, Ren & Peng 2018): each layer learns its normalizer.

    Paper: https://arxiv.org/abs/1806.10779 (eqs. 3-4); official code switchablenorms/
    Switchable-Normalization. The mean and the variance are each a softmax-weighted mixture of the
    InstanceNorm, LayerNorm and BatchNorm statistics, with their own importance logits:

    .. math::
        y = \gamma \frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma^2_k + \epsilon}} + \beta,
        \quad w = \mathrm{softmax}(\lambda), \; w' = \mathrm{softmax}(\lambda'),
        \quad k \in (\mathrm{IN}, \mathrm{LN}, \mathrm{BN})

    IN's statistics are over the spatial dims of each (sample, channel), LN's over (C, \*spatial) of
    each sample, BN's over (N, \*spatial) of each channel — in eval mode BN's are the running ones.
    With one-hot weights the layer is IN, LN or BN (tested).

    Decisions (tested):

    - The logits are the parameters ``mean_weight`` (λ) and ``var_weight`` (λ'), shape (3,) in
      (IN, LN, BN) order, initialised to 1 (equal weights), as in the paper's code.
    - Every variance is the biased one (the paper's definition; the official code uses the unbiased
      IN variance, which differs by HW / (HW - 1)).
    - ``running_mean``/``running_var`` are the BN part's, an exponential average with BatchNorm's
      conventions and guard (the code's default accumulates sums for a batch average computed after
      training, as PreciseBN-style recalibration does).

    Args:
        num_features: C.
        eps: added to the mixed variance; must be > 0. Default: 1e-5.
        momentum, affine, track_running_stats, device, dtype, bias, decay, on_nonfinite: as
            :class:`BatchNorm`.

    Shape:
        Input: (N, C, \*spatial) with at least one spatial dim; output: the same shape, dtype and
        memory format.

    Example::

        >>> import torch, normkit as nk
        >>> sn = nk.SwitchableNorm(4, affine=False)
        >>> sn.importance()  # (IN, LN, BN) weights of the mean and of the variance
        (tensor([0.3333, 0.3333, 0.3333]), tensor([0.3333, 0.3333, 0.3333]))
        >>> with torch.no_grad():  # one-hot weights: LayerNorm
        ...     _ = sn.mean_weight.copy_(torch.tensor([0.0, 50.0, 0.0]))
        ...     _ = sn.var_weight.copy_(torch.tensor([0.0, 50.0, 0.0]))
        >>> x = torch.randn(2, 4, 3, 3)
        >>> bool(torch.allclose(sn(x), torch.nn.functional.layer_norm(x, x.shape[1:]), atol=1e-5))
        True
    """

    def _init_parameters(self, factory: dict) -> None:
        self.mean_weight = nn.Parameter(torch.ones(3, **factory))
        self.var_weight = nn.Parameter(torch.ones(3, **factory))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for name in ("mean_weight", "var_weight"):
            if getattr(self, name, None) is not None:
                nn.init.ones_(getattr(self, name))

    def importance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The softmax weights (w, w') of the (IN, LN, BN) means and variances, without gradient."""
        with torch.no_grad():
            dtype = self.mean_weight.dtype
            return importance(self.mean_weight, dtype), importance(self.var_weight, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._normalize(switchable_norm, input, self.mean_weight, self.var_weight)
