"""The activations fused into BatchNormAct and InPlaceABN: forward, derivative, and inverse.

One name per activation, as in ``torch.nn.functional``; ``param`` is leaky_relu's negative slope or
elu's alpha. Derivatives take torch's value at the kinks (relu'(0) = 0, leaky_relu'(0) = slope,
elu'(0) = alpha). InPlace-ABN needs activations it can undo from the output alone: identity,
leaky_relu with a positive slope, and elu with a positive alpha (Rota Bulò et al. 2018, §3.2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from normkit.errors import ConfigError

FUSED_ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "identity")
INVERTIBLE_ACTIVATIONS = ("leaky_relu", "elu", "identity")


def check_activation(activation: str, param: float, choices: tuple[str, ...], layer: str) -> None:
    """The activation must be one of ``choices``; invertible ones need a positive parameter."""
    if activation not in choices:
        raise ConfigError(
            f"{layer} fuses one of the activations {list(choices)}, got activation={activation!r}"
            + (
                "; relu is not invertible (its output forgets the negative inputs): use "
                "leaky_relu with a small activation_param such as 0.01"
                if activation == "relu" and "relu" not in choices
                else ""
            )
        )
    if isinstance(param, bool) or not isinstance(param, (int, float)) or not math.isfinite(param):
        raise ConfigError(f"activation_param must be a finite number, got {param!r}")
    if choices is INVERTIBLE_ACTIVATIONS and activation in ("leaky_relu", "elu") and param <= 0:
        raise ConfigError(
            f"{layer} inverts {activation} in its backward pass, which needs activation_param > 0 "
            f"(got {param!r}); with 0 the negative inputs are lost. Use e.g. 0.01"
        )


def apply(pre: torch.Tensor, activation: str, param: float) -> torch.Tensor:
    """act(pre), out of place."""
    if activation == "relu":
        return F.relu(pre)
    if activation == "leaky_relu":
        return F.leaky_relu(pre, param)
    if activation == "silu":
        return F.silu(pre)
    if activation == "gelu":
        return F.gelu(pre)
    if activation == "elu":
        return F.elu(pre, param)
    return pre


def apply_(pre: torch.Tensor, activation: str, param: float) -> torch.Tensor:
    """act(pre), in place where torch has an in-place form (everything but gelu)."""
    if activation == "relu":
        return pre.relu_()
    if activation == "leaky_relu":
        return F.leaky_relu_(pre, param)
    if activation == "silu":
        return F.silu(pre, inplace=True)
    if activation == "elu":
        return F.elu_(pre, param)
    return apply(pre, activation, param)


def derivative(pre: torch.Tensor, activation: str, param: float) -> torch.Tensor:
    """d act / d pre, elementwise (pure tensor maths: torch.compile fuses it into the backward)."""
    if activation == "relu":
        return (pre > 0).to(pre.dtype)
    if activation == "leaky_relu":
        return torch.where(pre > 0, 1.0, param).to(pre.dtype)
    if activation == "silu":
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(pre * (1 / math.sqrt(2))))
        return cdf + pre * torch.exp(-0.5 * pre * pre) * (1 / math.sqrt(2 * math.pi))
    if activation == "elu":
        return torch.where(pre > 0, 1.0, param * torch.exp(pre)).to(pre.dtype)
    return torch.ones_like(pre)


def backward(dy: torch.Tensor, pre: torch.Tensor, activation: str, param: float) -> torch.Tensor:
    """dL/dpre from dL/dy with ATen's fused backward kernels (one pass each)."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(dy, pre, 0)
    if activation == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(dy, pre, param, False)
    if activation == "silu":
        return torch.ops.aten.silu_backward(dy, pre)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(dy, pre)
    if activation == "elu":
        return torch.ops.aten.elu_backward(dy, param, 1, 1, False, pre)
    return dy


def inverse(out: torch.Tensor, activation: str, param: float) -> torch.Tensor:
    """pre from act(pre) for the invertible activations. ELU's inverse log(1 + y/alpha) loses
    precision as pre -> -inf (the output saturates at -alpha); leaky_relu's is exact."""
    if activation == "leaky_relu":
        return torch.where(out < 0, out / param, out)
    if activation == "elu":
        return torch.where(out > 0, out, torch.log1p(out / param))
    return out


def derivative_from_output(out: torch.Tensor, activation: str, param: float) -> torch.Tensor:
    """d act / d pre read from the output: leaky_relu: 1 or slope; elu: 1 or y + alpha."""
    if activation == "leaky_relu":
        return torch.where(out > 0, 1.0, param).to(out.dtype)
    if activation == "elu":
        return torch.where(out > 0, 1.0, out + param).to(out.dtype)
    return torch.ones_like(out)
