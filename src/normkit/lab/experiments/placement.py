"""Where BN goes: before the nonlinearity, as Ioffe & Szegedy (2015, §3.2) prescribe, or after it.

The paper adds BN "immediately before the nonlinearity", normalizing x = Wu + b, because Wu + b "is
more likely to have a symmetric, non-sparse distribution, that is 'more Gaussian'" than the layer
input u; it reports no comparison with the other placement. Here: a small CNN with BN before every
ReLU (conv without bias, BN → ReLU) and after it (conv with bias, ReLU → BN), ``seeds`` seeds each.
A seed fixes the batch order and dropout-free training; the initial weights come from the same
stream but the two architectures consume it differently (the "after" convs have biases), so the
pairs share data order, not weights. Reported: final test accuracy per placement with 95% Student-t
intervals, and a paired t-test of the per-seed difference (Welch's unpaired test beside it); the
report says whether the difference is significant at α = 0.05.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.lab.datasets import first_test_examples
from normkit.lab.experiment import Experiment, Settings, Setup, register, seeded_trials
from normkit.lab.models import cnn, initialize
from normkit.lab.records import RunRecord
from normkit.lab.report import Figure, Report, Section, Table, fmt, new_figure
from normkit.lab.stats import mean_ci, paired_difference


@dataclass(frozen=True)
class PlacementSettings(Settings):
    steps: int = 2_000
    batch_size: int = 32
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 128
    learning_rate: float = 0.05
    momentum: float = 0.9
    seeds: int = 8
    test_examples: int = 0  # 0: the whole test set
    eval_every: int = 500
    alpha: float = 0.05


@register
class Placement(Experiment):
    name = "placement"
    title = "BN before or after the nonlinearity"
    paper = "Ioffe & Szegedy 2015, Batch Normalization, §3.2"
    claim = (
        "BN belongs immediately before the nonlinearity, normalizing Wu + b, whose distribution is "
        "more Gaussian than the layer's input (the paper argues this; it reports no ablation)."
    )
    settings_class = PlacementSettings
    presets = {
        "quick": {
            "steps": 800,
            "channels": (8, 16),
            "hidden": 64,
            "seeds": 3,
            "eval_every": 200,
            "test_examples": 2_000,
        },
        "tiny": {
            "steps": 12,
            "channels": (4, 8),
            "hidden": 16,
            "seeds": 2,
            "eval_every": 6,
            "batch_size": 16,
        },
    }

    def prepare_data(self, settings, dataset):
        return first_test_examples(dataset, settings.test_examples)

    def trials(self, settings, data, finals):
        arms = {where: {"placement": where} for where in ("before", "after")}
        return seeded_trials(arms, settings, settings.seeds)

    def setup(self, trial, settings, data, generator):
        model = cnn(
            data.sample_shape,
            settings.channels,
            settings.hidden,
            data.classes,
            activation="relu",
            norm="batch",
            placement=trial.params["placement"],
        )
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
        return Setup(model, optimizer, settings.batch_size)

    def measure(self, trial, settings, setup, data):
        """Nothing between the start and the end: the comparison is of final accuracies (the rows
        still carry the training loss, and evaluation steps remain checkpoint points)."""
        return {}

    def summarize(self, record: RunRecord) -> dict:
        finals = sorted(record.finals().values(), key=lambda r: r["replicate"])
        accuracy = {
            w: [r["test_accuracy"] for r in finals if r["placement"] == w]
            for w in ("before", "after")
        }
        result = {
            "accuracy": accuracy,
            "per_placement": {w: mean_ci(a) for w, a in accuracy.items()},
        }
        if len(accuracy["before"]) >= 2:
            result["after_minus_before"] = paired_difference(
                accuracy["after"], accuracy["before"], alpha=record.settings["alpha"]
            )
        return result

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        cells = s["per_placement"]
        test = s.get("after_minus_before")

        def ci(cell):
            if cell["n"] < 2:
                return fmt(cell["mean"], ".4f")
            return f"{fmt(cell['mean'], '.4f')} [{fmt(cell['low'], '.4f')}, {fmt(cell['high'], '.4f')}]"

        if test is None:
            verdict = "one seed: no test"
        elif test["significant"]:
            better = "after" if test["mean_difference"] > 0 else "before"
            verdict = f"significant at α = {test['alpha']:g}: BN {better} the ReLU is better"
        else:
            verdict = f"not significant at α = {test['alpha']:g}"
        difference = (
            "–"
            if test is None
            else (
                f"{test['mean_difference']:+.4f} [{test['low']:+.4f}, {test['high']:+.4f}], "
                f"paired p = {test['p_paired']:.3g}, Welch p = {test['p_welch']:.3g}"
            )
        )
        comparison = Table(
            [
                "quantity",
                "published",
                f"ours ({record.config['data']['name']}, small CNN)",
                "verdict",
            ],
            [
                [
                    "test accuracy, BN before ReLU",
                    "the recommended placement (no number)",
                    ci(cells["before"]),
                    "–",
                ],
                ["test accuracy, BN after ReLU", "not reported", ci(cells["after"]), "–"],
                ["difference after − before", "not reported", difference, verdict],
            ],
        )
        table = Table(
            ["seed", "before", "after", "after − before"],
            [
                [i, fmt(b, ".4f"), fmt(a, ".4f"), f"{a - b:+.4f}"]
                for i, (b, a) in enumerate(
                    zip(s["accuracy"]["before"], s["accuracy"]["after"], strict=False)
                )
            ],
            "Final test accuracy per seed (eval mode).",
        )
        figure = Figure(
            "placement",
            self._figure(s),
            "Final test accuracy per seed (dots) and mean with 95% interval (bars).",
        )
        deviations = [
            f"The paper gives an argument, not an experiment; this is a small CNN "
            f"(conv{'-conv'.join(str(c) for c in settings['channels'])}, fc{settings['hidden']}) on "
            f"{record.config['data']['name']}, SGD momentum {settings['momentum']:g} at "
            f"{settings['learning_rate']:g}, {settings['steps']} steps, {settings['seeds']} seeds.",
        ]
        headline = f"after − before: {difference}; {verdict}"
        return Report(comparison, [Section("Results", [figure, table])], [], deviations, headline)

    @staticmethod
    def _figure(s: dict):
        figure = new_figure(5.0, 3.6)
        axes = figure.add_subplot()
        for x, where in enumerate(("before", "after")):
            values, cell = s["accuracy"][where], s["per_placement"][where]
            axes.plot([x] * len(values), values, "o", alpha=0.6, color=f"C{x}")
            if cell["n"] >= 2:
                axes.errorbar(
                    [x + 0.15],
                    [cell["mean"]],
                    yerr=[[cell["mean"] - cell["low"]], [cell["high"] - cell["mean"]]],
                    fmt="s",
                    capsize=5,
                    color="black",
                )
        axes.set_xticks([0, 1], ["BN before ReLU", "BN after ReLU"])
        axes.set_xlim(-0.5, 1.5)
        axes.set_ylabel("test accuracy (fraction)")
        axes.grid(axis="y", alpha=0.3)
        return figure
