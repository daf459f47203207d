"""Santurkar et al. (2018), §2.1 and Fig. 2: BN with "noisy" covariate shift injected still trains
as well as BN.

If BN helped by keeping the distribution of each layer's input stable, destroying that stability
should destroy the benefit. The paper injects noise with a non-zero mean and non-unit variance,
changing at every step, after each BN layer (before the nonlinearity): the noisy-BN network's layer
inputs are *less* stable than those of the network without BN, yet it trains almost exactly like
BN, and better than the network without BN. The same noise added to the network without BN
prevents it from training.

Here (docs/PROTOCOLS.md §3, CPU protocol 3a): the VGG-style CNN of :mod:`normkit.lab.mechanism`
on Fashion-MNIST, plain SGD, four networks: Standard (no BN), BN, noisy BN, and Standard with the
same noise, ``seeds`` seeds each (paired: a seed's networks see the same batches). Measured:

- training curves: the training loss as training sees it (noise included) per evaluation
  interval, and in eval mode (BN's running statistics, the noise at its expectation) the loss
  and accuracy on the first ``eval_examples`` training and test images; at the end, on the
  first ``final_train_examples`` training images and the whole test set;
- per layer, the 15th/50th/85th percentiles of one channel of the input to the ReLU (after BN and
  noise), over the training batch, every ``percentile_every`` training steps, from the training
  forward passes themselves (:class:`normkit.lab.metrics.ActivationPercentiles`);
- instability of a layer's input: the mean absolute change of those three percentiles between
  consecutive records (``percentile_every`` steps apart), averaged over training after step 0.

Decision: "trains like BN" is judged by the training loss the network reaches, measured in eval
mode at the end (the "clean" loss), because the loss as trained includes the noise's own damage,
which says nothing about what the network has learned; the loss as trained is reported beside it.

The noise (our concrete choice; the paper's distribution is not known to us, and every parameter
is a setting): per step and channel, mu_c ~ U(-1, 1) and s_c ~ U(1, 3); per element
y = x · N(s_c, 0.1²) + N(mu_c, 0.1²) (:class:`~normkit.lab.mechanism.TimeVaryingNoise`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from normkit.lab.claims import Claim, Published, above, below, difference, final, per_seed, ratio
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Curves, PercentileBands
from normkit.lab.mechanism import LABELS, PAPER, vgg
from normkit.lab.metrics import ActivationPercentiles
from normkit.lab.models import initialize, pre_activation
from normkit.lab.plan import Arm, Plan
from normkit.lab.render import Section, Table, fmt
from normkit.lab.settings import Settings

FIG2 = "Santurkar et al. 2018, Fig. 2"
ARMS = {
    "standard": {"norm": "none", "noise": False},
    "bn": {"norm": "batch", "noise": False},
    "noisy-bn": {"norm": "batch", "noise": True},
    "standard-noise": {"norm": "none", "noise": True},
}


@dataclass(frozen=True)
class NoisySettings(Settings):
    steps: int = 1_500
    batch_size: int = 128
    channels: tuple[int, ...] = (16, 32, 64)
    hidden: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.0
    noise_mean: float = 1.0  # mu_c ~ U(-noise_mean, noise_mean), per step and channel
    noise_scale_low: float = 1.0  # s_c ~ U(noise_scale_low, noise_scale_high)
    noise_scale_high: float = 3.0
    noise_jitter: float = 0.1  # per element: N(s_c, jitter²) and N(mu_c, jitter²)
    standard_noise: bool = True  # also train the Standard network with the same noise
    seeds: int = 2
    channel: int = 0  # the channel whose percentiles are recorded, in every layer
    percentile_every: int = 5
    percentile_layer: int = 3  # the layer whose percentiles the figure shows (Fig. 2, right)
    eval_every: int = 50
    eval_examples: int = 1_000  # training and test images for the curves
    final_train_examples: int = 10_000  # training images for the final clean training loss
    loss_tolerance: float = 0.10  # claim: noisy BN's final loss <= (1 + this) x BN's


@dataclass
class RecordingSetup(Setup):
    """A setup whose model has percentile hooks on the input of every ReLU."""

    recorder: ActivationPercentiles | None = None


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
    return {layer: instability(rows) for layer, rows in percentile_series(trial).items()}


def _least_instability_ratio(trials, results) -> float | None:
    """The smallest, over layers, of noisy BN's instability over Standard's."""
    by_arm = {t.params["arm"]: _instabilities(t) for t in trials}
    noisy, standard = by_arm.get("noisy-bn", {}), by_arm.get("standard", {})
    ratios = [noisy[k] / v for k, v in standard.items() if v and noisy.get(k) is not None]
    return min(ratios) if ratios else None


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
        "quick": {"steps": 300, "channels": (8, 16, 32), "hidden": 64, "eval_every": 25, "seeds": 1},
        "tiny": {"steps": 8, "channels": (4, 8), "hidden": 8, "batch_size": 16, "eval_every": 4,
                 "eval_examples": 50, "final_train_examples": 100, "percentile_every": 2, "seeds": 1},
    }  # fmt: skip

    def plan(self, s, data):
        arms = [Arm(k, {"network": k, **v}, LABELS[k]) for k, v in ARMS.items()
                if s.standard_noise or k != "standard-noise"]  # fmt: skip
        return Plan(arms, s.steps, seeds=s.seeds, seed=s.seed, eval_every=s.eval_every)

    def setup(self, trial, s, data, generator):
        noise = None
        if trial.params["noise"]:
            noise = {"mean_range": s.noise_mean, "scale_low": s.noise_scale_low,
                     "scale_high": s.noise_scale_high, "jitter": s.noise_jitter}  # fmt: skip
        model = vgg(data.sample_shape, s.channels, s.hidden, data.classes, norm=trial.params["norm"],
                    noise=noise)  # fmt: skip
        initialize(model, "he", generator)
        layers = len(s.channels) + 1
        recorder = ActivationPercentiles(
            {f"layer{i}": pre_activation(model, i) for i in range(1, layers + 1)},
            channel=s.channel, every=s.percentile_every,
        )  # fmt: skip
        optimizer = torch.optim.SGD(model.parameters(), lr=s.learning_rate, momentum=s.momentum)
        return RecordingSetup(model, optimizer, s.batch_size, recorder=recorder)

    def measure(self, trial, s, setup, data):
        """Eval-mode accuracy and loss on the first ``eval_examples`` training and test images;
        the percentiles recorded since the last evaluation (per layer rows [k, p15, p50, p85] for
        the k-th of the ``recorded_calls`` training steps since then), and the last record of
        layer ``percentile_layer`` as ``p15``, ``p50``, ``p85`` (the figure's)."""
        calls, records = setup.recorder.take()
        count = s.eval_examples
        accuracy, loss = accuracy_and_loss(setup.model, data.x_test[:count], data.y_test[:count])
        train_accuracy, train_loss = accuracy_and_loss(setup.model, data.x_train[:count],
                                                       data.y_train[:count])  # fmt: skip
        last = (records.get(f"layer{s.percentile_layer}") or [[None] * 4])[-1]
        return {"test_accuracy": accuracy, "test_loss": loss, "clean_train_accuracy": train_accuracy,
                "clean_train_loss": train_loss, "recorded_calls": calls, "percentiles": records,
                "p15": last[1], "p50": last[2], "p85": last[3]}  # fmt: skip

    def finish(self, trial, s, setup, data):
        """The whole test set, and the clean (eval-mode) training loss and accuracy on the first
        ``final_train_examples`` training images."""
        values = super().finish(trial, s, setup, data)
        count = s.final_train_examples
        accuracy, loss = accuracy_and_loss(setup.model, data.x_train[:count], data.y_train[:count])
        return {**values, "clean_train_accuracy": accuracy, "clean_train_loss": loss}

    def claims(self, s):
        loss = {arm: final("clean_train_loss", arm=arm) for arm in ARMS}
        claims = [
            Claim("like-bn", "clean training loss at the end, noisy BN / BN",
                  Published("noisy BN's curve nearly coincides with BN's", f"{FIG2} (left)",
                            unverified=True),
                  ratio(loss["noisy-bn"], loss["bn"]), below(1 + s.loss_tolerance), fmt=".3f"),
            Claim("beats-standard", "clean training loss at the end, noisy BN − Standard",
                  Published("noisy BN trains better than Standard", f"{FIG2} (left)", unverified=True),
                  difference(loss["noisy-bn"], loss["standard"]), below(0.0), fmt="+.4f"),
            Claim("less-stable", "least, over layers, of noisy BN's / Standard's input instability",
                  Published("noisy BN's layer inputs are less stable than Standard's", f"{FIG2} (right)",
                            unverified=True),
                  per_seed(_least_instability_ratio, "min over layers of the ratio of mean |Δ percentile|"),
                  above(1.0), fmt=".2f"),
        ]  # fmt: skip
        if s.standard_noise:
            claims.append(Claim(
                "noise-stops-standard", "Standard + noise: final test accuracy / chance",
                Published('the same noise "prevents it from training entirely"', f"{FIG2}; §2.1",
                          unverified=True),
                per_seed(_accuracy_over_chance, "test accuracy × classes (diverged: 1)",
                         arm="standard-noise"),
                below(1.5), fmt=".2f"))  # fmt: skip
        return claims

    def figures(self, s):
        return [
            Curves("training-loss", "train_loss", "training loss (noise on)",
                   "Fig. 2 (left): training loss as training sees it, mean over each interval.",
                   logy=True),
            Curves("test-accuracy", "test_accuracy", "test accuracy (fraction)",
                   f"Test accuracy in eval mode on the first {s.eval_examples} test images."),
            Curves("clean-training-loss", "clean_train_loss", "training loss, eval mode",
                   f"Training loss in eval mode on the first {s.eval_examples} training images: "
                   "what the networks have learned.", logy=True),
            PercentileBands("percentiles", "p15", "p50", "p85", f"ReLU input, layer {s.percentile_layer}",
                            f"Fig. 2 (right) as percentiles: the 15th, 50th and 85th percentiles of "
                            f"channel {s.channel} of layer {s.percentile_layer}'s ReLU input over the "
                            "training batch, at each evaluation step."),
        ]  # fmt: skip

    def extra_section(self, results):
        rows = []
        for arm in results.values("arm"):
            per_layer = [_instabilities(t) for t in results.trials(arm=arm)]
            cells = []
            for layer in per_layer[0] if per_layer else []:
                found = [p[layer] for p in per_layer if p[layer] is not None]
                cells.append(fmt(statistics.fmean(found), ".3f") if found else "–")
            rows.append([results.label(arm), *cells])
        headers = ["network", *(f"layer {i + 1}" for i in range(len(rows[0]) - 1 if rows else 0))]
        return Section("Instability of each layer's input", [Table(headers, rows, (
            f"Mean |change| of the 15/50/85th percentiles of channel {results.settings.channel} of each "
            f"layer's ReLU input between records {results.settings.percentile_every} steps apart, "
            "mean over seeds."))])  # fmt: skip

    def deviations(self, s):
        return [
            f"A VGG-style CNN (conv{'-conv'.join(map(str, s.channels))}, fc{s.hidden}, 3×3 "
            f"convolutions) on {'Fashion-MNIST' if s.dataset == 'auto' else s.dataset} instead of VGG on "
            f"CIFAR-10; {s.steps} steps of plain SGD at {s.learning_rate:g} (momentum {s.momentum:g}), "
            f"batch {s.batch_size}.",
            f"The noise distribution is ours (the paper's is not given): per step and channel mu ~ "
            f"U(±{s.noise_mean:g}), s ~ U({s.noise_scale_low:g}, {s.noise_scale_high:g}); per element "
            f"y = x·N(s, {s.noise_jitter:g}²) + N(mu, {s.noise_jitter:g}²); in eval mode its expectation, "
            f"y = x·{(s.noise_scale_low + s.noise_scale_high) / 2:g}.",
            "Distributions are shown as three percentiles of one channel per layer, not as histograms; "
            "stability is summarized by the mean change of those percentiles.",
        ]  # fmt: skip
