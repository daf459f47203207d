"""RMS normalization layers: ``RMSNorm``, a drop-in for ``torch.nn.RMSNorm``, and ``RMSNorm2d`` over
the channels of a map."""

from __future__ import annotations

import torch
from torch import nn

from normkit.errors import NormkitError
from normkit.functional import channel_rms_norm, rms_norm
from normkit.functional._checks import (
    check_channels,
    check_eps,
    check_min_rank,
    check_normalized_shape,
    check_positive_int,
)
from normkit.nn._base import NormLayer, named


def _check_eps(eps: float | None) -> None:
    if eps is not None:
        check_eps(eps)


class RMSNorm(NormLayer, nn.RMSNorm):
    r"""Root mean square layer normalization over the last dims (Zhang & Sennrich 2019).

    Paper: https://arxiv.org/abs/1910.07467, eqs. 3-4. LayerNorm without the mean: the re-centring
    costs time and, the paper finds, is not what makes LayerNorm work; the re-scaling is.

    .. math::
        y = \frac{x}{\sqrt{\frac{1}{n}\sum_{i=1}^{n} x_i^2 + \epsilon}} \cdot g

    over the last ``len(normalized_shape)`` dims. An exact drop-in for ``torch.nn.RMSNorm``: it is
    that class (``isinstance`` holds), with the same arguments, ``state_dict`` keys (``weight``)
    and numbers (the dtype rules and the default eps of ``torch.rms_norm``: the machine epsilon of
    float32 for half inputs), and a faster CPU path (docs/benchmarks.md).

    Args:
        normalized_shape: the trailing shape normalized over (an int for the last dim).
        eps: added to the mean square; must be > 0, or None for torch's default. Default: None.
        elementwise_affine: learn the gain g (``weight``, ones at first). Default: True.
        device, dtype: where and in what dtype the gain is created.

    Shape:
        Input: (\*, \*normalized_shape); output: the same shape and dtype.

    Example::

        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 5, 16)
        >>> ours, theirs = nk.RMSNorm(16), torch.nn.RMSNorm(16)
        >>> bool(torch.allclose(ours(x), theirs(x), atol=1e-6)), isinstance(ours, torch.nn.RMSNorm)
        (True, True)
        >>> y = ours(x * 7)
        >>> bool(torch.allclose(y.pow(2).mean(-1), torch.ones(2, 5), atol=1e-4))
        True
    """

    def __init__(
        self,
        normalized_shape: int | list[int] | torch.Size,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        check_normalized_shape(normalized_shape)
        _check_eps(eps)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        try:
            return rms_norm(input, self.normalized_shape, self.weight, self.eps)
        except NormkitError as error:
            raise named(self, error) from None


class RMSNorm2d(NormLayer, nn.Module):
    r"""RMS normalization over the channels of an (N, C, \*) input, at each position.

    :class:`RMSNorm` for convolutional maps, as :class:`LayerNorm2d` is LayerNorm's: for every
    sample and spatial position the C channel values are divided by their root mean square, and
    multiplied by a per-channel gain. It equals ``torch.nn.RMSNorm(C)`` applied with the channels
    moved last, without the permutes and copies, and keeps channels_last inputs channels_last. Any
    rank >= 2.

    Args:
        num_channels: C.
        eps: as :class:`RMSNorm`. Default: None (torch's default).
        elementwise_affine: learn the per-channel gain ``weight`` of shape (C,). Default: True.
        device, dtype: where and in what dtype the gain is created.

    The ``state_dict`` (``weight``, shape (C,)) loads into and from ``torch.nn.RMSNorm(C)``.

    Example::

        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 8, 4, 4)
        >>> ref = torch.nn.RMSNorm(8)(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        >>> bool(torch.allclose(nk.RMSNorm2d(8)(x), ref, atol=1e-6))
        True
    """

    def __init__(
        self,
        num_channels: int,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        check_positive_int(num_channels, "num_channels")
        _check_eps(eps)
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        try:
            check_min_rank(input, 2, "(N, C, *)")
            check_channels(input, self.num_channels, what="num_channels")
            return channel_rms_norm(input, self.weight, self.eps)
        except NormkitError as error:
            raise named(self, error) from None

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
