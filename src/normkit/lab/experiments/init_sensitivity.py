"""Ioffe & Szegedy (2015), §3.3: with BN, training is insensitive to the scale of the weights.

BN(Wu) = BN((aW)u) for any a > 0, and ∂BN((aW)u)/∂(aW) = (1/a)·∂BN(Wu)/∂W: scaling a layer's
weights changes neither its output nor the gradient that flows back through it, and larger weights
get smaller gradients. So a BN network should train about equally well from initial weights over
several orders of magnitude, where the same network without BN stalls (small weights: vanishing
signal) or blows up (large weights).

Here: the MLP of Fig. 1 (3 hidden layers of 100, ``activation``), every Linear layer drawn from
N(0, s²) for each s in ``scales``, plus Xavier (Glorot) and He initialization, × {BN, no BN}, plain
SGD at one learning rate, ``seeds`` seeds each (paired: a seed fixes the batch order of every
cell); the final test accuracy forms a heatmap. Decisions: the scale applies to every Linear layer,
the output layer (which BN does not normalize) included, so the comparison is of the whole network
as initialized; a network whose training diverged (loss NaN/Inf or above 1000) counts at chance
accuracy (1 / classes) in the spread over scales, since it predicts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.lab.claims import Claim, Published, above, difference, per_seed
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Heatmap, MeanTable
from normkit.lab.models import initialize, mlp
from normkit.lab.plan import Arm, Plan
from normkit.lab.settings import Settings

SOURCE = "Ioffe & Szegedy 2015, §3.3"


@dataclass(frozen=True)
class InitSensitivitySettings(Settings):
    steps: int = 4_000
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "relu"
    learning_rate: float = 0.1
    scales: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    named: tuple[str, ...] = ("xavier", "he")
    seeds: int = 3
    eval_every: int = 500


def inits(settings) -> list[str]:
    """The initializations compared: one Gaussian per scale, then the named schemes."""
    return [f"gaussian:{s:g}" for s in settings.scales] + list(settings.named)


def _spread(network: str):
    """Range over the Gaussian scales of one seed's final test accuracy; diverged = chance."""

    def spread(trials, results):
        classes = results.record.config["data"]["classes"]
        scales = {f"gaussian:{s:g}" for s in results.settings.scales}
        cells = [t for t in trials if t.params["network"] == network and t.params["init"] in scales]
        accuracies = [1.0 / classes if t.final["diverged"] else t.final["test_accuracy"] for t in cells]
        return max(accuracies) - min(accuracies) if len(accuracies) == len(scales) else None

    return spread


@register
class InitSensitivity(Experiment):
    name = "init-sensitivity"
    title = "Insensitivity to the initial weight scale"
    paper = "Ioffe & Szegedy 2015, Batch Normalization, §3.3"
    claim = (
        "Batch normalization makes training resilient to the parameter scale: BN(Wu) = BN((aW)u), "
        "so a BN network trains from initial weights of very different scales, where a plain one "
        "stalls or diverges."
    )
    settings_class = InitSensitivitySettings
    presets = {
        "quick": {"steps": 2_500, "seeds": 1, "eval_every": 500},
        "tiny": {"steps": 16, "seeds": 1, "eval_every": 8, "hidden": (16, 16), "scales": (0.01, 1.0),
                 "named": ("he",)},
    }  # fmt: skip

    def plan(self, settings, data):
        arms = [Arm(n, {"network": n}, label) for n, label in (("plain", "no BN"), ("bn", "BN"))]
        return Plan(arms, settings.steps, seeds=settings.seeds, seed=settings.seed,
                    eval_every=settings.eval_every, grid={"init": inits(settings)})  # fmt: skip

    def setup(self, trial, settings, data, generator):
        model = mlp(data.features, settings.hidden, data.classes, activation=settings.activation,
                    norm="batch" if trial.params["network"] == "bn" else "none")  # fmt: skip
        initialize(model, trial.params["init"], generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
        return Setup(model, optimizer, settings.batch_size)

    def claims(self, s):
        scales = ", ".join(f"{x:g}" for x in s.scales)
        return [
            Claim("spread", f"range of final test accuracy over the scales {scales}, no BN − BN",
                  Published("BN: training resilient to the parameter scale (no number)", SOURCE),
                  difference(per_seed(_spread("plain"), "range over scales (no BN)"),
                             per_seed(_spread("bn"), "range over scales (BN)")),
                  above(0.0), fmt="+.3f"),
            Claim("spread-bn", f"range of BN's final test accuracy over the scales {scales}",
                  Published("small (implied)", SOURCE),
                  per_seed(_spread("bn"), "range over scales (BN)"), None),
            Claim("spread-plain", f"range of the no-BN final test accuracy over the scales {scales}",
                  Published("large (implied)", SOURCE),
                  per_seed(_spread("plain"), "range over scales (no BN)"), None),
        ]  # fmt: skip

    def figures(self, s):
        caption = f"Final test accuracy after {s.steps} steps by initialization of every Linear layer"
        return [
            Heatmap("heatmap", "test_accuracy", "init", "initialization of every Linear layer",
                    "test accuracy (fraction)", caption + " (blank: every seed diverged)."),
            MeanTable("cells", "test_accuracy", "init", caption + "; mean [95% interval] over seeds.",
                      spec=".3f"),
        ]  # fmt: skip

    def deviations(self, s):
        return [
            "The paper states the property (§3.3) and shows it through its ImageNet training; this is a "
            f"direct sweep on the Fig. 1 MLP with {s.activation} units.",
            f"Plain SGD at learning rate {s.learning_rate:g} for every cell; {s.steps} steps, batch "
            f"{s.batch_size}, {s.seeds} seed(s).",
        ]
