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

Here (the lab's CPU protocol 2): the small CNN of ``normkit.lab.small_batch`` on Fashion-MNIST, SGD with
momentum, two runs.

- Microbatches: gradient batch ``gradient_batch`` (128), normalized as a whole (``bn-128``), or in
  microbatches of ``microbatch`` (4) by BN (``nk.GhostBatchNorm``: BN per microbatch, running
  statistics updated once per microbatch) or by Batch Renorm (``nk.BatchRenorm`` applied to each
  microbatch in turn).
- Non-i.i.d.: batches of ``2 × pair_labels`` (20) = ``pair_labels`` labels drawn with replacement
  (Fashion-MNIST has 10 classes, not 1000), two different images of each; BN, Batch Renorm, BN on
  two halves holding one image of every pair (``nk.GhostBatchNorm`` of half the batch), and BN on
  i.i.d. batches of the same size as the reference.

Decisions: r_max/d_max follow the paper's schedule scaled to the run (plain BN for the first 3.5%
of a layer's forwards, then linearly to d_max = 5 at 18% and r_max = 3 at 28%; with microbatches a
layer runs once per microbatch); every arm's moving averages use the paper's α = 0.01
(``running_momentum``), so differences in eval mode come from training, not from noisier averages.
Reported: accuracy in eval mode on the test set, and in training mode on test batches shaped like
the training batches (microbatches of 4 / non-i.i.d. pairs), whose difference is the train/eval
gap; and the paper's control, BN in training mode on non-i.i.d. test batches of 50.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.legacy import Experiment, Settings, Setup, register
from normkit.lab.plots import curves
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure
from normkit.lab.small_batch import (
    batch_statistics_accuracy,
    measured_trial,
    small_cnn,
)

PUBLISHED = {  # Ioffe (2017), top-1 accuracy (%)
    "iid-32": {"bn": 78.3, "brn": 78.5},
    "micro-4": {"bn": 74.2, "brn": 76.5},
    "noniid": {"bn": 67.0, "brn": 78.6, "bn-train-mode-50": 76.5, "bn-halves": 77.4},
}
ARMS = {
    # key: (run, description)
    "micro/bn-128": ("micro", "BN on the whole gradient batch"),
    "micro/bn-4": ("micro", "BN per microbatch"),
    "micro/brn-4": ("micro", "Batch Renorm per microbatch"),
    "noniid/bn-iid": ("noniid", "BN, i.i.d. batches (reference)"),
    "noniid/bn": ("noniid", "BN, non-i.i.d. batches"),
    "noniid/brn": ("noniid", "Batch Renorm, non-i.i.d. batches"),
    "noniid/bn-halves": ("noniid", "BN per half (one image of each pair)"),
}


@dataclass(frozen=True)
class RenormSettings(Settings):
    micro_steps: int = 1_500
    gradient_batch: int = 128
    microbatch: int = 4
    micro_lr: float = 0.1
    noniid_steps: int = 4_000
    pair_labels: int = 10  # non-i.i.d. batch = 2 x this
    noniid_lr: float = 0.02
    momentum: float = 0.9
    running_momentum: float = 0.01  # the paper's alpha, for every arm
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    control_pairs: int = 25  # the paper's non-i.i.d. test minibatches: 25 labels x 2
    evaluations: int = 10
    eval_examples: int = 2_000


class PerMicrobatch(nn.Module):
    """Applies ``layer`` to each run of ``size`` consecutive samples in training (each normalized
    with its own batch statistics; running statistics updated once per microbatch, in order), and to
    the whole batch in eval mode (running statistics: the batch does not matter)."""

    def __init__(self, layer: nn.Module, size: int):
        super().__init__()
        if size < 1:
            raise ConfigError(f"microbatch size {size} must be >= 1")
        self.layer, self.size = layer, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.layer(x)
        return torch.cat([self.layer(chunk) for chunk in x.split(self.size)])


def _classes(labels: torch.Tensor) -> list[torch.Tensor]:
    members = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    usable = [m for m in members if len(m) >= 2]
    if not usable:
        raise ConfigError("non-i.i.d. pairs need a class with at least two examples")
    return usable


