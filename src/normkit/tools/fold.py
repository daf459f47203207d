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
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from normkit.errors import ConfigError
from normkit.nn.snapshot import frozen_running_stats
from normkit.tools import _graph
from normkit.tools._graph import as_inputs
from normkit.tools._norms import (
    Split,
    eval_affine_obstacle,
    eval_statistics,
    is_batch_norm,
    is_frozen_batch_norm,
    split,
)
from normkit.tools.norm_act import NormAct

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


def fold_into(layer: nn.Module, norm: nn.Module) -> str | None:
    """Fold the eval-mode normalizer ``norm`` into ``layer`` (Conv/ConvTranspose/Linear), in place.

    A parametrized weight or bias (``torch.nn.utils.parametrizations.weight_norm``,
    ``spectral_norm``, ...) is folded at its current value and the parametrization removed; the
    return value then says so (None otherwise).
    """
    note = _remove_parametrizations(layer) or _apply_weight_transform(layer)
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
    return note


def _remove_parametrizations(layer: nn.Module) -> str | None:
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(layer):
        return None
    # parametrize.remove_parametrizations deletes the tensor's property from the module's class,
    # which a deep copy shares with the model it was copied from (whose weight would then vanish):
    # read the current values, then give this module its own class back by hand.
    names = list(layer.parametrizations.keys())
    with torch.no_grad():
        values = {name: getattr(layer, name).detach().clone() for name in names}
    trainable = {
        name: any(p.requires_grad for p in layer.parametrizations[name].parameters())
        for name in names
    }
    del layer._modules["parametrizations"]
    layer.__class__ = type(layer).__bases__[0]
    for name, value in values.items():
        layer.register_parameter(name, nn.Parameter(value, requires_grad=trainable[name]))
    return (
        f"the parametrization of {', '.join(repr(n) for n in names)} was removed and its current "
        "value folded"
    )


def transforms_weight(layer: nn.Module) -> bool:
    """normkit's convolutions with a transformed weight (``StdConv2d``, ``ScaledStdConv2d``,
    ``CenteredConv2d``): a plain convolution of ``transformed_weight()``, so they fold."""
    return type(layer).__module__.startswith("normkit.") and callable(
        getattr(layer, "transformed_weight", None)
    )


def _apply_weight_transform(layer: nn.Module) -> str | None:
    """Turn a normkit weight-transformed convolution into the torch convolution it computes (its
    transformed weight, once), in place, so that a BatchNorm folds into it like any other."""
    if not transforms_weight(layer):
        return None
    name = type(layer).__name__
    with torch.no_grad():
        weight = layer.transformed_weight().detach().clone()
    trainable = layer.weight.requires_grad
    base = next(cls for cls in type(layer).__mro__ if cls in _graph.WEIGHTED_LAYERS)
    for extra in [n for n in layer._parameters if n not in ("weight", "bias")]:
        del layer._parameters[extra]  # ScaledStdConv2d's gain, now inside the weight
    layer.__dict__.pop("_cache", None)
    layer.__class__ = base
    layer.weight = nn.Parameter(weight, requires_grad=trainable)
    return f"its {name} weight transform applied once: it is a plain {base.__name__} now"


def producer_obstacle(layer: nn.Module) -> str | None:
    """Why folding into ``layer`` could change what the model computes; None when it cannot.

    Folding rewrites ``layer.weight`` and ``layer.bias``: that is exact only when the forward is
    the torch.nn layer's own (a subclass may standardize or quantize its weight, as timm's
    StdConv2d does), when no hook recomputes or reads them (the old ``torch.nn.utils.weight_norm``
    and pruning recompute the weight in a forward pre-hook), and when a parametrization gives the
    same value at every call (spectral_norm in training mode updates its estimate each call).
    """
    from torch.nn.utils import parametrize

    base = next(cls for cls in _graph.WEIGHTED_LAYERS if isinstance(layer, cls))
    name = type(layer).__name__
    if type(layer).forward is not base.forward and not transforms_weight(layer):
        return (
            f"{name} overrides {base.__name__}'s forward, which may transform its weight (weight "
            "standardization, quantization), so a folded weight may not give the same output"
        )
    if layer._forward_pre_hooks or layer._forward_hooks:
        return (
            f"{name} has forward hooks (the old torch.nn.utils.weight_norm and pruning recompute "
            "the weight in one), which folding would bypass or break"
        )
    if parametrize.is_parametrized(layer):
        training = [
            n for n, p in layer.parametrizations.items() if any(m.training for m in p.modules())
        ]
        if training:
            return (
                f"the parametrization of {', '.join(repr(n) for n in training)} is in training "
                "mode, where it may change at every call (spectral_norm's power iteration); call "
                "model.eval() before folding"
            )
    return None


