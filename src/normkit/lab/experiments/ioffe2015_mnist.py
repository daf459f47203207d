"""Ioffe & Szegedy (2015), Fig. 1: a sigmoid MLP with and without batch normalization.

The paper's MNIST experiment: 3 fully connected hidden layers of 100 sigmoid units, weights drawn
from "small random Gaussian values", mini-batches of 60, 50,000 steps, BN added to every hidden
layer (before the sigmoid; the Linear layer then has no bias, §3.2). It plots (a) test accuracy
against steps, and (b, c) the {15, 50, 85}th percentiles of the input to one sigmoid of the last
hidden layer over training, without and with BN.

Decisions where the paper is silent (CPU protocol 1a, docs/PROTOCOLS.md):

- Optimizer: plain SGD; each network gets its own learning rate by the same rule, a sweep over
  ``lr_sweep`` judged by the training loss after ``sweep_steps`` steps (no test data involved), so
  neither network runs at a rate tuned for the other. Initial weights N(0, 0.01²) for every Linear
  layer, biases 0.
- "One typical sigmoid" is unit ``unit`` (0) of hidden layer 3, fixed before training. Its input's
  percentiles are taken over the test set in eval mode, i.e. with BN's running statistics
  (Algorithm 2), at every evaluation: Fig. 1(b, c). The drift is judged on a statistic that
  single evaluations and the running averages' jitter cannot decide: the same percentiles in train
  mode (the batch's own statistics, as the sigmoid sees them in training) on a fixed batch of
  ``drift_batch`` test examples, averaged over the last quarter of the evaluations minus over the
  first quarter (step 0 excluded): |shift of the median| + |change of the 15–85 spread|.
- "BN ahead" is judged at fixed budgets (``budgets``): BN − baseline test accuracy at each, per
  seed, with its interval over seeds.
- Data: Fashion-MNIST (MNIST is not available offline), so accuracies are compared by the shapes of
  the curves, not by value.
- Seeds: ``seeds`` replicates of both networks (paired: each seed's networks see the same batches);
  the sweep runs once, on the first seed.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch

from normkit.lab.claims import Claim, Published, above, arm_gap, below, per_seed
from normkit.lab.evaluation import on_test_set, unit_percentiles
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
    lr_sweep: tuple[float, ...] = (0.02, 0.1, 0.5, 2.0, 8.0)  # picks inside the grid, not at its edge
    sweep_steps: int = 5_000
    eval_every: int = 250
    seeds: int = 3
    unit: int = 0  # the "typical" sigmoid of the last hidden layer
    budgets: tuple[int, ...] = (1_000, 5_000)  # claim: BN ahead at each of these steps
    drift_batch: int = 600  # the fixed batch of the train-mode percentiles
    drift_ratio: float = 3.0  # claim: the baseline's drift > drift_ratio × BN's


def _paired_accuracy(trials) -> list[tuple[int, float, float]]:
    """(step, baseline, BN) test accuracy at the evaluations both networks of a seed share."""
    by_arm = {t.params["arm"]: dict(zip(*t.series("test_accuracy"), strict=True)) for t in trials}
    plain, bn = by_arm.get("plain", {}), by_arm.get("bn", {})
    return [(s, plain[s], bn[s]) for s in sorted(set(plain) & set(bn))]


def _lead_at(budget: int):
    """BN − baseline test accuracy at the last evaluation at or before ``budget`` steps."""

    def lead(trials, results):
        pairs = [p for p in _paired_accuracy(trials) if p[0] <= budget]
        return pairs[-1][2] - pairs[-1][1] if pairs and pairs[-1][0] > 0 else None

    return lead


def _steps_ratio(trials, results) -> float | None:
    """Steps BN needs to reach the baseline's final accuracy, over the steps the baseline needs."""
    pairs = _paired_accuracy(trials)
    target = next((t.final["test_accuracy"] for t in trials if t.params["arm"] == "plain"), None)
    reach = [next((s for s, *acc in pairs if acc[i] >= target), None) for i in (0, 1)]
    return None if None in reach or not reach[0] else reach[1] / reach[0]


