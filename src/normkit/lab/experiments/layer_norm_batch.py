"""Ba, Kiros & Hinton (2016), §6.7 and Fig. 6: LayerNorm does not care about the batch size; BN does.

Layer Normalization (arXiv 1607.06450): a 784-1000-1000-10 network on permutation-invariant MNIST
(55,000 training images), Adam, batch sizes 128 and 4; LN on the hidden layers only (not the
logits); at batch 4, BN's variance is the unbiased estimate. Published (no table; Fig. 6's curves):
"LN is robust to the batch-sizes and exhibits faster training convergence compared to BN"; BN
with batch 4 is visibly worse in test error.

Here (the lab's CPU protocol 5a): the same MLP (``hidden``, ReLU) with no normalization, BN or LN
(``nk.BatchNorm1d`` / ``nk.LayerNorm`` between each hidden Linear layer and its ReLU, the Linear
bias dropped before a norm), Adam at ``learning_rate``, batch 128 and 4, the same ``epochs`` on a
class-balanced subset of Fashion-MNIST for every batch size. Measured: test error in eval mode
against epochs (BN uses its running statistics, momentum 0.1; LN is the same in both modes), and
at the end, BN's error with batch statistics (test images in batches of the training batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.errors import ConfigError
from normkit.lab.datasets import subset
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.legacy import Experiment, Settings, Setup, register
from normkit.lab.models import initialize, mlp
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure
from normkit.lab.small_batch import (
    batch_statistics_accuracy,
    batch_sweep,
    error_percent,
    error_vs_batch_figure,
)

LABELS = {"none": "no normalization", "bn": "BN", "ln": "LN"}
NORMS = {"none": "none", "bn": "batch", "ln": "layer"}


@dataclass(frozen=True)
class LayerNormSettings(Settings):
    batch_sizes: tuple[int, ...] = (128, 4)
    normalizers: tuple[str, ...] = ("none", "bn", "ln")
    hidden: tuple[int, ...] = (1000, 1000)
    learning_rate: float = 1e-3  # Adam
    train_examples: int = 20_000
    epochs: float = 2.0
    early_epoch: float = 0.25  # where "faster convergence" is read
    evaluations: int = 16
    eval_examples: int = 2_000
    batch_stat_examples: int = 2_000


@register
class LayerNormBatch(Experiment):
    name = "layer-norm"
    title = "LayerNorm vs BatchNorm at batch 128 and 4"
    paper = "Ba, Kiros & Hinton 2016, Layer Normalization, §6.7 and Fig. 6"
    claim = (
        "LayerNorm normalizes each example by its own hidden units, so it is robust to the batch "
        "size and converges faster than BN; BN evaluated with running statistics degrades at "
        "batch 4."
    )
    settings_class = LayerNormSettings
    presets = {
        "quick": {"hidden": (256, 256), "train_examples": 5_000, "epochs": 1.0, "evaluations": 8},
        "tiny": {
            "hidden": (16, 16),
            "batch_sizes": (16, 4),
            "train_examples": 64,
            "epochs": 1.0,
            "evaluations": 2,
            "eval_examples": 100,
            "batch_stat_examples": 40,
        },
    }

    def prepare_data(self, settings, dataset):
        return subset(dataset, settings.train_examples, settings.seed)

    def trials(self, settings, data, finals):
        n = len(data.y_train) if data is not None else settings.train_examples
        for normalizer in settings.normalizers:
            if normalizer not in NORMS:
                raise ConfigError(
                    f"normalizer {normalizer!r} is not known; choose from {', '.join(NORMS)}"
                )
        return batch_sweep(settings, n, settings.batch_sizes, train_size=n)

    def setup(self, trial, settings, data, generator):
        p = trial.params
        model = mlp(
            data.features, settings.hidden, data.classes, "relu", norm=NORMS[p["normalizer"]]
        )
        initialize(model, "he", generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
        return Setup(model, optimizer, p["batch_size"])

    def measure(self, trial, settings, setup, data):
        k = settings.eval_examples
        accuracy, _ = accuracy_and_loss(setup.model, data.x_test[:k], data.y_test[:k])
        epoch = setup.step * trial.params["batch_size"] / trial.params["train_size"]
        return {"test_error": error_percent(accuracy), "epoch": epoch}

    def finish(self, trial, settings, setup, data):
        p, k = trial.params, settings.batch_stat_examples
        accuracy, loss = accuracy_and_loss(setup.model, data.x_test, data.y_test)
        values = {
            "test_error": error_percent(accuracy),
            "test_loss": loss,
            "batch_stat_error": None,
        }
        if p["normalizer"] == "bn":
            values["batch_stat_error"] = error_percent(
                batch_statistics_accuracy(
                    setup.model, data.x_test[:k], data.y_test[:k], p["batch_size"]
                )
            )
        return values

    # -- meaning -------------------------------------------------------------------------------
    def summarize(self, record: RunRecord) -> dict:
        early = record.settings["early_epoch"]
        cells: dict[str, dict[str, dict]] = {}
        for key, row in record.finals().items():
            curve = record.curve(key)
            reached = [r for r in curve if r["epoch"] >= early]
            cells.setdefault(row["normalizer"], {})[str(row["batch_size"])] = {
                "test_error": row["test_error"],
                "batch_stat_error": row.get("batch_stat_error"),
                "early_error": reached[0]["test_error"] if reached else None,
                "early_epoch": reached[0]["epoch"] if reached else None,
                "diverged": row["diverged"],
            }
        sizes = sorted(record.settings["batch_sizes"])
        small, large = str(sizes[0]), str(sizes[-1])

        def rise(normalizer):
            c = cells.get(normalizer, {})
            if small not in c or large not in c:
                return None
            return c[small]["test_error"] - c[large]["test_error"]

        return {
            "cells": cells,
            "small": int(small),
            "large": int(large),
            "rise": {n: rise(n) for n in cells},
        }

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        cells, small, large = s["cells"], str(s["small"]), str(s["large"])
        data_name = record.config["data"]["name"]

        def err(normalizer, batch, field="test_error"):
            return cells.get(normalizer, {}).get(batch, {}).get(field)

        def faster(batch):
            ln, bn = err("ln", batch, "early_error"), err("bn", batch, "early_error")
            return None if ln is None or bn is None else ln < bn

        def beat_plain(batch):
            plain = err("none", batch, "early_error")
            values = [err(n, batch, "early_error") for n in ("bn", "ln")]
            if plain is None or None in values:
                return None
            return all(v < plain for v in values)

        rise = s["rise"]
        comparison = Table(
            [
                "quantity",
                "published (permutation-invariant MNIST, 784-1000-1000-10)",
                f"ours ({data_name}, test error %)",
                "verdict",
            ],
            [
                [
                    f"LN: error at batch {small} − at {large}",
                    "robust to the batch size (Fig. 6: curves nearly the same)",
                    f"{fmt(err('ln', small), '.2f')} − {fmt(err('ln', large), '.2f')} = "
                    f"{fmt(rise.get('ln'), '+.2f')}",
                    "no worse by more than 1 point: "
                    + fmt(None if rise.get("ln") is None else rise["ln"] <= 1.0),
                ],
                [
                    f"BN (eval mode): error at batch {small} − at {large}",
                    "worse at batch 4 (Fig. 6)",
                    f"{fmt(err('bn', small), '.2f')} − {fmt(err('bn', large), '.2f')} = "
                    f"{fmt(rise.get('bn'), '+.2f')}",
                    "BN degrades more than LN: "
                    + fmt(
                        None
                        if rise.get("bn") is None or rise.get("ln") is None
                        else rise["bn"] > rise["ln"]
                    ),
                ],
                [
                    f"LN vs BN at batch {small}",
                    "LN better",
                    f"{fmt(err('ln', small), '.2f')} vs {fmt(err('bn', small), '.2f')}",
                    "LN better: "
                    + fmt(
                        None
                        if err("ln", small) is None or err("bn", small) is None
                        else err("ln", small) < err("bn", small)
                    ),
                ],
                [
                    f"faster convergence: LN vs BN at epoch {settings['early_epoch']:g}",
                    "LN converges faster (both batch sizes)",
                    f"batch {large}: {fmt(err('ln', large, 'early_error'), '.2f')} vs "
                    f"{fmt(err('bn', large, 'early_error'), '.2f')}; batch {small}: "
                    f"{fmt(err('ln', small, 'early_error'), '.2f')} vs "
                    f"{fmt(err('bn', small, 'early_error'), '.2f')}",
                    f"LN ahead at {large}: {fmt(faster(large))}, at {small}: {fmt(faster(small))}",
                ],
                [
                    f"BN at batch {small} with batch statistics (training mode)",
                    "not reported",
                    fmt(err("bn", small, "batch_stat_error"), ".2f"),
                    "–",
                ],
            ],
        )
        checks = [
            Check(
                f"LN's error at batch {small} is at most 1 point above batch {large}'s",
                None if rise.get("ln") is None else rise["ln"] <= 1.0,
                f"{fmt(rise.get('ln'), '+.2f')} points",
            ),
            Check(
                f"LN beats BN (eval mode) at batch {small}",
                None
                if err("ln", small) is None or err("bn", small) is None
                else err("ln", small) < err("bn", small),
                f"{fmt(err('ln', small), '.2f')} vs {fmt(err('bn', small), '.2f')}",
            ),
            Check(
                f"BN and LN both ahead of no normalization at epoch {settings['early_epoch']:g}",
                None
                if beat_plain(large) is None or beat_plain(small) is None
                else beat_plain(large) and beat_plain(small),
                f"batch {large}: {fmt(beat_plain(large))}, batch {small}: {fmt(beat_plain(small))}",
            ),
        ]
        table = Table(
            ["normalizer", *[f"batch {b}" for b in (large, small)], f"at epoch {settings['early_epoch']:g} "
             f"(batch {large} / {small})"],
            [
                [
                    LABELS[n],
                    fmt(err(n, large), ".2f"),
                    fmt(err(n, small), ".2f")
                    + (
                        f" (batch statistics: {fmt(err(n, small, 'batch_stat_error'), '.2f')})"
                        if err(n, small, "batch_stat_error") is not None
                        else ""
                    ),
                    f"{fmt(err(n, large, 'early_error'), '.2f')} / "
                    f"{fmt(err(n, small, 'early_error'), '.2f')}",
                ]
                for n in LABELS
                if n in cells
            ],
            "Final test error (%) in eval mode on the whole test set; early errors on the first "
            f"{settings['eval_examples']} test images.",
        )  # fmt: skip
        lines = {
            LABELS[n]: [(int(b), c["test_error"]) for b, c in cells[n].items()]
            for n in LABELS
            if n in cells
        }
        figures = [
            Figure(
                "curves",
                self._curves(record, [int(large), int(small)]),
                "Test error (eval mode, first test images) against epochs (from the first evaluation "
                "after step 0), one panel per batch size.",
            ),
            Figure(
                "error-vs-batch",
                error_vs_batch_figure(
                    lines,
                    f"MLP {'-'.join(map(str, settings['hidden']))}, {data_name}",
                    "batch size",
                ),
                "Final test error against the batch size (log scale), one line per normalizer.",
            ),
        ]
        deviations = [
            f"{data_name}, {record.config['data']['train']} training images for "
            f"{settings['epochs']:g} epochs at both batch sizes, instead of MNIST (55,000) to "
            "convergence; MLP "
            f"784-{'-'.join(map(str, settings['hidden']))}-10 with ReLU, Adam at "
            f"{settings['learning_rate']:g}, one seed.",
            "BN's running statistics use momentum 0.1 and the unbiased variance (the paper's choice "
            "at batch 4 too).",
        ]
        headline = (
            f"batch {large} → {small}: BN {fmt(err('bn', large), '.1f')}% → "
            f"{fmt(err('bn', small), '.1f')}%, LN {fmt(err('ln', large), '.1f')}% → "
            f"{fmt(err('ln', small), '.1f')}%"
        )
        return Report(
            comparison, [Section("Results", [*figures, table])], checks, deviations, headline
        )

    @staticmethod
    def _curves(record: RunRecord, sizes: list[int]):
        figure = new_figure(5.0 * len(sizes), 3.8)
        for index, batch in enumerate(sizes, start=1):
            axes = figure.add_subplot(1, len(sizes), index)
            for n, label in LABELS.items():
                rows = [r for r in record.curve(f"{n}/b={batch}") if r["step"] > 0]
                if rows:
                    axes.plot([r["epoch"] for r in rows], [r["test_error"] for r in rows],
                              "o-", ms=3, label=label)  # fmt: skip
            axes.set_xlabel("epochs")
            axes.set_ylabel("test error (%)")
            axes.set_title(f"batch {batch}", fontsize="medium")
            axes.grid(alpha=0.3)
            axes.legend(fontsize="small")
        return figure
