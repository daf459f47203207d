"""Fold eval-mode BatchNorm into the Conv, ConvTranspose or Linear that feeds it, for inference.

In eval mode BatchNorm is a fixed per-channel affine map (Ioffe & Szegedy 2015, Algorithm 2, step 11):

    y = γ (z - μ) / sqrt(σ² + ε) + β,     z = W x + b

so with s = γ / sqrt(σ² + ε) the pair is one layer with weights W' = s·W (each output channel's
filter scaled) and bias b' = s·(b - μ) + β. The folded model computes the same function with one
layer less per BatchNorm and one pass less over each activation.

Two levels, as in the rest of normkit's tools:

- :func:`fold_conv_bn_weights` and :func:`fold_linear_bn_weights` are the maths on tensors;
- :func:`fold_batchnorm` finds the pairs in a whole model by its data flow (torch.fx), folds each,
  removes the BatchNorm calls, and reports what it folded and what it left and why.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from normkit.errors import ConfigError
from normkit.nn.snapshot import frozen_running_stats
from normkit.tools import _graph
from normkit.tools._graph import as_inputs
from normkit.tools._norms import (
    eval_affine_obstacle,
    eval_statistics,
    is_batch_norm,
    is_frozen_batch_norm,
)

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _math_dtype(tensor: torch.Tensor) -> torch.dtype:
    # The per-channel maths runs in float64 (float32 where the device has no float64), then rounds
    # once to the layer's dtype: a half-precision model gets the correctly rounded folded weights.
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def _scale_and_shift(mean, var, eps, gamma, beta, dtype):
    """s = γ / sqrt(σ² + ε) and t = β - s·μ, per channel, in ``dtype`` (Algorithm 2, step 11)."""
    mean, var = mean.detach().to(dtype), var.detach().to(dtype)
    gamma = torch.ones_like(mean) if gamma is None else gamma.detach().to(dtype)
    beta = torch.zeros_like(mean) if beta is None else beta.detach().to(dtype)
    scale = gamma * torch.rsqrt(var + eps)
    return scale, beta - scale * mean


def _check_channels(what: str, channels: int, mean: torch.Tensor) -> None:
    if mean.numel() != channels:
        raise ConfigError(
            f"the {what} has {channels} output channels but the BatchNorm statistics have "
            f"{mean.numel()}; fold a BatchNorm only into the layer that produces its input"
        )


def _fold(weight, bias, mean, var, eps, gamma, beta, out_channels, scale_weight):
    _check_channels("layer", out_channels, mean)
    dtype = _math_dtype(weight)
    scale, shift = _scale_and_shift(mean, var, eps, gamma, beta, dtype)
    folded_weight = scale_weight(weight.detach().to(dtype), scale).to(weight.dtype)
    old_bias = torch.zeros_like(scale) if bias is None else bias.detach().to(dtype)
    folded_bias = (scale * old_bias + shift).to(weight.dtype if bias is None else bias.dtype)
    bias_grad = weight.requires_grad if bias is None else bias.requires_grad
    return (
        nn.Parameter(folded_weight, requires_grad=weight.requires_grad),
        nn.Parameter(folded_bias, requires_grad=bias_grad),
    )


def fold_conv_bn_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[nn.Parameter, nn.Parameter]:
    """The weight and bias of a convolution followed by an eval-mode BatchNorm, as one convolution.

    ``W' = s·W`` per output channel and ``b' = s·(b - μ) + β`` with ``s = γ / sqrt(σ² + ε)``
    (Ioffe & Szegedy 2015, Algorithm 2, step 11). ``bias=None`` is a zero bias; ``gamma``/``beta``
    None mean γ = 1, β = 0 (``affine=False``). The result keeps the dtypes, device and
    ``requires_grad`` of ``weight`` and ``bias``.

    Args:
        weight: (C_out, C_in / groups, *kernel) for a convolution, or (C_in, C_out / groups, *kernel)
            with ``transposed=True`` for a ConvTranspose.
        groups: the convolution's groups; needed for a grouped ConvTranspose, whose output channels
            are spread over dim 1 of each group's block of rows.

    Example::

        >>> import torch
        >>> conv, bn = torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4).eval()
        >>> w, b = fold_conv_bn_weights(conv.weight, None, bn.running_mean, bn.running_var,
        ...                             bn.eps, bn.weight, bn.bias)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> bool(torch.allclose(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5))
        True
    """
    if transposed:
        c_in, per_group = weight.shape[0], weight.shape[1]
        out_channels = per_group * groups

        def scale_weight(w, scale):  # w: (C_in, C_out/g, *k); channel o = g * (C_out/g) + j
            grouped = w.reshape(groups, c_in // groups, per_group, *w.shape[2:])
            factor = scale.reshape(groups, 1, per_group, *([1] * (w.dim() - 2)))
            return (grouped * factor).reshape(w.shape)

    else:
        out_channels = weight.shape[0]

        def scale_weight(w, scale):  # w: (C_out, C_in/g, *k)
            return w * scale.reshape(-1, *([1] * (w.dim() - 1)))

    return _fold(weight, bias, mean, var, eps, gamma, beta, out_channels, scale_weight)


def fold_linear_bn_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[nn.Parameter, nn.Parameter]:
    """:func:`fold_conv_bn_weights` for a Linear layer, weight (out_features, in_features), whose
    (N, out_features) output feeds an eval-mode BatchNorm1d."""

    def scale_weight(w, scale):
        return w * scale.reshape(-1, 1)

    return _fold(weight, bias, mean, var, eps, gamma, beta, weight.shape[0], scale_weight)


def fold_into(layer: nn.Module, norm: nn.Module) -> None:
    """Fold the eval-mode normalizer ``norm`` into ``layer`` (Conv/ConvTranspose/Linear), in place."""
    mean, var, eps, gamma, beta = eval_statistics(norm)
    if isinstance(layer, nn.Linear):
        weight, bias = fold_linear_bn_weights(layer.weight, layer.bias, mean, var, eps, gamma, beta)
    else:
        weight, bias = fold_conv_bn_weights(
            layer.weight,
            layer.bias,
            mean,
            var,
            eps,
            gamma,
            beta,
            transposed=isinstance(layer, _TRANSPOSED),
            groups=layer.groups,
        )
    layer.weight = weight
    layer.bias = bias


@dataclass
class Folded:
    """One BatchNorm call folded into the layer that feeds it."""

    norm: str
    into: str


@dataclass
class LeftInPlace:
    """One BatchNorm call left as it was, and why."""

    norm: str
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did.

    Attributes:
        folded: each BatchNorm call folded, and the layer it went into.
        left: each BatchNorm call left in place, with the reason.
        traced: whether the data flow came from a torch.fx trace (else: Sequential neighbours only).
        trace_error: why tracing failed, when it did.
        modules_before, modules_after: how many modules the model had and has.
        max_relative_error: with ``example_inputs``: max |folded - original| / max |original| over
            the outputs, measured on those inputs.
    """

    folded: list[Folded] = field(default_factory=list)
    left: list[LeftInPlace] = field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None
    modules_before: int = 0
    modules_after: int = 0
    max_relative_error: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"folded {len(self.folded)} BatchNorm call(s), left {len(self.left)}; modules "
            f"{self.modules_before} -> {self.modules_after}"
            + ("" if self.traced else f" (not traced: {self.trace_error})")
        ]
        lines += [f"  folded {f.norm} into {f.into}" for f in self.folded]
        lines += [f"  left {item.norm}: {item.reason}" for item in self.left]
        if self.max_relative_error is not None:
            lines.append(
                f"  max relative error on the example inputs: {self.max_relative_error:.2e}"
            )
        return "\n".join(lines)


