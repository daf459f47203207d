"""Convolutions with standardized weights: Weight Standardization (Qiao et al. 2019), its scaled form
(Brock et al. 2021, NF-ResNets/NFNets), and the weight centring that MABN pairs with (Yan et al. 2020).

Weight Standardization, https://arxiv.org/abs/1903.10520, eqs. 5-6, per output filter i over its
I = C_in/groups * kh * kw weights:

    mu_i    = 1/I sum_j W_ij
    sigma_i = sqrt(1/I sum_j (W_ij - mu_i)^2 + eps)
    W_hat   = (W - mu_i) / sigma_i                   ->  y = conv(x, W_hat) + b

Scaled WS (https://arxiv.org/abs/2101.08692, §4): W_hat = gain_i * gamma * (W - mu_i) / (sigma_i
sqrt(I)), gamma a constant of the activation (1 by default) and gain_i learned per filter. Weight
centring (MABN's §4.2): W_hat = W - mu_i.

:func:`standardized_weight` computes W_hat; :func:`std_conv` convolves with it. Implementations
(``normkit.backends``, op ``standardized_weight``): ``native`` is ATen's batch norm over the
(1, C_out, I) view of the weight (timm's formulation: one fused kernel forward and backward, the
statistics in float32 for half weights); ``reference`` is the equations above, differentiated by
autograd, and what every program transform runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from normkit.errors import ConfigError
from normkit.functional import _dispatch
from normkit.functional._checks import check_eps, check_floating
from normkit.functional._moments import stats_dtype
from normkit.functional._transforms import transforming


def standardized_weight(
    weight: torch.Tensor,
    eps: float = 1e-6,
    gain: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """W_hat = gain * scale * (W - mu_i) / sqrt(var_i + eps), statistics per output filter (dim 0).

    Args:
        weight: (C_out, ...), a convolution's or linear layer's weight.
        eps: added to each filter's biased variance; > 0.
        gain: per-filter gains (C_out elements) or None.
        scale: a constant factor (Scaled WS: gamma / sqrt(fan-in)).
    """
    check_floating(weight, "weight")
    check_eps(eps)
    if gain is not None and gain.numel() != weight.shape[0]:
        raise ConfigError(
            f"gain must have one value per output filter ({weight.shape[0]}), got {gain.numel()}"
        )
    if transforming():
        return reference_standardized_weight(weight, eps, gain, scale)
    return _dispatch.resolve("standardized_weight", weight)(weight, eps, gain, scale)


def centered_weight(weight: torch.Tensor) -> torch.Tensor:
    """W - mu_i, each output filter's mean removed (MABN's weight centralization, Yan et al. 2020,
    §4.2)."""
    dims = tuple(range(1, weight.dim()))
    return weight - weight.mean(dims, keepdim=True)


def std_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    eps: float = 1e-6,
    gain: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """A convolution (1-d, 2-d or 3-d, by the weight's rank) with the standardized weight; the
    arguments of ``torch.nn.functional.conv2d`` plus those of :func:`standardized_weight`."""
    convolve = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}.get(weight.dim())
    if convolve is None:
        raise ConfigError(
            f"std_conv takes a convolution weight of rank 3, 4 or 5, got {weight.dim()}"
        )
    w_hat = standardized_weight(weight, eps, gain, scale)
    return convolve(input, w_hat, bias, stride, padding, dilation, groups)


def fan_in(weight: torch.Tensor) -> int:
    """The number of inputs of one output filter (I above)."""
    return math.prod(weight.shape[1:])


def native_standardized_weight(weight, eps, gain, scale):
    flat = weight.reshape(1, weight.shape[0], -1)
    if gain is None:
        w = (
            None
            if scale == 1.0
            else torch.full(
                (weight.shape[0],), float(scale), dtype=weight.dtype, device=weight.device
            )
        )
    else:
        w = gain.reshape(-1) * scale
    return F.batch_norm(flat, None, None, weight=w, training=True, momentum=0.0, eps=eps).reshape(
        weight.shape
    )


def reference_standardized_weight(weight, eps, gain, scale):
    dtype = stats_dtype(weight.dtype)
    w = weight.to(dtype)
    dims = tuple(range(1, w.dim()))
    mu = w.mean(dims, keepdim=True)  # eq. 5
    sigma = torch.sqrt((w - mu).square().mean(dims, keepdim=True) + eps)  # eq. 6
    w_hat = (w - mu) / sigma
    if gain is not None:
        w_hat = w_hat * gain.reshape((-1,) + (1,) * (w.dim() - 1)).to(dtype)
    if scale != 1.0:
        w_hat = w_hat * scale
    return w_hat.to(weight.dtype)
