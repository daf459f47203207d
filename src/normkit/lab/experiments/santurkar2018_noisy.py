"""Santurkar et al. (2018), §2.1 and Fig. 2: BN with "noisy" covariate shift still trains like BN.

If BN helped by keeping each layer's input distribution stable, destroying that stability should
destroy the benefit. The paper injects noise of non-zero mean and non-unit variance, changing at
every step, after each BN layer: the noisy-BN network's layer inputs are *less* stable than those of
the network without BN, yet it trains almost exactly like BN and better than the network without
BN; the same noise added to the network without BN prevents it from training.

Here (docs/PROTOCOLS.md §3, CPU protocol 3a): the VGG-style CNN of :mod:`normkit.lab.mechanism`
on Fashion-MNIST, plain SGD, four networks: Standard, BN, noisy BN, and Standard with the same
noise, ``seeds`` seeds each (paired: a seed's networks see the same batches). Measured: the
training loss as trained; accuracy and loss on ``eval_examples`` training and test images (at the
end: ``final_train_examples`` and the test set) in eval mode *with the noise on*, the mean of
``noise_draws`` draws; per layer, the 15/50/85th percentiles of one channel of the ReLU's input
over the training batch every ``percentile_every`` steps, and its instability: the mean |change| of
those percentiles between consecutive records.

Decisions (issue 17): the networks are evaluated as they were trained, noise on (its expectation,
y = 2x, ignores how the shift interacts with the ReLU: another network); the claims read the
test-accuracy curves, as the paper compares curves: per seed the mean over the evaluations after
step 0, noisy BN within ``accuracy_margin`` of BN ("almost exactly like BN") and above Standard.
The noise is ours (the paper's is not given): see the deviations and
:class:`~normkit.lab.mechanism.TimeVaryingNoise`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from normkit.lab import mechanism
from normkit.lab.claims import Claim, Published, above, below, difference, from_curve, per_seed
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Curves, PercentileBands
from normkit.lab.mechanism import LABELS, PAPER, noisy_accuracy_and_loss
from normkit.lab.metrics import ActivationPercentiles
from normkit.lab.models import initialize, pre_activation
from normkit.lab.plan import Arm, Plan
from normkit.lab.render import Section, Table, fmt
from normkit.lab.seeds import derived_seed

FIG2 = "Santurkar et al. 2018, Fig. 2"
ARMS = {"standard": {"norm": "none", "noise": False}, "bn": {"norm": "batch", "noise": False},
        "noisy-bn": {"norm": "batch", "noise": True}, "standard-noise": {"norm": "none", "noise": True}}


@dataclass(frozen=True)
class NoisySettings(mechanism.NetworkSettings):
    noise_mean: float = 1.0  # mu_c ~ U(-noise_mean, noise_mean), s_c ~ U(scale_low, scale_high)
    noise_scale_low: float = 1.0
    noise_scale_high: float = 3.0
    noise_jitter: float = 0.1  # per element: N(s_c, jitter²) and N(mu_c, jitter²)
    standard_noise: bool = True  # also train the Standard network with the same noise
    seeds: int = 4
    noise_draws: int = 4  # evaluation with the noise on: the mean over this many draws
    channel: int = 0  # the channel whose percentiles are recorded, in every layer
    percentile_every: int = 5
    percentile_layer: int = 3  # the layer whose percentiles the figure shows (Fig. 2, right)
    eval_every: int = 50
    eval_examples: int = 1_000  # training and test images for the curves
    final_train_examples: int = 10_000  # training images for the final row
    accuracy_margin: float = 0.02  # claim: noisy BN's mean test accuracy > BN's - this


@dataclass
class RecordingSetup(Setup):
    recorder: ActivationPercentiles | None = None  # percentile hooks on the input of every ReLU


def percentile_series(trial) -> dict[str, list[list[float]]]:
    """Per layer, the rows [step, p15, p50, p85] of one trial, on the training-step axis."""
    series: dict[str, list[list[float]]] = {}
    for row in trial.curve:
        start = row["step"] - row["recorded_calls"]
        for layer, entries in row["percentiles"].items():
            series.setdefault(layer, []).extend([start + e[0], *e[1:]] for e in entries)
    return series


def instability(series: list[list[float]]) -> float | None:
    """Mean |change| of the recorded percentiles between consecutive records (records of a
    network that overflowed, None in the JSON, are left out)."""
    changes = [abs(b[q] - a[q]) for a, b in zip(series, series[1:], strict=False) for q in (1, 2, 3)
               if a[q] is not None and b[q] is not None]  # fmt: skip
    return sum(changes) / len(changes) if changes else None


def _instabilities(trial) -> dict[str, float | None]:
    return {k: instability(rows) for k, rows in percentile_series(trial).items()}


def _least_instability_ratio(trials, results) -> float | None:
    """The smallest, over layers, of noisy BN's instability over Standard's."""
    by_arm = {t.params["arm"]: _instabilities(t) for t in trials}
    noisy, standard = by_arm.get("noisy-bn", {}), by_arm.get("standard", {})
    ratios = [noisy[k] / v for k, v in standard.items() if v and noisy.get(k) is not None]
    return min(ratios) if ratios else None


def _evaluate(trial, s, setup, data, test: int, train: int) -> dict:
    """Eval-mode accuracy and loss with the noise on, the mean of ``noise_draws`` draws seeded by
    the trial's seed and step, on the first ``test`` test and ``train`` training images."""
    model, seed, draws = setup.model, derived_seed(trial.seed, 5, setup.step, 0), s.noise_draws
    test_values = noisy_accuracy_and_loss(model, data.x_test[:test], data.y_test[:test], draws, seed)
    train_values = noisy_accuracy_and_loss(model, data.x_train[:train], data.y_train[:train], draws, seed ^ 1)
    return dict(zip(("test_accuracy", "test_loss", "train_accuracy", "train_eval_loss"),
                    (*test_values, *train_values), strict=True))  # fmt: skip


