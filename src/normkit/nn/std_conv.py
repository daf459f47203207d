"""Convolutions whose weights are standardized before use: ``StdConv2d`` (Weight Standardization),
``ScaledStdConv2d`` (NF-Nets' scaled form) and ``CenteredConv2d`` (MABN's weight centring)."""

from __future__ import annotations

import math

import torch
from torch import nn

from normkit.errors import ConfigError, NormkitError
from normkit.functional._checks import check_eps, check_floating, check_like_input
from normkit.functional._std_conv import centered_weight, fan_in, standardized_weight
from normkit.functional._transforms import transforming
from normkit.nn._base import NormLayer, named


class _TransformedWeightConv2d(NormLayer, nn.Conv2d):
    """A Conv2d that convolves with a function of its weight, computed once in eval mode.

    Training (or any call that records gradients, or a program transform) recomputes the weight
    every call: it is differentiated through. In eval mode without autograd recording (under
    ``torch.no_grad``/``torch.inference_mode``), the transformed weight is computed once and reused
    while the parameters keep their storage and version (an optimizer step, ``load_state_dict``,
    ``.to()`` or any in-place write through the tensor invalidates it; a write through ``.data``
    is invisible to PyTorch's version counter: call :meth:`clear_cache` after one).
    """

    _cache: tuple | None = None

    def transformed_weight(self) -> torch.Tensor:
        """The weight this layer convolves with."""
        raise NotImplementedError

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        try:  # normkit's wording for a wrong dtype or device, as every layer's (torch's differ)
            check_floating(input)
            check_like_input(input, weight=self.weight, bias=self.bias)
        except NormkitError as error:
            raise named(self, error) from None
        return self._conv_forward(input, self._weight_for_call(), self.bias)

    def _weight_for_call(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or transforming():
            return self.transformed_weight()
        key = tuple(
            (t.data_ptr(), t._version, t.dtype, t.device)
            for t in self.parameters(recurse=False)
            if t is not self.bias
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        weight = self.transformed_weight()
        self._cache = (key, weight)
        return weight

    def clear_cache(self) -> None:
        """Forget the weight computed for eval mode (after writing the parameters via ``.data``)."""
        self._cache = None

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``torch.nn.Conv2d`` computing what this layer computes now, its weight the
        transformed one: for inference, or to fold a following BatchNorm into."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, self.bias is not None, self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(self.transformed_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            conv.bias.requires_grad_(self.bias.requires_grad)
        return conv.train(self.training)


class StdConv2d(_TransformedWeightConv2d):
    r"""Conv2d with Weight Standardization (Qiao et al. 2019).

    Paper: https://arxiv.org/abs/1903.10520, eqs. 5-6. Each output filter's weights are
    standardized to zero mean and unit variance before the convolution:

    .. math::
        \hat W_{i,\cdot} = \frac{W_{i,\cdot} - \mu_{W_{i,\cdot}}}{\sqrt{\sigma^2_{W_{i,\cdot}} + \epsilon}}

    which smooths the loss landscape and, with GroupNorm (``nk.tools.convert(model, "ws_gn")``),
    trains at 1-2 images per device where BatchNorm fails: the paper's ResNet-50 with GN+WS reaches
    BN's ImageNet accuracy at a batch of 1 per GPU (its abstract and Table 2). BiT's ResNet-V2s use
    it. A drop-in for ``torch.nn.Conv2d`` (same arguments, ``state_dict`` keys and
    ``isinstance``), plus ``eps``; numerically equal to timm's ``StdConv2d`` with the same eps
    (timm's default padding is "same" and bias False; here torch's). The authors' own code divides
    by the unbiased standard deviation plus 1e-5; this is the paper's equation, as timm has it.

    In eval mode under ``torch.no_grad`` the standardized weight is computed once and reused
    (``clear_cache``; ``to_conv2d`` for a plain convolution); ``nk.tools.fold_batchnorm`` folds a
    BatchNorm after it like after any convolution.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as ``torch.nn.Conv2d``.
        eps: added to each filter's variance; > 0. Default: 1e-6 (timm's).

    Example::

        >>> import torch, normkit as nk
        >>> conv = nk.StdConv2d(3, 8, 3)
        >>> w = conv.transformed_weight().flatten(1)
        >>> bool(w.mean(1).abs().max() < 1e-6), bool((w.var(1, correction=0) - 1).abs().max() < 1e-3)
        (True, True)
    """

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        check_eps(eps)
        super().__init__(*args, **kwargs)
        self.eps = eps

    def transformed_weight(self) -> torch.Tensor:
        return standardized_weight(self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class ScaledStdConv2d(_TransformedWeightConv2d):
    r"""Conv2d with Scaled Weight Standardization (Brock et al. 2021), the convolution of NF-ResNets
    and NFNets, which train without any normalization layer.

    Paper: https://arxiv.org/abs/2101.08692, §4 (eq. 2):

    .. math::
        \hat W_{i,\cdot} = g_i\,\frac{\gamma}{\sqrt{N}}
            \frac{W_{i,\cdot} - \mu_{W_{i,\cdot}}}{\sqrt{\sigma^2_{W_{i,\cdot}} + \epsilon}}

    with N the fan-in, γ a constant of the activation that follows (e.g. ≈1.71 for ReLU, the
    paper's Table/Appendix D) and g a learned gain per filter (``gain``, shape (C_out, 1, 1, 1),
    ``gain_init`` at first). The paper's NF-ResNets match batch-normalized ResNets on ImageNet
    without any normalization layer (its Table 2). Numerically equal to timm's
    ``ScaledStdConv2d`` (the same formulation and ``state_dict`` keys); DeepMind's code uses
    max(σ² N, ε) instead, a difference of the order of ε.

    Args:
        in_channels, ..., dtype: as ``torch.nn.Conv2d``.
        gamma: γ. Default: 1.
        eps: > 0. Default: 1e-6.
        gain_init: the gains' initial value. Default: 1.

    Example::

        >>> import torch, normkit as nk
        >>> conv = nk.ScaledStdConv2d(16, 8, 3, gamma=2.0)
        >>> w = conv.transformed_weight().flatten(1)  # variance gamma^2 / fan-in per filter
        >>> bool(((w.var(1, correction=0) * 144 / 4) - 1).abs().max() < 1e-3)
        True
    """

    def __init__(
        self, *args, gamma: float = 1.0, eps: float = 1e-6, gain_init: float = 1.0, **kwargs
    ) -> None:
        check_eps(eps)
        for name, value in (("gamma", gamma), ("gain_init", gain_init)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, got {value!r}")
        self.gain_init = float(gain_init)  # read by reset_parameters, which nn.Conv2d calls
        super().__init__(*args, **kwargs)
        self.gamma, self.eps = float(gamma), eps
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.gain = nn.Parameter(
            torch.full((self.out_channels, 1, 1, 1), self.gain_init, **factory)
        )

    @property
    def scale(self) -> float:
        """γ / sqrt(fan-in)."""
        return self.gamma / math.sqrt(fan_in(self.weight))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "gain", None) is not None:
            nn.init.constant_(self.gain, self.gain_init)

    def transformed_weight(self) -> torch.Tensor:
        return standardized_weight(self.weight, self.eps, self.gain, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, eps={self.eps}"


class CenteredConv2d(_TransformedWeightConv2d):
    r"""Conv2d with Weight Centralization, the convolution MABN is paired with (Yan et al. 2020).

    Paper: https://arxiv.org/abs/2001.06838, §4.2: :class:`normkit.MovingAverageBatchNorm`
    subtracts no mean, so the filters before it are centred instead, Ŵ_i = W_i - mean(W_i), which
    keeps each output's mean near zero. A drop-in for ``torch.nn.Conv2d``, as the authors'
    ``CenConv2d``; ``nk.tools.convert(model, "mabn")`` swaps both.

    Example::

        >>> import torch, normkit as nk
        >>> conv = nk.CenteredConv2d(3, 8, 3)
        >>> bool(conv.transformed_weight().flatten(1).mean(1).abs().max() < 1e-7)
        True
    """

    def transformed_weight(self) -> torch.Tensor:
        return centered_weight(self.weight)
