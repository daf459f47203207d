"""Conversions for small batches that change a model's convolutions together with its BatchNorms,
as the papers use them (``nk.tools.convert(model, spec)`` with these specs):

- ``"ws_gn[:G]"``: Weight Standardization + GroupNorm (Qiao et al. 2019): every ``Conv2d`` becomes
  :class:`normkit.StdConv2d` and every BatchNorm a ``GroupNorm(G, C)``; G defaults to the largest
  number up to 32 (Wu & He's) that divides every converted layer's channels.
- ``"mabn"``: MABN (Yan et al. 2020, §4.2): every ``Conv2d`` becomes :class:`normkit.CenteredConv2d`
  (centred filters) and every BatchNorm a :class:`normkit.MovingAverageBatchNorm`.
- ``"cbn[:k]"``: Cross-Iteration BN (Yao et al. 2021): every BatchNorm fed by a convolution or a
  linear layer, and by nothing else (read from the traced data flow), becomes a
  :class:`normkit.CrossIterationBatchNorm` attached to that producer; the others stay as they were,
  listed in ``skipped`` with the reason.

The convolutions keep their weights and biases (shared tensors' values copied), so an optimizer
must be built after the conversion. Standardizing or centring the filters changes what a trained
model computes: these conversions are for training from scratch (or fine-tuning), as in the papers,
and each converted convolution is listed in the report.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from normkit.errors import ConfigError
from normkit.tools._norms import is_batch_norm, is_frozen_batch_norm, num_channels

SPECS = ("ws_gn", "mabn", "cbn")


def small_batch_spec(to) -> tuple[str, int | None] | None:
    """``(name, number)`` when ``to`` is one of :data:`SPECS` (``"ws_gn:16"`` -> ("ws_gn", 16))."""
    if not isinstance(to, str):
        return None
    name, _, number = to.partition(":")
    name = name.strip().lower().replace("-", "_").replace("+", "_")
    if name not in SPECS:
        return None
    if not number:
        return name, None
    if not number.strip().isdigit() or int(number) <= 0:
        raise ConfigError(f"the number in {to!r} must be a positive integer, got {number!r}")
    return name, int(number)


def norm_spec(name: str, number: int | None, model: nn.Module, selected, **kw):
    """What the BatchNorms become: a spec of ``nk.create_norm`` or a callable ``layer -> layer``."""
    if name == "ws_gn":
        return f"group:{number or _fitted_groups(model, selected)}"
    if name == "mabn":
        return "moving_average_batch_norm"  # create_norm's name ("mabn" here means both swaps)
    if number is not None:
        kw = {**kw, "window": number}
    return lambda layer: _cross_iteration(layer, **kw)


def transform_convolutions(name: str, model: nn.Module) -> list[tuple[str, str, list[str]]]:
    """Replace every plain ``Conv2d`` of ``model`` (in place) by the weight-transformed one the
    spec pairs with its normalization (none for "cbn"); returns ``(path, new class, carried)``."""
    if name == "cbn":
        return []
    conv_class = _conv_class(name)
    done = []
    for path, conv in _plain_convolutions(model):
        _set(model, path, _transformed_conv(conv, conv_class))
        done.append((path, conv_class.__name__, ["weight"] + ["bias"] * (conv.bias is not None)))
    return done


def cross_iteration_targets(model: nn.Module, selected, example_inputs):
    """For "cbn": ``(producers, unfed)``: normalizer path -> the Conv/Linear alone feeding it,
    and the selected normalizers without one (they stay, with :data:`UNFED_REASON`)."""
    producers = _producers(model, selected, example_inputs)
    unfed = sorted(p for p, m in model.named_modules() if selected(m) and p not in producers)
    return producers, unfed


def attach_producers(model: nn.Module, paths: list[str], producers: dict[str, str]) -> None:
    """Attach each converted Cross-Iteration BN at ``paths`` to its producer."""
    modules = dict(model.named_modules())
    for path in paths:
        norm = modules[path]
        norm = getattr(norm, "norm", norm)  # inside a NormAct when an activation was kept
        norm.attach(modules[producers[path]])


UNFED_REASON = (
    "no convolution or linear layer alone feeds it (read from the traced data flow), so "
    "CrossIterationBatchNorm's Taylor compensation has no weight to compensate for"
)


def selector(which):
    if which is None:
        return lambda m: is_batch_norm(m) and not is_frozen_batch_norm(m)
    if isinstance(which, type) or (
        isinstance(which, tuple) and all(isinstance(t, type) for t in which)
    ):
        return lambda m: isinstance(m, which)
    if callable(which):
        return which
    raise ConfigError(
        "which must be None (the BatchNorm family), a class, a tuple of classes or a predicate "
        f"for the small-batch conversions, got {which!r}"
    )


def _fitted_groups(model: nn.Module, selected) -> int:
    channels = [c for m in model.modules() if selected(m) and (c := num_channels(m)) is not None]
    if not channels:
        return 32
    common = math.gcd(*channels)
    return max(g for g in range(1, 33) if common % g == 0)


def _conv_class(name: str) -> type:
    import normkit as nk

    return nk.StdConv2d if name == "ws_gn" else nk.CenteredConv2d


def _plain_convolutions(model: nn.Module):
    """Every Conv2d that computes torch's convolution of its own weight (not a subclass that
    overrides forward, not already transformed), with its path; each once."""
    seen, found = set(), []
    for path, module in model.named_modules():
        if id(module) in seen or not isinstance(module, nn.Conv2d):
            continue
        seen.add(id(module))
        if type(module).forward is nn.Conv2d.forward and not type(module).__module__.startswith(
            "normkit."
        ):
            found.append((path, module))
    return found


def _transformed_conv(conv: nn.Conv2d, cls: type) -> nn.Module:
    new = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    return new.train(conv.training)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` and at every other path where the old one was registered."""
    old = root.get_submodule(path)
    for parent in root.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, module)


def _producers(model: nn.Module, selected, example_inputs) -> dict[str, str]:
    """Normalizer path -> the path of the Conv/Linear that feeds it alone (fx data flow)."""
    from normkit.tools._graph import as_inputs, find_sites

    sites, _, _ = find_sites(model, selected, as_inputs(example_inputs))
    found: dict[str, str] = {}
    calls: dict[str, int] = {}
    for site in sites:
        calls[site.norm] = calls.get(site.norm, 0) + 1
        if site.producer is not None and site.obstacle is None:
            found.setdefault(site.norm, site.producer)
    return {norm: producer for norm, producer in found.items() if calls[norm] == 1}


def _cross_iteration(layer: nn.Module, **kw) -> nn.Module:
    import normkit as nk

    channels = num_channels(layer)
    kw = {k: v for k, v in kw.items() if v is not None}
    return nk.CrossIterationBatchNorm(channels, **kw)
