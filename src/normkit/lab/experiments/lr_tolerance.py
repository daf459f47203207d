"""Ioffe & Szegedy (2015), §4.2: BN tolerates much higher learning rates (BN-x5, BN-x30).

On ImageNet, BN-x5 (5× the learning rate plus the §4.2.1 changes) reached Inception's best accuracy
(72.2%) in 14× fewer steps, BN-x30 was slower at first but went further, and Inception at BN-x5's
rate diverged. Here a small CNN on Fashion-MNIST (CPU protocol 1b, docs/PROTOCOLS.md), SGD with
momentum 0.9, ``seeds`` seeds (paired: a seed fixes every arm's batch order):

- η0 is the largest rate the network without BN trains at: a sweep of ``plain-x1`` over ``lr_sweep``
  (``sweep_steps`` steps, seed 0) picks the largest value that neither diverges nor ends with a
  training loss above ``stable_loss`` (a collapse to chance ends near ln 10 = 2.3), so BN-x5 and
  BN-x30 sit past the plain network's edge of stability, as in the paper.
- ``plain-x1``: no BN at η0 with the base recipe (dropout, L2 5e-4, the learning rate decaying
  exponentially by ``base_decay`` over ``steps``); its best validation accuracy (per seed) is the
  target, the analogue of 72.2%. ``bn-x1``: BN before every ReLU, otherwise the same.
- ``bn-xK`` / ``plain-xK`` (K in ``multipliers`` / ``plain_multipliers``): K·η0 with the §4.2.1
  changes that fit this network: no dropout, L2 ÷ 5, the decay constant ×6.
- ``bn-x5-sigmoid`` (accelerated recipe) and ``plain-x1-sigmoid`` (base recipe): sigmoids for ReLUs.

Metric: the first evaluation at which validation accuracy (a split held out of the training set)
reaches the seed's target; an arm's speedup is the no-BN steps over its own (0 if it never gets
there). A run whose training loss becomes NaN/Inf or exceeds 1000 stops, diverged; one whose best
accuracy stays under 1.5× chance did not train. The decay is defined per step over ``steps``, so a
longer arm keeps decaying at the same rate: BN-x30 reaches the rate BN-x5 ends at only after
log(384)/log(64) ≈ 1.43× ``steps``, so both train ``long_steps`` (1.5×), their best accuracies
compare at equal budgets, and their curves up to ``steps`` are unchanged. Shuffling, LRN and
photometric distortions have no analogue here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from normkit.lab.claims import Claim, Published, above, difference, from_curve, per_seed
from normkit.lab.datasets import first_test_examples, split_validation
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Curves
from normkit.lab.mechanism import describe, layout
from normkit.lab.models import cnn, initialize, vgg
from normkit.lab.plan import Arm, Plan, Sweep, largest_stable
from normkit.lab.render import Section, Table, fmt
from normkit.lab.settings import Settings

FIG3 = "Ioffe & Szegedy 2015, §4.2.2 and Fig. 3"
METRIC = "validation_accuracy"


@dataclass(frozen=True)
class LrToleranceSettings(Settings):
    steps: int = 3_000
    long_steps: int = 4_500  # the accelerated BN arms (BN-x5, BN-x30): room for BN-x30's late gain
    batch_size: int = 32
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 128
    vgg: str = ""  # "11": VGG-11 (normkit.lab.models.VGG_LAYOUTS) instead of the CNN of `channels`
    base_lr: float = 0.01  # used as is when lr_sweep is empty
    lr_sweep: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    sweep_steps: int = 1_000
    stable_loss: float = 1.0  # a sweep value "trains" when its final training loss is below this
    momentum: float = 0.9
    multipliers: tuple[float, ...] = (5.0, 30.0)  # besides x1; BN at each
    plain_multipliers: tuple[float, ...] = (5.0,)
    base_weight_decay: float = 5e-4
    base_dropout: float = 0.25
    base_decay: float = 2.0  # the base recipe's learning rate falls by this factor over `steps`
    faster_decay: float = 6.0  # §4.2.1: decay the learning rate 6x faster
    validation: int = 2_000
    test_examples: int = 0  # 0: the whole test set for the final accuracy
    seeds: int = 3
    eval_every: int = 100


def _arms(s) -> list[Arm]:
    runs = [("plain", 1.0, "relu", False), ("bn", 1.0, "relu", False)]
    runs += [("bn", m, "relu", True) for m in s.multipliers]
    runs += [("plain", m, "relu", True) for m in s.plain_multipliers]
    runs += [("bn", 5.0, "sigmoid", True), ("plain", 1.0, "sigmoid", False)]
    return [Arm(f"{net}-x{m:g}" + ("-sigmoid" if act == "sigmoid" else ""),
                {"network": net, "multiplier": m, "activation": act, "accelerated": fast})
            for net, m, act, fast in runs]  # fmt: skip


def _best(trial) -> float | None:
    return max(trial.series(METRIC)[1], default=None)


def _outcome(trial, classes: int) -> str:
    best = _best(trial)
    if trial.final["diverged"]:
        return "diverged"
    return "stuck at chance" if best is None or best < 1.5 / classes else "trained"


def _reached(trial, target: float) -> int | None:
    steps, values = trial.series(METRIC)
    return next((s for s, v in zip(steps, values, strict=True) if v >= target), None)


def _arm(trials, name):
    return next((t for t in trials if t.params["arm"] == name), None)


def speedup(arm: str):
    """Steps of the no-BN network to its own best accuracy over ``arm``'s (0: never reached)."""

    def value(trials, results):
        plain, other = _arm(trials, "plain-x1"), _arm(trials, arm)
        if plain is None or other is None or plain.final["diverged"]:
            return None
        steps = None if other.final["diverged"] else _reached(other, _best(plain))
        return 0.0 if steps is None else (_reached(plain, _best(plain)) / steps if steps else None)

    return per_seed(value, f"steps to the no-BN best, no BN / {arm}", ratio=True)


