"""Statistics and style under a domain shift: AdaBN (Li et al. 2016; Wu & Johnson 2021, §5) and
Batch-Instance Normalization (Nam & Kim 2018) against BN and IN.

A network's weights carry the task and its BatchNorm statistics the domain (Li et al. 2016): re-estimating
the statistics on unlabeled data of the shifted domain (AdaBN, :func:`normkit.tools.adapt`) recovers
accuracy; Wu & Johnson (2021, §5) find the same on ImageNet-C. Instance statistics remove an image's
style (Ulyanov et al. 2016) at a price in accuracy; BIN learns per channel a gate ρ between the two.

Here: a small CNN (conv-norm-ReLU-pool ×2, fc with BatchNorm1d, fc) trained on clean Fashion-MNIST
with the conv layers' normalizer one of BN, IN, BIN (the fc layer keeps BN: IN and BIN need feature
maps); ``seeds`` seeds, paired (the arms of a seed see the same batches). Evaluated on the test images
clean and under each shift of :func:`apply_shift`, with the training statistics and after AdaBN on
``adapt_examples`` unlabeled *training* images under the same shift (never the test images).
The style shift gives each image its own contrast, brightness and gamma, an increasing map of its
pixels: the "style" a normalizer may remove. An inversion (1 − x) flips the sign of the first layer's
centred responses, which no statistics undo: it is measured, never a test of AdaBN or IN.

Decisions: AdaBN re-estimates every BatchNorm layer (in the IN and BIN models only the fc layer's:
BIN's own running statistics are not BatchNorm's and ``adapt`` leaves them alone); BIN's gates get 10×
the learning rate and no weight decay, as in Nam & Kim's code, and are clipped to [0, 1] by the layer.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab import models
from normkit.lab.claims import Claim, Published, above, below, difference, per_seed
from normkit.lab.datasets import first_test_examples
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Bars
from normkit.lab.models import initialize
from normkit.lab.plan import Arm, Plan
from normkit.lab.population import error_rate
from normkit.lab.render import Section, Table
from normkit.lab.seeds import derived_seed
from normkit.lab.settings import Settings

NORMS = {"bn": "batch", "in": "group_instance", "bin": "batch_instance"}
LABELS = {"bn": "BN", "in": "IN", "bin": "BIN"}
NAM_KIM = "Nam & Kim 2018, §4 (CIFAR-10/100, ImageNet; docs/PROTOCOLS.md §6)"


def apply_shift(x: torch.Tensor, shift: str, seed: int, *, noise_std=0.3, scale=0.5,
                style=(0.5, 1.5, 0.2, 1.5)) -> torch.Tensor:  # fmt: skip
    """Images ``x`` (N, C, H, W) in [0, 1] under ``shift``, seeded: ``invert`` 1 − x; ``noise`` plus
    Gaussian noise of std ``noise_std``; ``scale`` ``scale``·x; ``style`` each image its own style,
    a·x^g + b with ``style`` = (a_low, a_high, b_max, g_max): contrast a ~ U(a_low, a_high),
    brightness b ~ U(±b_max), gamma g log-uniform in [1/g_max, g_max], an increasing map of the
    image's pixels (no sign flip)."""
    generator = torch.Generator().manual_seed(seed)
    if shift == "none":
        return x
    if shift == "invert":
        return 1.0 - x
    if shift == "noise":
        return x + noise_std * torch.randn(x.shape, generator=generator)
    if shift == "scale":
        return scale * x
    if shift == "style":
        shape = (-1, *([1] * (x.dim() - 1)))
        low, high, brightness, gamma = style
        a = low + (high - low) * torch.rand(len(x), generator=generator)
        b = brightness * (2 * torch.rand(len(x), generator=generator) - 1)
        g = torch.exp(math.log(gamma) * (2 * torch.rand(len(x), generator=generator) - 1))
        return a.view(shape) * x.clamp(min=0) ** g.view(shape) + b.view(shape)
    raise ConfigError(f"shift={shift!r} is not known; use none, invert, noise, scale or style")


