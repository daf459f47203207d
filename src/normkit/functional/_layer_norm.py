"""Layer normalization (Ba, Kiros & Hinton 2016): statistics per sample over the trailing dims.

:func:`layer_norm` normalizes over the last ``len(normalized_shape)`` dims, as
``torch.nn.functional.layer_norm``. :func:`channel_layer_norm` normalizes over the channel dim of an
(N, C, *) input at every position — the "LayerNorm2d" of ConvNeXt-style networks, which PyTorch does not
ship. Both are the moments core with other dims; ``reference`` versions are registered here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from normkit.functional import _dispatch
from normkit.functional._checks import (
    check_eps,
    check_floating,
    check_like_input,
    check_min_rank,
    check_per_channel,
    check_trailing_shape,
)
from normkit.functional._masked import masked_layer_norm
from normkit.functional._normalize import channel_view, empty_output, normalize_over


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Layer normalization over the last dims; see :class:`normkit.LayerNorm`.

    ``mask``: a bool tensor of the input's shape without its last dim, True where a position is
    real: statistics over the real elements only, zeros at padded positions (see
    :mod:`normkit.functional._masked`). Default: None, every element is real.
    """
    check_floating(input)
    check_eps(eps)
    normalized_shape = _as_shape(normalized_shape)
    check_trailing_shape(input, normalized_shape)
    check_like_input(input, weight=weight, bias=bias)
    if mask is not None:
        return masked_layer_norm(input, mask, normalized_shape, weight, bias, eps)
    impl = _dispatch.resolve("layer_norm", input)
    return impl(input, normalized_shape, weight, bias, eps)


def channel_layer_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalization over dim 1 of an (N, C, *) input, per sample and position.

    Equal to ``layer_norm`` of the input with the channels moved last, without the copies; the output
    keeps the input's memory format. See :class:`normkit.LayerNorm2d`.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_per_channel(input, weight=weight, bias=bias)
    impl = _dispatch.resolve("channel_layer_norm", input)
    return impl(input, weight, bias, eps)


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def reference_layer_norm(input, normalized_shape, weight, bias, eps):
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    if input.numel() == 0:
        return empty_output(input, weight, bias)
    y, _, _ = normalize_over(input, dims, weight, bias, eps)
    return y


def reference_channel_layer_norm(input, weight, bias, eps):
    w, b = channel_view(weight, input.dim()), channel_view(bias, input.dim())
    if input.numel() == 0:
        return empty_output(input, w, b)
    y, _, _ = normalize_over(input, (1,), w, b, eps)
    return y