def best(arm: str):
    return from_curve(lambda steps, values: max(values, default=None), METRIC, "best", arm=arm)


def failed(arm: str):
    def value(trials, results):
        return float(_outcome(trials[0], results.record.config["data"]["classes"]) != "trained")

    return per_seed(value, "1: diverged or stuck at chance, 0: trained", arm=arm)


@register
class LrTolerance(Experiment):
    name = "lr-tolerance"
    title = "Higher learning rates with BN (BN-x5, BN-x30)"
    paper = "Ioffe & Szegedy 2015, Batch Normalization, §4.2.1-4.2.2 and Fig. 3"
    claim = (
        "BN lets the learning rate rise: BN-x5 reaches the baseline's best accuracy in 14× fewer "
        "steps (about 7% of them), BN-x30 trains slower at first but ends higher, and the network "
        "without BN diverges at BN-x5's learning rate."
    )
    settings_class = LrToleranceSettings
    presets = {
        "quick": {"steps": 800, "long_steps": 1_200, "channels": (8, 16), "hidden": 64, "eval_every": 50,
                  "validation": 500, "test_examples": 2_000, "lr_sweep": (0.01, 0.02, 0.05, 0.1, 0.2),
                  "sweep_steps": 300, "stable_loss": 1.2, "seeds": 2},
        "tiny": {"steps": 24, "long_steps": 32, "channels": (4, 8), "hidden": 16, "eval_every": 8,
                 "validation": 64, "lr_sweep": (0.01, 0.05, 5.0), "sweep_steps": 16, "stable_loss": 2.3,
                 "multipliers": (5.0,), "plain_multipliers": (30.0,), "batch_size": 16, "seeds": 1},
        "gpu": {"dataset": "cifar10", "vgg": "11", "hidden": 512, "batch_size": 128, "steps": 15_640,
                "long_steps": 23_460, "lr_sweep": (0.005, 0.01, 0.02, 0.05, 0.1), "sweep_steps": 3_910,
                "eval_every": 391, "validation": 5_000},  # 40 epochs (60 for BN-x5/x30), sweep 10
    }  # fmt: skip

    def prepare_data(self, s, dataset):
        return split_validation(first_test_examples(dataset, s.test_examples), s.validation, s.seed)

    def plan(self, s, data):
        sweep = None
        if s.lr_sweep:
            sweep = Sweep("base_lr", s.lr_sweep, largest_stable("train_loss", s.stable_loss), s.sweep_steps,
                          arms=("plain-x1",))  # fmt: skip

        def steps(p):
            long = p["network"] == "bn" and p["accelerated"] and p["activation"] == "relu"
            return s.long_steps if long else s.steps

        return Plan(_arms(s), steps, seeds=s.seeds, seed=s.seed, eval_every=s.eval_every, sweep=sweep)

    def setup(self, trial, s, data, generator):
        p = trial.params
        fast = p["accelerated"]
        norm, dropout = "batch" if p["network"] == "bn" else "none", 0.0 if fast else s.base_dropout
        shape, act = data.sample_shape, p["activation"]
        model = (vgg(shape, layout(s), s.hidden, data.classes, norm, None, act, dropout) if s.vgg
                 else cnn(shape, s.channels, s.hidden, data.classes, act, norm, dropout=dropout))  # fmt: skip
        initialize(model, "he", generator)
        lr = p.get("base_lr", s.base_lr) * p["multiplier"]
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=s.momentum,
                                    weight_decay=s.base_weight_decay / (5.0 if fast else 1.0))  # fmt: skip
        rate = math.log(s.base_decay) * (s.faster_decay if fast else 1.0) / s.steps
        return Setup(model, optimizer, s.batch_size, lr_factor=lambda step: math.exp(-rate * step))

    def finish(self, trial, s, setup, data):
        return {**super().finish(trial, s, setup, data), "learning_rate": setup.initial_lrs[0]}

    def claims(self, s):
        plain_k = f"plain-x{min(s.plain_multipliers, default=5.0):g}"
        claims = [
            Claim("target", "best validation accuracy without BN (the target)",
                  Published("72.2% (Inception, ImageNet)", FIG3, 0.722), best("plain-x1"), None),
            Claim("bn-x1-speedup", "steps to the target, no BN / BN-x1",
                  Published('"less than half the number of training steps": 31.0M / 13.3M', FIG3,
                            31.0 / 13.3, unverified=True),
                  speedup("bn-x1"), above(2.0), fmt=".2f"),
            Claim("bn-x5-speedup", "steps to the target, no BN / BN-x5",
                  Published("14× fewer steps (31.0M / 2.1M)", FIG3, 31.0 / 2.1), speedup("bn-x5"), None,
                  fmt=".2f"),
            Claim("bn-x5-over-x1", "speedup of BN-x5 − speedup of BN-x1",
                  Published("BN-x5 much faster than BN-Baseline: 14× vs 2.3×", FIG3, 14.8 - 2.3,
                            unverified=True),
                  difference(speedup("bn-x5"), speedup("bn-x1")), above(0.0), fmt="+.2f"),
            Claim("plain-fails", f"{plain_k} fails (1: diverged or stuck at chance; mean over seeds)",
                  Published('Inception at BN-x5\'s rate: parameters reach "machine infinity"', FIG3, 1.0),
                  failed(plain_k), above(0.5), fmt=".2f"),
            Claim("sigmoid", "best validation accuracy, BN-x5-Sigmoid − sigmoid without BN",
                  Published('69.8% vs "never better than 1/1000"', FIG3, 0.698),
                  difference(best("bn-x5-sigmoid"), best("plain-x1-sigmoid")), above(0.0), fmt="+.4f"),
        ]
        if 30.0 in s.multipliers:
            claims.append(Claim(
                "bn-x30-best", "best validation accuracy, BN-x30 − BN-x5",
                Published("74.8% vs 73.0%: BN-x30 slower at first, ends higher", FIG3, 0.018,
                          unverified=True),
                difference(best("bn-x30"), best("bn-x5")), above(0.0), fmt="+.4f"))  # fmt: skip
        return claims

    def figures(self, s):
        relu = [a.name for a in _arms(s) if a.params["activation"] == "relu"]
        return [
            Curves("validation-accuracy", METRIC, "validation accuracy (fraction)",
                   "Validation accuracy of the ReLU networks; × marks a run stopped as diverged.",
                   arms=relu),
            Curves("training-loss", "train_loss", "training loss (cross-entropy)",
                   "Mean training loss over each evaluation interval, sigmoid networks included.", logy=True),
        ]  # fmt: skip

    def extra_section(self, results):
        classes, rows = results.record.config["data"]["classes"], []
        plain = {t.replicate: t for t in results.trials(arm="plain-x1")}
        for arm in [a for a in results.labels if results.trials(arm=a)]:
            trials = results.trials(arm=arm)
            reached = [_reached(t, _best(plain[t.replicate])) if t.replicate in plain else None
                       for t in trials]  # fmt: skip
            rows.append([arm, fmt(trials[0].final.get("learning_rate"), "g"),
                         ", ".join(fmt(r, "d", none="never") for r in reached),
                         ", ".join(f"{fmt(_best(t))} ({_outcome(t, classes)})" for t in trials)])  # fmt: skip
        headers = ["arm", "learning rate", "steps to the target", "best validation accuracy"]
        note = "One value per seed, in seed order; the target is the seed's no-BN best accuracy."
        return Section("Runs", [Table(headers, rows, note)])

    def deviations(self, s):
        rate = (f"the largest the network without BN trains at (the sweep, over {s.lr_sweep})" if s.lr_sweep
                else f"{s.base_lr:g}")  # fmt: skip
        convs = "-conv".join(map(str, s.channels))
        net = describe(s) if s.vgg else f"A small CNN (conv{convs}, fc{s.hidden})"
        return [
            f"{net}, {s.steps} steps ({s.long_steps} for BN-x5 and BN-x30) instead of Inception on ImageNet"
            " for millions; steps compare as ratios, on a validation split held out of the training set.",
            f"Base learning rate η0: {rate}; SGD, momentum {s.momentum:g}, batch {s.batch_size}. Inception's "
            "0.0015 (batch 32) was a tuned rate, not its edge of stability.",
            "Of §4.2.1's changes, LRN, shuffling and photometric distortions have no analogue here.",
        ]
