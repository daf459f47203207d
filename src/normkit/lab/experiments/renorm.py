"""Ioffe (2017), §4.2-4.3: Batch Renormalization where BN's batch is small or not i.i.d.

Batch Renormalization (arXiv 1702.03275), Inception-v3 on ImageNet, 50 workers × 32 examples,
top-1 validation accuracy:

- i.i.d. minibatches of 32: BN 78.3%, Batch Renorm 78.5%;
- microbatches of 4 (each worker's 32 normalized as 8 × 4; the gradient still over all 1600):
  BN 74.2% (at 210k steps), Batch Renorm 76.5% (at 130k steps);
- non-i.i.d. minibatches (16 labels drawn with replacement × 2 images of each = 32): BN 67.0%
  (training accuracy 72.8%), Batch Renorm 78.6% in the figure's legend (text: 78.5% at 120k steps);
  BN evaluated in training mode on non-i.i.d. test minibatches of 50 (25 labels × 2): 76.5%; BN
  applied separately to two halves of 16, each holding one image of every pair: 77.4%.

Here (CPU protocol 2): the small CNN of ``normkit.lab.small_batch`` on Fashion-MNIST, SGD with
momentum, ``seeds`` seeds, two runs. Microbatches: a gradient batch of 128 normalized as a whole,
or in microbatches of 4 by BN (``nk.GhostBatchNorm``) or Batch Renorm (``PerMicrobatch``); running
statistics updated once per microbatch. Non-i.i.d. (issue 17's fix): each batch draws
``classes_per_batch`` (2) of the 10 classes, then ``pair_labels`` labels from them with
replacement × two images of each (labels drawn from all 10 classes covered about 6.5 of them: BN
lost only 0.5 points, nothing for Batch Renorm to recover); BN, Batch Renorm, BN on two halves
each holding one image of every pair, and BN on i.i.d. batches of the same size. Batch Renorm's
r_max/d_max follow the paper's schedule scaled to a layer's forwards (plain BN for 3.5%, then
linearly to d_max = 5 at 18% and r_max = 3 at 28%); every arm's moving averages use the paper's
α = 0.01. Measured: accuracy in eval mode, and in training mode on test batches shaped like the
training batches (their difference is the train/eval gap); the paper's control, BN in training
mode on non-i.i.d. test batches of 50.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab.batch_orders import PairedBatches, paired_test_order
from normkit.lab.claims import Claim, Published, above, arm_gap, final, per_seed
from normkit.lab.evaluation import on_test_set
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Bars, Curves
from normkit.lab.plan import Arm, Plan
from normkit.lab.settings import Settings
from normkit.lab.small_batch import PerMicrobatch, batch_statistics_accuracy, small_cnn

SOURCE = "Ioffe 2017"
ARMS = {  # name: (run, normalizer, label)
    "micro-bn-128": ("micro", "bn", "BN on the whole gradient batch"),
    "micro-bn-4": ("micro", "gbn", "BN per microbatch"),
    "micro-brn-4": ("micro", "brn", "Batch Renorm per microbatch"),
    "noniid-bn-iid": ("noniid", "bn", "BN, i.i.d. batches (reference)"),
    "noniid-bn": ("noniid", "bn", "BN, non-i.i.d. batches"),
    "noniid-brn": ("noniid", "brn", "Batch Renorm, non-i.i.d. batches"),
    "noniid-bn-halves": ("noniid", "gbn", "BN per half (one image of each pair)"),
}


@dataclass(frozen=True)
class RenormSettings(Settings):
    micro_steps: int = 1_500
    gradient_batch: int = 128
    microbatch: int = 4
    micro_lr: float = 0.1
    noniid_steps: int = 4_000
    pair_labels: int = 10  # non-i.i.d. batch = 2 x this
    classes_per_batch: int = 2  # the labels of a non-i.i.d. batch come from this many classes; 0: all
    noniid_lr: float = 0.02
    momentum: float = 0.9
    running_momentum: float = 0.01  # the paper's alpha, for every arm
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    control_pairs: int = 25  # the paper's non-i.i.d. test minibatches: 25 labels x 2
    seeds: int = 3
    evaluations: int = 10
    eval_examples: int = 2_000


def _gap_difference(trials, results) -> float | None:
    gaps = {t.params["arm"]: t.final["train_eval_gap"] for t in trials}
    if {"micro-bn-4", "micro-brn-4"} <= set(gaps):
        return abs(gaps["micro-bn-4"]) - abs(gaps["micro-brn-4"])
    return None


@register
class Renorm(Experiment):
    name = "renorm"
    title = "Batch Renorm with microbatches and non-i.i.d. minibatches"
    paper = "Ioffe 2017, Batch Renormalization, §4.2-4.3 (Figs. 2-3)"
    claim = (
        "Batch Renorm keeps the benefit of normalization where BN's batch is poor: with "
        "microbatches of 4, BN reaches 74.2% and Batch Renorm 76.5%; with non-i.i.d. minibatches "
        "(pairs of one label), BN 67.0% and Batch Renorm 78.6% (i.i.d. BN: 78.3%)."
    )
    settings_class = RenormSettings
    presets = {
        "quick": {"micro_steps": 300, "noniid_steps": 800, "evaluations": 4, "eval_examples": 1000,
                  "seeds": 2},
        "tiny": {"micro_steps": 6, "gradient_batch": 16, "noniid_steps": 8, "pair_labels": 4,
                 "channels": (4, 8), "hidden": 16, "control_pairs": 5, "evaluations": 2,
                 "eval_examples": 100, "seeds": 1},
    }  # fmt: skip

    def plan(self, s, data):
        arms = [Arm(name, {"run": run, "normalizer": norm}, label)
                for name, (run, norm, label) in ARMS.items()]  # fmt: skip
        steps = lambda p: s.micro_steps if p["run"] == "micro" else s.noniid_steps
        return Plan(arms, steps, seeds=s.seeds, seed=s.seed, evaluations=s.evaluations)

    def setup(self, trial, s, data, generator):
        run, arm, norm = trial.params["run"], trial.params["arm"], trial.params["normalizer"]
        micro = run == "micro"
        if micro and s.gradient_batch % s.microbatch:
            raise ConfigError(f"gradient_batch={s.gradient_batch} is not a multiple of "
                              f"microbatch={s.microbatch}")  # fmt: skip
        forwards = trial.steps * (s.gradient_batch // s.microbatch if micro else 1)
        model = small_cnn(data.sample_shape, data.classes, norm, generator, channels=s.channels,
                          hidden=s.hidden, ghost_batch=s.microbatch if micro else s.pair_labels,
                          renorm_steps=forwards)  # fmt: skip
        for name, module in list(model.named_children()):
            if isinstance(module, (nk.BatchNorm, nk.BatchRenorm, nk.GhostBatchNorm)):
                module.momentum = s.running_momentum
                if arm == "micro-brn-4":
                    model._modules[name] = PerMicrobatch(module, s.microbatch)
        optimizer = torch.optim.SGD(model.parameters(), lr=s.micro_lr if micro else s.noniid_lr,
                                    momentum=s.momentum)  # fmt: skip
        batch = s.gradient_batch if micro else 2 * s.pair_labels
        paired = run == "noniid" and arm != "noniid-bn-iid"
        order = partial(PairedBatches, classes_per_batch=s.classes_per_batch or None)
        return Setup(model, optimizer, batch, batch_order=order if paired else None)

    def measure(self, trial, s, setup, data):
        return {"test_accuracy": on_test_set(setup.model, data, s.eval_examples)["test_accuracy"]}

    def finish(self, trial, s, setup, data):
        model = setup.model
        values = on_test_set(model, data)
        if trial.params["run"] == "micro":  # training-mode batches: test images, per microbatch
            train_mode = batch_statistics_accuracy(model, data.x_test, data.y_test, s.gradient_batch)
        else:
            order = paired_test_order(data.y_test, s.pair_labels, s.seed, s.classes_per_batch or None)
            train_mode = batch_statistics_accuracy(model, data.x_test[order], data.y_test[order],
                                                   2 * s.pair_labels)  # fmt: skip
        values.update(train_mode_accuracy=train_mode, train_eval_gap=train_mode - values["test_accuracy"],
                      control_50_accuracy=None)
        if trial.params["arm"] == "noniid-bn":
            order = paired_test_order(data.y_test, s.control_pairs, s.seed, s.classes_per_batch or None)
            values["control_50_accuracy"] = batch_statistics_accuracy(
                model, data.x_test[order], data.y_test[order], 2 * s.control_pairs)
        return values

    def claims(self, s):
        micro = f"microbatches of {s.microbatch}"
        return [
            arm_gap("micro-brn-beats-bn", f"{micro}: Batch Renorm − BN test accuracy",
                    Published("+0.023: 76.5% vs 74.2%", f"{SOURCE}, §4.2, Fig. 2", 0.023),
                    "test_accuracy", "micro-brn-4", "micro-bn-4", above(0.0), "+.4f"),
            Claim("micro-bn-gap", f"{micro}: |train/eval gap| of BN − of Batch Renorm",
                  Published("BN's training and inference outputs differ; Batch Renorm's agree",
                            f"{SOURCE}, §3 (motivation)"),
                  per_seed(_gap_difference, "|training-mode − eval-mode accuracy|, BN − Batch Renorm"),
                  above(0.0), fmt="+.4f"),
            arm_gap("noniid-hurts-bn", "BN: i.i.d. − non-i.i.d. batches, test accuracy",
                    Published("+0.113: 78.3% vs 67.0%", f"{SOURCE}, §4.3, Fig. 3", 0.113),
                    "test_accuracy", "noniid-bn-iid", "noniid-bn", above(0.0), "+.4f"),
            arm_gap("noniid-brn-beats-bn", "non-i.i.d.: Batch Renorm − BN test accuracy",
                    Published("+0.116: 78.6% vs 67.0%", f"{SOURCE}, §4.3, Fig. 3", 0.116),
                    "test_accuracy", "noniid-brn", "noniid-bn", above(0.0), "+.4f"),
            Claim("noniid-control-50", "BN (non-i.i.d.) in training mode on non-i.i.d. test batches of "
                  f"{2 * s.control_pairs}", Published("76.5%", f"{SOURCE}, §4.3", 0.765),
                  final("control_50_accuracy", arm="noniid-bn"), None, fmt=".4f"),
            Claim("noniid-halves", "BN per half-batch, one image of each pair in each: test accuracy",
                  Published("77.4%", f"{SOURCE}, §4.3", 0.774),
                  final("test_accuracy", arm="noniid-bn-halves"), None, fmt=".4f"),
        ]  # fmt: skip

    def figures(self, s):
        b = 2 * s.pair_labels
        return [
            Curves("microbatch", "test_accuracy", "test accuracy (fraction, eval mode)",
                   f"Microbatches of {s.microbatch} in batches of {s.gradient_batch}: eval-mode "
                   f"accuracy on {s.eval_examples} test images.", arms=[a for a in ARMS if "micro" in a]),
            Curves("noniid", "test_accuracy", "test accuracy (fraction, eval mode)",
                   f"Non-i.i.d. batches of {b} ({s.pair_labels} labels × 2): eval-mode accuracy on "
                   f"{s.eval_examples} test images.", arms=[a for a in ARMS if "noniid" in a]),
            Bars("accuracy", "test_accuracy", "test accuracy (fraction)",
                 "Final test accuracy in eval mode, whole test set."),
            Bars("train-eval-gap", "train_eval_gap", "training-mode − eval-mode accuracy",
                 f"Accuracy in training mode (test batches shaped like training's: {s.gradient_batch} "
                 f"in microbatches of {s.microbatch}; non-i.i.d. batches of {b}) minus eval mode."),
        ]  # fmt: skip

    def deviations(self, s):
        return [
            f"The small CNN (conv{'-conv'.join(map(str, s.channels))}, fc{s.hidden}), SGD momentum "
            f"{s.momentum:g} (lr {s.micro_lr:g} for the microbatch run, {s.noniid_lr:g} for the non-i.i.d. "
            f"one), {s.micro_steps} and {s.noniid_steps} steps, instead of Inception-v3 with RMSProp on 50 "
            "workers for 100k+ steps; no EMA of the parameters at inference.",
            f"Microbatches of {s.microbatch} inside a gradient batch of {s.gradient_batch} in one process "
            "(the paper: 8 × 4 per worker, gradient over 1600).",
            f"Non-i.i.d. batches of {s.pair_labels} labels × 2 drawn from {s.classes_per_batch or 'all'} "
            "of Fashion-MNIST's 10 classes (the paper: 16 labels of 1,000 classes); the training-mode "
            "test batches and the control's are drawn the same way.",
            "Batch Renorm's schedule scaled to each run's length (a layer's forwards); moving averages "
            f"α = {s.running_momentum:g} for every arm.",
        ]  # fmt: skip
