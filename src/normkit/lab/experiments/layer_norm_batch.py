"""Ba, Kiros & Hinton (2016), §6.7 and Fig. 6: LayerNorm does not care about the batch size; BN does.

Layer Normalization (arXiv 1607.06450): a 784-1000-1000-10 network on permutation-invariant MNIST
(55,000 training images), Adam, batch sizes 128 and 4; LN on the hidden layers only (not the
logits); at batch 4, BN's variance is the unbiased estimate. Published (no table; Fig. 6's curves):
"LN is robust to the batch-sizes and exhibits faster training convergence compared to BN"; BN
with batch 4 is visibly worse in test error.

Here (the lab's CPU protocol 5a): the same MLP (``hidden``, ReLU) with no normalization, BN or LN
(``nk.BatchNorm1d`` / ``nk.LayerNorm`` between each hidden Linear layer and its ReLU, the Linear
bias dropped before a norm), Adam at ``learning_rate``, batch 128 and 4 (the grid), the same
``epochs`` on a class-balanced subset of Fashion-MNIST for every batch size, ``seeds`` seeds
(paired: replicate k of every arm and batch size has the same seed). Measured: test error in eval
mode against epochs (BN uses its running statistics, momentum 0.1; LN is the same in both modes),
and at the end, BN's error with batch statistics (test images in batches of the training batch).
"Faster convergence" is read at the first evaluation at or after ``early_epoch`` epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.errors import ConfigError
from normkit.lab.claims import Claim, Published, above, arm_gap, below, difference, final, per_seed
from normkit.lab.evaluation import error_on_test_set, error_percent, on_test_set
from normkit.lab.experiment import Experiment, Setup, register, training_subset
from normkit.lab.figures import Curves, MeanTable, VersusSetting
from normkit.lab.models import initialize, mlp
from normkit.lab.plan import Arm, Plan
from normkit.lab.settings import Settings
from normkit.lab.small_batch import batch_statistics_accuracy

LABELS = {"none": "no normalization", "bn": "BN", "ln": "LN"}
NORMS = {"none": "none", "bn": "batch", "ln": "layer"}
FIG_6 = "Ba et al. 2016, §6.7 and Fig. 6 (permutation-invariant MNIST, 784-1000-1000-10)"
BATCH = "batch_size"
SMALL, LARGE = (lambda s: min(s.batch_sizes)), (lambda s: max(s.batch_sizes))


@dataclass(frozen=True)
class LayerNormSettings(Settings):
    batch_sizes: tuple[int, ...] = (128, 4)
    normalizers: tuple[str, ...] = ("none", "bn", "ln")
    hidden: tuple[int, ...] = (1000, 1000)
    learning_rate: float = 1e-3  # Adam
    train_examples: int = 20_000
    epochs: float = 2.0
    early_epoch: float = 0.25  # where "faster convergence" is read
    seeds: int = 6  # 3 left every claim inconclusive, its intervals 3-10 points wide
    evaluations: int = 16
    eval_examples: int = 2_000
    batch_stat_examples: int = 2_000


def early_error(trial, epoch: float) -> float | None:
    """The test error at the first evaluation at or after ``epoch`` epochs (None: it diverged)."""
    if trial.final["diverged"]:
        return None
    return next((r["test_error"] for r in trial.curve if r["epoch"] >= epoch), None)


def _early_lead(pairs, batches):
    """Per seed, the largest early error of ``a`` − that of ``b`` over the (a, b) of ``pairs`` and
    the ``batches``: below 0 when every ``a`` leads its ``b`` at every batch size."""

    def value(trials, results):
        epoch = results.settings.early_epoch
        early = {(t.params["normalizer"], t.params[BATCH]): early_error(t, epoch) for t in trials}
        gaps = [(early.get((a, n)), early.get((b, n))) for a, b in pairs for n in batches]
        return None if any(None in gap for gap in gaps) else max(x - y for x, y in gaps)

    return value


def _rise(normalizer):
    return difference(final("test_error", arm=normalizer, **{BATCH: SMALL}),
                      final("test_error", arm=normalizer, **{BATCH: LARGE}))  # fmt: skip


@register
class LayerNormBatch(Experiment):
    name = "layer-norm"
    title = "LayerNorm vs BatchNorm at batch 128 and 4"
    paper = "Ba, Kiros & Hinton 2016, Layer Normalization, §6.7 and Fig. 6"
    claim = (
        "LayerNorm normalizes each example by its own hidden units, so it is robust to the batch "
        "size and converges faster than BN; BN evaluated with running statistics degrades at "
        "batch 4."
    )
    settings_class = LayerNormSettings
    presets = {
        "quick": {"hidden": (256, 256), "train_examples": 5_000, "epochs": 1.0, "evaluations": 8,
                  "seeds": 2},
        "tiny": {"hidden": (16, 16), "batch_sizes": (16, 4), "train_examples": 64, "epochs": 1.0,
                 "evaluations": 2, "eval_examples": 100, "batch_stat_examples": 40, "seeds": 1},
    }  # fmt: skip
    prepare_data = training_subset

    def plan(self, s, data):
        if unknown := [n for n in s.normalizers if n not in NORMS]:
            raise ConfigError(f"normalizers {unknown} are not known; choose from {', '.join(NORMS)}")
        arms = [Arm(n, {"normalizer": n}, LABELS[n]) for n in s.normalizers]
        steps = lambda p: max(1, round(s.epochs * len(data.y_train) / p[BATCH]))  # noqa: E731
        return Plan(arms, steps, seeds=s.seeds, seed=s.seed, evaluations=s.evaluations,
                    grid={BATCH: list(s.batch_sizes)})  # fmt: skip

    def setup(self, trial, s, data, generator):
        model = mlp(data.features, s.hidden, data.classes, "relu", norm=NORMS[trial.params["normalizer"]])
        initialize(model, "he", generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=s.learning_rate)
        return Setup(model, optimizer, trial.params[BATCH])

    def measure(self, trial, s, setup, data):
        return {"test_error": error_on_test_set(setup.model, data, s.eval_examples),
                "epoch": setup.step * trial.params[BATCH] / len(data.y_train)}  # fmt: skip

    def finish(self, trial, s, setup, data):
        p, k = trial.params, s.batch_stat_examples
        values = {**on_test_set(setup.model, data, error=True), "batch_stat_error": None}
        if p["normalizer"] == "bn":
            values["batch_stat_error"] = error_percent(
                batch_statistics_accuracy(setup.model, data.x_test[:k], data.y_test[:k], p[BATCH]))
        return values

    def claims(self, s):
        small, large = SMALL(s), LARGE(s)
        return [
            Claim("ln-robust", f"LN's test error at batch {small} − at {large} (points)",
                  Published("robust to the batch size: the curves nearly coincide", FIG_6),
                  _rise("ln"), below(1.0), fmt="+.2f"),
            Claim("bn-degrades-more", f"BN's rise from batch {large} to {small} − LN's (points, eval mode)",
                  Published("BN at batch 4 is visibly worse in test error", FIG_6),
                  difference(_rise("bn"), _rise("ln")), above(0.0), fmt="+.2f"),
            arm_gap("ln-beats-bn-small", f"LN − BN test error at batch {small} (points)",
                    Published("LN better at batch 4", FIG_6), "test_error", "ln", "bn", below(0.0),
                    **{BATCH: SMALL}),
            *(Claim(f"ln-faster-b{b}", f"LN − BN test error at epoch {s.early_epoch:g}, batch {b} (points)",
                    Published("LN converges faster than BN (both batch sizes)", FIG_6),
                    per_seed(_early_lead([("ln", "bn")], [b]),
                             f"LN − BN error at the first evaluation after epoch {s.early_epoch:g}"),
                    below(0.0), fmt="+.2f")
              for b in (large, small)),
            Claim("normalized-ahead", "largest (BN or LN − no normalization) error at epoch "
                  f"{s.early_epoch:g}, both batch sizes (points)",
                  Published("both beat the baseline early (the lab's expectation, not the paper's "
                            "number)", "docs PROTOCOLS.md, CPU protocol 5a", unverified=True),
                  per_seed(_early_lead([("bn", "none"), ("ln", "none")], [small, large]),
                           "max over BN, LN and both batches of normalized − plain"),
                  below(0.0), fmt="+.2f"),
            Claim("bn-batch-statistics", f"BN's test error at batch {small} with batch statistics (%)",
                  Published("not reported", FIG_6),
                  final("batch_stat_error", arm="bn", **{BATCH: SMALL}), None, fmt=".2f"),
        ]  # fmt: skip

    def figures(self, s):
        return [
            *(Curves(f"curves-b{b}", "test_error", "test error (%)",
                     f"Test error (eval mode, first {s.eval_examples} test images) against training "
                     f"steps at batch {b}.", where={BATCH: b}, title=f"batch {b}", from_step=1)
              for b in sorted(s.batch_sizes, reverse=True)),
            VersusSetting("error-vs-batch", "test_error", BATCH, "batch size", "test error (%)",
                          "Final test error (eval mode, whole test set) against the batch size.",
                          title=f"MLP {'-'.join(map(str, s.hidden))}"),
            MeanTable("errors", "test_error", BATCH, "Final test error (%) in eval mode, whole test set."),
        ]  # fmt: skip

    def deviations(self, s):
        return [
            f"Fashion-MNIST, {s.train_examples} training images for {s.epochs:g} epochs at both batch "
            f"sizes, instead of MNIST (55,000) to convergence; MLP 784-{'-'.join(map(str, s.hidden))}-10 "
            f"with ReLU, Adam at {s.learning_rate:g}, {s.seeds} seeds.",
            "BN's running statistics use momentum 0.1 and the unbiased variance (the paper's choice "
            "at batch 4 too).",
        ]  # fmt: skip