@dataclass
class Folded:
    """One BatchNorm call folded into the layer that feeds it; ``kept``: what the layer computed
    after its normalization, kept as modules of its own (activation, drop path, residual);
    ``note``: anything else done (a parametrization removed)."""

    norm: str
    into: str
    kept: list[str] = field(default_factory=list)
    note: str | None = None


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
        graph_module: why the folded model is a ``torch.fx.GraphModule`` rather than the model's
            own class; None when it is the model's own class.
        modules_before, modules_after: how many modules the model had and has (the
            ``nn.Identity`` left where a layer was folded away not counted).
        max_relative_error: with ``example_inputs``: max |folded - original| / max |original| over
            the outputs, measured on those inputs.
    """

    folded: list[Folded] = field(default_factory=list)
    left: list[LeftInPlace] = field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None
    graph_module: str | None = None
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
        lines += [
            f"  folded {f.norm} into {f.into}"
            + (f", kept {'; '.join(f.kept)}" if f.kept else "")
            + (f" ({f.note})" if f.note else "")
            for f in self.folded
        ]
        if self.graph_module is not None:
            lines.append(f"  returned a torch.fx.GraphModule: {self.graph_module}")
        lines += [f"  left {item.norm}: {item.reason}" for item in self.left]
        if self.max_relative_error is not None:
            lines.append(
                f"  max relative error on the example inputs: {self.max_relative_error:.2e}"
            )
        return "\n".join(lines)


def _fold_obstacle(norm, producer, producer_shape) -> str | None:
    """Why this (producer, normalizer) pair cannot be folded, beyond the data flow; None if it can.
    ``norm`` is the normalization alone (:func:`~normkit.tools._norms.split`)."""
    reason = eval_affine_obstacle(norm)
    if reason is None:
        reason = _graph.channel_obstacle(norm, producer, producer_shape)
    if reason is None:
        reason = producer_obstacle(producer)
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
    then) and frozen BatchNorm in any mode. A BatchNorm + activation layer (normkit's
    ``BatchNormAct`` and ``InPlaceABN``, timm's ``BatchNormAct2d`` and ``FrozenBatchNormAct2d``) is
    folded too and its activation, drop path and residual input kept as modules of their own
    (a :class:`~normkit.tools.NormAct` in the layer's place). Everything else is left in place and
    listed in the report with the reason (training mode, a ReLU or an addition in between, a
    shared producer, a producer whose forward or hooks transform its weight, a layer whose forward
    normkit does not know...). A BatchNorm reused after several layers is folded into each of them.
    A producer under a parametrization (``weight_norm``, ``spectral_norm``) is folded at its
    current weight, and the parametrization removed (the report says so).

    Args:
        model: any model; call ``model.eval()`` first (BatchNorm in training mode is left).
        example_inputs: a tensor or a tuple of the forward's positional inputs. Optional, but
            needed to fold into a Linear (normkit checks that its output is (N, features)), and
            used to measure the folded model against the original (``max_relative_error``).
        inplace: fold into the model's own layers instead of a deep copy (which the default
            returns, leaving ``model`` as it was).

    Returns:
        ``(folded_model, report)``. ``folded_model`` is the model's own class, with each folded
        BatchNorm replaced by ``nn.Identity`` (a ``NormAct`` of its activation for a BatchNorm +
        activation layer): printing, ``state_dict`` keys (less the folded layers') and scripting
        stay the model's. The folded forward is checked by tracing it again; where it differs
        from the folded graph (a forward that reads a folded layer's attributes, or a layer
        called several times and folded at some calls only), ``folded_model`` is the
        ``torch.fx.GraphModule`` of the forward as it runs in the current mode, with the
        original's submodules under the same names, and ``report.graph_module`` says why. When
        the model does not trace, only BatchNorms after a Conv/Linear in an ``nn.Sequential`` are
        folded, and ``report.traced`` is False.

    Example::

        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), nk.BatchNorm2d(8), torch.nn.ReLU())
        >>> _ = model(torch.randn(4, 3, 8, 8)); _ = model.eval()
        >>> folded, report = nk.tools.fold_batchnorm(model)
        >>> [(f.norm, f.into) for f in report.folded], type(folded).__name__, folded[1]
        ([('1', '0')], 'Sequential', Identity())
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    expected = None
    if inputs is not None:
        with torch.no_grad(), frozen_running_stats(model):
            expected = model(*_cloned(inputs))
    modules_before = len(list(model.modules()))
    target = model if inplace else copy.deepcopy(model)
    sites, graph_module, trace_error = _graph.find_sites(target, _folds, inputs)
    report = FoldReport(traced=graph_module is not None, trace_error=trace_error)
    modules = dict(target.named_modules())
    parts: dict[str, Split | str] = {}
    reasons = []
    for site in sites:
        if site.norm not in parts:
            parts[site.norm] = split(modules[site.norm])
        reason = site.obstacle
        if reason is None and isinstance(parts[site.norm], str):
            reason = parts[site.norm]
        if reason is None:
            norm, producer = parts[site.norm].norm, modules[site.producer]
            reason = _fold_obstacle(norm, producer, site.producer_shape)
        if reason is None and (
            modules[site.norm]._forward_pre_hooks or modules[site.norm]._forward_hooks
        ):
            reason = "it has forward hooks, which would no longer run once it is folded away"
        reasons.append(reason)
    # A layer that computes more than its normalization is replaced as a whole (the activation kept
    # in a NormAct): every call of it folds, or none does.
    unfolded = {
        site.norm for site, reason in zip(sites, reasons, strict=True) if reason is not None
    }
    calls = Counter(site.norm for site in sites)
    for index, site in enumerate(sites):
        whole = parts[site.norm]
        if reasons[index] is None and site.norm in unfolded and not whole.plain:
            reasons[index] = (
                f"it is called {calls[site.norm]} times and not every call can be folded, so its "
                "activation cannot be separated from it"
            )
    replaced: dict[str, nn.Module] = {}  # layer path -> what takes its place once folded
    for site, reason in zip(sites, reasons, strict=True):
        if reason is not None:
            report.left.append(LeftInPlace(site.norm, reason))
            continue
        whole = parts[site.norm]
        note = fold_into(modules[site.producer], whole.norm)
        report.folded.append(Folded(site.norm, site.producer, list(whole.kept), note))
        if site.norm not in replaced:
            replaced[site.norm] = (
                nn.Identity()
                if whole.plain
                else NormAct(nn.Identity(), whole.drop, whole.act, residual=whole.residual)
            )
        if graph_module is None:  # the layer's place in its Sequential
            modules[site.parent][site.index] = replaced[site.norm]
        elif whole.plain:  # the BatchNorm call disappears from the graph
            site.node.replace_all_uses_with(site.producer_node)
            graph_module.graph.erase_node(site.node)
    folded_model = target
    if graph_module is not None:
        for path, new in replaced.items():
            if isinstance(new, NormAct):
                _set_submodule(graph_module, path, new)
        graph_module.graph.lint()
        graph_module.delete_all_unused_submodules()
        graph_module.recompile()
        folded_model, report.graph_module = _as_model_class(
            target, graph_module, replaced, unfolded
        )
    report.modules_before = modules_before
    placeholders = {id(m) for m in replaced.values() if isinstance(m, nn.Identity)}
    placeholders |= {id(m.norm) for m in replaced.values() if isinstance(m, NormAct)}
    report.modules_after = sum(id(m) not in placeholders for m in folded_model.modules())
    if inputs is not None:
        with torch.no_grad(), frozen_running_stats(folded_model):
            report.max_relative_error = _relative_error(expected, folded_model(*_cloned(inputs)))
    return folded_model, report


def _cloned(inputs: tuple) -> tuple:
    # A forward may write over its input (InPlaceABN, ReLU(inplace=True) first): each run gets a copy.
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class _CheckTracer(_graph.NormTracer):
    """The tools' tracer, tracing through the given modules (the Identity left by a folded layer)."""

    def __init__(self, through: set[int]) -> None:
        super().__init__()
        self.through = through

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if id(module) in self.through:
            return False
        return super().is_leaf_module(module, qualified_name)


