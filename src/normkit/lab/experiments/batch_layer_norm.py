"""Ziaee & Çano (2022): Batch Layer Normalization at batch 1 and batch 25.

Batch Layer Normalization (arXiv 2209.08898; official code A2Amir/Batch-Layer-Normalization): BN's
and LN's normalizations mixed with fixed weights set by the inverse batch size m, about 1/m on LN
and 1 − 1/m on BN, divided by sqrt(d_k) (``nk.BatchLayerNorm``). The abstract claims faster
convergence than BN and LN; the experiments train a CNN on CIFAR-10 (and an RNN on IMDB) at batch
1 and batch 25, against Keras BN and LN. At inference, four switches choose each statistic (batch
mean, batch variance, feature mean, feature variance) between its population average and the
current one; the README suggests searching the combinations. One notebook cell records Keras BN at
batch 1 on CIFAR-10 at test accuracy 0.109 (chance). The paper's tables were not read.

Here (the lab's CPU protocol 7): the small CNN of ``normkit.lab.models.cnn`` with the normalizer
after each convolution and after the fully connected hidden layer (``hidden_norm``), BN, LN (over
the channels at each position, ``nk.LayerNorm2d``: the LN part of BLN and Keras's default axis) or
BLN (``batch_size`` = the training batch, as the code fixes m at construction), trained with Adam at
batch 1 and at batch 25 (the grid) for the same epochs on a subset of Fashion-MNIST, ``seeds`` seeds
(paired by seed). At batch 1 the hidden layer gives each normalizer one value per channel: BLN is
defined there as in the code (its BN part is 0), BN refuses the batch (``BatchTooSmallError``; Keras
BN trains on it and collapses): the refusal is recorded in the trial's final row, the trial ends at
its first evaluation, and BN's failure is judged on the error of the network it leaves. Evaluation:

- every network in eval mode (BN, and BLN's BN part, with the running statistics, momentum 0.1);
- BN with batch statistics: test images in batches of the training batch, in training mode;
- BLN in the four inference configurations that treat mean and variance alike (BN part from the
  running statistics or the current test batch, LN part from the example or the population's
  averages over ``population_examples`` training images; :mod:`normkit.lab.bln_inference`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab.bln_inference import (  # noqa: F401 (BlnInference: the tests' import)
    CONFIGS,
    BlnInference,
    config_name,
    configured_accuracy,
    feature_population,
)
from normkit.lab.claims import Claim, Published, above, below, final, per_seed
from normkit.lab.evaluation import error_on_test_set, error_percent, on_test_set
from normkit.lab.experiment import Experiment, Setup, register, training_subset
from normkit.lab.figures import MeanTable, VersusSetting
from normkit.lab.models import cnn, initialize
from normkit.lab.plan import Arm, Plan
from normkit.lab.render import Section, Table
from normkit.lab.settings import Settings
from normkit.lab.small_batch import RefusalRecorder, batch_statistics_accuracy

LABELS = {"bn": "BN", "ln": "LN", "bln": "BLN", "bln-nosqrt": "BLN without 1/√d_k"}
SPECS = {"bn": "batch", "ln": "layer2d", "bln": "batch_layer", "bln-nosqrt": "batch_layer"}
CODE = "Ziaee & Çano 2022, abstract and official code (A2Amir/Batch-Layer-Normalization)"
NOTEBOOK = "official code's CIFAR-10 results notebook (Keras BN at batch 1)"
BATCH = "batch_size"
SMALL, LARGE = (lambda s: min(s.batch_sizes)), (lambda s: max(s.batch_sizes))


@dataclass(frozen=True)
class BatchLayerNormSettings(Settings):
    batch_sizes: tuple[int, ...] = (25, 1)
    normalizers: tuple[str, ...] = ("bn", "ln", "bln", "bln-nosqrt")
    train_examples: int = 10_000
    epochs: float = 2.0
    learning_rate: float = 1e-3  # Adam
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    hidden_norm: bool = True  # False: the legacy protocol, convolutions only
    seeds: int = 3
    evaluations: int = 10
    eval_examples: int = 1_000
    population_examples: int = 2_000
    batch_stat_examples: int = 2_000


def _bn_error(trials, results):
    """BN's eval-mode error; a refused training counts with the network it leaves (untrained)."""
    final = trials[0].final
    return final["test_error"] if final.get("refusal") or not final["diverged"] else None


