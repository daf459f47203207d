"""Group normalization: a drop-in for ``torch.nn.GroupNorm``."""

from __future__ import annotations

import torch
from torch import nn

from normkit.errors import NormkitError
from normkit.functional import group_norm
from normkit.functional._checks import check_channels, check_eps, check_groups, check_min_rank
from normkit.nn._base import (
    GROUP_NORM_HAS_BIAS,
    NormLayer,
    bias_kwargs,
    drop_bias_if_unsupported,
    named,
)


class GroupNorm(NormLayer, nn.GroupNorm):
    r"""Group normalization (Wu & He 2018): per sample, statistics over C/G channels and space.

    Paper: https://arxiv.org/abs/1803.08494 (eqs. 1-3, Fig. 2). Independent of the batch size, the
    same in training and eval. ``num_groups=1`` is LayerNorm over (C, \*); ``num_groups=C`` is
    InstanceNorm. γ and β are per channel.

    Args:
        num_groups: G; must divide ``num_channels``.
        num_channels: C.
        eps: added to the variance; must be > 0. Default: 1e-5.
        affine: learn per-channel γ and β. Default: True.
        device, dtype: where and in what dtype the parameters are created.
        bias: learn β (with ``affine``). Default: True.

    Shape:
        Input: (N, C, \*); output: the same shape and memory format.

    Example::

        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 6, 5, 5)
        >>> gn1 = nk.GroupNorm(1, 6, affine=False)
        >>> bool(torch.allclose(gn1(x), torch.nn.functional.layer_norm(x, x.shape[1:]), atol=1e-6))
        True
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        check_groups(num_groups, num_channels)
        check_eps(eps)
        super().__init__(
            num_groups,
            num_channels,
            eps,
            affine,
            device,
            dtype,
            **bias_kwargs(GROUP_NORM_HAS_BIAS, bias),
        )
        drop_bias_if_unsupported(self, GROUP_NORM_HAS_BIAS, bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        try:
            check_min_rank(input, 2, "(N, C, *)")
            check_channels(input, self.num_channels, what="num_channels")
            return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        except NormkitError as error:
            raise named(self, error) from None
