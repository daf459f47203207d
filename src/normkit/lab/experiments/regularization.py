"""Ioffe & Szegedy (2015), §3.4: BN regularizes, and may reduce the need for Dropout.

Each training example is normalized with statistics of the other examples in its mini-batch, so the
network no longer produces a deterministic value for it; the paper found this helps generalization
and removed Dropout from BN-Inception (§4.2.1) "without increasing overfitting".

Here: a ReLU MLP on a reduced training set (``train_examples``, seeded and class-balanced, the same
subset for every run) trained long enough to fit it, in four variants: no regularizer, Dropout, BN,
BN + Dropout; ``seeds`` seeds each (a seed fixes the initial weights, batch order and dropout masks,
shared across variants). Reported: final train and test accuracy (eval mode) and the generalization
gap, with 95% confidence intervals, and paired t-tests of each variant against no regularizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.lab.datasets import subset
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.legacy import Experiment, Settings, Setup, register, seeded_trials
from normkit.lab.models import initialize, mlp
from normkit.lab.plots import curves
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure
from normkit.lab.stats import mean_ci, paired_difference

VARIANTS = {
    "none": ("none", 0.0),
    "dropout": ("none", None),
    "bn": ("batch", 0.0),
    "bn+dropout": ("batch", None),
}


@dataclass(frozen=True)
class RegularizationSettings(Settings):
    train_examples: int = 1_000
    steps: int = 4_000
    batch_size: int = 50
    hidden: tuple[int, ...] = (256, 256)
    learning_rate: float = 0.05
    momentum: float = 0.9
    dropout: float = 0.5
    seeds: int = 5
    eval_every: int = 250


@register
class Regularization(Experiment):
    name = "regularization"
    title = "BN as a regularizer"
    paper = "Ioffe & Szegedy 2015, Batch Normalization, §3.4 and §4.2.1"
    claim = (
        "BN regularizes the model: a training example is seen together with others in its mini-batch, "
        "so the network's output for it is not deterministic; Dropout can be removed or reduced."
    )
    settings_class = RegularizationSettings
    presets = {
        "quick": {"steps": 2_000, "seeds": 3, "eval_every": 250},
        "tiny": {
            "train_examples": 100,
            "steps": 16,
            "seeds": 2,
            "eval_every": 8,
            "hidden": (16,),
            "batch_size": 20,
        },
    }

    def prepare_data(self, settings, dataset):
        return subset(dataset, settings.train_examples, settings.seed)

    def trials(self, settings, data, finals):
        arms = {variant: {"variant": variant} for variant in VARIANTS}
        return seeded_trials(arms, settings, settings.seeds)

    def setup(self, trial, settings, data, generator):
        norm, dropout = VARIANTS[trial.params["variant"]]
        model = mlp(
            data.features,
            settings.hidden,
            data.classes,
            activation="relu",
            norm=norm,
            dropout=settings.dropout if dropout is None else dropout,
        )
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
        return Setup(model, optimizer, settings.batch_size)

    def measure(self, trial, settings, setup, data):
        train, _ = accuracy_and_loss(setup.model, data.x_train, data.y_train)
        test, test_loss = accuracy_and_loss(setup.model, data.x_test, data.y_test)
        return {
            "train_accuracy": train,
            "test_accuracy": test,
            "test_loss": test_loss,
            "gap": train - test,
        }

    def finish(self, trial, settings, setup, data):
        return self.measure(trial, settings, setup, data)

    def summarize(self, record: RunRecord) -> dict:
        finals = record.finals().values()
        by_variant = {
            v: sorted((r for r in finals if r["variant"] == v), key=lambda r: r["replicate"])
            for v in VARIANTS
        }
        variants = {
            v: {
                key: mean_ci([r[key] for r in rows])
                for key in ("train_accuracy", "test_accuracy", "gap")
            }
            for v, rows in by_variant.items()
        }
        tests = {}
        if record.settings["seeds"] >= 2:
            for v in ("dropout", "bn", "bn+dropout"):
                tests[v] = {
                    key: paired_difference(
                        [r[key] for r in by_variant[v]], [r[key] for r in by_variant["none"]]
                    )
                    for key in ("test_accuracy", "gap")
                }
        return {"variants": variants, "versus_none": tests}

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        variants, tests = s["variants"], s["versus_none"]

        def ci(cell):
            if cell["n"] < 2:
                return fmt(cell["mean"])
            return f"{fmt(cell['mean'])} [{fmt(cell['low'])}, {fmt(cell['high'])}]"

        def versus(v, key):
            t = tests.get(v, {}).get(key)
            if t is None:
                return "–"
            return (
                f"{t['mean_difference']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}], p = {t['p_paired']:.3g}"
                + (" (significant)" if t["significant"] else " (not significant)")
            )

        table = Table(
            [
                "variant",
                "train accuracy",
                "test accuracy",
                "gap (train − test)",
                "test acc. vs none",
                "gap vs none",
            ],
            [
                [
                    v,
                    ci(c["train_accuracy"]),
                    ci(c["test_accuracy"]),
                    ci(c["gap"]),
                    versus(v, "test_accuracy"),
                    versus(v, "gap"),
                ]
                for v, c in variants.items()
            ],
            f"Mean [95% CI] over {settings['seeds']} seeds; differences to 'none' are paired by seed "
            "(paired t-test).",
        )
        gap_bn = tests.get("bn", {}).get("gap")
        acc_bn = tests.get("bn", {}).get("test_accuracy")
        comparison = Table(
            [
                "quantity",
                "published",
                f"ours ({record.config['data']['name']}, "
                f"{settings['train_examples']} training examples)",
                "verdict",
            ],
            [
                [
                    "BN reduces overfitting (gap BN vs none)",
                    "yes, qualitatively (§3.4)",
                    versus("bn", "gap"),
                    "–"
                    if gap_bn is None
                    else fmt(gap_bn["significant"] and gap_bn["mean_difference"] < 0),
                ],
                [
                    "BN improves test accuracy (vs none)",
                    "yes, on ImageNet (with other changes)",
                    versus("bn", "test_accuracy"),
                    "–"
                    if acc_bn is None
                    else fmt(acc_bn["significant"] and acc_bn["mean_difference"] > 0),
                ],
                [
                    "Dropout can be removed with BN (BN vs BN+Dropout test accuracy)",
                    "removing it did not increase overfitting (§4.2.1)",
                    f"{fmt(variants['bn']['test_accuracy']['mean'])} vs "
                    f"{fmt(variants['bn+dropout']['test_accuracy']['mean'])}",
                    "–",
                ],
            ],
        )
        checks = []
        if gap_bn is not None:
            checks.append(
                Check(
                    "BN's generalization gap is smaller than no regularizer's (paired, α = 0.05)",
                    gap_bn["significant"] and gap_bn["mean_difference"] < 0,
                    f"difference {gap_bn['mean_difference']:+.3f}, p = {gap_bn['p_paired']:.3g}",
                )
            )
        series = [(f"{v}/seed=0", v) for v in VARIANTS]
        figures = [
            Figure(
                "test-accuracy",
                curves(
                    record,
                    series,
                    "test_accuracy",
                    "test accuracy (fraction)",
                    "test accuracy (seed 0)",
                ),
                "Test accuracy during training, seed 0.",
            ),
            Figure(
                "gap",
                curves(
                    record, series, "gap", "train − test accuracy", "generalization gap (seed 0)"
                ),
                "Generalization gap during training, seed 0.",
            ),
            Figure(
                "final", self._bars(variants), "Final train and test accuracy with 95% intervals."
            ),
        ]
        deviations = [
            f"A {'-'.join(str(h) for h in settings['hidden'])} ReLU MLP on {settings['train_examples']} "
            f"training examples of {record.config['data']['name']}, SGD with momentum "
            f"{settings['momentum']:g} at {settings['learning_rate']:g}, {settings['steps']} steps: "
            "a setting made to overfit, where the paper reports the effect on ImageNet.",
            f"Dropout p = {settings['dropout']:g} after every hidden layer.",
        ]
        gaps = {v: fmt(variants[v]["gap"]["mean"]) for v in VARIANTS}
        headline = "train − test gap: " + ", ".join(f"{v} {gap}" for v, gap in gaps.items())
        return Report(
            comparison, [Section("Results", [table, *figures])], checks, deviations, headline
        )

    @staticmethod
    def _bars(variants: dict):
        figure = new_figure(6.4, 3.6)
        axes = figure.add_subplot()
        names = list(variants)
        for offset, key, label in (
            (-0.2, "train_accuracy", "train"),
            (0.2, "test_accuracy", "test"),
        ):
            means = [variants[v][key]["mean"] for v in names]
            errors = [
                0.0
                if variants[v][key]["n"] < 2
                else variants[v][key]["high"] - variants[v][key]["mean"]
                for v in names
            ]
            axes.bar(
                [i + offset for i in range(len(names))],
                means,
                0.4,
                yerr=errors,
                capsize=4,
                label=label,
            )
        axes.set_xticks(range(len(names)), names)
        axes.set_ylabel("accuracy (fraction), eval mode")
        axes.set_ylim(0.0, 1.05)
        axes.legend(fontsize="small")
        axes.grid(axis="y", alpha=0.3)
        return figure
