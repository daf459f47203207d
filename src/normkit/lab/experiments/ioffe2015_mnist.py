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
- Seeds: ``seeds`` replicates of both networks (paired: each seed's networks see the same batches);
  the sweep runs once, on the first seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.lab.claims import Claim, Published, above, below, difference, final, per_seed
from normkit.lab.evaluation import accuracy_and_loss, unit_percentiles
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Curves, PercentileBands
from normkit.lab.models import initialize, mlp, pre_activation
from normkit.lab.plan import Arm, Plan, Sweep, lowest
from normkit.lab.settings import Settings


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
    seeds: int = 3
    unit: int = 0  # the "typical" sigmoid of the last hidden layer
    ahead_after: int = 1_000  # claim (ii): BN >= baseline at every evaluation after this step
    drift_ratio: float = 3.0  # claim (iv): baseline median range > drift_ratio x BN's


def _paired_curves(trials, metric: str, after: int) -> list[tuple[int, float, float]]:
    """(step, baseline, BN) of ``metric`` at the evaluations both networks of a seed share."""
    by_arm = {t.params["arm"]: dict(zip(*t.series(metric), strict=True)) for t in trials}
    plain, bn = by_arm.get("plain", {}), by_arm.get("bn", {})
    return [(s, plain[s], bn[s]) for s in sorted(set(plain) & set(bn)) if s >= after]


def _least_lead(trials, results) -> float | None:
    """The smallest BN − baseline test accuracy over the evaluations after ``ahead_after``."""
    pairs = _paired_curves(trials, "test_accuracy", results.settings.ahead_after)
    return min(bn - plain for _, plain, bn in pairs) if pairs else None


def _steps_ratio(trials, results) -> float | None:
    """Steps BN needs to reach the baseline's final accuracy, over the steps the baseline needs."""
    pairs = _paired_curves(trials, "test_accuracy", 0)
    target = next((t.final["test_accuracy"] for t in trials if t.params["arm"] == "plain"), None)
    reach = [next((s for s, *acc in pairs if acc[i] >= target), None) for i in (0, 1)]
    return None if None in reach or not reach[0] else reach[1] / reach[0]


def _drift_ratio(trials, results) -> float | None:
    """Range over training (step 0 excluded) of the sigmoid input's median: baseline / BN."""
    ranges = {}
    for trial in trials:
        medians = [v for s, v in zip(*trial.series("p50"), strict=True) if s > 0]
        ranges[trial.params["arm"]] = max(medians) - min(medians) if medians else None
    if ranges.get("plain") is None or not ranges.get("bn"):
        return None
    return ranges["plain"] / ranges["bn"]


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
        "tiny": {"steps": 60, "eval_every": 20, "hidden": (16, 16, 16), "lr_sweep": (0.5, 2.0),
                 "sweep_steps": 20, "ahead_after": 20, "seeds": 2},
    }  # fmt: skip

    def plan(self, settings, data):
        fixed = {} if settings.lr_sweep else {"learning_rate": settings.learning_rate}
        arms = [Arm("plain", {"network": "plain", **fixed}, "baseline (no BN)"),
                Arm("bn", {"network": "bn", **fixed}, "with BN")]  # fmt: skip
        sweep = None
        if settings.lr_sweep:
            sweep = Sweep("learning_rate", settings.lr_sweep, lowest("train_loss"),
                          settings.sweep_steps, arms=("plain",))  # fmt: skip
        return Plan(arms, settings.steps, seeds=settings.seeds, seed=settings.seed,
                    eval_every=settings.eval_every, sweep=sweep)  # fmt: skip

    def setup(self, trial, settings, data, generator):
        model = mlp(data.features, settings.hidden, data.classes, activation="sigmoid",
                    norm="batch" if trial.params["network"] == "bn" else "none")  # fmt: skip
        initialize(model, f"gaussian:{settings.init_std}", generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=trial.params["learning_rate"])
        return Setup(model, optimizer, settings.batch_size)

    def measure(self, trial, settings, setup, data):
        model = setup.model
        accuracy, loss = accuracy_and_loss(model, data.x_test, data.y_test)
        row = {"test_accuracy": accuracy, "test_loss": loss}
        if trial.params["phase"] == "sweep":
            return row
        layer, unit = len(settings.hidden), settings.unit
        p15, p50, p85 = unit_percentiles(model, pre_activation(model, layer), data.x_test, unit)
        row.update(p15=p15, p50=p50, p85=p85)
        if trial.params["network"] == "bn":
            norm = model._modules[f"norm{layer}"]
            row.update(bn_running_mean=norm.running_mean[unit], bn_running_std=norm.running_var[unit].sqrt(),
                       bn_gamma=norm.weight[unit], bn_beta=norm.bias[unit])  # fmt: skip
        return row

    def claims(self, s):
        figure = "Ioffe & Szegedy 2015, Fig. 1(a)"
        return [
            Claim("final-accuracy", f"final test accuracy, BN − baseline ({s.steps} steps)",
                  Published("≈0.98 vs ≈0.96–0.97 at 50k steps, read from the figure", figure,
                            0.015, unverified=True),
                  difference(final("test_accuracy", arm="bn"), final("test_accuracy", arm="plain")),
                  above(0.0), fmt="+.4f"),
            Claim("ahead-throughout",
                  f"least BN − baseline test accuracy over the evaluations after step {s.ahead_after}",
                  Published("BN's curve lies above the baseline's throughout", figure),
                  per_seed(_least_lead, "min over evaluations of BN − baseline accuracy"),
                  above(0.0), fmt="+.4f"),
            Claim("faster", "steps to the baseline's final accuracy, BN / baseline",
                  Published("BN gets there much earlier (no number)", figure),
                  per_seed(_steps_ratio, "first evaluation at the baseline's final accuracy, BN / baseline"),
                  below(1.0), fmt=".2f"),
            Claim("drift", "range over training of the sigmoid input's median, baseline / BN",
                  Published("the baseline's distribution drifts, BN's stays stable",
                            "Ioffe & Szegedy 2015, Fig. 1(b, c)"),
                  per_seed(_drift_ratio, "range of p50 over evaluations after step 0, baseline / BN"),
                  above(s.drift_ratio), fmt=".2f"),
        ]  # fmt: skip

    def figures(self, s):
        layer = len(s.hidden)
        return [
            Curves("accuracy", "test_accuracy", "test accuracy (fraction)",
                   "Fig. 1(a): test accuracy (eval mode) against training steps, with and without BN.",
                   title="(a) test accuracy"),
            PercentileBands("percentiles", "p15", "p50", "p85", "sigmoid input (pre-activation)",
                            f"Fig. 1(b, c): 15th, 50th and 85th percentiles over the test set of the input "
                            f"to sigmoid unit {s.unit} of hidden layer {layer}.",
                            titles={"plain": "(b) without BN", "bn": "(c) with BN"}),
            Curves("bn-statistics", {"running mean": "bn_running_mean", "running std": "bn_running_std",
                                     "γ": "bn_gamma", "β": "bn_beta"},
                   "value (pre-activation units)",
                   "BN's running mean and standard deviation of that unit's pre-normalization input, "
                   "and its γ and β: the drift BN absorbs.", arms=["bn"], from_step=1),
        ]  # fmt: skip

    def deviations(self, s):
        return [
            f"Data: {'Fashion-MNIST' if s.dataset == 'auto' else s.dataset} instead of MNIST (not "
            "available offline); absolute accuracies are not comparable, the shapes of the curves are.",
            "Optimizer and learning rate are not stated in the paper: plain SGD, the learning rate "
            "picked by the baseline's training loss in a sweep (its section), used for both networks.",
            f'Initial weights N(0, {s.init_std:g}²) (the paper: "small random Gaussian values").',
            "Input pixels scaled to [0, 1] rather than binarized.",
            f"{s.steps} steps" + ("" if s.steps == 50_000 else " instead of 50,000")
            + f", evaluated every {s.eval_every}; {s.seeds} seeds (the paper shows one run).",
        ]
