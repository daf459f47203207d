"""What the experiments on BN's mechanism share: their networks, the noise of the noisy-BN
experiment, the ℓp normalization layers of §3.3, synthetic data for the deep linear network, and
the probe batches the measurements use.

Used by ``santurkar2018-noisy``, ``santurkar2018-ics`` and ``santurkar2018-landscape`` (and by
benchmarks/bench_metrics.py for the same networks).

Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help Optimization?"
(arXiv 1805.11604). The networks are CPU-sized stand-ins for the paper's VGG on CIFAR-10
(docs/PROTOCOLS.md §3, CPU protocol 3): a VGG-style CNN of 3×3 convolutions (one per stage,
16/32/64 channels, each stage ending in a 2×2 max-pool), a fully connected layer and the output
layer, and a deep linear network of 25 layers of width 32. Their ``gpu`` presets train VGG-11 on
CIFAR-10 (:data:`normkit.lab.models.VGG_LAYOUTS`), selected by the setting ``vgg``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab import models
from normkit.lab.datasets import Dataset
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.models import initialize
from normkit.lab.seeds import derived_seed
from normkit.lab.settings import Settings


@dataclass(frozen=True)
class NetworkSettings(Settings):
    """The settings of :func:`network` and its plain SGD, which the three experiments share."""

    steps: int = 1_500
    batch_size: int = 128
    channels: tuple[int, ...] = (16, 32, 64)
    vgg: str = ""  # "11": VGG-11 (normkit.lab.models.VGG_LAYOUTS) instead of the CNN of `channels`
    hidden: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.0


PAPER = "Santurkar, Tsipras, Ilyas & Madry 2018, How Does Batch Normalization Help Optimization?"
NORMS = ("none", "batch", "l1", "l2", "linf")
LABELS = {
    "standard": "Standard",
    "bn": "Standard + BatchNorm",
    "noisy-bn": "Standard + \u201cnoisy\u201d BatchNorm",
    "standard-noise": "Standard + the same noise",
    "l1": "ℓ1 normalization",
    "l2": "ℓ2 normalization",
    "linf": "ℓ∞ normalization",
}


class TimeVaryingNoise(nn.Module):
    """The noise of Santurkar et al.'s "noisy BatchNorm" (§2.1, Fig. 2), our concrete form.

    The paper perturbs every activation after each BN layer with i.i.d. noise "sampled from a
    non-zero mean and non-unit variance distribution", a distribution that "changes at each time
    step"; its exact form is not given. Ours (docs/PROTOCOLS.md §3, CPU protocol 3a): at every
    training-mode forward (= every training step), draw per channel c

        mu_c ~ U(-mean_range, mean_range),  s_c ~ U(scale_low, scale_high),

    then for every element y = x · (s_c + jitter · ε1) + (mu_c + jitter · ε2), with ε1, ε2 ~ N(0, 1)
    i.i.d. per element: multiplicative noise of mean s_c and additive noise of mean mu_c, both of
    standard deviation ``jitter``. Draws come from torch's global generator, which the lab seeds
    and checkpoints. In eval mode the layer applies the noise's expectation, y = x · (scale_low +
    scale_high) / 2 (E[mu_c] = 0), unless :func:`noise_in_eval` gives it a generator: then it draws
    the noise at every forward as in training (the network as trained, noise and ReLU together),
    from that generator, so measuring leaves training's random stream alone.
    """

    def __init__(
        self,
        mean_range: float = 1.0,
        scale_low: float = 1.0,
        scale_high: float = 3.0,
        jitter: float = 0.1,
    ):
        super().__init__()
        if mean_range < 0 or jitter < 0 or not 0 <= scale_low <= scale_high:
            raise ConfigError(
                f"TimeVaryingNoise: need mean_range >= 0, jitter >= 0 and 0 <= scale_low <= "
                f"scale_high; got mean_range={mean_range}, scale=({scale_low}, {scale_high}), "
                f"jitter={jitter}"
            )
        self.mean_range, self.jitter = mean_range, jitter
        self.scale_low, self.scale_high = scale_low, scale_high
        self.eval_generator: torch.Generator | None = None  # set by noise_in_eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.eval_generator is None:
            return x * ((self.scale_low + self.scale_high) / 2)
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)  # per channel, broadcast over N and space
        options = {"dtype": x.dtype, "device": x.device,
                   "generator": None if self.training else self.eval_generator}  # fmt: skip
        mean = (torch.rand(shape, **options) * 2 - 1) * self.mean_range
        scale = self.scale_low + torch.rand(shape, **options) * (self.scale_high - self.scale_low)
        multiplier = scale + self.jitter * torch.randn(x.shape, **options)
        shift = mean + self.jitter * torch.randn(x.shape, **options)
        return x * multiplier + shift

    def extra_repr(self) -> str:
        return (
            f"mean~U(±{self.mean_range:g}), scale~U({self.scale_low:g}, {self.scale_high:g}), "
            f"jitter={self.jitter:g}"
        )


@contextmanager
def noise_in_eval(model: nn.Module, generator: torch.Generator) -> Iterator[int]:
    """Within the block, every :class:`TimeVaryingNoise` of ``model`` draws its noise in eval mode
    too, from ``generator``; yields how many such layers there are (0: nothing random)."""
    layers = [m for m in model.modules() if isinstance(m, TimeVaryingNoise)]
    for layer in layers:
        layer.eval_generator = generator
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.eval_generator = None


@torch.no_grad()
def noisy_accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int,
                            seed: int) -> tuple[float, float]:  # fmt: skip
    """Eval-mode accuracy and cross-entropy with the noise on, each the mean over ``draws`` passes
    (one draw per forward of a chunk), from a generator seeded by ``seed``; one pass if the model
    has no noise. The generator lives on ``x``'s device (torch draws on a device only from a
    generator of that device: on CUDA a CPU one would raise)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with noise_in_eval(model, generator) as noisy:
        found = [accuracy_and_loss(model, x, y) for _ in range(draws if noisy else 1)]
    return sum(a for a, _ in found) / len(found), sum(loss for _, loss in found) / len(found)