def adapted(model: nn.Module, x_target: torch.Tensor, batch_size: int) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose BatchNorm statistics are the target domain's (AdaBN, via
    :func:`normkit.tools.adapt` on the unlabeled ``x_target`` in batches of ``batch_size``), in eval
    mode, and the layers it re-estimated."""
    batches = [x_target[i : i + batch_size] for i in range(0, len(x_target), batch_size)]
    model, report = nk.tools.adapt(model, batches, progress=False)
    return model.eval(), sorted(layer.path for layer in report.layers)


def shift_cnn(sample_shape, channels, hidden: int, classes: int, norm: str) -> nn.Sequential:
    """conv5 (no bias) → ``norm`` (a :func:`normkit.create_norm` spec) → ReLU → maxpool2 per stage,
    then fc (no bias) → BatchNorm1d → ReLU → fc."""
    return models.conv_net(sample_shape, channels, hidden, classes, norm, kernel_size=5,
                           fc_norm=nk.BatchNorm1d)


@dataclass(frozen=True)
class DomainShiftSettings(Settings):
    shifts: tuple[str, ...] = ("invert", "noise", "scale", "style")
    noise_std: float = 0.3
    scale: float = 0.5
    style: tuple[float, ...] = (0.5, 1.5, 0.2, 1.5)  # contrast low, high; brightness ±; gamma max
    steps: int = 468  # two epochs at batch 256
    batch_size: int = 256
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 128
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gate_lr_factor: float = 10.0
    adapt_examples: int = 10_000
    test_examples: int = 0  # 0: the whole test set
    eval_every: int = 117
    seeds: int = 5  # IN − BN on clean data is a fraction of a point: more seeds than 3


def _error(arm: str, shift: str, key: str = "error"):
    """Test error (%) of ``arm`` under ``shift``, with the training statistics or (``key`` =
    ``"error_adapted"``) after AdaBN; one value per seed."""

    def value(trials, results):
        trial = results.one(trials, f"{arm} {key} {shift}")
        found = None if trial.final["diverged"] else trial.final[key].get(shift)
        return None if found is None else 100 * found

    after = " after AdaBN" if key == "error_adapted" else ""
    return per_seed(value, f"{LABELS[arm]} test error (%) under {shift!r}{after}", arm=arm)


def _scale_change(trials, results) -> float | None:  # |error under scale − clean error|, points
    final = results.one(trials, "in scale").final
    return None if final["diverged"] else 100 * abs(final["error"]["scale"] - final["error"]["none"])


@register
class DomainShift(Experiment):
    name = "domain-shift"
    title = "Domain shift: AdaBN, and BN vs IN vs Batch-Instance Norm"
    paper = ("Li et al. 2016, AdaBN; Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm, §5; "
             "Nam & Kim 2018, Batch-Instance Normalization")  # fmt: skip
    claim = ("Re-estimating BN's statistics on the shifted domain (AdaBN, no labels) recovers accuracy "
             "lost to the shift; IN removes style but costs accuracy on clean data; BIN learns per "
             "channel how much style to remove, BIN ≥ BN on clean data and > BN under a style shift.")
    settings_class = DomainShiftSettings
    presets = {
        "quick": {"steps": 150, "channels": (8, 16), "hidden": 64, "adapt_examples": 2_000,
                  "test_examples": 2_000, "eval_every": 50, "seeds": 3},
        "gpu": {"dataset": "cifar10", "channels": (64, 128, 256), "hidden": 512, "steps": 15_640,
                "eval_every": 1_955},  # 80 epochs of CIFAR-10's 50,000 images at batch 256
        "tiny": {"steps": 6, "batch_size": 32, "channels": (4, 8), "hidden": 16, "adapt_examples": 64,
                 "test_examples": 64, "eval_every": 3, "seeds": 1},
    }  # fmt: skip

    def prepare_data(self, settings, dataset):
        return first_test_examples(dataset, settings.test_examples)

    def plan(self, s, data):
        arms = [Arm(arm, {}, label) for arm, label in LABELS.items()]
        return Plan(arms, s.steps, seeds=s.seeds, seed=s.seed, eval_every=s.eval_every)

    def setup(self, trial, s, data, generator):
        model = shift_cnn(data.sample_shape, s.channels, s.hidden, data.classes, NORMS[trial.params["arm"]])
        initialize(model, "he", generator)
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if not n.endswith("rho")], "weight_decay": s.weight_decay},
                  {"params": [p for n, p in named if n.endswith("rho")], "weight_decay": 0.0,
                   "lr": s.learning_rate * s.gate_lr_factor}]  # BIN's gates; empty for BN and IN
        optimizer = torch.optim.SGD(groups, lr=s.learning_rate, momentum=s.momentum)
        return Setup(model, optimizer, s.batch_size)

    def measure(self, trial, s, setup, data):
        return {"test_error": error_rate(setup.model, data.x_test, data.y_test)}

    def finish(self, trial, s, setup, data):
        model, options = setup.model, {"noise_std": s.noise_std, "scale": s.scale, "style": s.style}
        generator = torch.Generator().manual_seed(derived_seed(trial.seed, 12))
        count = min(s.adapt_examples, len(data.y_train))
        target_pool = data.x_train[torch.randperm(len(data.y_train), generator=generator)[:count]]
        errors, adapted_errors, layers = {}, {}, []
        for index, shift in enumerate(("none", *s.shifts)):
            x_test = apply_shift(data.x_test, shift, derived_seed(trial.seed, 13, index), **options)
            errors[shift] = error_rate(model, x_test, data.y_test)
            x_target = apply_shift(target_pool, shift, derived_seed(trial.seed, 14, index), **options)
            adapted_model, layers = adapted(model, x_target, s.batch_size)
            if layers:
                adapted_errors[shift] = error_rate(adapted_model, x_test, data.y_test)
        gates = {path: module.rho.detach().clamp(0, 1).tolist()
                 for path, module in model.named_modules() if isinstance(module, nk.BatchInstanceNorm)}
        return {"error": errors, "error_adapted": adapted_errors, "adapted_layers": layers,
                "rho": gates, "rho_mean": {p: statistics.fmean(v) for p, v in gates.items()}}  # fmt: skip

    def claims(self, s):
        def gap(name, a, b, shift, published, criterion):
            what = "clean test error" if shift == "none" else f"test error under {shift!r}"
            ours = difference(_error(a, shift), _error(b, shift, "error_adapted" if a == b else "error"))
            quantity = f"{what}, {LABELS[a]} − {'AdaBN' if a == b else LABELS[b]} (points)"
            return Claim(name, quantity, published, ours, criterion, fmt="+.2f")

        adabn = Published("AdaBN improves accuracy on the target domain", "Li et al. 2016, §4 (Office, "
                          "Caltech-Bing) [M]; Wu & Johnson 2021, §5 (ImageNet-C) [S]", unverified=True)
        instance = Published("IN removes instance-specific contrast (the guideline's style row)",
                             "Ulyanov et al. 2016 [M]", unverified=True)
        style = Published("BIN > BN under a style shift", f"{NAM_KIM}; CPU protocol 6", unverified=True)
        return [
            *(gap(f"adabn-{shift}", "bn", "bn", shift, adabn, None if shift == "invert" else above(0.0))
              for shift in s.shifts),  # an inversion flips x̂'s sign: no statistics undo it
            gap("in-behind-bn-clean", "in", "bn", "none", Published(
                "+4.8: IN 28.4 vs BN 23.6 (ResNet-50, ImageNet)", "Wu & He 2018, Table 1", 4.8), above(0.0)),
            Claim("bin-clean", "clean test error, BIN − BN (points)", Published(
                "BIN better than BN by about 0.3–1.5 points", NAM_KIM, -0.9, unverified=True),
                difference(_error("bin", "none"), _error("bn", "none")), below(0.0), fmt="+.2f",
                needs_gpu="Nam & Kim: ResNet-110, 164 epochs of CIFAR; ours: 2 conv layers, 2 epochs"),
            *(gap(f"{a}-beats-bn-{shift}", a, "bn", shift, {"bin": style, "in": instance}[a], below(0.0))
              for a in ("bin", "in") for shift in ("scale", "style") if shift in s.shifts),
            Claim("in-scale-invariant", f"IN's test error: |scaled ×{s.scale:g} − clean| (points)",
                  Published("IN removes each image's contrast (per-image statistics)",
                            "Ulyanov et al. 2016, §2 [M]", 0.0, unverified=True),
                  per_seed(_scale_change, "|IN error scaled − clean|", arm="in"), below(0.1), fmt=".3f"),
        ]  # fmt: skip

    def figures(self, s):
        return [
            Bars("errors", "error", "test error (fraction)",
                 "Test error by shift (x axis) and model, with the training statistics.", per_layer=True),
            Bars("gates", "rho_mean", "mean gate ρ (1 = BN, 0 = IN)", "BIN's learned gates, mean per "
                 "layer (Nam & Kim [S]: early, style-rich layers lean towards IN).", per_layer=True),
        ]  # fmt: skip

    def extra_section(self, results):
        shifts, rows = ["none", *results.settings.shifts], []
        for arm in results.values("arm"):
            trials = [t.final for t in results.trials(arm=arm) if not t.final["diverged"]]
            for key in ("error", "error_adapted") if trials else ():
                mean = [statistics.fmean(100 * t[key].get(sh, math.nan) for t in trials) for sh in shifts]
                what = f"AdaBN ({', '.join(trials[0]['adapted_layers'])})" if key != "error" else "training"
                rows.append([LABELS[arm], what, *(f"{m:.2f}" for m in mean)])
        return Section("Test error by shift", [Table(["model", "statistics", *shifts], rows, "Test error "
                       "(%) by shift, mean over seeds; AdaBN re-estimates the listed layers.")])

    def deviations(self, s):
        return [
            f"A small CNN (conv{'-conv'.join(map(str, s.channels))}, fc{s.hidden}) on {s.dataset}, "
            f"{s.steps} steps at batch {s.batch_size}, SGD lr {s.learning_rate:g} momentum {s.momentum:g}, "
            f"weight decay {s.weight_decay:g}, instead of ResNets on CIFAR/ImageNet/Office; synthetic "
            "shifts instead of ImageNet-C.",
            "AdaBN uses shifted *training* images (no labels) as the target domain's data; IN and BIN "
            "are in the conv layers only (the fc layer has BatchNorm1d in every model).",
        ]  # fmt: skip