def _after_start(steps, values) -> float | None:
    """The mean of a curve over its evaluations after step 0 (the area under it, per step)."""
    found = [v for step, v in zip(steps, values, strict=True) if step > 0]
    return statistics.fmean(found) if found else None


def _accuracy_over_chance(trials, results) -> float | None:
    """Standard + noise's final test accuracy in multiples of chance (a diverged network: 1)."""
    trial = results.one(trials, "standard-noise")
    if trial.final["diverged"]:
        return 1.0
    return trial.final["test_accuracy"] * results.record.config["data"]["classes"]


@register
class Santurkar2018Noisy(Experiment):
    name = "santurkar2018-noisy"
    title = "Noisy BatchNorm: distributional stability is not what BN provides (Fig. 2)"
    paper = f"{PAPER}, §2.1 and Fig. 2"
    claim = (
        "BN with time-varying noise of non-zero mean and non-unit variance injected after every BN "
        "layer trains almost exactly like BN and better than the network without BN, although its "
        "layer inputs are less stable than those of the network without BN; the same noise "
        "prevents the network without BN from training."
    )
    settings_class = NoisySettings
    presets = {
        "quick": {"steps": 300, "channels": (8, 16, 32), "hidden": 64, "eval_every": 25, "seeds": 2,
                  "noise_draws": 2, "final_train_examples": 2_000},
        "tiny": {"steps": 8, "channels": (4, 8), "hidden": 8, "batch_size": 16, "eval_every": 4,
                 "eval_examples": 50, "final_train_examples": 100, "percentile_every": 2, "seeds": 1,
                 "noise_draws": 2},
        "gpu": {"dataset": "cifar10", "vgg": "11", "hidden": 512, "steps": 15_640, "eval_every": 391,
                "seeds": 3, "percentile_every": 20, "eval_examples": 2_000},  # 40 epochs at batch 128
    }  # fmt: skip

    def plan(self, s, data):
        arms = [Arm(k, {"network": k, **v}, LABELS[k]) for k, v in ARMS.items()
                if s.standard_noise or k != "standard-noise"]  # fmt: skip
        return Plan(arms, s.steps, seeds=s.seeds, seed=s.seed, eval_every=s.eval_every)

    def setup(self, trial, s, data, generator):
        noise = {"mean_range": s.noise_mean, "scale_low": s.noise_scale_low, "scale_high": s.noise_scale_high,
                 "jitter": s.noise_jitter} if trial.params["noise"] else None  # fmt: skip
        model = mechanism.network(s, data.sample_shape, data.classes, trial.params["norm"], noise)
        initialize(model, "he", generator)
        recorder = ActivationPercentiles(  # every conv layer and the fc layer
            {f"layer{i}": pre_activation(model, i) for i in range(1, mechanism.conv_layers(s) + 2)},
            channel=s.channel, every=s.percentile_every,
        )  # fmt: skip
        optimizer = torch.optim.SGD(model.parameters(), lr=s.learning_rate, momentum=s.momentum)
        return RecordingSetup(model, optimizer, s.batch_size, recorder=recorder)

    def measure(self, trial, s, setup, data):
        """:func:`_evaluate` on ``eval_examples`` images; the percentiles recorded since the last
        evaluation (per layer rows [k, p15, p50, p85], k counting the ``recorded_calls`` steps since
        then), and the last record of layer ``percentile_layer`` as ``p15``, ``p50``, ``p85``."""
        calls, records = setup.recorder.take()
        last = (records.get(f"layer{s.percentile_layer}") or [[None] * 4])[-1]
        return {**_evaluate(trial, s, setup, data, s.eval_examples, s.eval_examples), "recorded_calls": calls,
                "percentiles": records, "p15": last[1], "p50": last[2], "p85": last[3]}  # fmt: skip

    def finish(self, trial, s, setup, data):
        """The whole test set and the first ``final_train_examples`` training images, noise on."""
        return _evaluate(trial, s, setup, data, len(data.y_test), s.final_train_examples)

    def claims(self, s):
        accuracy = {arm: from_curve(_after_start, "test_accuracy", "mean over the evaluations after step 0",
                                    arm=arm) for arm in ARMS}  # fmt: skip
        curve = "mean test accuracy over the curve (noise on)"
        claims = [
            Claim("like-bn", f"{curve}, noisy BN − BN",
                  Published("noisy BN's curve nearly coincides with BN's", f"{FIG2} (left)",
                            unverified=True),
                  difference(accuracy["noisy-bn"], accuracy["bn"]), above(-s.accuracy_margin), fmt="+.4f"),
            Claim("beats-standard", f"{curve}, noisy BN − Standard",
                  Published("noisy BN trains better than Standard", f"{FIG2} (left)", unverified=True),
                  difference(accuracy["noisy-bn"], accuracy["standard"]), above(0.0), fmt="+.4f"),
            Claim("less-stable", "least, over layers, of noisy BN's / Standard's input instability",
                  Published("noisy BN's layer inputs are less stable than Standard's", f"{FIG2} (right)",
                            unverified=True),
                  per_seed(_least_instability_ratio, "least layer ratio of mean |Δ percentile|", ratio=True),
                  above(1.0), fmt=".2f"),
        ]  # fmt: skip
        return claims + [Claim(
            "noise-stops-standard", "Standard + noise: final test accuracy / chance",
            Published('the same noise "prevents it from training entirely"', f"{FIG2}; §2.1",
                      unverified=True),
            per_seed(_accuracy_over_chance, "test accuracy × classes (diverged: 1)", arm="standard-noise"),
            below(1.5), fmt=".2f")] if s.standard_noise else []  # fmt: skip

    def figures(self, s):
        return [
            Curves("training-loss", "train_loss", "training loss (noise on)",
                   "Fig. 2 (left): training loss as training sees it, mean over each interval.",
                   logy=True),
            Curves("test-accuracy", "test_accuracy", "test accuracy (fraction)",
                   f"Test accuracy in eval mode, noise on (mean of {s.noise_draws} draws), on the first "
                   f"{s.eval_examples} test images: what the claims read."),
            Curves("training-accuracy", "train_accuracy", "training accuracy (fraction)",
                   f"Training accuracy, the same way, on the first {s.eval_examples} training images."),
            PercentileBands("percentiles", "p15", "p50", "p85", f"ReLU input, layer {s.percentile_layer}",
                            f"Fig. 2 (right) as percentiles: the 15th, 50th and 85th percentiles of "
                            f"channel {s.channel} of layer {s.percentile_layer}'s ReLU input over the "
                            "training batch, at each evaluation step."),
        ]  # fmt: skip

    def extra_section(self, results):
        rows = []
        for arm in results.values("arm"):
            seeds = [_instabilities(t) for t in results.trials(arm=arm)]
            found = [[p[k] for p in seeds if p[k] is not None] for k in seeds[0]]
            rows.append([results.label(arm), *(fmt(statistics.fmean(f) if f else None, ".3f")
                                               for f in found)])  # fmt: skip
        headers = ["network", *(f"layer {i + 1}" for i in range(len(rows[0]) - 1 if rows else 0))]
        return Section("Instability of each layer's input", [Table(headers, rows, (
            f"Mean |change| of the 15/50/85th percentiles of channel {results.settings.channel} of each "
            f"layer's ReLU input between records {results.settings.percentile_every} steps apart, "
            "mean over seeds."))])  # fmt: skip

    def deviations(self, s):
        return [
            f"{mechanism.describe(s)}; {s.steps} steps of SGD at {s.learning_rate:g} (momentum "
            f"{s.momentum:g}), batch {s.batch_size}.",
            f"The noise distribution is ours (the paper's is not given): per step and channel mu ~ "
            f"U(±{s.noise_mean:g}), s ~ U({s.noise_scale_low:g}, {s.noise_scale_high:g}); per element "
            f"y = x·N(s, {s.noise_jitter:g}²) + N(mu, {s.noise_jitter:g}²); evaluated with it on "
            f"(the mean of {s.noise_draws} draws).",
            "Distributions are shown as three percentiles of one channel per layer, not as histograms; "
            "stability is summarized by the mean change of those percentiles.",
        ]  # fmt: skip
