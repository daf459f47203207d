"""Ziaee & Çano (2022): Batch Layer Normalization at batch 1 and batch 25.

Batch Layer Normalization (arXiv 2209.08898; official code A2Amir/Batch-Layer-Normalization): BN's
and LN's normalizations mixed with fixed weights set by the inverse batch size m, about 1/m on LN
and 1 − 1/m on BN, divided by sqrt(d_k) (``nk.BatchLayerNorm``). The abstract claims faster
convergence than BN and LN; the experiments train a CNN on CIFAR-10 (and an RNN on IMDB) at batch
1 and batch 25, against Keras BN and LN. At inference, four switches choose each statistic (batch
mean, batch variance, feature mean, feature variance) between its population average and the
current one; the README suggests searching the combinations. One notebook cell records Keras BN at
batch 1 on CIFAR-10 at test accuracy 0.109 (chance). The paper's tables were not read.

Here (the lab's CPU protocol 7, on a CNN: normkit's BatchNorm and BatchLayerNorm refuse to train on
one value per channel, which is what a batch of 1 gives a fully connected layer): the small CNN of
``normkit.lab.small_batch`` with the normalizer after each convolution and none on the hidden layer, BN, LN
(over the channels at each position, ``nk.LayerNorm2d``: the LN part of BLN and Keras's default
axis) or BLN (``batch_size`` = the training batch, as the code fixes m at construction), trained
with Adam at batch 1 and at batch 25 for the same epochs on a subset of Fashion-MNIST. Evaluation:

- every network in eval mode (BN, and BLN's BN part, with the running statistics, momentum 0.1);
- BN with batch statistics: test images in batches of the training batch, in training mode;
- BLN in the four inference configurations that treat mean and variance alike: the BN part from
  the population (running statistics) or from the current test batch (of the training batch's
  size), times the LN part from the example itself or from the population (the average over
  ``population_examples`` training images of each position's per-example mean and variance; the
  code sums them over the last epoch instead; the population variance is not corrected, as a
  variance over the channels of one example has no m/(m − 1) to apply).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import product

import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab.datasets import subset
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.legacy import Experiment, Settings, Setup, register
from normkit.lab.models import cnn, initialize
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt
from normkit.lab.small_batch import (
    batch_statistics_accuracy,
    batch_sweep,
    error_percent,
    error_vs_batch_figure,
)

LABELS = {"bn": "BN", "ln": "LN", "bln": "BLN", "bln-nosqrt": "BLN without 1/√d_k"}
SPECS = {"bn": "batch", "ln": "layer2d", "bln": "batch_layer", "bln-nosqrt": "batch_layer"}
# (BN part, LN part) of BLN at inference.
CONFIGS = [(b, f) for b, f in product(("population", "batch"), ("example", "population"))]


def config_name(batch: str, feature: str) -> str:
    return f"BN part: {batch}, LN part: {feature}"


@dataclass(frozen=True)
class BatchLayerNormSettings(Settings):
    batch_sizes: tuple[int, ...] = (25, 1)
    normalizers: tuple[str, ...] = ("bn", "ln", "bln", "bln-nosqrt")
    train_examples: int = 10_000
    epochs: float = 2.0
    learning_rate: float = 1e-3  # Adam
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    evaluations: int = 10
    eval_examples: int = 1_000
    population_examples: int = 2_000
    batch_stat_examples: int = 2_000


class BlnInference(nn.Module):
    """A trained ``nk.BatchLayerNorm`` evaluated in one of the code's inference configurations.

    ``batch``: BN statistics from the running averages (``"population"``) or from the input batch
    (``"batch"``); ``feature``: LN statistics from each example and position (``"example"``) or the
    population's per-position averages ``feature_mean``/``feature_var`` (shape (*spatial)).
    """

    def __init__(
        self, layer: nk.BatchLayerNorm, batch: str, feature: str, feature_mean, feature_var
    ):
        super().__init__()
        self.layer, self.batch, self.feature = layer, batch, feature
        self.feature_mean, self.feature_var = feature_mean, feature_var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        shape = (1, -1) + (1,) * (x.dim() - 2)
        reduce = [0, *range(2, x.dim())]
        if self.batch == "population":
            mean, var = layer.running_mean.view(shape), layer.running_var.view(shape)
        else:
            mean = x.mean(reduce, keepdim=True)
            var = x.var(reduce, unbiased=False, keepdim=True)
        x_b = (x - mean) / torch.sqrt(var + layer.eps)
        if self.feature == "example":
            mean_f = x.mean(1, keepdim=True)
            var_f = x.var(1, unbiased=False, keepdim=True)
        else:
            mean_f, var_f = self.feature_mean.unsqueeze(0), self.feature_var.unsqueeze(0)
        x_f = (x - mean_f) / torch.sqrt(var_f + layer.eps)
        w_b, w_f = layer.mixing_weights(x.shape[0])
        y = w_b * x_b + w_f * x_f
        if layer.weight is not None:
            y = y * layer.weight.view(shape) + layer.bias.view(shape)
        return y


@torch.no_grad()
def feature_population(model: nn.Module, x: torch.Tensor, chunk: int = 500) -> dict[str, tuple]:
    """Each BatchLayerNorm's population LN statistics: the average over ``x`` of every example's
    per-position mean and (biased) variance over the channels, in eval mode."""
    sums: dict[str, list] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nk.BatchLayerNorm):

            def hook(_module, inputs, _output, name=name):
                h = inputs[0].double()
                mean, var = h.mean(1), h.var(1, unbiased=False)
                total = sums.setdefault(name, [0.0, 0.0, 0])
                total[0] = total[0] + mean.sum(0)
                total[1] = total[1] + var.sum(0)
                total[2] += h.shape[0]

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), chunk):
            model(x[start : start + chunk])
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return {name: ((m / n).float(), (v / n).float()) for name, (m, v, n) in sums.items()}


@torch.no_grad()
def configured_accuracy(
    model, x, y, batch_size: int, batch: str, feature: str, population
) -> float:
    """Accuracy of a BLN network in one inference configuration; the test images go in batches
    of ``batch_size`` (what "the current batch" means), the last incomplete one dropped."""
    replica = copy.deepcopy(model).eval()
    for name, module in list(replica.named_children()):
        if isinstance(module, nk.BatchLayerNorm):
            mean_f, var_f = population.get(name, (None, None))
            replica._modules[name] = BlnInference(module, batch, feature, mean_f, var_f)
    step = batch_size if batch == "batch" else 500
    count = len(y) // step * step if batch == "batch" else len(y)
    correct = 0
    for start in range(0, count, step):
        stop = min(start + step, count)
        logits = replica(x[start:stop])
        correct += int((logits.argmax(dim=1) == y[start:stop]).sum())
    return correct / count


@register
class BatchLayerNormExperiment(Experiment):
    name = "batch-layer-norm"
    title = "Batch Layer Normalization vs BN and LN at batch 1 and 25"
    paper = "Ziaee & Çano 2022, Batch Layer Normalization (arXiv 2209.08898) and its official code"
    claim = (
        "BLN weights BN and LN by the inverse batch size, so it works at batch 1 (where BN in eval "
        "mode fails: Keras BN at batch 1 reached chance, 0.109) and converges faster than BN and LN."
    )
    settings_class = BatchLayerNormSettings
    presets = {
        "quick": {"train_examples": 2_000, "epochs": 1.0, "evaluations": 4},
        "tiny": {
            "batch_sizes": (8, 1),
            "train_examples": 32,
            "epochs": 1.0,
            "channels": (4, 8),
            "hidden": 16,
            "evaluations": 2,
            "eval_examples": 50,
            "population_examples": 32,
            "batch_stat_examples": 40,
        },
    }

    def prepare_data(self, settings, dataset):
        return subset(dataset, settings.train_examples, settings.seed)

    def trials(self, settings, data, finals):
        n = len(data.y_train) if data is not None else settings.train_examples
        return batch_sweep(settings, n, settings.batch_sizes, train_size=n)

    def setup(self, trial, settings, data, generator):
        p = trial.params
        if p["normalizer"] not in SPECS:
            raise ConfigError(
                f"normalizer {p['normalizer']!r} is not known; choose from {', '.join(SPECS)}"
            )
        model = cnn(
            data.sample_shape,
            settings.channels,
            settings.hidden,
            data.classes,
            activation="relu",
            norm=SPECS[p["normalizer"]],
        )
        position = f"linear{len(settings.channels) + 1}"
        old = model._modules[position]
        model._modules[position] = nn.Linear(old.in_features, old.out_features)
        model._modules[f"norm{len(settings.channels) + 1}"] = nn.Identity()
        for module in model.modules():
            if isinstance(module, nk.BatchLayerNorm):
                module.batch_size = p["batch_size"]
                module.divide_by_sqrt_features = p["normalizer"] != "bln-nosqrt"
        initialize(model, "he", generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
        return Setup(model, optimizer, p["batch_size"])

    def measure(self, trial, settings, setup, data):
        k = settings.eval_examples
        accuracy, _ = accuracy_and_loss(setup.model, data.x_test[:k], data.y_test[:k])
        epoch = setup.step * trial.params["batch_size"] / trial.params["train_size"]
        return {"test_error": error_percent(accuracy), "epoch": epoch}

    def finish(self, trial, settings, setup, data):
        p, k = trial.params, settings.batch_stat_examples
        model, m = setup.model, p["batch_size"]
        accuracy, loss = accuracy_and_loss(model, data.x_test, data.y_test)
        values = {"test_error": error_percent(accuracy), "test_loss": loss}
        x, y = data.x_test[:k], data.y_test[:k]
        if p["normalizer"] == "bn":
            values["batch_stat_error"] = error_percent(batch_statistics_accuracy(model, x, y, m))
        if p["normalizer"].startswith("bln"):
            population = feature_population(model, data.x_train[: settings.population_examples])
            values["configurations"] = {
                config_name(b, f): error_percent(
                    configured_accuracy(model, x, y, m, b, f, population)
                )
                for b, f in CONFIGS
            }
        return values

    # -- meaning -------------------------------------------------------------------------------
    def summarize(self, record: RunRecord) -> dict:
        cells: dict[str, dict[str, dict]] = {}
        for key, row in record.finals().items():
            curve = record.curve(key)
            cells.setdefault(row["normalizer"], {})[str(row["batch_size"])] = {
                "test_error": row["test_error"],
                "batch_stat_error": row.get("batch_stat_error"),
                "configurations": row.get("configurations"),
                "best_error": min((r["test_error"] for r in curve), default=None),
                "diverged": row["diverged"],
            }
        return {"cells": cells, "batch_sizes": sorted(record.settings["batch_sizes"])}

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        cells = s["cells"]
        small, large = str(s["batch_sizes"][0]), str(s["batch_sizes"][-1])
        data_name = record.config["data"]["name"]

        def err(n, b, field="test_error"):
            return cells.get(n, {}).get(b, {}).get(field)

        def close(a, b, tolerance=1.0):
            return None if a is None or b is None else abs(a - b) <= tolerance

        bn_fails = None if err("bn", small) is None else err("bn", small) > 50.0
        comparison = Table(
            [
                "quantity",
                "published (CIFAR-10 CNN; code and abstract)",
                f"ours ({data_name}, small CNN, test error %)",
                "verdict",
            ],
            [
                [
                    f"BN at batch {small}, eval mode",
                    "fails: Keras BN at batch 1 reached chance (accuracy 0.109)",
                    fmt(err("bn", small), ".2f")
                    + f" (with batch statistics: {fmt(err('bn', small, 'batch_stat_error'), '.2f')})",
                    "fails (error > 50%): " + fmt(bn_fails),
                ],
                [
                    f"BLN ≈ LN at batch {small}",
                    "BLN works at batch 1 (its LN part dominates)",
                    f"{fmt(err('bln', small), '.2f')} vs {fmt(err('ln', small), '.2f')}",
                    "within 1 point: " + fmt(close(err("bln", small), err("ln", small))),
                ],
                [
                    f"BLN ≈ BN at batch {large}",
                    "BLN ≈ BN (its BN part dominates: 0.96 / 0.04 at 25)",
                    f"{fmt(err('bln', large), '.2f')} vs {fmt(err('bn', large), '.2f')}",
                    "within 1 point: " + fmt(close(err("bln", large), err("bn", large))),
                ],
                [
                    "BLN converges faster than BN and LN",
                    "claimed (abstract)",
                    "best error during training, BLN / BN / LN: "
                    + "; ".join(
                        f"batch {b}: "
                        + " / ".join(
                            fmt(err(n, b, "best_error"), ".2f") for n in ("bln", "bn", "ln")
                        )
                        for b in (large, small)
                    ),
                    "–",
                ],
            ],
        )
        checks = [
            Check(f"BN in eval mode fails at batch {small} (error > 50%)", bn_fails,
                  f"{fmt(err('bn', small), '.2f')}%"),
            Check(f"BLN within 1 point of LN at batch {small}",
                  close(err("bln", small), err("ln", small)),
                  f"{fmt(err('bln', small), '.2f')} vs {fmt(err('ln', small), '.2f')}"),
            Check(f"BLN within 1 point of BN at batch {large}",
                  close(err("bln", large), err("bn", large)),
                  f"{fmt(err('bln', large), '.2f')} vs {fmt(err('bn', large), '.2f')}"),
        ]  # fmt: skip
        lines = [n for n in LABELS if n in cells]
        table = Table(
            ["normalizer", f"batch {large}", f"batch {small}"],
            [[LABELS[n], fmt(err(n, large), ".2f"), fmt(err(n, small), ".2f")] for n in lines],
            "Final test error (%) in eval mode on the whole test set.",
        )
        config_rows = []
        for n in ("bln", "bln-nosqrt"):
            for b in (large, small):
                configs = err(n, b, "configurations") or {}
                config_rows += [
                    [LABELS[n], b, name, fmt(value, ".2f")] for name, value in configs.items()
                ]
        configurations = Table(
            ["normalizer", "batch", "inference configuration", "test error (%)"],
            config_rows,
            f"BLN's inference configurations on {settings['batch_stat_examples']} test images "
            "(the current batch: test images in batches of the training batch; the population LN "
            f"statistics: averages over {settings['population_examples']} training images).",
        )
        figure = Figure(
            "error-vs-batch",
            error_vs_batch_figure(
                {
                    LABELS[n]: [(int(b), c["test_error"]) for b, c in cells[n].items()]
                    for n in lines
                },
                f"small CNN, {data_name}",
                "batch size",
            ),
            "Final test error (eval mode) against the batch size (log scale), one line per "
            "normalizer.",
        )
        deviations = [
            f"A small CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, "
            f"fc{settings['hidden']}, normalizer after the convolutions only) on "
            f"{record.config['data']['train']} {data_name} images for {settings['epochs']:g} epochs "
            f"at both batch sizes, Adam at {settings['learning_rate']:g}, one seed; the paper: a "
            "CIFAR-10 CNN, 15 epochs.",
            "BN's part of BLN keeps normkit's running statistics (exponential average, momentum "
            "0.1) where the code averages each epoch's batches; BN's statistics are per channel over "
            "(N, H, W), the code's per position over the batch.",
            "LN is over the channels at each position (the code's last axis, Keras's default), not "
            "over (C, H, W).",
        ]  # fmt: skip
        headline = (
            f"batch {small}: BN {fmt(err('bn', small), '.1f')}%, LN {fmt(err('ln', small), '.1f')}%, "
            f"BLN {fmt(err('bln', small), '.1f')}%; batch {large}: BN {fmt(err('bn', large), '.1f')}%, "
            f"BLN {fmt(err('bln', large), '.1f')}%"
        )
        return Report(
            comparison,
            [Section("Results", [figure, table, configurations])],
            checks,
            deviations,
            headline,
        )
