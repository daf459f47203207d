"""``EvoNormS0``: the sample-based EvoNorm normalization-activation layer."""

from __future__ import annotations

import torch
from torch import nn

from normkit.errors import ConfigError, NormkitError
from normkit.functional import evo_norm_s0
from normkit.functional._checks import (
    check_channels,
    check_eps,
    check_groups,
    check_min_rank,
    check_positive_int,
)
from normkit.nn._base import NormLayer, named


class EvoNormS0(NormLayer, nn.Module):
    r"""EvoNorm-S0 (Liu et al. 2020): normalization and activation in one, per sample.

    Paper: https://arxiv.org/abs/2004.02967 (EvoNorm-S0, Figure 1 and Table 1), found by searching
    over computation graphs of normalization and activation together:

    .. math::
        y = \frac{x \cdot \sigma(v x)}{\sqrt{s^2_{c/g,\,spatial}(x) + \epsilon}} \gamma + \beta

    with σ the sigmoid, s² the biased variance of each sample's group of C/G channels (GroupNorm's
    statistic) and v, γ, β per channel. It replaces BN *and* the activation after it (a
    Swish-like gate, SiLU when v = 1), uses no batch statistic and so computes the same function
    in training and eval at any batch size. The paper's Figure 1: with ResNet-50 on ImageNet,
    EvoNorm-S0 keeps its accuracy as the batch over 8 workers shrinks from 1024 to 32 where BN-ReLU
    degrades, and it outperforms BN- and GN-based layers on MobileNetV2 and Mask R-CNN (the
    per-model numbers are the paper's Tables 2-4).

    Numerically equal to timm's ``EvoNorm2dS0`` with the same groups and eps, with the same
    ``state_dict`` keys (``weight``, ``bias``, ``v``).

    Args:
        num_features: C.
        groups: G, the number of channel groups; must divide C. Default: 32 (timm's; with fewer
            channels, ``group_size`` is often the simpler choice).
        group_size: channels per group instead of ``groups`` (G = C / group_size). Default: None.
        eps: added to the group variance; > 0. Default: 1e-5.
        apply_act: keep the sigmoid gate (``v``); without it the layer is x / s_g * γ + β, GroupNorm
            without the mean. Default: True.
        device, dtype: where and in what dtype the parameters are created.

    Shape:
        Input: (N, C, \*) with at least one spatial dim; output: the same shape, dtype and memory
        format.

    Example::

        >>> import torch, normkit as nk
        >>> layer = nk.EvoNormS0(16, groups=4)
        >>> x = torch.randn(2, 16, 5, 5)
        >>> y = layer(x)
        >>> bool(torch.allclose(layer(x[:1]), y[:1]))  # every sample on its own
        True
    """

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        group_size: int | None = None,
        eps: float = 1e-5,
        apply_act: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        check_positive_int(num_features, "num_features")
        check_eps(eps)
        if group_size is not None:
            check_positive_int(group_size, "group_size")
            if num_features % group_size:
                raise ConfigError(
                    f"group_size ({group_size}) must divide num_features ({num_features})"
                )
            groups = num_features // group_size
        check_groups(groups, num_features)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.groups = groups
        self.eps = eps
        self.apply_act = bool(apply_act)
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        if apply_act:
            self.v = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("v", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        try:
            check_min_rank(input, 3, "(N, C, *spatial)")
            check_channels(input, self.num_features)
            return evo_norm_s0(input, self.v, self.weight, self.bias, self.groups, self.eps)
        except NormkitError as error:
            raise named(self, error) from None

    def extra_repr(self) -> str:
        text = f"{self.num_features}, groups={self.groups}, eps={self.eps}"
        return text + ("" if self.apply_act else ", apply_act=False")
