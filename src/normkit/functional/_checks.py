"""Argument and input checks shared by every normalizer.

Each check costs only Python (shapes, dtypes, numbers), never a pass over the data, and raises an error
from :mod:`normkit.errors` whose message names the argument, the shape and the fix. The functional ops
call them before touching any state, so a rejected call leaves running statistics as they were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from normkit.errors import (
    BatchTooSmallError,
    ChannelMismatchError,
    ConfigError,
    DeviceError,
    DtypeError,
    ShapeError,
)

NONFINITE_POLICIES = ("skip", "warn", "raise")


def shape_str(shape: Sequence[int]) -> str:
    """``(2, 3, 4)`` for a shape, with a trailing comma for one dimension like Python's tuples."""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_floating(input: torch.Tensor, name: str = "input") -> None:
    """Normalization needs floating-point data: integer and bool inputs are rejected."""
    if not isinstance(input, torch.Tensor):
        raise DtypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise DtypeError(
            f"{name} has dtype {input.dtype}, but normalization needs a floating-point tensor "
            f"(float32, float64, float16 or bfloat16); convert it first, e.g. {name}.float()"
        )


_HALF = (torch.float16, torch.bfloat16)


def check_like_input(input: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Parameters and buffers live on the input's device, in its dtype — or in float32 for a
    float16/bfloat16 input (mixed precision, as ATen's kernels allow)."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device != input.device:
            raise DeviceError(
                f"{name} is on {tensor.device}, but the input is on {input.device}; move the "
                f"layer with .to({str(input.device)!r}) or the input with "
                f".to({str(tensor.device)!r})"
            )
        if tensor.dtype != input.dtype and not (
            input.dtype in _HALF and tensor.dtype == torch.float32
        ):
            raise DtypeError(
                f"{name} has dtype {tensor.dtype}, but the input has dtype {input.dtype}; "
                "normalization needs them equal (or float32 parameters for a float16/bfloat16 "
                f"input): convert the layer with .to({input.dtype}) or the input with "
                f".to({tensor.dtype})"
            )


def check_eps(eps: float) -> None:
    """eps keeps 1/sqrt(var + eps) finite for constant channels, so it must be positive."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
        raise ConfigError(f"eps must be a positive finite number, got {eps!r}")
    if eps <= 0:
        raise ConfigError(
            f"eps must be > 0, got {eps!r}: with eps=0 a channel whose values are all equal has "
            "variance 0 and normalizes to NaN; use a small positive value such as 1e-5"
        )


def check_momentum(momentum: float | None) -> None:
    """PyTorch's convention: running = (1 - momentum) * running + momentum * batch, 0 <= momentum <= 1."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ConfigError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ConfigError(
            f"momentum must be in [0, 1] (PyTorch's convention: the weight of the new batch), got "
            f"{momentum!r}; for the Keras/Flax convention pass decay= instead"
        )


def check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_normalized_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    """The trailing shape a layer normalizes over (LayerNorm, RMSNorm), as a tuple of sizes."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    for size in shape:
        check_positive_int(size, "normalized_shape entries")
    return shape


def check_groups(num_groups: int, num_channels: int) -> None:
    """GroupNorm splits the channels into equal groups."""
    check_positive_int(num_groups, "num_groups")
    check_positive_int(num_channels, "num_channels")
    if num_channels % num_groups != 0:
        divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
        raise ConfigError(
            f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}); "
            f"valid num_groups for {num_channels} channels: {divisors}"
        )


def check_policy(on_nonfinite: str) -> None:
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")


def check_min_rank(input: torch.Tensor, min_rank: int, layout: str) -> None:
    if input.dim() < min_rank:
        raise ShapeError(
            f"expected an input of at least {min_rank} dimensions {layout}, got a "
            f"{input.dim()}-D input of shape {shape_str(input.shape)}"
        )


def check_channels(
    input: torch.Tensor, expected: int, *, what: str = "num_features", dim: int = 1
) -> None:
    """The input's channel dimension must match the layer's per-channel parameters and buffers."""
    got = input.shape[dim]
    if got != expected:
        raise ChannelMismatchError(
            f"expected {expected} channels ({what}={expected}) at dim {dim}, but the input of shape "
            f"{shape_str(input.shape)} has {got}; build the layer with {what}={got} or check the "
            "layer that feeds it"
        )


def check_per_channel(input: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """weight, bias and running statistics hold one value per channel (dim 1 of the input), on
    the input's device and in its dtype (:func:`check_like_input`)."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.numel() != input.shape[1]:
            raise ChannelMismatchError(
                f"{name} has {tensor.numel()} elements, one per channel, but the input of shape "
                f"{shape_str(input.shape)} has {input.shape[1]} channels at dim 1; build the "
                f"layer for {input.shape[1]} channels or check the layer that feeds it"
            )
    check_like_input(input, **tensors)


def check_batch_statistics_size(input: torch.Tensor) -> None:
    """Batch statistics from one value per channel are meaningless (variance 0, output = bias).

    Empty batches pass: they produce an empty output and leave running statistics alone.
    """
    count = input.shape[0] * math.prod(input.shape[2:])
    if count == 1:
        dims = "N" if input.dim() == 2 else "N and the spatial dims " + shape_str(input.shape[2:])
        raise BatchTooSmallError(
            f"training needs more than one value per channel to compute batch statistics, but "
            f"the input of shape {shape_str(input.shape)} has 1 (statistics are taken over "
            f"{dims}). Use a batch of at least 2, call .eval() to normalize with the running "
            "statistics, or use a normalizer that does not depend on the batch (GroupNorm, "
            "LayerNorm)"
        )


def check_instance_statistics_size(input: torch.Tensor) -> None:
    """Instance statistics need more than one spatial element per channel."""
    spatial = math.prod(input.shape[2:])
    if spatial == 1 and input.numel() > 0:
        raise BatchTooSmallError(
            f"instance statistics need more than one spatial element per channel, but the input "
            f"of shape {shape_str(input.shape)} has 1; InstanceNorm of a 1x1 map is always the "
            "bias. Use BatchNorm or GroupNorm for inputs without spatial extent"
        )


def check_trailing_shape(input: torch.Tensor, normalized_shape: Sequence[int]) -> None:
    """LayerNorm normalizes over the last dims, which must equal ``normalized_shape``."""
    k = len(normalized_shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k :]) != tuple(normalized_shape):
        raise ShapeError(
            f"normalized_shape={shape_str(normalized_shape)} must match the last {k} dims of "
            f"the input, but the input has shape {shape_str(input.shape)}; build the layer with "
            f"normalized_shape={shape_str(input.shape[-k:]) if input.dim() >= k else '...'}"
        )
