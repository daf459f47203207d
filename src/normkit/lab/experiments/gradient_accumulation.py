"""BatchNorm under gradient accumulation: batch 4 × 16 accumulated against batch 64 and batch 4, with
and without the exact accumulated running statistics of ``nk.accumulate`` (docs/accumulate.md).

No paper measures this. Users who accumulate gradients over k micro-batches (pytorch#46516,
Lightning#17446) report that BatchNorm then behaves like small-batch BN: its running mean and
variance take k exponential-average updates per optimizer step, each from one micro-batch, and eval
mode pays. ``nk.accumulate`` makes one update per step from the k micro-batches' merged statistics;
with ``whole_batch=True`` the training forward also normalizes with the whole accumulated batch's
statistics (a statistics-only pass per BatchNorm depth first).

Here (our protocol): the lab's small CNN (:func:`normkit.lab.small_batch.small_cnn`: conv-BN-ReLU ×2,
fc-BN-ReLU, classifier; BN's default momentum 0.1) on a seeded, class-balanced Fashion-MNIST subset,
five arms paired by seed: ``large``, batch ``micro_batch × micro_batches`` (64); ``small``, batch
``micro_batch`` (4) on the same images in the same order (the training set is a multiple of 64, so
its steps 16j … 16j+15 are the large arm's step j), 16× the steps at the learning rate × 4/64;
``plain``, ``exact`` and ``whole-batch``, the large arm's batches split into 16 micro-batches of 4
whose gradients (loss / 16 each) make one SGD step at the large arm's rate: plainly (16
running-statistics updates per step), under ``nk.accumulate(model, micro_batches=16)`` (one exact
update per step) and with ``whole_batch=True``. ``plain`` and ``exact`` train identically (the
running statistics do not enter the forward), so their eval errors differ by the running statistics
alone. SGD with momentum, the learning rate decayed to 0 on a cosine (our choice: with a constant
rate, one EMA update per step lags weights that still move, and in short runs that lag, not the
micro-batch noise, decides the comparison). Measured: test error in eval mode, with PreciseBN
statistics (Wu & Johnson 2021, §3: the best the running statistics could be, on the same weights)
and in training mode (test batches of the size each arm normalizes over: 4, or 64 for ``large`` and
``whole-batch``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

import normkit as nk
from normkit.lab.claims import Claim, Published, above, arm_gap, difference, final
from normkit.lab.evaluation import accuracy_and_loss, error_on_test_set, error_percent, on_test_set
from normkit.lab.experiment import Experiment, Setup, register, training_subset
from normkit.lab.figures import Bars, Curves
from normkit.lab.plan import Arm, Plan
from normkit.lab.population import batch_norm_layers, precise, training_batches
from normkit.lab.settings import Settings
from normkit.lab.small_batch import batch_statistics_accuracy, small_cnn

REPORTS = "pytorch#46516; Lightning#17446 (user reports, not papers)"
NO_NUMBER = "no published number: "
ACCUMULATED = {"plain": "plain", "exact": "nk.accumulate", "whole-batch": "whole_batch"}


@dataclass(frozen=True)
class GradientAccumulationSettings(Settings):
    micro_batch: int = 4
    micro_batches: int = 16  # k: the accumulated (and the large) batch is micro_batch × k
    train_examples: int = 12_800  # a multiple of micro_batch × k keeps the small arm in step
    epochs: float = 2.0
    learning_rate: float = 0.1  # at the large batch; the small arm's is scaled by 1/k
    momentum: float = 0.9
    cosine: bool = True  # the learning rate decays to 0 over the run (a cosine), or stays constant
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    seeds: int = 8  # the running-statistics gap is a fraction of a point: many paired seeds
    evaluations: int = 4
    eval_examples: int = 1_000
    batch_stat_examples: int = 2_000  # test images for the training-mode error
    precise_examples: int = 2_048  # training images for PreciseBN's statistics


class AccumulatedStep:
    """One SGD step over a batch split into ``k`` micro-batches whose gradients are summed (each
    loss divided by k): plainly, or under ``nk.accumulate`` (``exact``; ``whole-batch``)."""

    def __init__(self, model: nn.Module, optimizer, k: int, statistics: str):
        self.model, self.optimizer, self.k, self.statistics = model, optimizer, k, statistics

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        micro = list(zip(x.chunk(self.k), y.chunk(self.k), strict=True))
        whole = self.statistics == "whole-batch"
        context = (contextlib.nullcontext() if self.statistics == "plain"
                   else nk.accumulate(self.model, micro_batches=self.k, whole_batch=whole))  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=x.device)
        with context as accumulation:
            if whole:
                accumulation.prepare([xs for xs, _ in micro])
            for xs, ys in micro:
                loss = nn.functional.cross_entropy(self.model(xs), ys) / self.k
                loss.backward()
                total += loss.detach()
        self.optimizer.step()
        return total


@register
class GradientAccumulation(Experiment):
    name = "gradient-accumulation"
    title = "BN under gradient accumulation: batch 4 × 16 vs 64 and 4, with nk.accumulate"
    paper = "pytorch#46516, Lightning#17446 (user reports, no paper); normkit's nk.accumulate"
    claim = ("Accumulating gradients over micro-batches leaves BN's running statistics those of the "
             "micro-batches, so eval error suffers; exact accumulated statistics close that gap.")
    settings_class = GradientAccumulationSettings
    presets = {
        "quick": {"train_examples": 3_200, "epochs": 1.0, "seeds": 3, "evaluations": 2,
                  "eval_examples": 500, "batch_stat_examples": 1_000},
        "tiny": {"train_examples": 256, "epochs": 1.0, "channels": (4, 8), "hidden": 16, "seeds": 1,
                 "evaluations": 1, "eval_examples": 40, "batch_stat_examples": 64,
                 "precise_examples": 64},
    }  # fmt: skip
    prepare_data = training_subset

    def plan(self, s, data):
        m, k = s.micro_batch, s.micro_batches
        alone = {"micro_batches": 1, "statistics": "plain"}
        arms = [Arm("large", {"batch": m * k, **alone}, f"batch {m * k}"),
                Arm("small", {"batch": m, **alone}, f"batch {m}"),
                *(Arm(arm, {"batch": m * k, "micro_batches": k, "statistics": arm},
                      f"{m} × {k}, {label}") for arm, label in ACCUMULATED.items())]  # fmt: skip
        examples = s.train_examples if data is None else len(data.y_train)
        steps = lambda p: max(1, round(s.epochs * examples / p["batch"]))
        return Plan(arms, steps, seeds=s.seeds, seed=s.seed, evaluations=s.evaluations)

    def setup(self, trial, s, data, generator):
        p = trial.params
        model = small_cnn(data.sample_shape, data.classes, "bn", generator, channels=s.channels,
                          hidden=s.hidden)  # fmt: skip
        large = s.micro_batch * s.micro_batches
        optimizer = torch.optim.SGD(model.parameters(), lr=s.learning_rate * p["batch"] / large,
                                    momentum=s.momentum)  # fmt: skip
        k = p["micro_batches"]
        step = AccumulatedStep(model, optimizer, k, p["statistics"]) if k > 1 else None
        factor = (lambda t: 0.5 * (1 + math.cos(math.pi * t / trial.steps))) if s.cosine else None
        return Setup(model, optimizer, p["batch"], lr_factor=factor, train_step=step)

    def measure(self, trial, s, setup, data):
        return {"test_error": error_on_test_set(setup.model, data, s.eval_examples)}

    def finish(self, trial, s, setup, data):
        p, model, k = trial.params, setup.model, s.batch_stat_examples
        normalized = p["batch"] if p["statistics"] == "whole-batch" else p["batch"] // p["micro_batches"]
        train_mode = batch_statistics_accuracy(model, data.x_test[:k], data.y_test[:k], normalized)
        batches = training_batches(data.x_train, normalized, s.precise_examples, trial.seed)
        precise_accuracy, _ = accuracy_and_loss(precise(model, batches), data.x_test, data.y_test)
        return {**on_test_set(model, data, error=True),
                "precise_error": error_percent(precise_accuracy),
                "train_mode_error": error_percent(train_mode), "normalization_batch": normalized,
                "bn_updates_per_step": {name: int(layer.num_batches_tracked) / max(1, setup.step)
                                        for name, layer in batch_norm_layers(model).items()},
                "parameter_norm": float(torch.sqrt(sum(w.double().square().sum()
                                                       for w in model.parameters())))}  # fmt: skip

    def claims(self, s):
        m, k = s.micro_batch, s.micro_batches
        acc = f"{m} × {k}"

        def gap(name, a, b, quantity, published, criterion):
            return arm_gap(name, quantity, Published(published, REPORTS), "test_error", a, b, criterion)

        return [
            gap("plain-behind-large", "plain", "large",
                f"eval error, {acc} plain accumulation − batch {m * k} (points)",
                NO_NUMBER + "users report worse eval accuracy with BN under accumulation than with "
                "the large batch", above(0.0)),
            gap("exact-closes-gap", "plain", "exact",
                f"eval error, {acc} plain − {acc} under nk.accumulate (points)",
                NO_NUMBER + "the running statistics are blamed; nk.accumulate makes them the "
                "accumulated batch's, so this should be > 0", above(0.0)),
            gap("exact-vs-large", "exact", "large",
                f"eval error, {acc} under nk.accumulate − batch {m * k} (points)",
                NO_NUMBER + "what remains is training with micro-batch normalization", None),
            gap("whole-batch-vs-large", "whole-batch", "large",
                f"eval error, {acc} with whole_batch=True − batch {m * k} (points)",
                NO_NUMBER + "the forward is the large batch's; the gradient is not quite", None),
            Claim("exact-vs-precise", f"eval error, {acc} under nk.accumulate − the same network "
                  "with PreciseBN statistics (points)",
                  Published(NO_NUMBER + "exact accumulated statistics should be as good as PreciseBN's "
                            "at the end of a decayed schedule", "Wu & Johnson 2021, §3 (PreciseBN)"),
                  difference(final("test_error", arm="exact"), final("precise_error", arm="exact")),
                  None, fmt="+.2f"),
            gap("small-vs-large", "small", "large", f"eval error, batch {m} − batch {m * k} (points)",
                NO_NUMBER + "small-batch BN (cf. Wu & He 2018, Fig. 1)", None),
        ]

    def figures(self, s):
        return [
            Bars("eval-error", "test_error", "test error (%), eval mode",
                 "Test error with the running statistics (eval mode), whole test set."),
            Bars("precise-error", "precise_error", "test error (%), PreciseBN statistics",
                 f"Test error in eval mode with PreciseBN statistics ({s.precise_examples} training "
                 "images in batches of the arm's normalization batch, final weights)."),
            Bars("train-mode-error", "train_mode_error", "test error (%), training mode",
                 "Test error with batch statistics over each arm's normalization batch."),
            Curves("eval-curves", "test_error", "test error (%), eval mode",
                   f"Eval-mode test error on {s.eval_examples} test images during training (the "
                   "arms with the large batch's optimizer steps).",
                   arms=["large", *ACCUMULATED]),
        ]  # fmt: skip

    def deviations(self, s):
        return [
            f"No published protocol: a small CNN (conv{'-conv'.join(map(str, s.channels))}, "
            f"fc{s.hidden}, BN after each) on {s.train_examples} images for {s.epochs:g} epoch(s), "
            f"SGD momentum {s.momentum:g} at {s.learning_rate:g} for the large batch, "
            + ("decayed to 0 on a cosine." if s.cosine else "no schedule."),
            "BN's default momentum 0.1 in every arm: under plain accumulation the running "
            f"statistics then average about the last {round(1 / 0.1)} micro-batches "
            f"({round(s.micro_batch / 0.1)} images), not the last 10 steps.",
        ]
