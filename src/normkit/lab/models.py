"""The lab's networks: a fully connected net, small CNNs, VGG and a bottleneck ResNet, with or
without normalization.

The first two are ``nn.Sequential`` with named children (``linear1``, ``norm1``, ``act1``, ...) so experiments
can find "the input to the sigmoid of hidden layer 3" by name. Normalization layers come from the
public API as a user would write them: ``norm="batch"`` is ``nk.BatchNorm1d``/``nk.BatchNorm2d``, any
other name a layer of ``nk.create_norm`` (``"group:4"``, ``"layer"``, ...), ``"none"`` no layer.

Placement (Ioffe & Szegedy 2015, §3.2): ``"before"`` puts BN between the affine map and the
nonlinearity, z = g(BN(Wu)), and drops the affine map's bias because BN's β subsumes it;
``"after"`` puts BN after the nonlinearity, BN(g(Wu + b)), where the bias is no longer redundant
and is kept.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
PLACEMENTS = ("before", "after")


def _check_choice(argument: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{argument}={value!r} is not known; choose one of {', '.join(choices)}")


def _norm(norm: str, spatial_dims: int, features: int) -> nn.Module | None:
    """The normalizer named ``norm`` for ``features`` channels; None for "none".

    ``"batch"`` is ``nk.BatchNorm1d``/``nk.BatchNorm2d``; any other name goes to
    ``nk.create_norm`` (``"group:4"``, ``"layer"``, ``"renorm"``, ...), whose errors list the names.
    """
    if norm == "none":
        return None
    if norm == "batch":
        return {0: nk.BatchNorm1d, 1: nk.BatchNorm1d, 2: nk.BatchNorm2d}[spatial_dims](features)
    return nk.create_norm(norm, features)


def _block(
    layers: OrderedDict,
    index: int,
    affine: nn.Module,
    norm: nn.Module | None,
    activation: str,
    placement: str,
) -> None:
    layers[f"{'conv' if affine.__class__.__name__.startswith('Conv') else 'linear'}{index}"] = (
        affine
    )
    if norm is not None and placement == "before":
        layers[f"norm{index}"] = norm
    layers[f"act{index}"] = ACTIVATIONS[activation]()
    if norm is not None and placement == "after":
        layers[f"norm{index}"] = norm


def mlp(
    in_features: int,
    hidden: tuple[int, ...] = (100, 100, 100),
    classes: int = 10,
    activation: str = "sigmoid",
    norm: str = "none",
    placement: str = "before",
    dropout: float = 0.0,
) -> nn.Sequential:
    """A fully connected net: flatten, then per hidden layer Linear [BN] act [Dropout], then Linear.

    Ioffe & Szegedy's MNIST net (Fig. 1) is ``mlp(784, (100, 100, 100), activation="sigmoid")``.
    """
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("placement", placement, PLACEMENTS)
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = in_features
    for index, out in enumerate(hidden, start=1):
        has_norm = norm != "none"
        linear = nn.Linear(width, out, bias=not (has_norm and placement == "before"))
        _block(layers, index, linear, _norm(norm, 0, out), activation, placement)
        if dropout > 0:
            layers[f"dropout{index}"] = nn.Dropout(dropout)
        width = out
    layers["output"] = nn.Linear(width, classes)
    return nn.Sequential(layers)


def cnn(
    sample_shape: tuple[int, ...],
    channels: tuple[int, ...] = (16, 32),
    hidden: int = 128,
    classes: int = 10,
    activation: str = "relu",
    norm: str = "none",
    placement: str = "before",
    dropout: float = 0.0,
) -> nn.Sequential:
    """A small CNN: per stage conv5 [BN] act [BN] maxpool2, then fc ``hidden`` [BN] act, then fc.

    Works on images (C, H, W) with 2-d convolutions and on sequences (C, L) such as MNIST-1D with
    1-d ones. ``dropout`` applies before the last fully connected layer.
    """
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("placement", placement, PLACEMENTS)
    spatial = len(sample_shape) - 1
    if spatial not in (1, 2):
        raise ConfigError(f"cnn: sample_shape={tuple(sample_shape)} must be (C, L) or (C, H, W)")
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if spatial == 1 else (nn.Conv2d, nn.MaxPool2d)
    has_norm = norm != "none"
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width, size = sample_shape[0], list(sample_shape[1:])
    for index, out in enumerate(channels, start=1):
        layer = conv(width, out, 5, padding=2, bias=not (has_norm and placement == "before"))
        _block(
            layers,
            index,
            layer,
            _norm(norm, spatial, out),
            activation,
            placement,
        )
        if min(size) >= 2:
            layers[f"pool{index}"] = pool(2)
            size = [s // 2 for s in size]
        width = out
    layers["flatten"] = nn.Flatten()
    index = len(channels) + 1
    linear = nn.Linear(
        width * math.prod(size), hidden, bias=not (has_norm and placement == "before")
    )
    _block(layers, index, linear, _norm(norm, 0, hidden), activation, placement)
    if dropout > 0:
        layers["dropout"] = nn.Dropout(dropout)
    layers["output"] = nn.Linear(hidden, classes)
    return nn.Sequential(layers)


def conv_net(
    sample_shape: tuple[int, ...],
    channels: tuple[int, ...],
    hidden: int,
    classes: int,
    norm: str,
    *,
    kernel_size: int = 3,
    fc_norm: Callable[[int], nn.Module] | None = None,
) -> nn.Sequential:
    """conv k×k (no bias) → ``norm`` (a :func:`normkit.create_norm` spec) → ReLU → maxpool2 per
    stage, then fc ``hidden`` [→ ``fc_norm(hidden)``] → ReLU → fc. Layers are named ``conv{i}``,
    ``norm{i}``, ``act{i}``, ``pool{i}``, then ``linear``, ``norm_fc``, ``act_fc``, ``output``; the
    fc layer has a bias only without ``fc_norm``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width, size = sample_shape[0], list(sample_shape[1:])
    for index, out in enumerate(channels, start=1):
        padding = kernel_size // 2
        layers[f"conv{index}"] = nn.Conv2d(width, out, kernel_size, padding=padding, bias=False)
        layers[f"norm{index}"] = nk.create_norm(norm, out)
        layers[f"act{index}"] = nn.ReLU()
        if min(size) >= 2:
            layers[f"pool{index}"] = nn.MaxPool2d(2)
            size = [s // 2 for s in size]
        width = out
    layers["flatten"] = nn.Flatten()
    layers["linear"] = nn.Linear(width * math.prod(size), hidden, bias=fc_norm is None)
    if fc_norm is not None:
        layers["norm_fc"] = fc_norm(hidden)
    layers["act_fc"] = nn.ReLU()
    layers["output"] = nn.Linear(hidden, classes)
    return nn.Sequential(layers)


def initialize(model: nn.Module, scheme: str, generator: torch.Generator) -> None:
    """Re-draw every Linear/Conv weight from ``generator``; biases start at zero.

    ``scheme``: ``"gaussian:STD"`` (N(0, STD²), the paper's "small random Gaussian values"),
    ``"xavier"`` (Glorot & Bengio 2010, normal, std = sqrt(2 / (fan_in + fan_out))) or ``"he"``
    (He et al. 2015, normal, std = sqrt(2 / fan_in)). BN layers keep γ = 1, β = 0.
    """
    if not (scheme in ("xavier", "he") or scheme.startswith("gaussian:")):
        raise ConfigError(
            f"init={scheme!r} is not known; use 'gaussian:STD' (e.g. 'gaussian:0.01'), 'xavier' or 'he'"
        )
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                continue
            weight = module.weight
            receptive = math.prod(weight.shape[2:])
            fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
            if scheme == "xavier":
                std = math.sqrt(2.0 / (fan_in + fan_out))
            elif scheme == "he":
                std = math.sqrt(2.0 / fan_in)
            else:
                std = float(scheme.split(":", 1)[1])
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
            if module.bias is not None:
                module.bias.zero_()


def pre_activation(model: nn.Sequential, index: int) -> nn.Module:
    """The module whose output is the input of hidden layer ``index``'s nonlinearity."""
    names = list(model._modules)
    position = names.index(f"act{index}")
    return model._modules[names[position - 1]]


class Bottleneck(nn.Module):
    """He et al. 2016's bottleneck block (§4.1, Fig. 5 right): 1×1 → 3×3 (``stride``) → 1×1 to
    ``4 · width`` channels, ``norm`` after each convolution, ReLU after the first two and after the
    sum with the shortcut (a 1×1 convolution with ``norm`` where the shape changes)."""

    def __init__(self, channels: int, width: int, stride: int, norm: str):
        super().__init__()
        out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False), nk.create_norm(norm, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nk.create_norm(norm, width), nn.ReLU(),
            nn.Conv2d(width, out, 1, bias=False), nk.create_norm(norm, out),
        )  # fmt: skip
        self.shortcut = nn.Identity()
        if stride != 1 or channels != out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False),
                                          nk.create_norm(norm, out))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet(sample_shape: tuple[int, ...], classes: int, norm: str, blocks: tuple[int, ...] = (3, 4, 6, 3),
           width: int = 64, dropout: float = 0.0) -> nn.Sequential:  # fmt: skip
    """A bottleneck ResNet for small images (He et al. 2016, Table 1: ``blocks=(3, 4, 6, 3)`` is
    ResNet-50): a 3×3 stem to ``width`` channels with ``norm`` and no max-pool (the usual CIFAR
    stem), stages of bottleneck blocks of width ``width · 2^i``, each stage after the first starting
    with stride 2 (32×32 images: 32, 16, 8, 4 pixels), then global average pooling, Dropout
    ``dropout`` where it is > 0 (as Inception's before its classifier) and fc."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Conv2d(sample_shape[0], width, 3, padding=1, bias=False),
        norm_stem=nk.create_norm(norm, width), act_stem=nn.ReLU())  # fmt: skip
    channels = width
    for stage, count in enumerate(blocks):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            layers[f"block{stage + 1}_{index + 1}"] = Bottleneck(channels, width << stage, stride, norm)
            channels = 4 * (width << stage)
    layers["pool"], layers["flatten"] = nn.AdaptiveAvgPool2d(1), nn.Flatten()
    if dropout > 0:
        layers["dropout"] = nn.Dropout(dropout)
    layers["output"] = nn.Linear(channels, classes)
    return nn.Sequential(layers)


VGG_LAYOUTS = {"11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")}
"""Simonyan & Zisserman 2015, Table 1: configuration A (VGG-11), its conv widths and max-pools."""


def vgg(sample_shape: tuple[int, ...], layout, hidden: int = 512, classes: int = 10,
        norm: str | Callable[[int, bool], nn.Module | None] = "none",
        noise: Callable[[], nn.Module] | None = None, activation: str = "relu",
        dropout: float = 0.0) -> nn.Sequential:  # fmt: skip
    """A VGG network (Simonyan & Zisserman 2015) for small images: ``layout`` lists the 3×3
    convolutions' widths and ``"M"`` for a 2×2 max-pool (:data:`VGG_LAYOUTS`; a pool is skipped
    once the maps are 1 pixel), then fc ``hidden`` and the output layer (one hidden fc layer, the
    usual CIFAR classifier, instead of ImageNet's two of 4096). Each conv/fc layer is followed by
    ``norm`` (a spec of :func:`_norm`, or ``norm(features, spatial)``; no bias where there is one),
    ``noise()`` if given, then ``activation``; Dropout ``dropout`` before the output layer where it is
    > 0. Children: ``conv1``, ``norm1``, ``noise1``, ``act1``, ``pool1``, ..., ``linear{k}``,
    ``norm{k}``, ``noise{k}``, ``act{k}``, [``dropout``,] ``output``."""
    _check_choice("activation", activation, ACTIVATIONS)
    if len(sample_shape) != 3:
        raise ConfigError(f"vgg: sample_shape={tuple(sample_shape)} must be (C, H, W)")
    make = norm if callable(norm) else (lambda features, spatial: _norm(norm, 2 if spatial else 0, features))
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width, size, index = sample_shape[0], list(sample_shape[1:]), 0

    def block(affine: Callable[[bool], nn.Module], features: int, spatial: bool) -> None:
        normalization = make(features, spatial)  # before the layer: its bias depends on it
        layers[f"{'conv' if spatial else 'linear'}{index}"] = affine(normalization is None)
        if normalization is not None:
            layers[f"norm{index}"] = normalization
        if noise is not None:
            layers[f"noise{index}"] = noise()
        layers[f"act{index}"] = ACTIVATIONS[activation]()

    for entry in layout:
        if entry == "M":
            if min(size) >= 2:
                layers[f"pool{index}"] = nn.MaxPool2d(2)
                size = [s // 2 for s in size]
            continue
        index += 1
        block(lambda bias, w=width, out=entry: nn.Conv2d(w, out, 3, padding=1, bias=bias), entry, True)
        width = entry
    layers["flatten"] = nn.Flatten()
    index += 1
    block(lambda bias: nn.Linear(width * math.prod(size), hidden, bias=bias), hidden, False)
    if dropout > 0:
        layers["dropout"] = nn.Dropout(dropout)
    layers["output"] = nn.Linear(hidden, classes)
    return nn.Sequential(layers)