def _trained(trials, results, batch) -> dict:
    at = batch(results.settings)
    return {t.params["normalizer"]: t for t in trials if t.params[BATCH] == at and not t.final["diverged"]}


def _gap(a, b, batch):
    """|a − b| of the final test errors at ``batch`` (points): "within 1 point" is below(1)."""

    def value(trials, results):
        found = _trained(trials, results, batch)
        if not {a, b} <= set(found):
            return None
        return abs(found[a].final["test_error"] - found[b].final["test_error"])

    return value


def _faster(batch):
    """BLN's best error during training − the better of BN's and LN's best (points)."""

    def value(trials, results):
        found = _trained(trials, results, batch).items()
        best = {n: min(t.series("test_error")[1], default=None) for n, t in found}
        others = [best[n] for n in ("bn", "ln") if best.get(n) is not None]
        return None if best.get("bln") is None or not others else best["bln"] - min(others)

    return value


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
        "quick": {"train_examples": 2_000, "epochs": 1.0, "evaluations": 4, "seeds": 2},
        "tiny": {"batch_sizes": (8, 1), "train_examples": 32, "epochs": 1.0, "channels": (4, 8), "hidden": 16,
                 "evaluations": 2, "eval_examples": 50, "population_examples": 32, "batch_stat_examples": 40,
                 "seeds": 1},
    }  # fmt: skip
    prepare_data = training_subset

    def plan(self, s, data):
        unknown = [n for n in s.normalizers if n not in SPECS]
        if unknown:
            raise ConfigError(f"normalizers {unknown} are not known; choose from {', '.join(SPECS)}")
        arms = [Arm(n, {"normalizer": n}, LABELS[n]) for n in s.normalizers]
        steps = lambda p: max(1, round(s.epochs * len(data.y_train) / p[BATCH]))  # noqa: E731
        return Plan(arms, steps, seeds=s.seeds, seed=s.seed, evaluations=s.evaluations,
                    grid={BATCH: list(s.batch_sizes)})  # fmt: skip

    def setup(self, trial, s, data, generator):
        p = trial.params
        model = cnn(data.sample_shape, s.channels, s.hidden, data.classes, activation="relu",
                    norm=SPECS[p["normalizer"]])  # fmt: skip
        if not s.hidden_norm:  # the hidden layer without a normalizer, with its bias
            old = model._modules[f"linear{len(s.channels) + 1}"]
            model._modules[f"linear{len(s.channels) + 1}"] = nn.Linear(old.in_features, old.out_features)
            model._modules[f"norm{len(s.channels) + 1}"] = nn.Identity()
        for module in model.modules():
            if isinstance(module, nk.BatchLayerNorm):
                module.batch_size = p[BATCH]
                module.divide_by_sqrt_features = p["normalizer"] != "bln-nosqrt"
        initialize(model, "he", generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=s.learning_rate)
        step = RefusalRecorder(model, optimizer) if p["normalizer"] == "bn" else None
        return Setup(model, optimizer, p[BATCH], train_step=step)

    def measure(self, trial, s, setup, data):
        return {"test_error": error_on_test_set(setup.model, data, s.eval_examples),
                "epoch": setup.step * trial.params[BATCH] / len(data.y_train)}  # fmt: skip

    def finish(self, trial, s, setup, data):
        p, model, m = trial.params, setup.model, trial.params[BATCH]
        values = on_test_set(model, data, error=True)
        x, y = data.x_test[: s.batch_stat_examples], data.y_test[: s.batch_stat_examples]
        if p["normalizer"] == "bn":
            values["refusal"] = setup.train_step.refusal
            values["batch_stat_error"] = None if values["refusal"] else error_percent(
                batch_statistics_accuracy(model, x, y, m))  # fmt: skip
        if p["normalizer"].startswith("bln"):
            population = feature_population(model, data.x_train[: s.population_examples])
            values["configurations"] = {config_name(b, f): error_percent(
                configured_accuracy(model, x, y, m, b, f, population)) for b, f in CONFIGS}  # fmt: skip
        return values

    def claims(self, s):
        small, large = SMALL(s), LARGE(s)
        return [
            Claim("bn-fails-small", f"BN's test error at batch {small}, eval mode; a refused batch "
                  "counts with the untrained network (%)",
                  Published("fails: Keras BN at batch 1 reached chance (accuracy 0.109)", NOTEBOOK, 89.1,
                            unverified=True),
                  per_seed(_bn_error, "BN's final test error", arm="bn", **{BATCH: SMALL}), above(50.0),
                  fmt=".2f"),
            Claim("bn-refuses-small", f"BN refused to train at batch {small} (fraction of seeds)",
                  Published("Keras BN trains on one sample and collapses to chance", NOTEBOOK,
                            unverified=True),
                  per_seed(lambda trials, results: float(bool(trials[0].final.get("refusal"))),
                           "1 if BatchTooSmallError stopped its training", arm="bn", **{BATCH: SMALL}),
                  None, fmt=".2f"),
            Claim("bln-near-ln-small", f"|BLN − LN| test error at batch {small} (points)",
                  Published("BLN works at batch 1 (its LN part dominates)", CODE),
                  per_seed(_gap("bln", "ln", SMALL), "|BLN − LN| final test error"), below(1.0), fmt=".2f"),
            Claim("bln-near-bn-large", f"|BLN − BN| test error at batch {large} (points)",
                  Published("BLN ≈ BN (its BN part dominates: 0.96 / 0.04 at 25)", CODE),
                  per_seed(_gap("bln", "bn", LARGE), "|BLN − BN| final test error"), below(1.0), fmt=".2f"),
            *(Claim(f"bln-faster-b{b}", f"BLN's best test error during training − the better of BN's "
                    f"and LN's, batch {b} (points)", Published("BLN converges faster than BN and LN", CODE),
                    per_seed(_faster(at), "best error over the evaluations, BLN − min(BN, LN)"), None,
                    fmt="+.2f")
              for b, at in ((large, LARGE), (small, SMALL))),
            Claim("bn-batch-statistics", f"BN's test error at batch {small} with batch statistics (%)",
                  Published("not reported", CODE), final("batch_stat_error", arm="bn", **{BATCH: SMALL}),
                  None, fmt=".2f"),
        ]  # fmt: skip

    def figures(self, s):
        return [
            VersusSetting("error-vs-batch", "test_error", BATCH, "batch size", "test error (%)",
                          "Final test error (eval mode, whole test set) against the batch size.",
                          title=f"small CNN, {s.train_examples} images"),
            MeanTable("errors", "test_error", BATCH, "Final test error (%) in eval mode, whole test set."),
        ]  # fmt: skip

    def extra_section(self, results):
        rows = []
        for trials in ([t for t in results.trials(arm=n) if t.params[BATCH] == b]
                       for n in ("bln", "bln-nosqrt") for b in results.values(BATCH)):  # fmt: skip
            configs = [t.final["configurations"] for t in trials if t.final.get("configurations")]
            rows += [[LABELS[trials[0].params["normalizer"]], trials[0].params[BATCH], name,
                      f"{statistics.fmean(c[name] for c in configs):.2f}"]
                     for name in (configs[:1] or [{}])[0]]
        s = results.settings
        return Section("BLN's inference configurations", [Table(
            ["normalizer", "batch", "inference configuration", "test error (%), mean over seeds"], rows,
            f"On {s.batch_stat_examples} test images (the current batch: test images in batches of "
            f"the training batch; population LN statistics: averages over {s.population_examples} "
            "training images).",
        )]) if rows else None  # fmt: skip

    def deviations(self, s):
        return [
            f"A small CNN (conv{'-conv'.join(map(str, s.channels))}, fc{s.hidden}, normalized after the "
            f"convolutions{' and fc' if s.hidden_norm else ' only'}) on {s.train_examples} Fashion-MNIST "
            f"images, {s.epochs:g} epochs at both batches, Adam at {s.learning_rate:g}, {s.seeds} seeds; "
            "the paper: a CIFAR-10 CNN, 15 epochs.",
            "BN's part of BLN keeps normkit's running statistics (exponential average, momentum 0.1) where "
            "the code averages each epoch's batches; BN's statistics are per channel over (N, H, W), the "
            "code's per position over the batch.",
            "LN is over the channels at each position (the code's last axis, Keras's default), not over "
            "(C, H, W).",
        ]  # fmt: skip
