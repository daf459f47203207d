"""Santurkar et al. (2018), §2.1 and Fig. 2: BN with "noisy" covariate shift injected still trains
as well as BN.

If BN helped by keeping the distribution of each layer's input stable, destroying that stability
should destroy the benefit. The paper injects noise with a non-zero mean and non-unit variance,
changing at every step, after each BN layer (before the nonlinearity): the noisy-BN network's layer
inputs are *less* stable than those of the network without BN, yet it trains almost exactly like
BN, and better than the network without BN. The same noise added to the network without BN
prevents it from training.

Here (docs/PROTOCOLS.md §3, CPU protocol 3a): the VGG-style CNN of
:mod:`santurkar2018_common` on Fashion-MNIST, plain SGD, four networks: Standard (no BN), BN,
noisy BN, and Standard with the same noise. Measured:

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
y = x · N(s_c, 0.1²) + N(mu_c, 0.1²) (:class:`~santurkar2018_common.TimeVaryingNoise`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.lab.datasets import Dataset
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.experiments.santurkar2018_common import LABELS, PAPER, mean, vgg
from normkit.lab.legacy import Experiment, Settings, Setup, register, seeded_trials
from normkit.lab.metrics import ActivationPercentiles
from normkit.lab.models import initialize, pre_activation
from normkit.lab.plots import curves
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure

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
    eval_every: int = 50
    eval_examples: int = 1_000  # training and test images for the curves
    final_train_examples: int = 10_000  # training images for the final clean training loss
    tail: float = 0.2  # "final" training loss: the mean over the last 20% of the steps
    loss_tolerance: float = 0.10  # check: noisy BN's final loss <= (1 + this) x BN's


@dataclass
class RecordingSetup(Setup):
    """A setup whose model has percentile hooks on the input of every ReLU."""

    recorder: ActivationPercentiles | None = None


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
        "quick": {
            "steps": 300,
            "channels": (8, 16, 32),
            "hidden": 64,
            "eval_every": 25,
            "seeds": 1,
        },
        "tiny": {
            "steps": 8,
            "channels": (4, 8),
            "hidden": 8,
            "batch_size": 16,
            "eval_every": 4,
            "eval_examples": 50,
            "final_train_examples": 100,
            "percentile_every": 2,
            "seeds": 1,
        },
    }

    def trials(self, settings, data, finals):
        arms = {k: {"network": k, **v} for k, v in ARMS.items()}
        if not settings.standard_noise:
            del arms["standard-noise"]
        return seeded_trials(arms, settings, settings.seeds)

    def setup(self, trial, settings, data, generator):
        noise = None
        if trial.params["noise"]:
            noise = {
                "mean_range": settings.noise_mean,
                "scale_low": settings.noise_scale_low,
                "scale_high": settings.noise_scale_high,
                "jitter": settings.noise_jitter,
            }
        model = vgg(
            data.sample_shape,
            settings.channels,
            settings.hidden,
            data.classes,
            norm=trial.params["norm"],
            noise=noise,
        )
        initialize(model, "he", generator)
        layers = len(settings.channels) + 1
        recorder = ActivationPercentiles(
            {f"layer{i}": pre_activation(model, i) for i in range(1, layers + 1)},
            channel=settings.channel,
            every=settings.percentile_every,
        )
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
        return RecordingSetup(model, optimizer, settings.batch_size, recorder=recorder)

    def measure(self, trial, settings, setup: RecordingSetup, data: Dataset) -> dict:
        """Eval-mode accuracy and loss on the first ``eval_examples`` training and test images,
        and the percentiles recorded since the last evaluation: per layer rows [k, p15, p50, p85]
        for the k-th of the ``recorded_calls`` training steps since then (placed on the step axis
        by :meth:`percentile_series`)."""
        calls, records = setup.recorder.take()
        count = settings.eval_examples
        accuracy, loss = accuracy_and_loss(setup.model, data.x_test[:count], data.y_test[:count])
        train_accuracy, train_loss = accuracy_and_loss(
            setup.model, data.x_train[:count], data.y_train[:count]
        )
        return {
            "test_accuracy": accuracy,
            "test_loss": loss,
            "clean_train_accuracy": train_accuracy,
            "clean_train_loss": train_loss,
            "recorded_calls": calls,
            "percentiles": records,
        }

    def finish(self, trial, settings, setup, data) -> dict:
        """The whole test set, and the clean (eval-mode) training loss and accuracy on the first
        ``final_train_examples`` training images."""
        values = super().finish(trial, settings, setup, data)
        count = settings.final_train_examples
        accuracy, loss = accuracy_and_loss(setup.model, data.x_train[:count], data.y_train[:count])
        return {**values, "clean_train_accuracy": accuracy, "clean_train_loss": loss}

    # -- meaning -------------------------------------------------------------------------------
    @staticmethod
    def percentile_series(record: RunRecord, key: str) -> dict[str, list[list[float]]]:
        """Per layer, the rows [step, p15, p50, p85] of one trial, on the training-step axis."""
        series: dict[str, list[list[float]]] = {}
        for row in record.curve(key):
            start = row["step"] - row["recorded_calls"]
            for layer, entries in row["percentiles"].items():
                series.setdefault(layer, []).extend([start + e[0], *e[1:]] for e in entries)
        return series

    @staticmethod
    def instability(series: list[list[float]]) -> float | None:
        """Mean |change| of the recorded percentiles between consecutive records (records of a
        network that overflowed, None in the JSON, are left out)."""
        changes = [
            abs(b[q] - a[q])
            for a, b in zip(series, series[1:], strict=False)
            for q in (1, 2, 3)
            if a[q] is not None and b[q] is not None
        ]
        return sum(changes) / len(changes) if changes else None

    @staticmethod
    def median_range(series: list[list[float]]) -> float | None:
        """max - min of the recorded medians over training."""
        medians = [r[2] for r in series if r[2] is not None]
        return max(medians) - min(medians) if medians else None

    def summarize(self, record: RunRecord) -> dict:
        settings = record.settings
        finals = record.finals()
        arms: dict[str, dict] = {}
        for key, final in finals.items():
            rows = record.curve(key)
            tail_from = final["step"] * (1 - settings["tail"])
            tail = [r["train_loss"] for r in rows if r["step"] > tail_from and r["step"] > 0]
            series = self.percentile_series(record, key)
            arm = arms.setdefault(final["network"], {"seeds": []})
            arm["seeds"].append(
                {
                    "seed": final["replicate"],
                    "final_train_loss": mean(tail),
                    "clean_train_loss": final.get("clean_train_loss"),
                    "clean_train_accuracy": final.get("clean_train_accuracy"),
                    "test_accuracy": final["test_accuracy"],
                    "diverged": final["diverged"],
                    "instability": {k: self.instability(v) for k, v in series.items()},
                    "median_range": {k: self.median_range(v) for k, v in series.items()},
                }
            )
        for arm in arms.values():
            seeds = arm["seeds"]
            arm["final_train_loss"] = mean(s["final_train_loss"] for s in seeds)
            arm["clean_train_loss"] = mean(s["clean_train_loss"] for s in seeds)
            arm["clean_train_accuracy"] = mean(s["clean_train_accuracy"] for s in seeds)
            arm["test_accuracy"] = mean(s["test_accuracy"] for s in seeds)
            arm["diverged"] = sum(bool(s["diverged"]) for s in seeds)
            layers = seeds[0]["instability"]
            arm["instability"] = {k: mean(s["instability"][k] for s in seeds) for k in layers}
            arm["median_range"] = {k: mean(s["median_range"][k] for s in seeds) for k in layers}
        loss = {k: a["clean_train_loss"] for k, a in arms.items()}
        checks = {}
        if loss.get("bn") and loss.get("noisy-bn") is not None:
            checks["noisy_bn_loss_close_to_bn"] = loss["noisy-bn"] <= loss["bn"] * (
                1 + settings["loss_tolerance"]
            )
            checks["noisy_bn_loss_below_standard"] = (
                loss["standard"] is not None and loss["noisy-bn"] < loss["standard"]
            )
            checks["noisy_bn_less_stable_than_standard"] = all(
                (arms["noisy-bn"]["instability"][k] or 0)
                > (arms["standard"]["instability"][k] or 0)
                for k in arms["standard"]["instability"]
            )
        if "standard-noise" in arms:
            chance = 1.0 / record.config["data"]["classes"]
            noisy_standard = arms["standard-noise"]
            checks["noise_stops_standard"] = bool(
                noisy_standard["diverged"] or (noisy_standard["test_accuracy"] or 0) < 1.5 * chance
            )
        return {"arms": arms, "checks": checks}

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        arms, checks = s["arms"], s["checks"]
        data = record.config["data"]["name"]

        def loss_of(key, which="clean_train_loss"):
            return fmt(arms.get(key, {}).get(which), ".4f")

        def ratio(a, b, which="clean_train_loss"):
            x, y = arms.get(a, {}).get(which), arms.get(b, {}).get(which)
            return None if x is None or not y else x / y

        def losses(a, b):
            return (
                f"clean training loss {loss_of(a)} vs {loss_of(b)} (×{fmt(ratio(a, b), '.2f')}); "
                f"as trained {loss_of(a, 'final_train_loss')} vs "
                f"{loss_of(b, 'final_train_loss')}; test accuracy "
                f"{fmt(arms[a]['test_accuracy'])} vs {fmt(arms[b]['test_accuracy'])}"
            )

        layers = list(arms["standard"]["instability"])
        instability = {
            k: " / ".join(fmt(arms[k]["instability"][layer], ".3f") for layer in layers)
            for k in arms
        }
        factor = [
            arms["noisy-bn"]["instability"][layer] / arms["standard"]["instability"][layer]
            for layer in layers
            if arms["noisy-bn"]["instability"][layer] and arms["standard"]["instability"][layer]
        ]
        comparison = Table(
            ["claim", "published (VGG, CIFAR-10)", f"ours (small VGG, {data})", "agrees?"],
            [
                [
                    "noisy BN trains almost exactly like BN",
                    "curves nearly coincide (Fig. 2, left)",
                    losses("noisy-bn", "bn"),
                    f"within {settings['loss_tolerance']:.0%}: "
                    + fmt(checks.get("noisy_bn_loss_close_to_bn")),
                ],
                [
                    "noisy BN trains better than Standard",
                    "yes (Fig. 2, left)",
                    losses("noisy-bn", "standard"),
                    fmt(checks.get("noisy_bn_loss_below_standard")),
                ],
                [
                    "noisy BN's layer inputs are less stable than Standard's",
                    "yes (Fig. 2, right; Fig. 7)",
                    f"mean |Δ percentile| per {settings['percentile_every']} steps, layers "
                    f"1–{len(layers)}: noisy BN {instability['noisy-bn']}, Standard "
                    f"{instability['standard']} (noisy BN ×{fmt(min(factor, default=None), '.1f')}"
                    f"–{fmt(max(factor, default=None), '.1f')})",
                    fmt(checks.get("noisy_bn_less_stable_than_standard")),
                ],
                [
                    "the same noise stops the Standard network from training",
                    '"prevents it from training entirely"',
                    "not run"
                    if "standard-noise" not in arms
                    else (
                        f"training loss as trained {loss_of('standard-noise', 'final_train_loss')}"
                        f", test accuracy "
                        f"{fmt(arms['standard-noise']['test_accuracy'])}"
                        + (
                            f", diverged in {arms['standard-noise']['diverged']} of "
                            f"{len(arms['standard-noise']['seeds'])} seeds"
                            if arms["standard-noise"]["diverged"]
                            else ""
                        )
                    ),
                    "near chance or diverged: " + fmt(checks.get("noise_stops_standard")),
                ],
            ],
        )
        report_checks = [
            Check(
                f"(a) noisy BN's clean training loss ≤ {1 + settings['loss_tolerance']:g} × BN's",
                checks.get("noisy_bn_loss_close_to_bn"),
                f"{loss_of('noisy-bn')} vs {loss_of('bn')}",
            ),
            Check(
                "(b) noisy BN's clean training loss < Standard's",
                checks.get("noisy_bn_loss_below_standard"),
                f"{loss_of('noisy-bn')} vs {loss_of('standard')}",
            ),
            Check(
                "(c) noisy BN's layer inputs less stable than Standard's, every layer",
                checks.get("noisy_bn_less_stable_than_standard"),
                f"{instability['noisy-bn']} vs {instability['standard']}",
            ),
        ]
        table = Table(
            [
                "network",
                "training loss as trained",
                "clean training loss",
                "clean training accuracy",
                "test accuracy",
                "diverged",
                "instability per layer",
                "median range per layer",
            ],
            [
                [
                    LABELS[k],
                    fmt(a["final_train_loss"], ".4f"),
                    fmt(a["clean_train_loss"], ".4f"),
                    fmt(a["clean_train_accuracy"]),
                    fmt(a["test_accuracy"]),
                    f"{a['diverged']} of {len(a['seeds'])}",
                    instability[k],
                    " / ".join(fmt(a["median_range"][layer], ".2f") for layer in layers),
                ]
                for k, a in arms.items()
            ],
            f"Training loss as trained: mean over the last {settings['tail']:.0%} of the steps, "
            "noise on; clean: eval mode (BN's running statistics, the noise at its expectation) "
            f"at the end, first {settings['final_train_examples']} training images; "
            f"instability: mean |change| of the 15/50/85th percentiles of channel "
            f"{settings['channel']} of each layer's ReLU input between records "
            f"{settings['percentile_every']} steps apart; median range: max − min of the median "
            "over training. Means over seeds.",
        )
        keys = [f"{k}/seed=0" for k in arms]
        figures = [
            Figure(
                "training-loss",
                curves(
                    record,
                    [(k, LABELS[k.split("/")[0]]) for k in keys],
                    "train_loss",
                    "training loss (mean over the interval)",
                    "training loss (as trained: noise on)",
                    logy=True,
                ),
                "Fig. 2 (left): training loss against steps (seed 0).",
            ),
            Figure(
                "test-accuracy",
                curves(
                    record,
                    [(k, LABELS[k.split("/")[0]]) for k in keys],
                    "test_accuracy",
                    "test accuracy (fraction)",
                    f"test accuracy, eval mode, first {settings['eval_examples']} test images",
                ),
                "Test accuracy in eval mode (BN's running statistics, the noise at its expectation) "
                "against steps (seed 0).",
            ),
            Figure(
                "clean-training-loss",
                curves(
                    record,
                    [(k, LABELS[k.split("/")[0]]) for k in keys],
                    "clean_train_loss",
                    "training loss, eval mode",
                    f"clean training loss, first {settings['eval_examples']} training images",
                    logy=True,
                ),
                "Training loss in eval mode (BN's running statistics, the noise at its "
                "expectation) against steps (seed 0): what the networks have learned.",
            ),
            Figure(
                "percentiles",
                self._percentile_figure(record, keys),
                f"Fig. 2 (right) as percentiles: the 15th, 50th and 85th percentiles of channel "
                f"{settings['channel']} of each layer's ReLU input over the training batch "
                "(rows: networks; columns: layers; seed 0).",
            ),
        ]
        deviations = [
            f"A VGG-style CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, "
            f"fc{settings['hidden']}, 3×3 convolutions) on {data} instead of VGG on CIFAR-10; "
            f"{settings['steps']} steps of plain SGD at {settings['learning_rate']:g} "
            f"(momentum {settings['momentum']:g}), batch {settings['batch_size']}.",
            f"The noise distribution is ours (the paper's is not given): per step and channel "
            f"mu ~ U(±{settings['noise_mean']:g}), s ~ U({settings['noise_scale_low']:g}, "
            f"{settings['noise_scale_high']:g}); per element y = x·N(s, {settings['noise_jitter']:g}²) "
            f"+ N(mu, {settings['noise_jitter']:g}²); in eval mode its expectation, y = x·"
            f"{(settings['noise_scale_low'] + settings['noise_scale_high']) / 2:g}.",
            "Distributions are shown as three percentiles of one channel per layer, not as "
            "histograms; stability is summarized by the mean change of those percentiles.",
        ]
        headline = (
            f"clean training loss: noisy BN {loss_of('noisy-bn')}, BN {loss_of('bn')}, Standard "
            f"{loss_of('standard')}"
            + (
                "; Standard + noise "
                + ("diverged" if arms["standard-noise"]["diverged"] else loss_of("standard-noise"))
                if "standard-noise" in arms
                else ""
            )
            + f"; noisy BN's inputs {fmt(min(factor, default=None), '.1f')}–"
            f"{fmt(max(factor, default=None), '.1f')}× less stable than Standard's"
        )
        return Report(
            comparison,
            [Section("All networks", [table]), Section("Figures", figures)],
            report_checks,
            deviations,
            headline,
        )

    def _percentile_figure(self, record: RunRecord, keys: list[str]):
        series = {k: self.percentile_series(record, k) for k in keys}
        layers = list(series[keys[0]])
        figure = new_figure(2.6 * len(layers), 1.9 * len(keys))
        axes = figure.subplots(len(keys), len(layers), sharex=True, squeeze=False)
        for row, key in enumerate(keys):
            for column, layer in enumerate(layers):
                ax = axes[row][column]
                points = series[key][layer]
                steps = [p[0] for p in points]
                for q, style in ((1, "--"), (2, "-"), (3, ":")):
                    ax.plot(steps, [p[q] for p in points], style, color=f"C{row}", linewidth=0.8)
                if row == 0:
                    ax.set_title(layer)
                if column == 0:
                    ax.set_ylabel(LABELS[key.split("/")[0]], fontsize="small")
                if row == len(keys) - 1:
                    ax.set_xlabel("step")
                ax.grid(alpha=0.3)
        return figure