class LpBatchNorm(nn.Module):
    """BatchNorm with the standard deviation replaced by an ℓp average (Santurkar et al. 2018, §3.3).

    Per channel, over the batch and space (as BN, Ioffe & Szegedy 2015, §3.2):

        y = γ · (x - μ_B) / (S_p + eps) + β,   μ_B = mean(x),
        S_1 = mean(|x|),  S_2 = sqrt(mean(x²)),  S_∞ = max(|x|),

    with S_p taken on x "before shifting the mean", as the paper says; ``p`` is 1, 2 or ``inf``.
    Decisions where the paper is silent: eps is added to S_p (not under a root), and eval mode uses
    running averages of μ_B and S_p kept with PyTorch's momentum convention (0.1). The paper reports
    that these layers train comparably to BN and smooth the landscape similarly.
    """

    def __init__(self, num_features: int, p: float, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if p not in (1, 2, math.inf):
            raise ConfigError(f"LpBatchNorm: p={p!r} must be 1, 2 or math.inf")
        if eps <= 0:
            raise ConfigError(f"LpBatchNorm: eps={eps} must be positive")
        self.num_features, self.p, self.eps, self.momentum = num_features, p, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_scale", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ConfigError(
                f"LpBatchNorm({self.num_features}): input of shape {tuple(x.shape)} must be "
                f"(N, {self.num_features}, *)"
            )
        dims = [0, *range(2, x.dim())]
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            mean = x.mean(dim=dims)
            if self.p == 1:
                scale = x.abs().mean(dim=dims)
            elif self.p == 2:
                scale = x.pow(2).mean(dim=dims).sqrt()
            else:
                scale = x.abs().amax(dim=dims)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_scale.lerp_(scale.detach(), self.momentum)
        else:
            mean, scale = self.running_mean, self.running_scale
        normalized = (x - mean.view(view)) / (scale.view(view) + self.eps)
        return normalized * self.weight.view(view) + self.bias.view(view)

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p:g}, eps={self.eps:g}, momentum={self.momentum:g}"


def norm_layer(norm: str, features: int, spatial: bool) -> nn.Module | None:
    """``"batch"``: ``nk.BatchNorm2d``/``nk.BatchNorm1d``; ``"l1"``, ``"l2"``, ``"linf"``:
    :class:`LpBatchNorm`; ``"none"``: no layer."""
    if norm not in NORMS:
        raise ConfigError(f"norm={norm!r} is not known; choose one of {', '.join(NORMS)}")
    if norm == "none":
        return None
    if norm == "batch":
        return (nk.BatchNorm2d if spatial else nk.BatchNorm1d)(features)
    return LpBatchNorm(features, {"l1": 1, "l2": 2, "linf": math.inf}[norm])


def vgg(
    sample_shape: Sequence[int],
    channels: Sequence[int] = (16, 32, 64),
    hidden: int = 128,
    classes: int = 10,
    norm: str = "none",
    noise: dict | None = None,
    layout: Sequence[int | str] | None = None,
) -> nn.Sequential:
    """A VGG-style CNN (:func:`normkit.lab.models.vgg`): per stage conv3×3 [norm] [noise] ReLU
    maxpool2 (or the convolutions and pools of ``layout``, e.g. ``models.VGG_LAYOUTS["11"]``), then
    fc ``hidden`` [norm] [noise] ReLU, then the output layer. Children are named ``conv1``,
    ``norm1``, ``noise1``, ``act1``, ``pool1``, ..., ``linear4``, ``norm4``, ``noise4``, ``act4``,
    ``output``.

    ``norm`` is one of :data:`NORMS` (:func:`norm_layer`). ``noise`` (keyword arguments of
    :class:`TimeVaryingNoise`, or None) puts the noise before every ReLU: after the normalization
    layer if there is one, else right after the conv/linear layer (the "Standard + noise"
    network). A conv/linear layer followed by a normalization layer has no bias (β subsumes it).
    """
    layout = tuple(layout) if layout is not None else tuple(x for c in channels for x in (c, "M"))
    return models.vgg(tuple(sample_shape), layout, hidden, classes,
                      lambda features, spatial: norm_layer(norm, features, spatial),
                      None if noise is None else lambda: TimeVaryingNoise(**noise))  # fmt: skip


