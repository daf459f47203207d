"""Group normalization (Wu & He 2018): statistics per sample over groups of C/G channels and space.

GN with one group is LayerNorm over (C, *); GN with C groups is InstanceNorm (Wu & He 2018, §3.1,
Fig. 2); the tests check both. The ``reference`` version views the input as (N, G, C/G, *) — a view,
so channels_last stays channels_last — and reduces over every dim after G.
"""

from __future__ import annotations

import math

import torch

from normkit.errors import BatchTooSmallError
from normkit.functional import _dispatch
from normkit.functional._checks import (
    check_eps,
    check_floating,
    check_groups,
    check_min_rank,
    check_per_channel,
    shape_str,
)
from normkit.functional._normalize import channel_view, empty_output, normalize_over


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Group normalization of an (N, C, *) input; see :class:`normkit.GroupNorm`."""
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_groups(num_groups, int(input.shape[1]))  # an int even under torch.jit.trace
    check_per_channel(input, weight=weight, bias=bias)
    check_group_size(input, num_groups)
    impl = _dispatch.resolve("group_norm", input)
    return impl(input, num_groups, weight, bias, eps)


def check_group_size(input: torch.Tensor, num_groups: int) -> None:
    """A group of one value has variance 0 and normalizes to 0 whatever the input: the output is
    the bias, and no gradient reaches the input. torch.nn raises for a batch of one such sample;
    normkit raises for any batch, since no sample gets a meaningful output."""
    per_group = math.prod([int(size) for size in input.shape[1:]]) // num_groups
    if per_group == 1 and input.numel() > 0:
        raise BatchTooSmallError(
            f"num_groups={num_groups} splits the input of shape {shape_str(input.shape)} into "
            "groups of one value each, which normalize to 0 whatever the input (the output is the "
            "bias); use fewer groups, or a normalizer over more values per group"
        )


def group_view(tensor: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(N, C, *) viewed as (N, G, C/G, *): splitting a dim is always a view."""
    n, c = tensor.shape[:2]
    return tensor.view(n, num_groups, c // num_groups, *tensor.shape[2:])


def reference_group_norm(input, num_groups, weight, bias, eps):
    ndim = input.dim()
    w, b = channel_view(weight, ndim), channel_view(bias, ndim)
    if input.numel() == 0:
        return empty_output(input, w, b)
    grouped = group_view(input, num_groups)  # (N, G, C/G, *)
    gw = None if w is None else group_view(w, num_groups)
    gb = None if b is None else group_view(b, num_groups)
    y, _, _ = normalize_over(grouped, tuple(range(2, ndim + 1)), gw, gb, eps)
    return y.reshape(input.shape)