class PairedBatches:
    """Non-i.i.d. batches (Ioffe 2017, §4.3): ``batch_size / 2`` labels drawn with replacement, two
    different examples of each; the first images of all pairs come first, then the second ones, so
    each half of a batch holds one image of every pair. A runner ``Setup.batch_order``."""

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int):
        if batch_size % 2:
            raise ConfigError(f"a batch of pairs needs an even batch size, got {batch_size}")
        self.members = _classes(labels)
        self.pairs = batch_size // 2
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        g = self.generator
        chosen = torch.randint(len(self.members), (self.pairs,), generator=g).tolist()
        first, second = [], []
        for c in chosen:
            members = self.members[c]
            i = int(torch.randint(len(members), (1,), generator=g))
            j = (i + 1 + int(torch.randint(len(members) - 1, (1,), generator=g))) % len(members)
            first.append(members[i])
            second.append(members[j])
        return torch.stack(first + second)

    def state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def paired_test_order(labels: torch.Tensor, pairs_per_batch: int, seed: int) -> torch.Tensor:
    """The test set arranged as consecutive non-i.i.d. batches of ``pairs_per_batch`` pairs (each
    pair two examples of one label, laid out as :class:`PairedBatches` does); every example is used
    at most once. Seeded, so every arm is measured on the same batches."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for members in _classes(labels):
        shuffled = members[torch.randperm(len(members), generator=g)]
        pairs += shuffled[: len(shuffled) // 2 * 2].view(-1, 2).unbind()
    order = torch.randperm(len(pairs), generator=g).tolist()
    batches = []
    for start in range(0, len(order) - pairs_per_batch + 1, pairs_per_batch):
        chosen = [pairs[k] for k in order[start : start + pairs_per_batch]]
        batches.append(torch.stack([p[0] for p in chosen] + [p[1] for p in chosen]))
    return torch.cat(batches)


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
        "quick": {"micro_steps": 300, "noniid_steps": 800, "evaluations": 4, "eval_examples": 1000},
        "tiny": {
            "micro_steps": 6,
            "gradient_batch": 16,
            "noniid_steps": 8,
            "pair_labels": 4,
            "channels": (4, 8),
            "hidden": 16,
            "control_pairs": 5,
            "evaluations": 2,
            "eval_examples": 100,
        },
    }

    def trials(self, settings, data, finals):
        plan = []
        for key, (run, _) in ARMS.items():
            steps = settings.micro_steps if run == "micro" else settings.noniid_steps
            arm = key.split("/")[1]
            plan.append(measured_trial(key, {"run": run, "arm": arm}, steps, settings))
        return plan

    def setup(self, trial, settings, data, generator):
        run, arm = trial.params["run"], trial.params["arm"]
        micro = run == "micro"
        norm = {"bn-4": "gbn", "brn-4": "brn", "brn": "brn", "bn-halves": "gbn"}.get(arm, "bn")
        ghost = settings.microbatch if micro else settings.pair_labels
        if micro and settings.gradient_batch % settings.microbatch:
            raise ConfigError(
                f"gradient_batch={settings.gradient_batch} must be a multiple of "
                f"microbatch={settings.microbatch}"
            )
        forwards = trial.steps * (settings.gradient_batch // settings.microbatch if micro else 1)
        model = small_cnn(
            data.sample_shape,
            data.classes,
            norm,
            generator,
            channels=settings.channels,
            hidden=settings.hidden,
            ghost_batch=ghost,
            renorm_steps=forwards,
        )
        for name, module in list(model.named_children()):
            if isinstance(module, (nk.BatchNorm, nk.BatchRenorm, nk.GhostBatchNorm)):
                module.momentum = settings.running_momentum
                if arm == "brn-4":
                    model._modules[name] = PerMicrobatch(module, settings.microbatch)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=settings.micro_lr if micro else settings.noniid_lr,
            momentum=settings.momentum,
        )
        batch = settings.gradient_batch if micro else 2 * settings.pair_labels
        paired = run == "noniid" and arm != "bn-iid"
        return Setup(model, optimizer, batch, batch_order=PairedBatches if paired else None)

    def measure(self, trial, settings, setup, data):
        k = settings.eval_examples
        accuracy, _ = accuracy_and_loss(setup.model, data.x_test[:k], data.y_test[:k])
        return {"test_accuracy": accuracy}

    def finish(self, trial, settings, setup, data):
        model, run = setup.model, trial.params["run"]
        accuracy, loss = accuracy_and_loss(model, data.x_test, data.y_test)
        if run == "micro":  # training-mode batches: 128 test images, normalized per microbatch
            train_mode = batch_statistics_accuracy(
                model, data.x_test, data.y_test, settings.gradient_batch
            )
        else:
            order = paired_test_order(data.y_test, settings.pair_labels, settings.seed)
            train_mode = batch_statistics_accuracy(
                model, data.x_test[order], data.y_test[order], 2 * settings.pair_labels
            )
        values = {
            "test_accuracy": accuracy,
            "test_loss": loss,
            "train_mode_accuracy": train_mode,
            "train_eval_gap": train_mode - accuracy,
            "control_50_accuracy": None,
        }
        if trial.key == "noniid/bn":
            order = paired_test_order(data.y_test, settings.control_pairs, settings.seed)
            values["control_50_accuracy"] = batch_statistics_accuracy(
                model, data.x_test[order], data.y_test[order], 2 * settings.control_pairs
            )
        return values

    # -- meaning -------------------------------------------------------------------------------
    def summarize(self, record: RunRecord) -> dict:
        finals = record.finals()
        arms = {
            key: {
                k: finals[key].get(k)
                for k in (
                    "test_accuracy",
                    "train_mode_accuracy",
                    "train_eval_gap",
                    "control_50_accuracy",
                    "diverged",
                )
            }
            for key in ARMS
            if key in finals
        }

        def acc(key):
            return arms.get(key, {}).get("test_accuracy")

        def diff(a, b):
            return None if acc(a) is None or acc(b) is None else acc(a) - acc(b)

        return {
            "arms": arms,
            "micro_brn_minus_bn": diff("micro/brn-4", "micro/bn-4"),
            "noniid_brn_minus_bn": diff("noniid/brn", "noniid/bn"),
            "noniid_brn_minus_iid": diff("noniid/brn", "noniid/bn-iid"),
        }

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        arms = s["arms"]
        data_name = record.config["data"]["name"]

        def pct(key, field="test_accuracy"):
            value = arms.get(key, {}).get(field)
            return fmt(None if value is None else 100 * value, ".1f")

        micro, b = settings["microbatch"], 2 * settings["pair_labels"]
        comparison = Table(
            [
                "quantity",
                "published (Inception-v3, ImageNet, top-1 %)",
                f"ours ({data_name}, small CNN, test accuracy %)",
                "verdict",
            ],
            [
                [
                    f"microbatches of {micro}: BN vs Batch Renorm",
                    "74.2 vs 76.5 (+2.3)",
                    f"{pct('micro/bn-4')} vs {pct('micro/brn-4')} "
                    f"({fmt(_points(s['micro_brn_minus_bn']), '+.1f')})",
                    "Batch Renorm better: " + fmt(_positive(s["micro_brn_minus_bn"])),
                ],
                [
                    "BN on the whole batch (reference)",
                    "78.3 (i.i.d. 32)",
                    f"{pct('micro/bn-128')} (BN on {settings['gradient_batch']})",
                    "–",
                ],
                [
                    "non-i.i.d. minibatches: BN vs Batch Renorm",
                    "67.0 vs 78.6 (+11.6)",
                    f"{pct('noniid/bn')} vs {pct('noniid/brn')} "
                    f"({fmt(_points(s['noniid_brn_minus_bn']), '+.1f')})",
                    "Batch Renorm better: " + fmt(_positive(s["noniid_brn_minus_bn"])),
                ],
                [
                    "Batch Renorm (non-i.i.d.) vs BN on i.i.d. batches",
                    "78.6 vs 78.3",
                    f"{pct('noniid/brn')} vs {pct('noniid/bn-iid')} (i.i.d. batches of {b})",
                    "–",
                ],
                [
                    "BN in training mode on non-i.i.d. test batches of 50",
                    "76.5",
                    f"{pct('noniid/bn', 'control_50_accuracy')} "
                    f"({settings['control_pairs']} labels × 2)",
                    "–",
                ],
                [
                    "BN on two halves, one image of each pair in each",
                    "77.4",
                    f"{pct('noniid/bn-halves')} (halves of {settings['pair_labels']})",
                    "–",
                ],
            ],
        )
        checks = [
            Check(
                f"Batch Renorm beats BN with microbatches of {micro} (eval mode)",
                _positive(s["micro_brn_minus_bn"]),
                f"difference {fmt(_points(s['micro_brn_minus_bn']), '+.2f')} points",
            ),
            Check(
                "Batch Renorm beats BN with non-i.i.d. minibatches (eval mode)",
                _positive(s["noniid_brn_minus_bn"]),
                f"difference {fmt(_points(s['noniid_brn_minus_bn']), '+.2f')} points",
            ),
        ]
        gap_bn = arms.get("micro/bn-4", {}).get("train_eval_gap")
        gap_brn = arms.get("micro/brn-4", {}).get("train_eval_gap")
        if gap_bn is not None and gap_brn is not None:
            checks.append(
                Check(
                    "BN per microbatch has the larger train/eval gap",
                    abs(gap_bn) > abs(gap_brn),
                    f"BN {100 * gap_bn:+.1f}, Batch Renorm {100 * gap_brn:+.1f} points",
                )
            )
        table = Table(
            [
                "arm",
                "what",
                "eval mode",
                "training mode",
                "train/eval gap",
                "steps",
            ],
            [
                [
                    key,
                    ARMS[key][1],
                    pct(key),
                    pct(key, "train_mode_accuracy"),
                    fmt(_points(cell["train_eval_gap"]), "+.1f"),
                    settings["micro_steps" if key.startswith("micro") else "noniid_steps"],
                ]
                for key, cell in arms.items()
            ],
            "Test accuracy (%). Training mode: test images in batches shaped like the training "
            f"batches ({settings['gradient_batch']} in microbatches of {micro}; non-i.i.d. batches "
            f"of {b}), normalized with their batch statistics. Gap = training mode − eval mode.",
        )
        figures = [
            Figure(
                "microbatch",
                curves(
                    record,
                    [(k, ARMS[k][1]) for k in arms if k.startswith("micro")],
                    "test_accuracy",
                    "test accuracy, eval mode",
                    f"microbatches of {micro} in batches of {settings['gradient_batch']}",
                ),
                f"Eval-mode accuracy on {settings['eval_examples']} test images during training.",
            ),
            Figure(
                "noniid",
                curves(
                    record,
                    [(k, ARMS[k][1]) for k in arms if k.startswith("noniid")],
                    "test_accuracy",
                    "test accuracy, eval mode",
                    f"non-i.i.d. batches of {b} ({settings['pair_labels']} labels × 2)",
                ),
                f"Eval-mode accuracy on {settings['eval_examples']} test images during training.",
            ),
            Figure(
                "gap",
                self._gap_figure(arms),
                "Final test accuracy in eval mode and in training mode (batches shaped like "
                "training's), per arm.",
            ),
        ]
        deviations = [
            f"The small CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, "
            f"fc{settings['hidden']}) on {data_name}, SGD momentum {settings['momentum']:g} "
            f"(lr {settings['micro_lr']:g} for the microbatch run, {settings['noniid_lr']:g} for the "
            f"non-i.i.d. one), {settings['micro_steps']} and {settings['noniid_steps']} steps, instead "
            "of Inception-v3 with RMSProp on 50 workers for 100k+ steps.",
            f"Microbatches of {micro} inside a gradient batch of {settings['gradient_batch']} in one "
            "process (the paper: 8 × 4 per worker, gradient over 1600).",
            f"Non-i.i.d. batches of {settings['pair_labels']} labels × 2 (Fashion-MNIST has 10 "
            "classes, so labels repeat within a batch more often than the paper's 16 of 1000).",
            "Batch Renorm's schedule scaled to each run's length (a layer's forwards); moving averages "
            f"α = {settings['running_momentum']:g} for every arm; one seed.",
        ]
        headline = (
            f"microbatches of {micro}: BN {pct('micro/bn-4')}% vs Batch Renorm "
            f"{pct('micro/brn-4')}%; non-i.i.d.: BN {pct('noniid/bn')}% vs Batch Renorm "
            f"{pct('noniid/brn')}%"
        )
        return Report(
            comparison, [Section("Results", [table, *figures])], checks, deviations, headline
        )

    @staticmethod
    def _gap_figure(arms: dict):
        figure = new_figure(7.0, 3.6)
        axes = figure.add_subplot()
        keys = list(arms)
        for offset, field, label in (
            (-0.2, "test_accuracy", "eval mode"),
            (0.2, "train_mode_accuracy", "training mode"),
        ):
            values = [100 * (arms[k].get(field) or 0.0) for k in keys]
            axes.bar([i + offset for i in range(len(keys))], values, 0.4, label=label)
        axes.set_xticks(range(len(keys)), keys, rotation=25, ha="right")
        axes.set_ylabel("test accuracy (%)")
        low = min(100 * (arms[k].get("test_accuracy") or 0.0) for k in keys) if keys else 0.0
        axes.set_ylim(max(0.0, low - 10.0), 100.0)
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize="small")
        return figure


def _points(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _positive(value: float | None) -> bool | None:
    return None if value is None else value > 0