def _as_model_class(
    target: nn.Module, graph_module: fx.GraphModule, replaced: dict[str, nn.Module], unfolded: set
) -> tuple[nn.Module, str | None]:
    """The folded model as the user's own class where that computes what the graph does.

    Each folded layer becomes an ``nn.Identity`` (or a NormAct of its activation) in ``target``;
    ``target`` is returned when its forward, traced again, is the folded graph call for call.
    Otherwise the GraphModule is returned, with the reason.
    """
    if not replaced:
        return target, None  # nothing folded: the model computes what it did
    partly = sorted(set(replaced) & unfolded)
    if partly:
        return graph_module, (
            f"{', '.join(repr(p) for p in partly)} is called several times and only some calls "
            "were folded, which only a rewritten forward can express"
        )
    originals = {path: target.get_submodule(path) for path in replaced}
    for path, new in replaced.items():
        _set_submodule(target, path, new)
    through = {id(m) for m in replaced.values() if isinstance(m, nn.Identity)}
    through |= {id(m.norm) for m in replaced.values() if isinstance(m, NormAct)}
    try:
        mine = _CheckTracer(through).trace(target).python_code("self").src
        folded = _CheckTracer(through).trace(graph_module).python_code("self").src
    except Exception as error:  # the user's forward may rely on the layers it no longer has
        mine, folded = f"{type(error).__name__}: {error}", None
    if mine != folded:
        for path, old in originals.items():
            _set_submodule(target, path, old)
        return graph_module, (
            "the model's forward, traced again with the folded layers removed, does not compute "
            "what the folded graph does (it reads the folded layers' attributes or branches on "
            "them)"
        )
    return target, None


def _folds(module: nn.Module) -> bool:
    return is_batch_norm(module) or is_frozen_batch_norm(module)
