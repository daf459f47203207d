"""Statistics and style under a domain shift: AdaBN (Li et al. 2016; Wu & Johnson 2021, §5) and
Batch-Instance Normalization (Nam & Kim 2018) against BN and IN.

A network's weights carry the task and its BatchNorm statistics carry the domain (Li, Wang, Shi, Liu
& Hou 2016, "Revisiting Batch Normalization For Practical Domain Adaptation"): when the test images
shift (another sensor, another contrast), re-estimating the statistics on unlabeled data of the new
domain (:func:`normkit.tools.adapt`) recovers part of the accuracy; Wu & Johnson (2021, §5) find the
same on ImageNet-C. Instance statistics remove an image's style (contrast, intensity) altogether
(Ulyanov et al. 2016), at a price in accuracy on classification; Batch-Instance Normalization learns,
per channel, a gate ρ between the two (ρ = 1: BN, ρ = 0: IN).

Here: a small CNN (conv-norm-ReLU-pool ×2, fc with BatchNorm1d, fc) trained on clean Fashion-MNIST
with the conv layers' normalizer one of BN, IN, BIN (IN and BIN are defined on feature maps, so the
fc layer keeps BN in all three). Evaluated on the test images clean and shifted:

- ``invert``: contrast inversion, 1 − x;
- ``noise``: additive Gaussian noise of standard deviation ``noise_std``;
- ``scale``: intensity (and so contrast) scaled by ``scale``;
- ``mixed``: the protocol's "style shift": half of the images (seeded) changed, each of them either
  inverted or scaled.

What to expect, from the maps alone: a per-image positive scaling is undone exactly by instance
statistics (IN is invariant to it) and, for the whole domain, by AdaBN's re-estimated statistics of
the first layer; an inversion flips the sign of the first layer's centred responses, x̂ → −x̂, which
neither batch nor instance statistics can undo.

For each, the error with the training statistics and after AdaBN on ``adapt_examples`` unlabeled
*training* images under the same shift (disjoint from the test images; the labels are never used).
BIN's gates ρ are recorded per layer.

Decisions: AdaBN re-estimates every BatchNorm layer of the model (in the IN and BIN models, the fc
layer's; BIN's own running statistics are not BatchNorm's and :func:`~normkit.tools.adapt` leaves them
alone, as the report says); the gates get 10× the learning rate and no weight decay, as in Nam &
Kim's code, and are clipped to [0, 1] by the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab import models
from normkit.lab.datasets import first_test_examples
from normkit.lab.experiments.population_stats import batch_norm_layers, error_rate
from normkit.lab.legacy import Experiment, Settings, Setup, Trial, register
from normkit.lab.models import initialize
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure
from normkit.lab.seeds import derived_seed

NORMS = {"bn": "batch", "in": "group_instance", "bin": "batch_instance"}
LABELS = {"bn": "BN", "in": "IN", "bin": "BIN"}


def apply_shift(
    x: torch.Tensor, shift: str, seed: int, *, noise_std=0.3, scale=0.5
) -> torch.Tensor:
    """Images ``x`` (N, C, H, W) in [0, 1] under ``shift`` (module docstring); seeded."""
    generator = torch.Generator().manual_seed(seed)
    if shift == "none":
        return x
    if shift == "invert":
        return 1.0 - x
    if shift == "noise":
        return x + noise_std * torch.randn(x.shape, generator=generator)
    if shift == "scale":
        return scale * x
    if shift == "mixed":
        changed = torch.rand(len(x), generator=generator) < 0.5
        inverted = torch.rand(len(x), generator=generator) < 0.5
        shape = (-1, *([1] * (x.dim() - 1)))
        shifted = torch.where(inverted.view(shape), 1.0 - x, scale * x)
        return torch.where(changed.view(shape), shifted, x)
    raise ConfigError(f"shift={shift!r} is not known; use none, invert, noise, scale or mixed")


def adapted(model: nn.Module, x_target: torch.Tensor, batch_size: int) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are the target domain's (AdaBN, via
    :func:`normkit.tools.adapt` on the unlabeled ``x_target`` in batches of ``batch_size``)."""
    batches = [x_target[i : i + batch_size] for i in range(0, len(x_target), batch_size)]
    model, _ = nk.tools.adapt(model, batches, progress=False)
    return model.eval()


def shift_cnn(
    sample_shape: tuple[int, ...], channels: tuple[int, ...], hidden: int, classes: int, norm: str
) -> nn.Sequential:
    """conv5 (no bias) → ``norm`` → ReLU → maxpool2 per stage, then fc (no bias) → BatchNorm1d → ReLU
    → fc; ``norm`` is a :func:`normkit.create_norm` spec."""
    return models.conv_net(
        sample_shape, channels, hidden, classes, norm, kernel_size=5, fc_norm=nk.BatchNorm1d
    )


@dataclass(frozen=True)
class DomainShiftSettings(Settings):
    arms: tuple[str, ...] = ("bn", "in", "bin")
    shifts: tuple[str, ...] = ("invert", "noise", "scale", "mixed")
    noise_std: float = 0.3
    scale: float = 0.5
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


@register
class DomainShift(Experiment):
    name = "domain-shift"
    title = "Domain shift: AdaBN, and BN vs IN vs Batch-Instance Norm"
    paper = (
        "Li et al. 2016, AdaBN; Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm, §5; "
        "Nam & Kim 2018, Batch-Instance Normalization"
    )
    claim = (
        "Re-estimating BN's statistics on the shifted domain (AdaBN, no labels) recovers accuracy "
        "lost to the shift; IN removes style but costs accuracy on clean data; BIN learns per "
        "channel how much style to remove, BIN ≥ BN on clean data and > BN under a style shift."
    )
    settings_class = DomainShiftSettings
    presets = {
        "quick": {
            "steps": 150,
            "channels": (8, 16),
            "hidden": 64,
            "adapt_examples": 2_000,
            "test_examples": 2_000,
            "eval_every": 50,
        },
        "tiny": {
            "steps": 6,
            "batch_size": 32,
            "channels": (4, 8),
            "hidden": 16,
            "adapt_examples": 64,
            "test_examples": 64,
            "eval_every": 3,
        },
    }

    def prepare_data(self, settings, dataset):
        return first_test_examples(dataset, settings.test_examples)

    def trials(self, settings, data, finals):
        return [
            Trial(arm, {"arm": arm}, settings.steps, settings.eval_every, settings.seed)
            for arm in settings.arms
        ]

    def setup(self, trial, settings, data, generator):
        model = shift_cnn(
            data.sample_shape,
            settings.channels,
            settings.hidden,
            data.classes,
            NORMS[trial.params["arm"]],
        )
        initialize(model, "he", generator)
        gates = [p for n, p in model.named_parameters() if n.endswith("rho")]
        others = [p for n, p in model.named_parameters() if not n.endswith("rho")]
        groups = [{"params": others, "weight_decay": settings.weight_decay}]
        if gates:
            groups.append(
                {
                    "params": gates,
                    "lr": settings.learning_rate * settings.gate_lr_factor,
                    "weight_decay": 0.0,
                }
            )
        optimizer = torch.optim.SGD(groups, lr=settings.learning_rate, momentum=settings.momentum)
        return Setup(model, optimizer, settings.batch_size)

    def measure(self, trial, settings, setup, data):
        return {"test_error": error_rate(setup.model, data.x_test, data.y_test)}

    def finish(self, trial, settings, setup, data):
        model = setup.model
        generator = torch.Generator().manual_seed(derived_seed(trial.seed, 12))
        count = min(settings.adapt_examples, len(data.y_train))
        target_pool = data.x_train[torch.randperm(len(data.y_train), generator=generator)[:count]]
        errors, adapted_errors = {}, {}
        for index, shift in enumerate(("none", *settings.shifts)):
            options = {"noise_std": settings.noise_std, "scale": settings.scale}
            x_test = apply_shift(data.x_test, shift, derived_seed(trial.seed, 13, index), **options)
            errors[shift] = error_rate(model, x_test, data.y_test)
            if batch_norm_layers(model):
                x_target = apply_shift(
                    target_pool, shift, derived_seed(trial.seed, 14, index), **options
                )
                adapted_model = adapted(model, x_target, settings.batch_size)
                adapted_errors[shift] = error_rate(adapted_model, x_test, data.y_test)
        gates = {
            path: module.rho.detach().clamp(0, 1).tolist()
            for path, module in model.named_modules()
            if isinstance(module, nk.BatchInstanceNorm)
        }
        return {
            "error": errors,
            "error_adapted": adapted_errors,
            "adapted_layers": sorted(batch_norm_layers(model)),
            "rho": gates,
        }

    # ------------------------------------------------------------------------------ summary
    def summarize(self, record: RunRecord) -> dict:
        finals = record.finals()
        arms = {}
        for key, row in finals.items():
            arms[key] = {
                "error": row["error"],
                "error_adapted": row["error_adapted"],
                "adaptation_gain": {
                    shift: row["error"][shift] - row["error_adapted"][shift]
                    for shift in row["error_adapted"]
                },
                "adapted_layers": row["adapted_layers"],
                "rho": {
                    path: {
                        "mean": sum(values) / len(values),
                        "min": min(values),
                        "max": max(values),
                        "below_half": sum(v < 0.5 for v in values),
                        "channels": len(values),
                    }
                    for path, values in row["rho"].items()
                },
                "diverged": row["diverged"],
            }
        return {"shifts": ["none", *record.settings["shifts"]], "arms": arms}

    # ------------------------------------------------------------------------------- report
    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        arms, shifts = s["arms"], s["shifts"]
        pct = lambda v: fmt(None if v is None else 100 * v, ".2f")  # noqa: E731
        rows, checks = [], []
        if "bn" in arms:
            gains = arms["bn"]["adaptation_gain"]
            shifted = [sh for sh in shifts if sh != "none"]
            rows.append(
                [
                    "BN model, test error under shift: training statistics → AdaBN",
                    "AdaBN improves on the target domain (Li et al. 2016 [M]; ImageNet-C, Wu & "
                    "Johnson 2021 [S])",
                    "; ".join(
                        f"{sh}: {pct(arms['bn']['error'][sh])} → {pct(arms['bn']['error_adapted'][sh])}%"
                        for sh in shifted
                    ),
                    f"improves {sum(gains[sh] > 0 for sh in shifted)} of {len(shifted)} shifts",
                ]
            )
            for sh in shifted:
                checks.append(
                    Check(
                        f"AdaBN lowers the BN model's error under {sh!r}",
                        gains[sh] > 0,
                        f"{pct(arms['bn']['error'][sh])}% → {pct(arms['bn']['error_adapted'][sh])}%",
                    )
                )
        if {"bn", "in", "bin"} <= set(arms):
            err = {arm: arms[arm]["error"] for arm in ("in", "bin", "bn")}
            rows.append(
                [
                    "clean test error: IN / BIN / BN",
                    "IN worst for classification (ImageNet: 28.4 vs BN 23.6%, Wu & He 2018); "
                    "BIN ≥ BN (+0.3-1.5 pts on CIFAR/ImageNet [M])",
                    " / ".join(pct(err[a]["none"]) for a in err) + "%",
                    ", ".join(
                        [
                            "IN worse than BN"
                            if err["in"]["none"] > err["bn"]["none"]
                            else "IN not worse",
                            "BIN ≥ BN" if err["bin"]["none"] <= err["bn"]["none"] else "BIN worse",
                        ]
                    ),
                ]
            )
            checks.append(
                Check(
                    "IN worse than BN on clean data",
                    err["in"]["none"] > err["bn"]["none"],
                    f"{pct(err['in']['none'])}% vs {pct(err['bn']['none'])}%",
                )
            )
            checks.append(
                Check(
                    "BIN at least as good as BN on clean data",
                    err["bin"]["none"] <= err["bn"]["none"],
                    f"{pct(err['bin']['none'])}% vs {pct(err['bn']['none'])}%",
                )
            )
            for sh in (sh for sh in shifts if sh != "none"):
                rows.append(
                    [
                        f"test error under {sh!r} (training statistics): IN / BIN / BN",
                        "IN removes instance contrast (Ulyanov et al. 2016); BIN > BN under a "
                        "style shift (protocol 6's expectation)",
                        " / ".join(pct(err[a][sh]) for a in err) + "%",
                        (
                            "BIN better than BN"
                            if err["bin"][sh] < err["bn"][sh]
                            else "BIN not better"
                        )
                        + (
                            "; IN best" if err["in"][sh] == min(e[sh] for e in err.values()) else ""
                        ),
                    ]
                )
                if sh in ("scale", "mixed"):
                    checks.append(
                        Check(
                            f"BIN better than BN under {sh!r}",
                            err["bin"][sh] < err["bn"][sh],
                            f"{pct(err['bin'][sh])}% vs {pct(err['bn'][sh])}%",
                        )
                    )
            if "scale" in err["in"]:
                checks.append(
                    Check(
                        "IN is invariant to intensity scaling (error as on clean data, ±0.1 pt)",
                        abs(err["in"]["scale"] - err["in"]["none"]) <= 0.001,
                        f"{pct(err['in']['scale'])}% vs {pct(err['in']['none'])}%",
                    )
                )
        if "bin" in arms and arms["bin"]["rho"]:
            gates = arms["bin"]["rho"]
            rows.append(
                [
                    "learned gates ρ per layer (mean; channels below 0.5)",
                    "early, style-rich layers lean towards IN [S]",
                    "; ".join(
                        f"{p}: {g['mean']:.2f} ({g['below_half']}/{g['channels']})"
                        for p, g in gates.items()
                    ),
                    "–",
                ]
            )
        comparison = Table(["quantity", "published", "ours", "verdict"], rows)
        errors = Table(
            ["model", "statistics", *shifts],
            [
                row
                for key, arm in arms.items()
                for row in (
                    [LABELS.get(key, key), "training", *(pct(arm["error"][sh]) for sh in shifts)],
                    [
                        LABELS.get(key, key),
                        "AdaBN (" + ", ".join(arm["adapted_layers"]) + ")",
                        *(pct(arm["error_adapted"].get(sh)) for sh in shifts),
                    ],
                )
            ],
            "Test error (%) by shift; AdaBN re-estimates the listed BatchNorm layers on unlabeled "
            "shifted training images.",
        )
        blocks = [
            Figure("errors", self._errors(s), "Test error by shift, model and statistics."),
            errors,
        ]
        if "bin" in arms and arms["bin"]["rho"]:
            blocks.append(
                Figure(
                    "gates",
                    self._gates(record),
                    "Histogram of BIN's learned gates ρ per layer (1 = BN, 0 = IN).",
                )
            )
        deviations = [
            f"A small CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, fc"
            f"{settings['hidden']}) on {record.config['data']['name']}, {settings['steps']} steps at "
            f"batch {settings['batch_size']}, SGD lr {settings['learning_rate']:g} momentum "
            f"{settings['momentum']:g}, weight decay {settings['weight_decay']:g}, instead of "
            "ResNets on CIFAR/ImageNet/Office; synthetic shifts instead of ImageNet-C.",
            "AdaBN uses shifted *training* images (no labels) as the target domain's data, so the "
            "adapted statistics never saw the test images.",
            "IN and BIN are in the conv layers only; the fc layer has BatchNorm1d in every model.",
        ]
        headline = "; ".join(
            f"{LABELS.get(k, k)} clean {pct(a['error']['none'])}%" for k, a in arms.items()
        )
        if "bn" in arms and "noise" in arms["bn"]["error_adapted"]:
            headline += (
                f"; BN under noise {pct(arms['bn']['error']['noise'])}% → AdaBN "
                f"{pct(arms['bn']['error_adapted']['noise'])}%"
            )
        return Report(comparison, [Section("Results", blocks)], checks, deviations, headline)

    @staticmethod
    def _errors(s):
        figure = new_figure(7.5, 3.8)
        axes = figure.add_subplot()
        shifts, arms = s["shifts"], s["arms"]
        series = []
        for key, arm in arms.items():
            series.append((f"{LABELS.get(key, key)}", arm["error"]))
            if arm["error_adapted"]:
                series.append((f"{LABELS.get(key, key)} + AdaBN", arm["error_adapted"]))
        width = 0.8 / max(1, len(series))
        for i, (label, values) in enumerate(series):
            axes.bar(
                [j + i * width for j in range(len(shifts))],
                [100 * values.get(sh, math.nan) for sh in shifts],
                width,
                label=label,
            )
        axes.set_xticks([j + 0.4 - width / 2 for j in range(len(shifts))], shifts)
        axes.set_ylabel("test error (%)")
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize="small", ncol=2)
        return figure

    @staticmethod
    def _gates(record: RunRecord):
        row = record.finals()["bin"]
        figure = new_figure(6.0, 3.4)
        axes = figure.add_subplot()
        bins = [i / 20 for i in range(21)]
        for path, values in row["rho"].items():
            axes.hist(values, bins=bins, alpha=0.6, label=path)
        axes.set_xlabel("ρ")
        axes.set_ylabel("channels")
        axes.legend(fontsize="small")
        return figure
