"""Ioffe & Szegedy (2015), Fig. 1: a sigmoid MLP with and without batch normalization.

The paper's MNIST experiment: 3 fully connected hidden layers of 100 sigmoid units, weights drawn
from "small random Gaussian values", mini-batches of 60, 50,000 steps, BN added to every hidden
layer (before the sigmoid; the Linear layer then has no bias, §3.2). It plots (a) test accuracy
against steps, and (b, c) the {15, 50, 85}th percentiles of the input to one sigmoid of the last
hidden layer over training, without and with BN.

Decisions where the paper is silent (CPU protocol 1a, docs/PROTOCOLS.md):

- Optimizer: plain SGD; the learning rate is chosen by a sweep on the *baseline* (the network
  without BN), by its training loss after ``sweep_steps`` steps (no test data involved), and used
  for both networks. Initial weights N(0, 0.01²) for every Linear layer, biases 0.
- "One typical sigmoid" is unit ``unit`` (0) of hidden layer 3, fixed before training. Its input's
  percentiles are taken over the test set in eval mode, i.e. with BN's running statistics
  (Algorithm 2), at every evaluation. Step 0 (before training) is plotted but not counted in the
  drift ranges: BN's running statistics are still at their initial values then.
- Data: Fashion-MNIST (MNIST is not available offline), so accuracies are compared by the shapes of
  the curves, not by value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.lab.datasets import Dataset
from normkit.lab.evaluation import accuracy_and_loss, unit_percentiles
from normkit.lab.experiment import Experiment, Settings, Setup, Trial, register
from normkit.lab.models import initialize, mlp, pre_activation
from normkit.lab.plots import curves
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure

PUBLISHED_ACCURACY = {"bn": 0.98, "plain": "0.96–0.97"}  # read from Fig. 1(a) (PROTOCOLS.md [M])
NETWORKS = {"plain": "baseline (no BN)", "bn": "with BN"}


@dataclass(frozen=True)
class Ioffe2015Settings(Settings):
    steps: int = 50_000
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float = 0.01
    learning_rate: float = 0.5  # used as is when lr_sweep is empty
    lr_sweep: tuple[float, ...] = (0.1, 0.5, 2.0)
    sweep_steps: int = 5_000
    eval_every: int = 250
    unit: int = 0  # the "typical" sigmoid of the last hidden layer
    ahead_after: int = 1_000  # check (i): BN >= baseline at every evaluation after this step
    drift_ratio: float = 3.0  # check (ii): baseline median range > drift_ratio x BN's


@register
class Ioffe2015Mnist(Experiment):
    name = "ioffe2015-mnist"
    title = "Batch normalization on a sigmoid MLP (Fig. 1)"
    paper = "Ioffe & Szegedy 2015, Batch Normalization, §4.1 and Fig. 1"
    claim = (
        "With BN the network trains faster and reaches higher test accuracy, and the distribution of "
        "a sigmoid's input stays stable, while without BN its mean and spread drift during training."
    )
    settings_class = Ioffe2015Settings
    presets = {
        "quick": {"steps": 20_000, "eval_every": 250, "sweep_steps": 2_000},
        "tiny": {
            "steps": 60,
            "eval_every": 20,
            "hidden": (16, 16, 16),
            "lr_sweep": (0.5, 2.0),
            "sweep_steps": 20,
            "ahead_after": 20,
        },
    }

    # -- plan ----------------------------------------------------------------------------------
    def trials(self, settings, data, finals):
        sweep = [
            Trial(
                f"sweep/plain/lr={lr:g}",
                {"network": "plain", "role": "sweep", "learning_rate": lr},
                settings.sweep_steps,
                max(1, settings.sweep_steps // 4),
                settings.seed,
            )
            for lr in settings.lr_sweep
        ]
        if any(t.key not in finals for t in sweep):
            return sweep
        learning_rate = self.chosen_learning_rate(settings, finals)
        main = [
            Trial(
                network,
                {"network": network, "role": "main", "learning_rate": learning_rate},
                settings.steps,
                settings.eval_every,
                settings.seed,
            )
            for network in ("plain", "bn")
        ]
        return sweep + main

    @staticmethod
    def chosen_learning_rate(settings, finals: dict[str, dict]) -> float:
        """The sweep's learning rate with the lowest final training loss (diverged runs excluded)."""
        if not settings.lr_sweep:
            return settings.learning_rate
        candidates = [
            (row["train_loss"], row["learning_rate"])
            for row in finals.values()
            if row.get("role") == "sweep" and not row["diverged"] and row["train_loss"] is not None
        ]
        if not candidates:
            return min(settings.lr_sweep)
        return min(candidates)[1]

    def setup(self, trial, settings, data, generator):
        model = mlp(
            data.features,
            settings.hidden,
            data.classes,
            activation="sigmoid",
            norm="batch" if trial.params["network"] == "bn" else "none",
        )
        initialize(model, f"gaussian:{settings.init_std}", generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=trial.params["learning_rate"])
        return Setup(model, optimizer, settings.batch_size)

    # -- measurements --------------------------------------------------------------------------
    def measure(self, trial: Trial, settings, setup: Setup, data: Dataset) -> dict:
        model = setup.model
        accuracy, loss = accuracy_and_loss(model, data.x_test, data.y_test)
        row = {"test_accuracy": accuracy, "test_loss": loss}
        if trial.params["role"] == "sweep":
            return row
        layer, unit = len(settings.hidden), settings.unit
        p15, p50, p85 = unit_percentiles(model, pre_activation(model, layer), data.x_test, unit)
        row.update(p15=p15, p50=p50, p85=p85)
        if trial.params["network"] == "bn":
            norm = model._modules[f"norm{layer}"]
            row.update(
                bn_running_mean=norm.running_mean[unit],
                bn_running_std=norm.running_var[unit].sqrt(),
                bn_gamma=norm.weight[unit],
                bn_beta=norm.bias[unit],
            )
        return row

    # -- meaning -------------------------------------------------------------------------------
    def summarize(self, record: RunRecord) -> dict:
        settings = record.settings
        finals = record.finals()
        curves_ = {net: record.curve(net) for net in ("plain", "bn")}
        after = settings["ahead_after"]
        paired = [
            (p["step"], p["test_accuracy"], b["test_accuracy"])
            for p, b in zip(curves_["plain"], curves_["bn"], strict=False)
            if p["step"] == b["step"] and p["step"] >= after
        ]
        behind = [step for step, plain, bn in paired if bn < plain]

        def median_range(rows):
            medians = [r["p50"] for r in rows if r["step"] > 0 and r.get("p50") is not None]
            return (max(medians) - min(medians)) if medians else None

        ranges = {net: median_range(rows) for net, rows in curves_.items()}
        ratio = None
        if ranges["plain"] is not None and ranges["bn"]:
            ratio = ranges["plain"] / ranges["bn"]
        plain_final = finals["plain"]["test_accuracy"]
        bn_reaches = next(
            (r["step"] for r in curves_["bn"] if r["test_accuracy"] >= plain_final), None
        )
        plain_reaches = next(
            (r["step"] for r in curves_["plain"] if r["test_accuracy"] >= plain_final), None
        )
        return {
            "learning_rate": finals["plain"]["learning_rate"],
            "sweep": {
                str(r["learning_rate"]): {"train_loss": r["train_loss"], "diverged": r["diverged"]}
                for r in finals.values()
                if r["role"] == "sweep"
            },
            "final_test_accuracy": {net: finals[net]["test_accuracy"] for net in ("plain", "bn")},
            "bn_behind_at_steps": behind,
            "evaluations_compared": len(paired),
            "median_range": ranges,
            "median_range_ratio": ratio,
            "steps_to_baseline_final_accuracy": {"bn": bn_reaches, "plain": plain_reaches},
            "checks": {
                "bn_ahead_after": not behind if paired else None,
                "baseline_drifts_more": None if ratio is None else ratio > settings["drift_ratio"],
            },
        }

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        data = record.config["data"]["name"]
        acc = s["final_test_accuracy"]
        steps = s["steps_to_baseline_final_accuracy"]
        ratio = s["median_range_ratio"]
        comparison = Table(
            ["quantity", "published (MNIST)", f"ours ({data})", "verdict"],
            [
                [
                    "test accuracy at the end, BN / baseline",
                    f"≈{PUBLISHED_ACCURACY['bn']} / "
                    f"≈{PUBLISHED_ACCURACY['plain']} at 50k steps (read from Fig. 1a)",
                    f"{fmt(acc['bn'])} / {fmt(acc['plain'])} at {settings['steps']} steps",
                    "BN higher: "
                    + fmt(acc["bn"] > acc["plain"])
                    + " (values differ: other data set)",
                ],
                [
                    "BN ahead of the baseline throughout",
                    "yes (Fig. 1a)",
                    f"behind at {len(s['bn_behind_at_steps'])} of {s['evaluations_compared']} evaluations "
                    f"after step {settings['ahead_after']}",
                    fmt(s["checks"]["bn_ahead_after"]),
                ],
                [
                    "steps to the baseline's final accuracy, BN / baseline",
                    "not stated (BN's curve rises much earlier)",
                    f"{fmt(steps['bn'])} / {fmt(steps['plain'])}",
                    "BN faster: "
                    + fmt(
                        steps["bn"] is not None
                        and steps["plain"] is not None
                        and steps["bn"] < steps["plain"]
                    ),
                ],
                [
                    "range of the sigmoid input's median over training, baseline / BN",
                    "baseline drifts, BN stable (Fig. 1b, c)",
                    f"{fmt(s['median_range']['plain'])} / {fmt(s['median_range']['bn'])} "
                    f"(ratio {fmt(ratio, '.1f')})",
                    f"ratio > {settings['drift_ratio']:g}: "
                    + fmt(s["checks"]["baseline_drifts_more"]),
                ],
            ],
        )
        checks = [
            Check(
                f"(i) BN accuracy ≥ baseline at every evaluation after step {settings['ahead_after']}",
                s["checks"]["bn_ahead_after"],
                f"behind at steps {s['bn_behind_at_steps'][:10]}"
                if s["bn_behind_at_steps"]
                else "never behind",
            ),
            Check(
                f"(ii) baseline median range > {settings['drift_ratio']:g} × BN's",
                s["checks"]["baseline_drifts_more"],
                f"ratio {fmt(ratio, '.2f')}",
            ),
        ]
        figures = [
            Figure(
                "accuracy",
                curves(
                    record,
                    [("plain", NETWORKS["plain"]), ("bn", NETWORKS["bn"])],
                    "test_accuracy",
                    "test accuracy (fraction)",
                    "(a) test accuracy, eval mode",
                ),
                "Fig. 1(a): test accuracy against training steps, with and without BN.",
            ),
            Figure(
                "percentiles",
                self._percentile_figure(record),
                f"Fig. 1(b, c): 15th, 50th and 85th percentiles over the test set of the input to "
                f"sigmoid unit {settings['unit']} of hidden layer {len(settings['hidden'])}.",
            ),
            Figure(
                "bn-statistics",
                self._bn_statistics_figure(record),
                "BN's running mean and standard deviation of that unit's pre-normalization input, "
                "and its γ and β: the drift BN absorbs.",
            ),
        ]
        sweep = Table(
            ["learning rate", "final training loss", "diverged"],
            [[k, fmt(v["train_loss"], ".4f"), fmt(v["diverged"])] for k, v in s["sweep"].items()],
            f"Baseline learning-rate sweep ({settings['sweep_steps']} steps each); chosen: "
            f"{s['learning_rate']:g}",
        )
        sections = [Section("Figures", figures)]
        if s["sweep"]:
            sections.append(Section("Learning rate", [sweep]))
        deviations = [
            f"Data: {data} instead of MNIST (not available offline); absolute accuracies are not "
            "comparable, the shapes of the curves are.",
            f"Optimizer and learning rate are not stated in the paper: plain SGD at {s['learning_rate']:g}, "
            "chosen by the baseline's training loss in a sweep, for both networks.",
            f'Initial weights N(0, {settings["init_std"]:g}²) (the paper: "small random Gaussian values").',
            "Input pixels scaled to [0, 1] rather than binarized.",
            f"{settings['steps']} steps"
            + ("" if settings["steps"] == 50_000 else " instead of 50,000")
            + f", evaluated every {settings['eval_every']}.",
        ]
        headline = (
            f"BN {fmt(acc['bn'])} vs baseline {fmt(acc['plain'])} test accuracy after {settings['steps']} "
            f"steps; the baseline's sigmoid-input median moved {fmt(ratio, '.1f')}× as much as BN's."
        )
        return Report(comparison, sections, checks, deviations, headline)

    @staticmethod
    def _percentile_figure(record: RunRecord):
        figure = new_figure(9.0, 3.6)
        axes = figure.subplots(1, 2, sharey=True)
        for ax, net, label in (
            (axes[0], "plain", "(b) without BN"),
            (axes[1], "bn", "(c) with BN"),
        ):
            rows = record.curve(net)
            steps = [r["step"] for r in rows]
            for key, style in (("p15", "--"), ("p50", "-"), ("p85", ":")):
                ax.plot(
                    steps,
                    [r[key] for r in rows],
                    style,
                    color="C0" if net == "plain" else "C1",
                    label=f"{key[1:]}th percentile",
                )
            ax.set_title(label)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("sigmoid input (pre-activation)")
        axes[0].legend(fontsize="small")
        return figure

    @staticmethod
    def _bn_statistics_figure(record: RunRecord):
        figure = new_figure(6.4, 3.6)
        axes = figure.add_subplot()
        rows = [r for r in record.curve("bn") if r["step"] > 0]
        steps = [r["step"] for r in rows]
        for key, label in (
            ("bn_running_mean", "running mean"),
            ("bn_running_std", "running std"),
            ("bn_gamma", "γ"),
            ("bn_beta", "β"),
        ):
            axes.plot(steps, [r[key] for r in rows], label=label)
        axes.set_xlabel("training step")
        axes.set_ylabel("value (pre-activation units)")
        axes.set_title("BN statistics and affine parameters of the unit")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        return figure
