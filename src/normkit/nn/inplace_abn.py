"""``InPlaceABN``: memory-saving activated batch norm (Rota Bulò, Porzi & Kontschieder 2018)."""

from __future__ import annotations

import torch

from normkit.errors import ConfigError
from normkit.functional import inplace_abn
from normkit.functional._activation import INVERTIBLE_ACTIVATIONS, check_activation
from normkit.functional._transforms import INPLACE_DOUBLE_BACKWARD
from normkit.nn._base import NormBase


class InPlaceABN(NormBase):
    r"""Batch norm and an invertible activation, written over the input, y = act(BN(x)).

    Paper: https://arxiv.org/abs/1712.02616 (In-Place Activated BatchNorm, CVPR 2018). Training
    keeps only the output y and per-channel statistics for backward, and recovers the normalized
    input from y (x_hat = (act^-1(y) - beta) / gamma, §3.2): BatchNorm followed by an activation
    keeps x and y, so this halves the memory saved for backward. The gradients are those of the
    unfused computation; no compiled extension is involved (normkit's kernels, or torch).

    Note:
        The activation must be invertible: ``"leaky_relu"`` (default, slope
        ``activation_param`` > 0), ``"elu"`` (alpha > 0) or ``"identity"``; not relu.

    Note:
        gamma must stay away from 0 (the backward divides by it). The paper's code uses
        |gamma| + eps, which flips every channel whose gamma is negative. Here gamma is used as it
        is when |gamma| >= ``min_abs_weight`` and replaced by ``min_abs_weight`` with its sign
        (+ for 0) otherwise, with the gradient passed straight through to gamma: a plain
        BatchNorm's weights load into this layer and give the same output in every channel with
        |gamma| >= min_abs_weight, and a zero-initialised gamma still learns. Precision: x_hat is
        recovered with an error of about u * (|x_hat| + |beta / gamma|) (u the unit roundoff of
        the dtype, ELU's inverse worse as its output saturates); prefer float32 or bfloat16 with
        |beta / gamma| of order 1.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, decay,
        on_nonfinite: as :class:`normkit.BatchNorm` (this layer has its keys).
        activation: ``"leaky_relu"``, ``"elu"`` or ``"identity"``. Default: ``"leaky_relu"``.
        activation_param: the leaky slope or ELU's alpha. Default: 0.01.
        min_abs_weight: the smallest |gamma| used in the forward. Default: 1e-3.
        inplace: write the output over the input when autograd allows (not a leaf that requires
            grad). Default: True. The input must not be used elsewhere after this layer.

    Example::

        >>> import torch, normkit as nk
        >>> layer = nk.InPlaceABN(8)
        >>> x = torch.randn(4, 8, 5, 5)
        >>> y = layer(x)
        >>> y.data_ptr() == x.data_ptr()  # the output took the input's memory
        True
    """

    transform_refusals = (*NormBase.transform_refusals, INPLACE_DOUBLE_BACKWARD)

    def __init__(
        self, *args, activation: str = "leaky_relu", activation_param: float = 0.01,
        min_abs_weight: float = 1e-3, inplace: bool = True, **kwargs,
    ) -> None:  # fmt: skip
        check_activation(activation, activation_param, INVERTIBLE_ACTIVATIONS, "InPlaceABN")
        if isinstance(min_abs_weight, bool) or not isinstance(min_abs_weight, (int, float)):
            raise ConfigError(f"min_abs_weight must be a positive number, got {min_abs_weight!r}")
        if not min_abs_weight > 0:
            raise ConfigError(f"min_abs_weight must be > 0, got {min_abs_weight!r}")
        super().__init__(*args, **kwargs)
        self.activation = activation
        self.activation_param = float(activation_param)
        self.min_abs_weight = float(min_abs_weight)
        self.inplace = bool(inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return self._normalize(
            inplace_abn,
            input,
            activation=self.activation,
            activation_param=self.activation_param,
            min_abs_weight=self.min_abs_weight,
            inplace=self.inplace,
        )

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, activation={self.activation!r}"
        if self.activation != "identity":
            text += f", activation_param={self.activation_param}"
        return text + ("" if self.inplace else ", inplace=False")
