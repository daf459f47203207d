"""Layer normalization: ``LayerNorm`` (a drop-in for torch's) and ``LayerNorm2d`` over channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from normkit.errors import NormkitError
from normkit.functional import channel_layer_norm, layer_norm
from normkit.functional._checks import (
    check_channels,
    check_eps,
    check_min_rank,
    check_normalized_shape,
    check_positive_int,
)
from normkit.nn._base import NormLayer, named


class LayerNorm(NormLayer, nn.LayerNorm):
    r"""Layer normalization over the trailing dims of each sample (Ba, Kiros & Hinton 2016).

    Paper: https://arxiv.org/abs/1607.06450 (eq. 4). Statistics are the mean and biased variance of
    each sample over the last ``len(normalized_shape)`` dims, the same in training and eval.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    ``layer(x, mask=m)`` with a bool ``m`` of the input's shape without its last dim, True where a
    position is real, computes each sample's statistics over its real elements only (when
    ``normalized_shape`` spans padded positions, e.g. a whole sequence); padded positions of the
    output are 0 and get no gradient.

    Args:
        normalized_shape: the trailing shape to normalize over (an int for the last dim).
        eps: added to the variance; must be > 0. Default: 1e-5.
        elementwise_affine: learn γ and β of shape ``normalized_shape``. Default: True.
        bias: learn β (with ``elementwise_affine``). Default: True.
        device, dtype: where and in what dtype the parameters are created.

    Shape:
        Input: (\*, \*normalized_shape); output: the same.

    Example::

        >>> import torch, normkit as nk
        >>> ln = nk.LayerNorm(16)
        >>> y = ln(torch.randn(4, 10, 16) * 5 + 3)
        >>> bool(torch.allclose(y.mean(-1), torch.zeros(4, 10), atol=1e-5))
        True
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        check_normalized_shape(normalized_shape)
        check_eps(eps)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return layer_norm(
                input, self.normalized_shape, self.weight, self.bias, self.eps, mask=mask
            )
        except NormkitError as error:
            raise named(self, error) from None


class LayerNorm2d(NormLayer, nn.Module):
    r"""Layer normalization over the channels of an (N, C, \*) input, at each position.

    The LayerNorm of ConvNeXt (Liu et al. 2022, https://arxiv.org/abs/2201.03545) and of many
    vision models: for every sample and spatial position, the C channel values are normalized
    together; γ and β are per channel. It equals ``LayerNorm(C)`` applied with the channels moved
    last, without the two permutes and copies users usually write, and keeps channels_last inputs
    channels_last. Any rank ≥ 2 is accepted, so the same layer serves 1-d and 3-d maps.

    Args:
        num_channels: C.
        eps: added to the variance; must be > 0. Default: 1e-5 (timm uses 1e-6).
        elementwise_affine: learn per-channel γ and β. Default: True.
        bias: learn β (with ``elementwise_affine``). Default: True.
        device, dtype: where and in what dtype the parameters are created.

    The parameters are named ``weight`` and ``bias`` with shape (C,), so ``state_dict``s load from
    and into ``torch.nn.LayerNorm(C)`` and timm's ``LayerNorm2d``.

    Example::

        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 8, 4, 4)
        >>> ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
        >>> bool(torch.allclose(nk.LayerNorm2d(8)(x), ref, atol=1e-6))
        True
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        check_positive_int(num_channels, "num_channels")
        check_eps(eps)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_channels = num_channels
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        try:
            check_min_rank(input, 2, "(N, C, *)")
            check_channels(input, self.num_channels, what="num_channels")
            return channel_layer_norm(input, self.weight, self.bias, self.eps)
        except NormkitError as error:
            raise named(self, error) from None

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )
