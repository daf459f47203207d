"""Luo, Ren & Peng (2018): Switchable Normalization learns which statistics to use, per layer.

Switchable Normalization (arXiv 1806.10779; official code and README switchablenorms/
Switchable-Normalization): the mean and the variance are softmax-weighted mixtures of IN's, LN's
and BN's, with importance logits learned per layer (``nk.SwitchableNorm``). README table, ResNet-50
on ImageNet, top-1 accuracy (%) by (GPUs, images per GPU): at (8, 32) BN 76.4, GN 75.9, SN 76.9; at
(8, 2) BN 65.3, GN 75.9, SN 75.6 (errors 23.6 / 24.1 / 23.1 and 34.7 / 24.1 / 24.4). The paper
reports that the learned weights move away from BN as the batch per GPU shrinks (lab notes: from a
secondary source).

Here (the lab's CPU protocol 8): the batch-size experiment's setting (the small CNN of
``normkit.lab.small_batch``, Fashion-MNIST subset, SGD with momentum, linear learning-rate scaling, the same
epochs) at a large and a small batch, BN, GN and SN; SN's (IN, LN, BN) weights of the mean and of
the variance are logged at every evaluation and reported per layer at the end. SN sits after both
convolutions; the hidden fully connected layer, where IN is undefined, uses LN in the SN network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.lab.datasets import subset
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.legacy import Experiment, Settings, Setup, register
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure
from normkit.lab.small_batch import (
    NORMALIZERS,
    batch_statistics_accuracy,
    batch_sweep,
    error_percent,
    error_vs_batch_figure,
    small_cnn,
    switchable_importance,
)

KINDS = ("IN", "LN", "BN")
# SN README (ResNet-50, 8 GPUs): top-1 accuracy (%) -> error, by images per GPU.
PUBLISHED = {
    "bn": {32: 100 - 76.4, 16: 100 - 76.3, 8: 100 - 75.2, 4: 100 - 72.7, 2: 100 - 65.3},
    "gn": {32: 100 - 75.9, 16: 100 - 75.8, 8: 100 - 76.0, 4: 100 - 75.8, 2: 100 - 75.9},
    "sn": {32: 100 - 76.9, 16: 100 - 76.7, 8: 100 - 76.7, 4: 100 - 75.9, 2: 100 - 75.6},
}


@dataclass(frozen=True)
class SwitchableSettings(Settings):
    batch_sizes: tuple[int, ...] = (64, 2)
    normalizers: tuple[str, ...] = ("bn", "gn", "sn")
    train_examples: int = 20_000
    epochs: float = 2.0
    base_lr: float = 0.1  # at base_batch, scaled linearly
    base_batch: int = 64
    momentum: float = 0.9
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    groups: int = 4
    evaluations: int = 8
    eval_examples: int = 1_000
    batch_stat_examples: int = 2_000


@register
class Switchable(Experiment):
    name = "switchable"
    title = "Switchable Norm beside BN and GN at a large and a small batch"
    paper = "Luo, Ren & Peng 2018, Switchable Normalization, README table and learned ratios"
    claim = (
        "SN matches the better of BN and GN at every batch size (ResNet-50: 23.1% error at 32 "
        "images per GPU, 24.4% at 2, where BN has 34.7%), and learns to rely less on BN's "
        "statistics when the batch is small."
    )
    settings_class = SwitchableSettings
    presets = {
        "quick": {"train_examples": 3_000, "epochs": 1.0, "evaluations": 4},
        "tiny": {
            "batch_sizes": (8, 2),
            "train_examples": 48,
            "epochs": 0.5,
            "channels": (4, 8),
            "hidden": 16,
            "groups": 2,
            "evaluations": 2,
            "eval_examples": 50,
            "batch_stat_examples": 40,
        },
    }

    def prepare_data(self, settings, dataset):
        return subset(dataset, settings.train_examples, settings.seed)

    def trials(self, settings, data, finals):
        n = len(data.y_train) if data is not None else settings.train_examples
        return batch_sweep(settings, n, sorted(settings.batch_sizes, reverse=True))

    def setup(self, trial, settings, data, generator):
        p = trial.params
        model = small_cnn(
            data.sample_shape,
            data.classes,
            p["normalizer"],
            generator,
            channels=settings.channels,
            hidden=settings.hidden,
            groups=settings.groups,
        )
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=settings.base_lr * p["batch_size"] / settings.base_batch,
            momentum=settings.momentum,
        )
        return Setup(model, optimizer, p["batch_size"])

    def measure(self, trial, settings, setup, data):
        k = settings.eval_examples
        accuracy, _ = accuracy_and_loss(setup.model, data.x_test[:k], data.y_test[:k])
        values = {"test_error": error_percent(accuracy)}
        if trial.params["normalizer"] == "sn":
            values["importance"] = switchable_importance(setup.model)
        return values

    def finish(self, trial, settings, setup, data):
        p, k = trial.params, settings.batch_stat_examples
        accuracy, loss = accuracy_and_loss(setup.model, data.x_test, data.y_test)
        values = {"test_error": error_percent(accuracy), "test_loss": loss}
        if p["normalizer"] in ("bn", "sn"):
            values["batch_stat_error"] = error_percent(
                batch_statistics_accuracy(
                    setup.model, data.x_test[:k], data.y_test[:k], p["batch_size"]
                )
            )
        if p["normalizer"] == "sn":
            values["importance"] = switchable_importance(setup.model)
        return values

    # -- meaning -------------------------------------------------------------------------------
    def summarize(self, record: RunRecord) -> dict:
        cells: dict[str, dict[str, dict]] = {}
        importance: dict[str, dict] = {}
        for row in record.finals().values():
            batch = str(row["batch_size"])
            cells.setdefault(row["normalizer"], {})[batch] = {
                "test_error": row["test_error"],
                "batch_stat_error": row.get("batch_stat_error"),
                "diverged": row["diverged"],
            }
            if row.get("importance"):
                layers = row["importance"]
                importance[batch] = {
                    "layers": layers,
                    "bn_share_mean": _average(layers, "mean", 2),
                    "bn_share_var": _average(layers, "var", 2),
                }
        sizes = sorted(record.settings["batch_sizes"])
        small, large = str(sizes[0]), str(sizes[-1])

        def err(n, b):
            return cells.get(n, {}).get(b, {}).get("test_error")

        def sn_vs_best(b):
            others = [err(n, b) for n in ("bn", "gn") if err(n, b) is not None]
            return None if err("sn", b) is None or not others else err("sn", b) - min(others)

        fall = None
        if small in importance and large in importance:
            fall = {
                key: importance[large][key] - importance[small][key]
                for key in ("bn_share_mean", "bn_share_var")
            }
        return {
            "cells": cells,
            "importance": importance,
            "small": int(small),
            "large": int(large),
            "sn_minus_best": {b: sn_vs_best(b) for b in (large, small)},
            "bn_share_fall": fall,
        }

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        cells, importance = s["cells"], s["importance"]
        small, large = str(s["small"]), str(s["large"])
        data_name = record.config["data"]["name"]

        def err(n, b, field="test_error"):
            return cells.get(n, {}).get(b, {}).get(field)

        def published(n, b):
            return PUBLISHED[n].get(int(b), PUBLISHED[n][32 if int(b) > 32 else 2])

        def share(b, key):
            return importance.get(b, {}).get(key)

        def change(key):
            return f"{fmt(share(large, key), '.2f')} → {fmt(share(small, key), '.2f')}"

        fall = s["bn_share_fall"] or {}
        comparison = Table(
            [
                "quantity",
                "published (ResNet-50, ImageNet, error %)",
                f"ours ({data_name}, small CNN, error %)",
                "verdict",
            ],
            [
                [
                    f"BN / GN / SN at batch {large}",
                    " / ".join(f"{published(n, 32):.1f}" for n in ("bn", "gn", "sn"))
                    + " at 32 per GPU",
                    " / ".join(fmt(err(n, large), ".2f") for n in ("bn", "gn", "sn")),
                    "SN within 0.5 of the best: " + fmt(_within(s["sn_minus_best"][large], 0.5)),
                ],
                [
                    f"BN / GN / SN at batch {small}",
                    " / ".join(f"{published(n, small):.1f}" for n in ("bn", "gn", "sn"))
                    + f" at {small if int(small) in PUBLISHED['bn'] else 2} per GPU",
                    " / ".join(fmt(err(n, small), ".2f") for n in ("bn", "gn", "sn")),
                    "SN within 0.5 of the best: " + fmt(_within(s["sn_minus_best"][small], 0.5)),
                ],
                [
                    "BN's share of SN's weights, large → small batch (mean; variance)",
                    "falls as the batch shrinks (toward IN and LN)",
                    f"{change('bn_share_mean')}; {change('bn_share_var')}",
                    "falls: "
                    + fmt(
                        None
                        if not fall
                        else fall["bn_share_mean"] > 0 and fall["bn_share_var"] > 0
                    ),
                ],
            ],
        )  # fmt: skip
        checks = [
            Check(
                f"SN within 0.5 points of the better of BN and GN at batch {b}",
                _within(s["sn_minus_best"][b], 0.5),
                f"SN − best = {fmt(s['sn_minus_best'][b], '+.2f')}",
            )
            for b in (large, small)
        ]
        if fall:
            checks.append(
                Check(
                    "BN's share of SN's mean and variance weights falls at the small batch",
                    fall["bn_share_mean"] > 0 and fall["bn_share_var"] > 0,
                    f"fall {fall['bn_share_mean']:+.3f} (mean), {fall['bn_share_var']:+.3f} (variance)",
                )
            )
        table = Table(
            ["normalizer", f"batch {large}", f"batch {small}", f"batch {small}, batch statistics"],
            [
                [
                    NORMALIZERS[n],
                    fmt(err(n, large), ".2f"),
                    fmt(err(n, small), ".2f"),
                    fmt(err(n, small, "batch_stat_error"), ".2f"),
                ]
                for n in ("bn", "gn", "sn")
                if n in cells
            ],
            "Final test error (%), eval mode, whole test set; batch statistics: test images in "
            "batches of the training batch, training mode.",
        )
        weights = Table(
            ["batch", "layer", "mean: IN / LN / BN", "variance: IN / LN / BN"],
            [
                [
                    b,
                    layer,
                    " / ".join(f"{w:.3f}" for w in values["mean"]),
                    " / ".join(f"{w:.3f}" for w in values["var"]),
                ]
                for b in (large, small)
                for layer, values in importance.get(b, {}).get("layers", {}).items()
            ],
            "SN's softmax importance weights at the end of training, per layer (norm1, norm2: the "
            "two convolutions).",
        )
        lines = {
            NORMALIZERS[n]: [(int(b), c["test_error"]) for b, c in cells[n].items()]
            for n in ("bn", "gn", "sn")
            if n in cells
        }
        figures = [
            Figure(
                "error-vs-batch",
                error_vs_batch_figure(
                    lines,
                    f"ours: small CNN, {data_name}",
                    published={NORMALIZERS[n]: list(PUBLISHED[n].items()) for n in PUBLISHED},
                    published_title="SN README (ResNet-50, ImageNet, 8 GPUs)",
                ),
                "Test error against the batch size (log scale), one line per normalizer; right: "
                "the published numbers by images per GPU.",
            ),
            Figure(
                "importance",
                self._importance_figure(importance, [large, small]),
                "SN's importance weights per layer at the end of training (stacked IN / LN / BN), "
                "for the mean and the variance, at each batch size.",
            ),
            Figure(
                "bn-share",
                self._share_figure(record, [large, small]),
                "BN's weight in SN's mean and variance during training, averaged over the layers.",
            ),
        ]
        deviations = [
            f"The small CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, "
            f"fc{settings['hidden']}) on {record.config['data']['train']} {data_name} images, "
            f"{settings['epochs']:g} epochs, SGD momentum {settings['momentum']:g} at "
            f"{settings['base_lr']:g}·B/{settings['base_batch']}, one process, one seed; the "
            "README: ResNet-50 on ImageNet with 8 GPUs.",
            "The SN network's hidden fully connected layer uses LN (IN needs spatial dims; the "
            "official code's SwitchNorm1d mixes LN and BN, which normkit does not offer).",
            "BN's part of SN uses an exponential running average in eval (the code's default "
            "averages the batch statistics after training).",
        ]
        headline = (
            f"batch {large}: BN {fmt(err('bn', large), '.1f')}%, GN {fmt(err('gn', large), '.1f')}%, "
            f"SN {fmt(err('sn', large), '.1f')}%; batch {small}: BN {fmt(err('bn', small), '.1f')}%, "
            f"GN {fmt(err('gn', small), '.1f')}%, SN {fmt(err('sn', small), '.1f')}%"
        )
        return Report(
            comparison,
            [Section("Results", [figures[0], table, figures[1], weights, figures[2]])],
            checks,
            deviations,
            headline,
        )

    @staticmethod
    def _importance_figure(importance: dict, batches: list[str]):
        layers = sorted(
            {layer for b in batches for layer in importance.get(b, {}).get("layers", {})}
        )
        figure = new_figure(3.2 * max(1, len(batches)) + 1.0, 3.6)
        for index, b in enumerate(batches, start=1):
            axes = figure.add_subplot(1, len(batches), index)
            values = importance.get(b, {}).get("layers", {})
            bars = [(layer, stat) for layer in layers for stat in ("mean", "var")]
            bottoms = [0.0] * len(bars)
            for k, kind in enumerate(KINDS):
                heights = [values.get(layer, {}).get(stat, [0, 0, 0])[k] for layer, stat in bars]
                axes.bar(range(len(bars)), heights, 0.7, bottom=bottoms, label=kind, color=f"C{k}")
                bottoms = [a + h for a, h in zip(bottoms, heights, strict=True)]
            axes.set_xticks(range(len(bars)), [f"{layer}\n{stat}" for layer, stat in bars])
            axes.set_ylim(0, 1)
            axes.set_title(f"batch {b}", fontsize="medium")
            axes.set_ylabel("softmax weight")
            if index == 1:
                axes.legend(fontsize="small", loc="lower left")
        return figure  # fmt: skip

    @staticmethod
    def _share_figure(record: RunRecord, batches: list[str]):
        figure = new_figure(6.0, 3.6)
        axes = figure.add_subplot()
        finals = record.finals()
        for b in batches:
            key = f"sn/b={b}"
            rows = [r for r in record.curve(key) if r.get("importance")]
            total = finals.get(key, {}).get("steps") or max((r["step"] for r in rows), default=1)
            for stat, style in (("mean", "-"), ("var", "--")):
                axes.plot(
                    [r["step"] / total for r in rows],
                    [_average(r["importance"], stat, 2) for r in rows],
                    style,
                    marker="o",
                    ms=3,
                    label=f"batch {b}, {'mean' if stat == 'mean' else 'variance'}",
                )
        axes.set_xlabel("fraction of training")
        axes.set_ylabel("BN's weight, mean over layers")
        axes.axhline(1 / 3, color="grey", lw=0.8, ls=":")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        return figure


def _average(layers: dict, stat: str, kind: int) -> float | None:
    values = [weights[stat][kind] for weights in layers.values()]
    return sum(values) / len(values) if values else None


def _within(value: float | None, tolerance: float) -> bool | None:
    return None if value is None else value <= tolerance
