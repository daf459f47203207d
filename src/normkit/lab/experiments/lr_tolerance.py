"""Ioffe & Szegedy (2015), §4.2: BN tolerates much higher learning rates (BN-x5, BN-x30).

On ImageNet, BN-x5 (5× the learning rate plus the §4.2.1 changes) reached Inception's best accuracy
(72.2%) in 2.1M steps instead of 31.0M (14× fewer; 6.8% of the steps), BN-x30 was slower at first
but went further, and Inception at BN-x5's learning rate diverged. Here a small CNN on
Fashion-MNIST (CPU protocol 1b, docs/PROTOCOLS.md), SGD with momentum 0.9:

- ``plain-x1``: no BN, base learning rate η0, the base recipe (dropout, L2 5e-4, exponential decay of
  the learning rate by ``base_decay`` over the run). Its best validation accuracy is the target,
  the analogue of 72.2%.
- ``bn-x1``: BN before every ReLU, otherwise the same ("BN-Baseline").
- ``bn-xK`` and ``plain-xK`` for K in ``multipliers``: K·η0 with the §4.2.1 changes that fit this
  network: no dropout, L2 ÷ 5, the learning rate decayed 6× faster.
- ``bn-x5-sigmoid`` (accelerated recipe) and ``plain-x1-sigmoid`` (base recipe): sigmoids for ReLUs.

Metric: the first evaluated step at which validation accuracy (on a split held out of the training
set) reaches the target, and each run's best validation accuracy; a run whose training loss
becomes NaN/Inf or exceeds 1000 is stopped and marked diverged. Decisions: the "6× faster decay" is
read as the learning rate's exponential decay constant multiplied by 6; shuffling, LRN and
photometric distortions have no analogue here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from normkit.lab.datasets import first_test_examples, split_validation
from normkit.lab.legacy import Experiment, Settings, Setup, Trial, register
from normkit.lab.models import cnn, initialize
from normkit.lab.plots import curves
from normkit.lab.records import RunRecord
from normkit.lab.report import Figure, Report, Section, Table, fmt

PUBLISHED = {  # Fig. 3 of the paper: steps to 72.2% and best accuracy
    "Inception": (31.0e6, 0.722),
    "BN-Baseline": (13.3e6, 0.727),
    "BN-x5": (2.1e6, 0.730),
    "BN-x30": (2.7e6, 0.748),
    "BN-x5-Sigmoid": (None, 0.698),
}


@dataclass(frozen=True)
class LrToleranceSettings(Settings):
    steps: int = 3_000
    batch_size: int = 32
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 128
    base_lr: float = 0.01
    momentum: float = 0.9
    multipliers: tuple[float, ...] = (5.0, 30.0, 100.0)  # besides x1; BN and plain at each
    plain_multipliers: tuple[float, ...] = (5.0, 30.0)
    base_weight_decay: float = 5e-4
    base_dropout: float = 0.25
    base_decay: float = 2.0  # the base recipe's learning rate falls by this factor over the run
    faster_decay: float = 6.0  # §4.2.1: decay the learning rate 6x faster
    sigmoid: bool = True  # add bn-x5-sigmoid and plain-x1-sigmoid
    validation: int = 2_000
    test_examples: int = 0  # 0: the whole test set for the final accuracy
    eval_every: int = 100


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
        "quick": {
            "steps": 800,
            "channels": (8, 16),
            "hidden": 64,
            "eval_every": 50,
            "validation": 500,
            "test_examples": 2_000,
            "multipliers": (5.0, 30.0),
            "plain_multipliers": (5.0,),
        },
        "tiny": {
            "steps": 24,
            "channels": (4, 8),
            "hidden": 16,
            "eval_every": 8,
            "validation": 64,
            "multipliers": (5.0,),
            "plain_multipliers": (30.0,),
            "batch_size": 16,
        },
    }

    def prepare_data(self, settings, dataset):
        dataset = first_test_examples(dataset, settings.test_examples)
        return split_validation(dataset, settings.validation, settings.seed)

    def trials(self, settings, data, finals):
        runs = [("plain", 1.0, "relu", False), ("bn", 1.0, "relu", False)]
        runs += [("bn", m, "relu", True) for m in settings.multipliers]
        runs += [("plain", m, "relu", True) for m in settings.plain_multipliers]
        if settings.sigmoid:
            runs += [("bn", 5.0, "sigmoid", True), ("plain", 1.0, "sigmoid", False)]
        return [
            Trial(
                f"{net}-x{m:g}" + ("-sigmoid" if act == "sigmoid" else ""),
                {"network": net, "multiplier": m, "activation": act, "accelerated": fast},
                settings.steps,
                settings.eval_every,
                settings.seed,
            )
            for net, m, act, fast in runs
        ]

    def setup(self, trial, settings, data, generator):
        p = trial.params
        fast = p["accelerated"]
        model = cnn(
            data.sample_shape,
            settings.channels,
            settings.hidden,
            data.classes,
            activation=p["activation"],
            norm="batch" if p["network"] == "bn" else "none",
            dropout=0.0 if fast else settings.base_dropout,
        )
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=settings.base_lr * p["multiplier"],
            momentum=settings.momentum,
            weight_decay=settings.base_weight_decay / (5.0 if fast else 1.0),
        )
        rate = (
            math.log(settings.base_decay)
            * (settings.faster_decay if fast else 1.0)
            / settings.steps
        )
        return Setup(
            model, optimizer, settings.batch_size, lr_factor=lambda step: math.exp(-rate * step)
        )

    # -- meaning -------------------------------------------------------------------------------
    def summarize(self, record: RunRecord) -> dict:
        finals = record.finals()
        best = {
            key: max((r["validation_accuracy"] for r in record.curve(key)), default=None)
            for key in finals
        }
        target = best["plain-x1"]
        runs = {}
        for key, final in finals.items():
            reached = next(
                (r["step"] for r in record.curve(key) if r["validation_accuracy"] >= target), None
            )
            runs[key] = {
                "steps_to_target": reached,
                "best_validation_accuracy": best[key],
                "test_accuracy": final["test_accuracy"],
                "diverged": final["diverged"],
                # a network that never beats 1.5x chance did not train (dead units, collapse)
                "stuck_at_chance": best[key] is not None
                and best[key] < 1.5 / record.config["data"]["classes"],
                "learning_rate": record.settings["base_lr"] * final["multiplier"],
            }
        base_steps = runs["plain-x1"]["steps_to_target"]

        def ratio(key):
            steps = runs.get(key, {}).get("steps_to_target")
            return None if not steps or not base_steps else base_steps / steps

        return {
            "target_accuracy": target,
            "runs": runs,
            "speedup_bn_x1": ratio("bn-x1"),
            "speedup_bn_x5": ratio("bn-x5"),
            "speedup_bn_x30": ratio("bn-x30"),
            "plain_failed": [
                k
                for k, r in runs.items()
                if k.startswith("plain") and (r["diverged"] or r["stuck_at_chance"])
            ],
        }

    @staticmethod
    def _outcome(run: dict) -> str:
        if run["diverged"]:
            return "diverged"
        if run.get("stuck_at_chance"):
            return f"did not train (best {run['best_validation_accuracy']:.3f}, chance level)"
        return f"trained (best {run['best_validation_accuracy']:.3f})"

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        runs = s["runs"]

        def steps_of(key):
            run = runs.get(key)
            if run is None:
                return "not run"
            if run["diverged"]:
                return "diverged"
            if run.get("stuck_at_chance"):
                return "never (stuck at chance)"
            return fmt(run["steps_to_target"], none="never")

        def share(key):
            speed = s.get(f"speedup_{key.replace('-', '_')}")
            return "–" if not speed else f"{1 / speed:.0%} of the steps ({speed:.1f}× fewer)"

        comparison = Table(
            [
                "quantity",
                "published (ImageNet, Inception)",
                f"ours ({record.config['data']['name']}, small CNN)",
                "verdict",
            ],
            [
                [
                    "target: the no-BN network's best accuracy",
                    "72.2% (Inception)",
                    f"{fmt(s['target_accuracy'])} validation accuracy (plain-x1)",
                    "–",
                ],
                [
                    "BN-Baseline (BN-x1) steps to the target",
                    '13.3M vs 31.0M: 43% ("less than half")',
                    f"{steps_of('bn-x1')} vs {steps_of('plain-x1')}: {share('bn-x1')}",
                    "under half the steps: "
                    + fmt(bool(s["speedup_bn_x1"] and s["speedup_bn_x1"] > 2)),
                ],
                [
                    "BN-x5 steps to the target",
                    "2.1M: 6.8% of the steps (14× fewer)",
                    f"{steps_of('bn-x5')}: {share('bn-x5')}",
                    "faster than BN-x1: "
                    + fmt(
                        bool(s["speedup_bn_x5"] and s["speedup_bn_x5"] > (s["speedup_bn_x1"] or 0))
                    ),
                ],
                [
                    "BN-x30 steps to the target",
                    "2.7M (slower than BN-x5 at first)",
                    f"{steps_of('bn-x30')}: {share('bn-x30')}",
                    "–",
                ],
                [
                    "best accuracy BN-x30 vs BN-x5",
                    "74.8% vs 73.0%",
                    f"{fmt(runs.get('bn-x30', {}).get('best_validation_accuracy'))} vs "
                    f"{fmt(runs.get('bn-x5', {}).get('best_validation_accuracy'))}",
                    "BN-x30 at least as high: "
                    + fmt(
                        runs.get("bn-x30", {}).get("best_validation_accuracy", 0)
                        >= runs.get("bn-x5", {}).get("best_validation_accuracy", 1)
                    ),
                ],
                [
                    "the network without BN at BN-x5's learning rate",
                    'diverges ("machine infinity")',
                    ", ".join(
                        f"{k}: {self._outcome(runs[k])}"
                        for k in runs
                        if k.startswith("plain-x") and "sigmoid" not in k and k != "plain-x1"
                    ),
                    "–",
                ],
                [
                    "sigmoid: BN-x5-Sigmoid vs no BN",
                    '69.8% vs "never better than 1/1000"',
                    f"{fmt(runs.get('bn-x5-sigmoid', {}).get('best_validation_accuracy'))} vs "
                    f"{fmt(runs.get('plain-x1-sigmoid', {}).get('best_validation_accuracy'))}",
                    "–",
                ],
            ],
        )
        table = Table(
            [
                "run",
                "learning rate",
                "steps to target",
                "best validation acc.",
                "test acc. (end)",
                "diverged",
            ],
            [
                [
                    k,
                    fmt(r["learning_rate"], "g"),
                    steps_of(k),
                    fmt(r["best_validation_accuracy"]),
                    fmt(r["test_accuracy"]),
                    fmt(r["diverged"]),
                ]
                for k, r in runs.items()
            ],
        )
        relu = [(k, k) for k in runs if "sigmoid" not in k]
        figures = [
            Figure(
                "validation-accuracy",
                curves(
                    record,
                    relu,
                    "validation_accuracy",
                    "validation accuracy (fraction)",
                    "ReLU CNN, SGD momentum 0.9",
                ),
                "Validation accuracy against steps; × marks a run stopped because it diverged.",
            ),
            Figure(
                "training-loss",
                curves(
                    record,
                    [(k, k) for k in runs],
                    "train_loss",
                    "training loss (mean over the interval)",
                    "training loss",
                    logy=True,
                ),
                "Training cross-entropy (log scale) for every run, sigmoid ones included.",
            ),
        ]
        deviations = [
            f"A small CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, "
            f"fc{settings['hidden']}) on "
            f"{record.config['data']['name']} for {settings['steps']} steps instead of Inception on ImageNet "
            "for millions; steps are compared as ratios.",
            f"Base learning rate η0 = {settings['base_lr']:g} (SGD, momentum {settings['momentum']:g}, batch "
            f"{settings['batch_size']}); the paper's Inception used 0.0015 with batch 32 (distributed).",
            "Of §4.2.1's changes: dropout removed, L2 ÷ 5 and the learning rate decayed 6× faster for the "
            "accelerated runs; LRN, shuffling and photometric distortions have no analogue here.",
            "The target is reached on a validation split held out of the training set, not the test set.",
        ]
        headline = (
            f"to the no-BN best ({fmt(s['target_accuracy'])}): plain {steps_of('plain-x1')} steps, "
            f"BN-x1 {steps_of('bn-x1')}, BN-x5 {steps_of('bn-x5')}, BN-x30 {steps_of('bn-x30')}"
        )
        return Report(
            comparison,
            [Section("All runs", [table]), Section("Figures", figures)],
            [],
            deviations,
            headline,
        )
