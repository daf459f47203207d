"""Group norm (Wu & He 2018) forward and backward on batch norm's kernels.

A group-norm statistic is one sample's values over D = C/G consecutive channels and all positions.
The kernels of ``batch_norm_forward`` and ``batch_norm_backward`` already reduce per (sample,
channel) — group norm is their P = N view (``_utils.group_view``) — and their second stage merges
the D channels x chunks of partials of each group with Chan et al.'s formula (forward) or sums them
(backward coefficients, each channel's partial weighted by its own gamma). Channels-last inputs are
read along the channels, with no NCHW copy (PyTorch's CUDA group norm converted NHWC inputs to NCHW,
pytorch#111824). The launchers take an activation for the normalize pass (SiLU after group norm,
as in diffusion U-Nets); no layer exposes it yet.
"""

from __future__ import annotations

import torch

from normkit.kernels._utils import group_view, plan
from normkit.kernels.batch_norm_backward import normalization_backward
from normkit.kernels.batch_norm_eval import launch_normalize
from normkit.kernels.batch_norm_forward import launch_moments


def group_norm_forward(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: int = 0,
    act_param: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y, mean, invstd)``; statistics are float32, shaped (N, G)."""
    view = group_view(x)
    p = plan(view)
    mean, invstd = launch_moments(view, p, groups=num_groups, eps=eps)
    y = torch.empty_like(view.tensor)
    launch_normalize(
        view, p, y, None, mean, invstd, weight, bias,
        groups=num_groups, eps=eps, stat_is_var=False, act=act, act_param=act_param,
    )  # fmt: skip
    return y, mean, invstd


def group_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    *,
    act: int = 0,
    act_param: float = 0.0,
    needs_input_grad: bool = True,
    needs_param_grads: bool = True,
):
    """dL/dx, dL/dw, dL/db (float32 parameter grads) from the saved (N, G) statistics."""
    dx, _, dweight, dbias = normalization_backward(
        group_view(x), dy, None, weight, bias, mean, invstd,
        groups=num_groups, training=True, act=act, act_param=act_param,
        needs_input_grad=needs_input_grad, needs_param_grads=needs_param_grads, fuse=False,
    )  # fmt: skip
    return dx, dweight, dbias
