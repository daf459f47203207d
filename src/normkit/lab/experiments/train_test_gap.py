"""Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", §4: the train-test inconsistency.

BN normalizes with the statistics of the normalization batch (NBS samples) in training and with
population statistics in eval mode. Varying the NBS from 2 to 1024 inside a fixed gradient batch
(ResNet-50, ImageNet), Wu & Johnson find the validation error with population statistics much worse
than with batch statistics at a small NBS; FrozenBN (population statistics in training) for the
last part of training helps.

Here: a CNN (:func:`~normkit.lab.models.conv_net`, BN in the conv layers only, as in the paper's
ResNets) whose five stages shrink the maps 28 → 14 → 7 → 3 → 1, so its last BN pools NBS values
per statistic (issue 17); the ``gpu`` preset trains ResNet-50 on CIFAR-10. Gradient batch 256, the
NBS set by :class:`normkit.GhostBatchNorm`. Arms: ``bn`` at every NBS; ``frozen`` (BN frozen for
the last ``freeze_fraction`` of the steps) and ``fc`` (ghost BN on the fc layer too; not in the
paper) at a few. At the end: the errors with batch statistics (train mode on chunks of the gradient
batch, so each sample meets its own ghost batch; running statistics untouched) on training and test
images, with PreciseBN population statistics (which removes the EMA's own error), with the layers'
EMA, and ``inconsistency`` = population − batch test error.

Decisions: freezing first recomputes the statistics with PreciseBN, then runs every BN in eval mode
(γ and β still learn); a frozen model's population error uses the statistics it was frozen with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import normkit as nk
from normkit.lab.claims import Claim, Published, above, difference, final
from normkit.lab.datasets import first_test_examples
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Curves, MeanTable, VersusSetting
from normkit.lab.models import conv_net, initialize, resnet
from normkit.lab.plan import Arm, Plan
from normkit.lab.population import (
    batch_norm_layers,
    batch_statistics,
    error_rate,
    precise,
    training_batches,
)
from normkit.lab.seeds import derived_seed
from normkit.lab.settings import Settings

WU_JOHNSON = "Wu & Johnson 2021, §4 (ResNet-50, ImageNet, NBS 2–1024)"
ERRORS = {"train, batch statistics": "train_error_batch", "test, batch statistics": "test_error_batch",
          "test, population statistics": "test_error_population"}  # fmt: skip
SMALLEST, LARGEST = (lambda s: min(s.nbs)), (lambda s: max(s.nbs))
GPU_ONLY = ("a trained deep network whose statistics are noisy but not degenerate: ResNet-50's 16 blocks "
            "pool 32 values per statistic in its last stage at NBS 2 (32×32 images); our CNN either pools "
            "≥ 98 (3 stages: |population − batch| ≤ 0.2 pt at every NBS) or, down to 1×1 maps, 2 values, "
            "which map each channel to ±1 so it does not train (77–85% training error at NBS 2, quick run)")


class FreezeBatchNorm(nn.Module):
    """A network whose BatchNorm layers run in eval mode from training step ``freeze_at`` on
    (``None``: never), after one call of ``before_freeze(net)`` (e.g. PreciseBN in place).
    ``steps`` (a buffer: a resumed run keeps it) counts training forwards."""

    def __init__(self, net: nn.Module, freeze_at: int | None, before_freeze=None):
        super().__init__()
        self.net, self.freeze_at, self.before_freeze = net, freeze_at, before_freeze
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def frozen(self) -> bool:  # at least one training step ran frozen
        return self.freeze_at is not None and int(self.steps) > self.freeze_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.freeze_at is not None and int(self.steps) >= self.freeze_at:
            if int(self.steps) == self.freeze_at and self.before_freeze:
                self.before_freeze(self.net)
            for layer in batch_norm_layers(self.net).values():
                layer.eval()
        if self.training:
            self.steps += 1
        return self.net(x)


def network(s, sample_shape, classes: int, nbs: int, fc_norm: bool = False) -> nn.Module:
    """The CNN of ``s.channels`` (ghost BN of ``nbs`` samples in its conv layers, and on its fc layer
    with ``fc_norm``), or the ResNet of ``s.resnet_blocks`` where that is set."""
    spec = f"ghost:{nbs}"
    if s.resnet_blocks:
        return resnet(sample_shape, classes, spec, tuple(s.resnet_blocks), s.resnet_width)
    fc = (lambda features: nk.create_norm(spec, features)) if fc_norm else None
    return conv_net(sample_shape, s.channels, s.hidden, classes, spec, fc_norm=fc)


@dataclass(frozen=True)
class TrainTestGapSettings(Settings):
    steps: int = 936  # four epochs at batch 256
    batch_size: int = 256  # the gradient batch
    nbs: tuple[int, ...] = (2, 4, 16, 64, 256)
    freeze_nbs: tuple[int, ...] = (2, 4)
    freeze_fraction: float = 0.2
    fc_nbs: tuple[int, ...] = (2,)  # NBS at which a trial also normalizes the fc layer
    channels: tuple[int, ...] = (16, 32, 64, 64, 64)  # BN at 28, 14, 7, 3, 1 pixels
    resnet_blocks: tuple[int, ...] = ()  # bottleneck blocks per stage: a ResNet instead of the CNN
    resnet_width: int = 64
    hidden: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    precise_samples: int = 4096
    train_examples_eval: int = 5_000  # training examples for the train-set error
    test_examples: int = 0  # 0: the whole test set
    eval_every: int = 156
    seeds: int = 3


@register
class TrainTestGap(Experiment):
    name = "train-test-gap"
    title = "Train-test inconsistency against the normalization batch size"
    paper = "Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm, §4 (train-test inconsistency)"
    claim = (
        "At a small normalization batch size, evaluating with population statistics is much worse "
        "than evaluating with batch statistics (the train-test inconsistency); using population "
        "statistics for the last part of training (FrozenBN) reduces the gap."
    )
    settings_class = TrainTestGapSettings
    presets = {
        "quick": {"steps": 200, "nbs": (2, 16, 256), "freeze_nbs": (2,), "fc_nbs": (), "seeds": 2,
                  "channels": (8, 16, 32, 32, 32), "hidden": 64, "precise_samples": 2048,
                  "train_examples_eval": 2_000, "test_examples": 2_000, "eval_every": 50},
        "gpu": {"dataset": "cifar10", "resnet_blocks": (3, 4, 6, 3), "steps": 5_860,  # 30 epochs
                "fc_nbs": (), "precise_samples": 16_384, "train_examples_eval": 10_000,
                "eval_every": 586},
        "tiny": {"steps": 6, "batch_size": 32, "nbs": (2, 32), "freeze_nbs": (2,), "fc_nbs": (2,),
                 "freeze_fraction": 0.5, "channels": (4, 8, 8, 8), "hidden": 16, "precise_samples": 64,
                 "train_examples_eval": 64, "test_examples": 64, "eval_every": 3, "seeds": 2},
    }  # fmt: skip

    def prepare_data(self, s, dataset):
        return first_test_examples(dataset, s.test_examples)

    def plan(self, s, data):
        arms = [Arm("bn", {"frozen": False, "fc_norm": False}, "BN (ghost batches of NBS)"),
                Arm("frozen", {"frozen": True, "fc_norm": False}, "FrozenBN at the end",
                    grid={"nbs": list(s.freeze_nbs)}),
                Arm("fc", {"frozen": False, "fc_norm": True}, "BN on the fc layer too",
                    grid={"nbs": list(s.fc_nbs)})]  # fmt: skip
        arms = [a for a in arms if a.grid is None or a.grid["nbs"]]
        return Plan(arms, s.steps, seeds=s.seeds, seed=s.seed, eval_every=s.eval_every,
                    grid={"nbs": list(s.nbs)})  # fmt: skip

    def setup(self, trial, s, data, generator):
        p = trial.params
        net = network(s, data.sample_shape, data.classes, p["nbs"], p["fc_norm"])
        initialize(net, "he", generator)
        freeze_at = s.steps - round(s.freeze_fraction * s.steps) if p["frozen"] else None

        def recalibrate_in_place(module):
            batches = training_batches(data.x_train, s.batch_size, s.precise_samples,
                                       derived_seed(trial.seed, 8))  # fmt: skip
            nk.tools.recalibrate(module, batches, num_batches=None, inplace=True, progress=False)

        optimizer = torch.optim.SGD(net.parameters(), lr=s.learning_rate, momentum=s.momentum)
        return Setup(FreezeBatchNorm(net, freeze_at, recalibrate_in_place), optimizer, s.batch_size)

    def measure(self, trial, s, setup, data):  # the cheap number: the layers' own statistics
        return {"test_error_ema": error_rate(setup.model, data.x_test, data.y_test)}

    def finish(self, trial, s, setup, data):
        model: FreezeBatchNorm = setup.model
        net = model.net
        generator = torch.Generator().manual_seed(derived_seed(trial.seed, 9))
        index = torch.randperm(len(data.y_train), generator=generator)[: s.train_examples_eval]
        x_train, y_train, x_test, y_test = data.x_train[index], data.y_train[index], data.x_test, data.y_test
        with batch_statistics(net):
            row = {"train_error_batch": error_rate(net, x_train, y_train, s.batch_size),
                   "test_error_batch": error_rate(net, x_test, y_test, s.batch_size)}  # fmt: skip
        row["test_error_ema"] = error_rate(net, x_test, y_test)
        population = net  # frozen: the statistics its last steps trained with
        if not model.frozen:
            batches = training_batches(data.x_train, s.batch_size, s.precise_samples,
                                       derived_seed(trial.seed, 10))  # fmt: skip
            population = precise(net, batches)
        row["test_error_population"] = error_rate(population, x_test, y_test)
        row["train_error_population"] = error_rate(population, x_train, y_train)
        row["inconsistency"] = row["test_error_population"] - row["test_error_batch"]
        return row

    def claims(self, s):
        def at(metric, arm="bn", nbs=SMALLEST):
            return final(metric, arm=arm, nbs=nbs)

        small, large = SMALLEST(s), LARGEST(s)
        found = [
            Claim("inconsistency-grows",
                  f"test error, population − batch statistics, at NBS {small} minus at NBS {large}",
                  Published("population statistics much worse than batch statistics at small NBS",
                            WU_JOHNSON, unverified=True),
                  difference(at("inconsistency"), at("inconsistency", nbs=LARGEST)), above(0.0),
                  needs_gpu=GPU_ONLY, fmt="+.4f"),
            Claim("error-grows", f"test error (population statistics), NBS {small} − NBS {large}",
                  Published("BN's error grows as the NBS shrinks", WU_JOHNSON, unverified=True),
                  difference(at("test_error_population"), at("test_error_population", nbs=LARGEST)),
                  above(0.0), fmt="+.4f"),
        ]  # fmt: skip
        for n in s.freeze_nbs:
            found.append(Claim(
                f"freeze-helps-{n}", f"test error (population statistics) at NBS {n}, BN − FrozenBN "
                f"for the last {s.freeze_fraction:.0%}",
                Published("FrozenBN for the last ~20 epochs helps at small NBS", WU_JOHNSON, unverified=True),
                difference(at("test_error_population", nbs=n), at("test_error_population", "frozen", n)),
                above(0.0), needs_gpu=GPU_ONLY, fmt="+.4f"))  # fmt: skip
        for n in s.fc_nbs:
            found.append(Claim(
                f"fc-norm-{n}", f"BN on the fc layer too, NBS {n}: test error, population − batch",
                Published("not in the paper (its ResNets have no BN after the pooling)", WU_JOHNSON),
                at("inconsistency", "fc", n), None, fmt="+.4f"))  # fmt: skip
        return found

    def figures(self, s):
        return [
            VersusSetting("errors-by-nbs", ERRORS, "nbs", "normalization batch size", "error (fraction)",
                          "The three errors of Wu & Johnson's Fig. against the NBS (BN in the conv layers).",
                          arms=["bn"], title="BN"),
            VersusSetting("population-error-by-nbs", "test_error_population", "nbs",
                          "normalization batch size", "test error, population statistics (fraction)",
                          "Test error with population statistics: BN, FrozenBN at the end, BN on the fc "
                          "layer too."),
            MeanTable("inconsistency", "inconsistency", "nbs",
                      "Test error, population − batch statistics (fraction), by arm and NBS.", ".4f"),
            Curves("ema-error", "test_error_ema", "test error, EMA statistics (fraction)",
                   "Test error in eval mode with the layers' EMA during training.", arms=["bn"]),
        ]  # fmt: skip

    def deviations(self, s):
        model = (f"ResNet-{3 * sum(s.resnet_blocks) + 2} (width {s.resnet_width}, CIFAR stem)"
                 if s.resnet_blocks else f"A CNN (conv{'-conv'.join(map(str, s.channels))}, fc{s.hidden}; "
                 "normalization in the conv layers only)")  # fmt: skip
        return [
            f"{model} on {s.dataset} for {s.steps} steps at gradient batch {s.batch_size}, SGD lr "
            f"{s.learning_rate:g} momentum {s.momentum:g}, constant, no augmentation, instead of "
            "ResNet-50 on ImageNet for 100 epochs; the NBS comes from Ghost BN inside the gradient batch.",
            f"FrozenBN for the last {s.freeze_fraction:.0%} of the steps (the paper: the last ~20 "
            "epochs), after a PreciseBN pass.",
        ] + ([f"Not in the paper: at NBS {', '.join(map(str, s.fc_nbs))} a trial also normalizes the "
              "fc layer (few values per feature)."] if s.fc_nbs else [])  # fmt: skip
