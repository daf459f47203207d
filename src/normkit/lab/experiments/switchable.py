"""Luo, Ren & Peng (2018): Switchable Normalization learns which statistics to use, per layer.

Switchable Normalization (arXiv 1806.10779; official code and README switchablenorms/
Switchable-Normalization): the mean and the variance are softmax-weighted mixtures of IN's, LN's
and BN's, with importance logits learned per layer (``nk.SwitchableNorm``). README table, ResNet-50
on ImageNet, top-1 accuracy (%) by (GPUs, images per GPU): at (8, 32) BN 76.4, GN 75.9, SN 76.9; at
(8, 2) BN 65.3, GN 75.9, SN 75.6 (errors 23.6 / 24.1 / 23.1 and 34.7 / 24.1 / 24.4). The paper
reports that the learned weights move away from BN as the batch per GPU shrinks (lab notes: from a
secondary source).

Here: ``batch-size``'s protocol (:class:`~normkit.lab.small_batch.NormalizationBatchSettings`,
issue 17's fix: the small CNN on a Fashion-MNIST subset, a fixed gradient batch of 64 normalized
per B images, equal updates, no normalizer on the hidden fully connected layer) at a large and a
small B, BN, GN and SN, ``seeds`` seeds, paired. Its BN and SN trials are ``batch-size``'s (same
settings, seeds and data), so the two experiments' ``sn-vs-bn-large`` claims are one measurement.
SN's (IN, LN, BN) weights of the mean and of the variance are logged at every evaluation and
reported per layer at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from normkit.lab.claims import Claim, Published, above, below, per_seed
from normkit.lab.evaluation import error_on_test_set, error_percent, on_test_set
from normkit.lab.experiment import Experiment, Setup, register, training_subset
from normkit.lab.figures import Bars, Curves, VersusSetting
from normkit.lab.plan import Arm, Plan
from normkit.lab.small_batch import (
    NORMALIZATION_BATCH_PRESETS,
    NORMALIZERS,
    NormalizationBatchSettings,
    batch_statistics_accuracy,
    bn_share,
    importance_section,
    normalization_batch_cnn,
    sn_vs_bn_claim,
    switchable_importance,
)

README = "Switchable-Normalization README, ResNet-50 on ImageNet, 8 GPUs (top-1 → error %)"
PUBLISHED = {  # images per GPU -> error (%)
    "BN": [(32, 23.6), (16, 23.7), (8, 24.8), (4, 27.3), (2, 34.7)],
    "GN": [(32, 24.1), (16, 24.2), (8, 24.0), (4, 24.2), (2, 24.1)],
    "Switchable Norm": [(32, 23.1), (16, 23.3), (8, 23.3), (4, 24.1), (2, 24.4)],
}
BATCH = "batch_per_device"  # the normalization batch, as in batch-size
LARGE, SMALL = (lambda s: max(s.batch_sizes)), (lambda s: min(s.batch_sizes))


@dataclass(frozen=True)
class SwitchableSettings(NormalizationBatchSettings):
    batch_sizes: tuple[int, ...] = (64, 2)
    normalizers: tuple[str, ...] = ("bn", "gn", "sn")


def _sn_minus_best_small(trials, results):
    batch = SMALL(results.settings)
    errors = {t.params["normalizer"]: t.final["test_error"] for t in trials
              if t.params[BATCH] == batch and not t.final["diverged"]}  # fmt: skip
    others = [errors[n] for n in ("bn", "gn") if n in errors]
    return errors["sn"] - min(others) if "sn" in errors and others else None


def _share_fall(stat):
    def value(trials, results):
        shares = {t.params[BATCH]: bn_share(t.final["importance"], stat) for t in trials}
        sizes = results.settings.batch_sizes
        return shares[max(sizes)] - shares[min(sizes)] if len(shares) == len(sizes) else None

    return value


@register
class Switchable(Experiment):
    name = "switchable"
    title = "Switchable Norm beside BN and GN at a large and a small batch"
    paper = "Luo, Ren & Peng 2018, Switchable Normalization, README table and learned ratios"
    claim = ("SN matches the better of BN and GN at every batch size (ResNet-50: 23.1% error at 32 "
             "images per GPU, 24.4% at 2, where BN has 34.7%), and learns to rely less on BN's "
             "statistics when the batch is small.")  # fmt: skip
    settings_class = SwitchableSettings
    presets = dict(NORMALIZATION_BATCH_PRESETS)
    prepare_data = training_subset

    def plan(self, s, data):
        arms = [Arm(n, {"normalizer": n, "processes": 1}, NORMALIZERS[n]) for n in s.normalizers]
        return Plan(arms, s.steps, seeds=s.seeds, seed=s.seed, evaluations=s.evaluations,
                    grid={BATCH: sorted(s.batch_sizes, reverse=True)})  # fmt: skip

    def setup(self, trial, s, data, generator):
        model, optimizer = normalization_batch_cnn(s, data, trial.params["normalizer"],
                                                   trial.params[BATCH], generator)  # fmt: skip
        return Setup(model, optimizer, s.gradient_batch)

    def measure(self, trial, s, setup, data):
        values = {"test_error": error_on_test_set(setup.model, data, s.eval_examples)}
        if trial.params["normalizer"] == "sn":
            importance = switchable_importance(setup.model)
            values.update(importance=importance, bn_share_mean=bn_share(importance, "mean"),
                          bn_share_var=bn_share(importance, "var"))  # fmt: skip
        return values

    def finish(self, trial, s, setup, data):
        p, k = trial.params, s.batch_stat_examples
        values = on_test_set(setup.model, data, error=True)
        if p["normalizer"] in ("bn", "sn"):
            values["batch_stat_error"] = error_percent(
                batch_statistics_accuracy(setup.model, data.x_test[:k], data.y_test[:k],
                                          min(s.gradient_batch, k)))  # fmt: skip
        if p["normalizer"] == "sn":
            values["importance"] = switchable_importance(setup.model)
            values["sn_bn_weight"] = {layer: w["mean"][2] for layer, w in values["importance"].items()}
        return values

    def claims(self, s):
        def fall(stat, what):
            return Claim(f"bn-share-falls-{stat}",
                         f"BN's weight in SN's {what}, batch {LARGE(s)} − batch {SMALL(s)} "
                         "(mean over layers)",
                         Published("falls as the batch shrinks (toward IN and LN)",
                                   "Luo et al. 2018, learned importance ratios", unverified=True),
                         per_seed(_share_fall(stat), f"BN's share of the {what} weights, large − small",
                                  arm="sn"),
                         above(0.0), fmt="+.3f")  # fmt: skip

        return [
            sn_vs_bn_claim(BATCH),
            Claim("sn-vs-best-small",
                  f"SN − the better of BN and GN at batch {SMALL(s)} (error points)",
                  Published("+0.3 at 2 per GPU (24.4 vs GN 24.1)", README, 0.3),
                  per_seed(_sn_minus_best_small, "SN error − min(BN, GN) error"),
                  below(0.5), fmt="+.2f"),
            fall("mean", "mean"), fall("var", "variance"),
        ]  # fmt: skip

    def figures(self, s):
        return [
            VersusSetting("error-vs-batch", "test_error", BATCH, "batch size", "test error (%)",
                          "Test error (eval mode) against the batch size. Right: the SN README's numbers "
                          "by images per GPU.", published=PUBLISHED,
                          published_title="SN README (ResNet-50, ImageNet, 8 GPUs)",
                          title=f"ours: small CNN, {s.train_examples} images"),
            Bars("sn-bn-weight", "sn_bn_weight", "weight of BN's mean (softmax)",
                 "Switchable Norm: the weight its layers give BN's mean, by batch size.",
                 by=BATCH, where={"arm": "sn"}, per_layer=True),
            Curves("bn-share", {"mean": "bn_share_mean", "variance": "bn_share_var"},
                   "BN's weight, mean over layers", "BN's weight in SN's mean and variance during "
                   f"training at batch {SMALL(s)} (1/3 at the start).", arms=["sn"],
                   where={BATCH: SMALL(s)}),
        ]  # fmt: skip

    def extra_section(self, results):
        return importance_section(results, BATCH, "sn")

    def deviations(self, s):
        return [
            f"The small CNN (conv{'-conv'.join(map(str, s.channels))}, fc{s.hidden}) on "
            f"{s.train_examples} images, {s.steps} updates of {s.gradient_batch} (SGD momentum "
            f"{s.momentum:g} at {s.lr:g}) normalized per B, one process; the README: ResNet-50 on "
            "ImageNet, 8 GPUs, a gradient batch of 8·B.",
            "No normalizer on the hidden fully connected layer" if not s.hidden_norm else
            "The SN network's hidden fully connected layer uses LN (IN needs spatial dims; the "
            "official code's SwitchNorm1d mixes LN and BN, which normkit does not offer).",
            "BN's part of SN uses an exponential running average in eval (the code's default "
            "averages the batch statistics after training).",
        ]  # fmt: skip