def _drift(trial) -> float | None:
    """Late-minus-early shift of the train-mode percentiles: |Δ median| + |Δ (p85 − p15)|, each the
    mean over the last quarter of the evaluations minus over the first (step 0 excluded)."""
    rows = [r for r in trial.curve if r["step"] > 0 and r.get("train_p50") is not None]
    quarter = len(rows) // 4
    if quarter < 1:
        return None

    def shift(value):
        return statistics.fmean(map(value, rows[-quarter:])) - statistics.fmean(map(value, rows[:quarter]))

    return abs(shift(lambda r: r["train_p50"])) + abs(shift(lambda r: r["train_p85"] - r["train_p15"]))


def _drift_ratio(trials, results) -> float | None:
    """The baseline's drift over BN's (per seed)."""
    drift = {t.params["arm"]: _drift(t) for t in trials}
    return None if drift.get("plain") is None or not drift.get("bn") else drift["plain"] / drift["bn"]


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
        "tiny": {"steps": 60, "eval_every": 10, "hidden": (16, 16, 16), "lr_sweep": (0.5, 2.0),
                 "sweep_steps": 20, "budgets": (20,), "drift_batch": 50, "seeds": 2},
    }  # fmt: skip

    def plan(self, settings, data):
        fixed = {} if settings.lr_sweep else {"learning_rate": settings.learning_rate}
        arms = [Arm("plain", {"network": "plain", **fixed}, "baseline (no BN)"),
                Arm("bn", {"network": "bn", **fixed}, "with BN")]  # fmt: skip
        sweep = (Sweep("learning_rate", settings.lr_sweep, lowest("train_loss"),
                       settings.sweep_steps, by=("arm",)) if settings.lr_sweep else None)  # fmt: skip
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
        row = on_test_set(model, data)
        if trial.params["phase"] == "sweep":
            return row
        layer, unit = len(settings.hidden), settings.unit
        p15, p50, p85 = unit_percentiles(model, pre_activation(model, layer), data.x_test, unit)
        row.update(p15=p15, p50=p50, p85=p85)
        probe = copy.deepcopy(model).train()  # the batch's own statistics; the model's stay as they are
        batch = data.x_test[: settings.drift_batch]
        train = unit_percentiles(probe, pre_activation(probe, layer), batch, unit)
        row.update(dict(zip(("train_p15", "train_p50", "train_p85"), train, strict=True)))
        if trial.params["network"] == "bn":
            norm = model._modules[f"norm{layer}"]
            row.update(bn_running_mean=norm.running_mean[unit], bn_running_std=norm.running_var[unit].sqrt(),
                       bn_gamma=norm.weight[unit], bn_beta=norm.bias[unit])  # fmt: skip
        return row

    def claims(self, s):
        figure = "Ioffe & Szegedy 2015, Fig. 1(a)"
        return [
            arm_gap("final-accuracy", f"final test accuracy, BN − baseline ({s.steps} steps)",
                    Published("≈0.98 vs ≈0.96–0.97 at 50k steps, read from the figure", figure,
                              0.015, unverified=True),
                    "test_accuracy", "bn", "plain", above(0.0), "+.4f"),
            *(Claim(f"ahead-at-{budget}", f"test accuracy after {budget} steps, BN − baseline",
                    Published("BN's curve lies above the baseline's throughout", figure),
                    per_seed(_lead_at(budget), f"BN − baseline test accuracy at step {budget}"),
                    above(0.0), fmt="+.4f") for budget in s.budgets),
            Claim("faster", "steps to the baseline's final accuracy, BN / baseline",
                  Published("BN gets there much earlier (no number)", figure),
                  per_seed(_steps_ratio, "first evaluation at the baseline's final accuracy, BN / baseline",
                           ratio=True),
                  below(1.0), fmt=".2f"),
            Claim("drift", "drift of the sigmoid input's percentiles (train mode, a fixed batch), plain / BN",
                  Published("the baseline's distribution drifts, BN's stays stable",
                            "Ioffe & Szegedy 2015, Fig. 1(b, c)"),
                  per_seed(_drift_ratio, "late − early |Δ median| + |Δ spread|, baseline / BN", ratio=True),
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
            "Optimizer and learning rate are not stated in the paper: plain SGD, each network's learning "
            "rate picked by its own training loss in a sweep (the sections below).",
            f'Initial weights N(0, {s.init_std:g}²) (the paper: "small random Gaussian values").',
            "Input pixels scaled to [0, 1] rather than binarized.",
            f"{s.steps} steps" + ("" if s.steps == 50_000 else " instead of 50,000")
            + f", evaluated every {s.eval_every}; {s.seeds} seeds (the paper shows one run).",
        ]
