"""Ioffe & Szegedy (2015), §3.4: BN regularizes, and may reduce the need for Dropout.

Each training example is normalized with statistics of the other examples in its mini-batch, so the
network no longer produces a deterministic value for it; the paper found this helps generalization
and removed Dropout from BN-Inception (§4.2.1) "without increasing overfitting".

Here: a ReLU MLP on a reduced training set (``train_examples``, seeded and class-balanced, the same
subset for every run) trained long enough to fit it, in four variants: no regularizer, Dropout, BN,
BN + Dropout; ``seeds`` seeds each (a seed fixes the initial weights, batch order and dropout masks,
shared across variants: the comparisons are paired by seed). Measured in eval mode at the end:
train and test accuracy and the generalization gap (train − test accuracy).

Decisions: BN's noise comes from the batch's statistics and shrinks as the batch grows, so every
variant trains at each of ``batch_sizes`` (equal steps: equal updates), and the claims are judged
per batch size. One learning rate for all variants would favour some (Dropout alone underfits at the
rate the others fit with), so each variant, at each batch size, gets its own: a sweep over
``lr_sweep`` (``sweep_steps`` steps, seed 0) picks the rate with the highest validation accuracy, on
``validation`` examples held out of the training set (never the training subset or the test set).
The ``gpu`` preset trains ResNet-50 (``resnet_blocks``; Dropout before its classifier only) on a
10,000-image subset of CIFAR-10 instead of the MLP: Inception on ImageNet is out of reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.lab.claims import Claim, Published, above, arm_gap, below, difference, final
from normkit.lab.datasets import split_validation, subset
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Curves, MeanTable, VersusSetting
from normkit.lab.models import initialize, mlp, resnet
from normkit.lab.plan import Arm, Plan, Sweep, highest
from normkit.lab.settings import Settings

SOURCE = "Ioffe & Szegedy 2015, §3.4"
VARIANTS = {  # name: (norm, dropout; None = the dropout setting), label
    "none": ("none", 0.0, "no regularizer"),
    "dropout": ("none", None, "Dropout"),
    "bn": ("batch", 0.0, "BN"),
    "bn+dropout": ("batch", None, "BN + Dropout"),
}


@dataclass(frozen=True)
class RegularizationSettings(Settings):
    train_examples: int = 1_000
    steps: int = 4_000
    batch_sizes: tuple[int, ...] = (10, 50)
    hidden: tuple[int, ...] = (256, 256)
    resnet_blocks: tuple[int, ...] = ()  # bottleneck blocks per stage: a ResNet instead of the MLP
    resnet_width: int = 64
    learning_rate: float = 0.05  # used as is when lr_sweep is empty
    lr_sweep: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1)
    sweep_steps: int = 1_500
    validation: int = 1_000  # held out of the training set for the sweep
    momentum: float = 0.9
    dropout: float = 0.5
    seeds: int = 5
    eval_every: int = 250


def _gap(arm: str, **where):
    return final("gap", arm=arm, **where)


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
        "quick": {"steps": 1_500, "seeds": 2, "eval_every": 500, "lr_sweep": (0.01, 0.05),
                  "sweep_steps": 400},
        "tiny": {"train_examples": 100, "steps": 16, "seeds": 2, "eval_every": 8, "hidden": (16,),
                 "batch_sizes": (10, 20), "lr_sweep": (0.01, 0.2), "sweep_steps": 8, "validation": 60},
        "gpu": {"dataset": "cifar10", "resnet_blocks": (3, 4, 6, 3), "train_examples": 10_000,
                "validation": 5_000, "batch_sizes": (32, 128), "steps": 7_820, "sweep_steps": 2_000,
                "lr_sweep": (0.01, 0.02, 0.05, 0.1, 0.2), "seeds": 3, "eval_every": 782},
    }  # fmt: skip

    def prepare_data(self, s, dataset):
        return subset(split_validation(dataset, s.validation, s.seed), s.train_examples, s.seed)

    def plan(self, s, data):
        fixed = {} if s.lr_sweep else {"learning_rate": s.learning_rate}
        arms = [Arm(name, {"variant": name, **fixed}, label) for name, (*_, label) in VARIANTS.items()]
        sweep = None
        if s.lr_sweep:
            sweep = Sweep("learning_rate", s.lr_sweep, highest("validation_accuracy"), s.sweep_steps,
                          by=("arm", "batch_size"))  # fmt: skip
        return Plan(arms, s.steps, seeds=s.seeds, seed=s.seed, eval_every=s.eval_every,
                    grid={"batch_size": s.batch_sizes}, sweep=sweep)  # fmt: skip

    def setup(self, trial, s, data, generator):
        norm, dropout, _ = VARIANTS[trial.params["variant"]]
        dropout = s.dropout if dropout is None else dropout
        if s.resnet_blocks:  # the gpu preset: Dropout before the classifier only, as in Inception
            model = resnet(data.sample_shape, data.classes, norm, tuple(s.resnet_blocks), s.resnet_width,
                           dropout)  # fmt: skip
        else:
            model = mlp(data.features, s.hidden, data.classes, activation="relu", norm=norm, dropout=dropout)
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=trial.params["learning_rate"], momentum=s.momentum)
        return Setup(model, optimizer, trial.params["batch_size"])

    def measure(self, trial, s, setup, data):
        train, _ = accuracy_and_loss(setup.model, data.x_train, data.y_train)
        test, test_loss = accuracy_and_loss(setup.model, data.x_test, data.y_test)
        row = {"train_accuracy": train, "test_accuracy": test, "test_loss": test_loss, "gap": train - test}
        if data.x_val is not None:
            row["validation_accuracy"] = accuracy_and_loss(setup.model, data.x_val, data.y_val)[0]
        return row

    def finish(self, trial, s, setup, data):
        return self.measure(trial, s, setup, data)

    def claims(self, s):
        claims = []
        for batch in s.batch_sizes:
            at = {"batch_size": batch}
            tag = f"-b{batch}" if len(s.batch_sizes) > 1 else ""
            claims += [
                Claim(f"gap-bn{tag}", f"generalization gap (train − test accuracy), BN − none, batch {batch}",
                      Published("BN regularizes the model (no number)", SOURCE),
                      difference(_gap("bn", **at), _gap("none", **at)), below(0.0), fmt="+.4f"),
                arm_gap(f"accuracy-bn{tag}", f"test accuracy, BN − none, batch {batch}",
                        Published("BN improves accuracy on ImageNet (with other changes)",
                                  "Ioffe & Szegedy 2015, §4.2"),
                        "test_accuracy", "bn", "none", above(0.0), "+.4f", **at),
                arm_gap(f"dropout-removable{tag}", f"test accuracy, BN − BN + Dropout, batch {batch}",
                        Published('Dropout removed from BN-Inception "without increasing overfitting"',
                                  "Ioffe & Szegedy 2015, §4.2.1"),
                        "test_accuracy", "bn", "bn+dropout", None, "+.4f", **at),
                Claim(f"gap-dropout{tag}", f"generalization gap, Dropout − none, batch {batch}",
                      Published("Dropout is a regularizer (not measured in the paper)", SOURCE),
                      difference(_gap("dropout", **at), _gap("none", **at)), None, fmt="+.4f"),
            ]  # fmt: skip
        return claims

    def figures(self, s):
        batch = {"batch_size": min(s.batch_sizes)}
        return [
            Curves("test-accuracy", "test_accuracy", "test accuracy (fraction)",
                   f"Test accuracy (eval mode) during training, batch {batch['batch_size']}.", where=batch),
            Curves("gap", "gap", "train − test accuracy",
                   f"Generalization gap during training, batch {batch['batch_size']}.", where=batch),
            VersusSetting("gap-by-batch", "gap", "batch_size", "batch size", "train − test accuracy",
                          "Final generalization gap of each variant against the batch size."),
            *(MeanTable(f"{metric}-table", metric, "batch_size", f"Final {text}; mean [95% interval].",
                        spec=".4f") for metric, text in (("train_accuracy", "train accuracy (eval mode)"),
                                                         ("test_accuracy", "test accuracy"),
                                                         ("gap", "generalization gap (train − test)"))),
        ]  # fmt: skip

    def deviations(self, s):
        blocks = "-".join(map(str, s.resnet_blocks))
        net = (f"ResNet-{3 * sum(s.resnet_blocks) + 2} (bottleneck blocks {blocks}, width {s.resnet_width}, "
               "CIFAR stem; BN, if any, after every convolution)" if s.resnet_blocks else
               f"A {'-'.join(str(h) for h in s.hidden)} ReLU MLP")  # fmt: skip
        return [
            f"{net} on {s.train_examples} training examples, "
            f"SGD with momentum {s.momentum:g}, {s.steps} steps at every batch size: a setting made to "
            "overfit, where the paper reports the effect on Inception on ImageNet (out of reach here).",
            "Learning rate: " + ("each variant's own at each batch size, from the sweeps below ("
                                 + ", ".join(f"{v:g}" for v in s.lr_sweep) + ")" if s.lr_sweep
                                 else f"{s.learning_rate:g} for every variant") + ".",
            f"Dropout p = {s.dropout:g} " + ("before the classifier." if s.resnet_blocks else
                                             "after every hidden layer."),
        ]
