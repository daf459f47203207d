"""Batch normalization layers: ``BatchNorm`` for any rank, and the drop-ins ``BatchNorm1d/2d/3d``."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.functional import batch_norm
from normkit.nn._base import NormBase


class BatchNorm(NormBase, _BatchNorm):
    r"""Batch normalization over an input of any rank (N, C, \*) (Ioffe & Szegedy 2015).

    Paper: https://arxiv.org/abs/1502.03167 (Algorithm 1 for training, Algorithm 2 for inference).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training the mean and the *biased* variance are taken per channel over N and every spatial
    dim of this batch; ``running_mean`` and ``running_var`` follow them by an exponential average,
    the variance unbiased by m/(m-1); in eval mode the running statistics are used. γ starts at 1
    and β at 0. ``BatchNorm1d/2d/3d`` are the same layer restricted to torch's ranks.

    Note:
        ``momentum`` is PyTorch's: ``running = (1 - momentum) * running + momentum * batch``. Keras and
        Flax call ``1 - momentum`` their "momentum" (0.99); pass that number as ``decay=`` instead.
        ``momentum=None`` is the cumulative average over the batches seen.

    ``layer(x, mask=m)`` with a bool ``m`` of shape (N, \*) — the input without dim 1, True where
    an element is real — keeps padded elements out of the statistics (variable-length sequences):
    each channel's mean and variance are over its real elements, padded positions of the output are
    0 and get no gradient, in training and eval. A channel with fewer than two real elements does
    not update the running statistics (the guard below skips it).

    Running statistics are guarded: a batch whose statistics are NaN or Inf never enters them
    (``on_nonfinite``, below); ``num_batches_skipped`` counts such batches. An empty batch returns
    an empty output and leaves running statistics and ``num_batches_tracked`` as they were
    (``torch.nn`` counts it, which skews ``momentum=None``). To undo or prevent updates, see
    :func:`normkit.snapshot_running_stats` and :func:`normkit.frozen_running_stats`.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance before the square root; must be > 0. Default: 1e-5.
        momentum: weight of each new batch in the running statistics, or ``None`` for the
            cumulative average. Default: 0.1.
        affine: learn γ (``weight``) and β (``bias``). Default: True.
        track_running_stats: keep running statistics for eval mode; without them eval mode uses
            the batch's statistics. Default: True.
        device, dtype: where and in what dtype parameters and buffers are created.
        bias: learn β (with ``affine``). Default: True.
        decay: the Keras/Flax form of the momentum (``momentum = 1 - decay``); give it or
            ``momentum``, not both. Default: None.
        on_nonfinite: ``"skip"`` (default, no host synchronisation), ``"warn"`` or ``"raise"``
            when a batch's statistics are not finite.

    Shape:
        Input: (N, C, \*); output: the same shape, dtype and memory format.

    Raises:
        BatchTooSmallError: training on one value per channel.
        ChannelMismatchError: the input's dim 1 is not ``num_features``.
        DtypeError: an integer or bool input. ConfigError: eps <= 0, momentum outside [0, 1].

    Example::

        >>> import torch, normkit as nk
        >>> bn = nk.BatchNorm(8)
        >>> y = bn(torch.randn(16, 8, 5, 5, 5, 5) * 3 + 2)  # any rank
        >>> per_channel = (0, 2, 3, 4, 5)
        >>> bool(y.mean(per_channel).abs().max() < 1e-5), bool((y.std(per_channel) - 1).abs().max() < 1e-3)
        (True, True)
        >>> bn.running_mean.shape, int(bn.num_batches_tracked)
        (torch.Size([8]), 1)
    """

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        return self._normalize(batch_norm, input, mask=mask)


class BatchNorm1d(BatchNorm, nn.BatchNorm1d):
    """:class:`BatchNorm` on (N, C) or (N, C, L) inputs; a drop-in for ``torch.nn.BatchNorm1d``."""

    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(BatchNorm, nn.BatchNorm2d):
    """:class:`BatchNorm` on (N, C, H, W) inputs; a drop-in for ``torch.nn.BatchNorm2d``."""

    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchNorm3d(BatchNorm, nn.BatchNorm3d):
    """:class:`BatchNorm` on (N, C, D, H, W) inputs; a drop-in for ``torch.nn.BatchNorm3d``."""

    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