def _fold_obstacle(norm, producer, producer_shape) -> str | None:
    """Why this (producer, normalizer) pair cannot be folded, beyond the data flow; None if it can."""
    reason = eval_affine_obstacle(norm)
    if reason is None:
        reason = _graph.channel_obstacle(norm, producer, producer_shape)
    return reason


def _outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _outputs(item)]
    return []


@torch.no_grad()
def _relative_error(before, after) -> float:
    error, scale = 0.0, 0.0
    for a, b in zip(_outputs(before), _outputs(after), strict=True):
        if a.is_floating_point() and a.numel():
            error = max(error, (b.double() - a.double()).abs().max().item())
            scale = max(scale, a.double().abs().max().item())
    return error / scale if scale > 0 else error


def fold_batchnorm(
    model: nn.Module, example_inputs=None, *, inplace: bool = False
) -> tuple[nn.Module, FoldReport]:
    """Fold every eval-mode BatchNorm into the Conv/ConvTranspose/Linear that feeds it.

    The pairs come from the model's data flow, traced with torch.fx, not from the order in which
    layers are registered: a BatchNorm is folded when its input is the output of a Conv1d/2d/3d,
    ConvTranspose1d/2d/3d (grouped ones too) or Linear that feeds nothing else, is called once and
    shares its parameters with no other layer. Folded are torch.nn's and normkit's BatchNorm,
    SyncBatchNorm, Batch Renorm and Ghost BN in eval mode (all of which are Algorithm 2's fixed map
    then) and frozen BatchNorm in any mode. Everything else is left in place and listed in the
    report with the reason (training mode, a ReLU or an addition in between, a shared producer...).
    A BatchNorm reused after several layers is folded into each of them.

    Args:
        model: any model; call ``model.eval()`` first (BatchNorm in training mode is left).
        example_inputs: a tensor or a tuple of the forward's positional inputs. Optional, but
            needed to fold into a Linear (normkit checks that its output is (N, features)), and
            used to measure the folded model against the original (``max_relative_error``).
        inplace: fold into the model's own layers instead of a deep copy. The returned model is
            then built from them, and the original must not be used any more.

    Returns:
        ``(folded_model, report)``. When the model traces, ``folded_model`` is a
        ``torch.fx.GraphModule`` with the original's submodules under the same names, less the
        folded BatchNorms (the forward as it runs in the current mode, for inference). When it
        does not, ``folded_model`` is the model itself with each BatchNorm folded into the previous
        child of its ``nn.Sequential`` replaced by ``nn.Identity``, and ``report.traced`` is False.

    Example::

        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), nk.BatchNorm2d(8), torch.nn.ReLU())
        >>> _ = model(torch.randn(4, 3, 8, 8)); _ = model.eval()
        >>> folded, report = nk.tools.fold_batchnorm(model)
        >>> [(f.norm, f.into) for f in report.folded], report.modules_before, report.modules_after
        ([('1', '0')], 4, 3)
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    expected = None
    if inputs is not None:
        with torch.no_grad(), frozen_running_stats(model):
            expected = model(*inputs)
    modules_before = len(list(model.modules()))
    target = model if inplace else copy.deepcopy(model)
    sites, graph_module, trace_error = _graph.find_sites(target, _folds, inputs)
    report = FoldReport(traced=graph_module is not None, trace_error=trace_error)
    modules = dict(target.named_modules())
    for site in sites:
        reason = site.obstacle
        if reason is None:
            reason = _fold_obstacle(modules[site.norm], modules[site.producer], site.producer_shape)
        if reason is not None:
            report.left.append(LeftInPlace(site.norm, reason))
            continue
        fold_into(modules[site.producer], modules[site.norm])
        report.folded.append(Folded(site.norm, site.producer))
        if graph_module is not None:  # the BatchNorm call disappears from the graph
            site.node.replace_all_uses_with(site.producer_node)
            graph_module.graph.erase_node(site.node)
        else:  # the BatchNorm's place in its Sequential becomes an identity
            modules[site.parent][site.index] = nn.Identity()
    folded_model = target
    if graph_module is not None:
        graph_module.graph.lint()
        graph_module.delete_all_unused_submodules()
        graph_module.recompile()
        folded_model = graph_module
    report.modules_before = modules_before
    report.modules_after = len(list(folded_model.modules()))
    if inputs is not None:
        with torch.no_grad(), frozen_running_stats(folded_model):
            report.max_relative_error = _relative_error(expected, folded_model(*inputs))
    return folded_model, report


def _folds(module: nn.Module) -> bool:
    return is_batch_norm(module) or is_frozen_batch_norm(module)
