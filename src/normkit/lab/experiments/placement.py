"""Where BN goes: before the nonlinearity, as Ioffe & Szegedy (2015, §3.2) prescribe, or after it.

The paper adds BN "immediately before the nonlinearity", normalizing x = Wu + b, because Wu + b "is
more likely to have a symmetric, non-sparse distribution, that is 'more Gaussian'" than the layer
input u; it reports no comparison with the other placement. Here: a small CNN with BN before every
ReLU (conv without bias, BN → ReLU) and after it (conv with bias, ReLU → BN), ``seeds`` seeds each.
A seed fixes the batch order; the initial weights come from the same stream but the two
architectures consume it differently (the "after" convs have biases), so the pairs share the data
order, not the weights: the difference is judged per seed (paired) with its 95% interval.

Each placement gets its own learning rate by one stated rule: a sweep over ``lr_sweep``
(``sweep_steps`` steps, seed 0) picks the rate with the highest accuracy on ``validation`` examples
held out of the training set. One rate for both would compare a placement with a rate tuned, by
chance, for the other: the unstable seeds of "after" could be its rate's doing, not BN's place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.lab.claims import Claim, Published, below, difference, final
from normkit.lab.datasets import first_test_examples, split_validation
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Bars, Curves
from normkit.lab.models import cnn, initialize
from normkit.lab.plan import Arm, Plan, Sweep, highest
from normkit.lab.settings import Settings

SOURCE = "Ioffe & Szegedy 2015, §3.2"


@dataclass(frozen=True)
class PlacementSettings(Settings):
    steps: int = 2_000
    batch_size: int = 32
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 128
    learning_rate: float = 0.05  # used as is when lr_sweep is empty
    lr_sweep: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)
    sweep_steps: int = 600
    validation: int = 2_000  # held out of the training set for the sweep
    momentum: float = 0.9
    seeds: int = 8
    test_examples: int = 0  # 0: the whole test set
    eval_every: int = 500


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
        "quick": {"steps": 800, "channels": (8, 16), "hidden": 64, "seeds": 3, "eval_every": 200,
                  "test_examples": 2_000, "lr_sweep": (0.02, 0.05, 0.1), "sweep_steps": 300,
                  "validation": 1_000},
        "tiny": {"steps": 12, "channels": (4, 8), "hidden": 16, "seeds": 2, "eval_every": 6,
                 "batch_size": 16, "lr_sweep": (0.02, 0.2), "sweep_steps": 6, "validation": 100},
    }  # fmt: skip

    def prepare_data(self, settings, dataset):
        return split_validation(first_test_examples(dataset, settings.test_examples), settings.validation,
                                settings.seed)  # fmt: skip

    def plan(self, settings, data):
        fixed = {} if settings.lr_sweep else {"learning_rate": settings.learning_rate}
        arms = [Arm(where, {"placement": where, **fixed}, f"BN {where} the ReLU")
                for where in ("before", "after")]  # fmt: skip
        sweep = None
        if settings.lr_sweep:
            sweep = Sweep("learning_rate", settings.lr_sweep, highest("validation_accuracy"),
                          settings.sweep_steps, by=("arm",))  # fmt: skip
        return Plan(arms, settings.steps, seeds=settings.seeds, seed=settings.seed,
                    eval_every=settings.eval_every, sweep=sweep)  # fmt: skip

    def setup(self, trial, settings, data, generator):
        model = cnn(data.sample_shape, settings.channels, settings.hidden, data.classes,
                    activation="relu", norm="batch", placement=trial.params["placement"])  # fmt: skip
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=trial.params["learning_rate"],
                                    momentum=settings.momentum)  # fmt: skip
        return Setup(model, optimizer, settings.batch_size)

    def measure(self, trial, settings, setup, data):
        """Nothing between the start and the end: the comparison is of final accuracies (the rows
        still carry the training loss, and evaluation steps remain checkpoint points)."""
        return {}

    def finish(self, trial, settings, setup, data):
        """The test accuracy; the validation accuracy too, which the sweep's rule reads."""
        row = super().finish(trial, settings, setup, data)
        if data.x_val is not None:
            row["validation_accuracy"] = accuracy_and_loss(setup.model, data.x_val, data.y_val)[0]
        return row

    def claims(self, settings):
        return [
            Claim(
                "after-minus-before",
                "test accuracy, BN after − before the ReLU",
                Published("BN before the nonlinearity is the recommended placement; no ablation",
                          SOURCE),  # fmt: skip
                difference(final("test_accuracy", arm="after"), final("test_accuracy", arm="before")),
                below(0.0),
                fmt="+.4f",
            ),
            Claim("before", "test accuracy, BN before the ReLU",
                  Published("the recommended placement (no number)", SOURCE),
                  final("test_accuracy", arm="before"), None, fmt=".4f"),  # fmt: skip
            Claim("after", "test accuracy, BN after the ReLU", Published("not reported", SOURCE),
                  final("test_accuracy", arm="after"), None, fmt=".4f"),  # fmt: skip
        ]

    def figures(self, settings):
        return [
            Bars("placement", "test_accuracy", "test accuracy (fraction)",
                 "Final test accuracy (eval mode) with BN before and after the ReLU."),
            Curves("training-loss", "train_loss", "training loss (cross-entropy)",
                   "Mean training loss over each evaluation interval."),
        ]  # fmt: skip

    def deviations(self, settings):
        return [
            f"The paper gives an argument, not an experiment; this is a small CNN "
            f"(conv{'-conv'.join(str(c) for c in settings.channels)}, fc{settings.hidden}), SGD "
            f"momentum {settings.momentum:g}, {settings.steps} steps, {settings.seeds} seeds; each "
            + ("placement's learning rate from its own sweep (the sections below)." if settings.lr_sweep
               else f"placement at learning rate {settings.learning_rate:g}."),
        ]