def layout(s) -> tuple:
    """The conv layout of an experiment's settings: VGG-``s.vgg`` (:data:`models.VGG_LAYOUTS`,
    the gpu presets) where that is set, else one conv and one pool per width of ``s.channels``."""
    if s.vgg and s.vgg not in models.VGG_LAYOUTS:
        raise ConfigError(f"vgg={s.vgg!r} is not known; choose one of {', '.join(models.VGG_LAYOUTS)}")
    return models.VGG_LAYOUTS[s.vgg] if s.vgg else tuple(x for c in s.channels for x in (c, "M"))


def conv_layers(s) -> int:
    """How many conv layers :func:`network` has (its fc layer is ``linear{conv_layers(s) + 1}``)."""
    return sum(1 for x in layout(s) if x != "M")


def weight_layers(s) -> list[str]:
    """The names of :func:`network`'s conv and linear layers, input to output."""
    depth = conv_layers(s)
    return [f"conv{i}" for i in range(1, depth + 1)] + [f"linear{depth + 1}", "output"]


def network(s, sample_shape: Sequence[int], classes: int, norm: str, noise: dict | None = None):
    """The CNN of an experiment's settings: :func:`vgg` of :func:`layout` and fc ``s.hidden``."""
    return vgg(sample_shape, (), s.hidden, classes, norm, noise, layout=layout(s))


def describe(s) -> str:
    """The CNN of :func:`network` and its data in words, for the deviations."""
    data = "Fashion-MNIST" if s.dataset == "auto" else s.dataset
    if s.vgg:
        convs = "-".join(str(x) for x in layout(s) if x != "M")
        return (f"VGG-{s.vgg} (Simonyan & Zisserman 2015, Table 1: conv{convs}; a CIFAR classifier fc"
                f"{s.hidden}, not ImageNet's fc4096-fc4096) on {data}")  # fmt: skip
    convs = "-conv".join(map(str, s.channels))
    return f"A VGG-style CNN (conv{convs}, fc{s.hidden}) on {data} instead of VGG on CIFAR-10"


def deep_linear(width: int = 32, depth: int = 25, outputs: int = 1, norm: str = "none"):
    """A deep linear network: ``depth`` Linear layers (``linear1`` ... ``linear{depth}``), width
    ``width``, the last one mapping to ``outputs``; with ``norm="batch"`` a BatchNorm1d after every
    layer but the last (the network is then no longer linear in its input, which is the point)."""
    if depth < 2:
        raise ConfigError(f"deep_linear: depth={depth} must be at least 2")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index in range(1, depth + 1):
        last = index == depth
        layers[f"linear{index}"] = nn.Linear(
            width, outputs if last else width, bias=last or norm == "none"
        )
        if not last:
            normalization = norm_layer(norm, width, spatial=False)
            if normalization is not None:
                layers[f"norm{index}"] = normalization
    return nn.Sequential(layers)


def initialize_deep_linear(model: nn.Sequential, generator: torch.Generator) -> None:
    """Xavier-normal weights (std sqrt(2 / (fan_in + fan_out)) = 1/sqrt(width) for square layers,
    which keeps the signal's scale through 25 layers in expectation), zero biases."""
    initialize(model, "xavier", generator)


def gaussian_regression(
    samples: int, width: int, outputs: int, noise: float, seed: int, test: int = 1024
) -> Dataset:
    """Synthetic Gaussian data for the deep linear network: x ~ N(0, I_width), y = A x + noise ε,
    A with N(0, 1/width) entries (a random linear teacher), ε ~ N(0, I). Seeded; the same for
    every trial of a run."""
    generator = torch.Generator().manual_seed(derived_seed(seed, 7))
    teacher = torch.randn(outputs, width, generator=generator) / math.sqrt(width)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, width, generator=generator)
        return x, x @ teacher.T + noise * torch.randn(n, outputs, generator=generator)

    x_train, y_train = draw(samples)
    x_test, y_test = draw(test)
    return Dataset(
        name="gaussian-regression",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=0,
        source=f"synthetic: x ~ N(0, I_{width}), y = A x + {noise:g} ε, A ~ N(0, 1/{width})",
    )


def probe_batch(
    data: Dataset, size: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``size`` training examples for a measurement at ``step``: drawn without
    replacement from a generator seeded by (trial seed, step), so it is the same after a resume and
    independent of the training batches (whose order the measurement must not disturb)."""
    size = min(size, len(data.y_train))
    generator = torch.Generator().manual_seed(derived_seed(seed, 3, step))
    index = torch.randperm(len(data.y_train), generator=generator)[:size]
    return data.x_train[index], data.y_train[index]
