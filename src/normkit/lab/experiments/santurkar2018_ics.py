"""Santurkar et al. (2018), §2.2 and Fig. 3: BN does not reduce internal covariate shift, measured
as the change of a layer's gradient when the layers before it update first.

The paper measures ICS (Definition 2.1, :func:`normkit.lab.metrics.ics`) over training, for VGG on
CIFAR-10 and for a 25-layer deep linear network (DLN) on synthetic Gaussian data: networks with BN
show similar or even *larger* ICS (a larger ℓ2 difference, a cosine further from 1) than those
without, although they train faster.

Here (docs/PROTOCOLS.md §3, CPU protocol 3b), two pairs of networks, Standard and BN:

- ``cnn-*``: the VGG-style CNN of :mod:`santurkar2018_common` on the run's data set (Fashion-MNIST
  by default), plain SGD, cross-entropy;
- ``dln-*``: a deep linear network (``dln_depth`` layers of width ``dln_width``, Xavier-normal
  weights; BN after every layer but the last) trained by full-batch gradient descent on the mean
  squared error of synthetic Gaussian regression (x ~ N(0, I), y = A x + 0.1 ε).

Every ``eval_every`` steps (step 0 included) ICS is measured on a probe batch of ``batch_size``
training examples drawn for that step (the whole training set for the DLN, i.e. its full batch),
with the trial's own optimizer, for every Conv/Linear layer (BN's γ and β are among "the layers
before", and move with them, but are not reported). The measurement restores model and optimizer
bit for bit, so the trajectory is the one training takes without it. Reported per layer: the median
over the evaluations after step 0 (at initialization the networks are in a transient) of
||G - G'||_2 (the paper's ICS), cos(G, G') and ||G - G'|| / ||G||, averaged over seeds. Medians,
because ICS comes in spikes (a Standard network near the edge of stability has a few evaluations
with ICS 100× its usual value) that would decide a mean on their own. A caveat the paper also
makes (Fig. 3): a network that has converged has G ≈ 0 and so ||G - G'|| ≈ 0; BN converging
faster makes its *absolute* ICS small late in training, which is why the scale-free cosine and
relative difference are reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.experiments.santurkar2018_common import (
    PAPER,
    deep_linear,
    gaussian_regression,
    initialize_deep_linear,
    mean,
    probe_batch,
    vgg,
)
from normkit.lab.legacy import Experiment, Settings, Setup, Trial, register
from normkit.lab.metrics import ics
from normkit.lab.models import initialize
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure

NETWORKS = {"standard": "Standard", "bn": "Standard + BatchNorm"}


@dataclass(frozen=True)
class IcsSettings(Settings):
    steps: int = 1_500
    batch_size: int = 128
    channels: tuple[int, ...] = (16, 32, 64)
    hidden: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.0
    eval_every: int = 50  # ICS is measured at every evaluation
    eval_examples: int = 1_000  # test images for the accuracy curve
    plot_layers: tuple[str, ...] = ("conv2", "conv3")  # Fig. 3's two panels for the CNN
    seeds: int = 2
    dln: bool = True
    dln_depth: int = 25
    dln_width: int = 32
    dln_outputs: int = 1
    dln_samples: int = 1_024
    dln_noise: float = 0.1
    dln_learning_rate: float = 1e-3  # full-batch GD; the Standard DLN diverges at 1e-2
    dln_steps: int = 1_000
    dln_eval_every: int = 20
    dln_plot_layers: tuple[str, ...] = ("linear13", "linear23")
    tail: float = 0.2  # "final" training loss: the mean over the last 20% of the steps
    similar_within: float = 0.2  # BN's ICS counts as "similar" down to (1 - this) x Standard's


def _cnn_layers(settings) -> list[str]:
    return [f"conv{i + 1}" for i in range(len(settings.channels))] + [
        f"linear{len(settings.channels) + 1}",
        "output",
    ]


@register
class Santurkar2018Ics(Experiment):
    name = "santurkar2018-ics"
    title = "Internal covariate shift with and without BN (Fig. 3)"
    paper = f"{PAPER}, §2.2, Definition 2.1 and Fig. 3"
    claim = (
        "BN does not reduce internal covariate shift in the optimization sense: for VGG and for a "
        "25-layer deep linear network, the networks with BN show similar or even larger ICS (a "
        "larger ℓ2 difference between G and G', a cosine further from 1), yet train faster."
    )
    settings_class = IcsSettings
    presets = {
        "quick": {
            "steps": 300,
            "channels": (8, 16, 32),
            "hidden": 64,
            "eval_every": 25,
            "dln_steps": 300,
            "dln_eval_every": 25,
            "seeds": 1,
        },
        "tiny": {
            "steps": 6,
            "channels": (4, 8),
            "hidden": 8,
            "batch_size": 16,
            "eval_every": 3,
            "eval_examples": 40,
            "plot_layers": ("conv2", "linear3"),
            "dln_depth": 4,
            "dln_width": 6,
            "dln_samples": 64,
            "dln_steps": 6,
            "dln_eval_every": 3,
            "dln_plot_layers": ("linear2", "linear4"),
            "seeds": 1,
        },
    }

    def trials(self, settings, data, finals):
        plan = []
        for k in range(settings.seeds):
            for network in NETWORKS:
                plan.append(
                    Trial(
                        f"cnn-{network}/seed={k}",
                        {"family": "cnn", "network": network, "replicate": k},
                        settings.steps,
                        settings.eval_every,
                        settings.seed + k,
                    )
                )
            if settings.dln:
                for network in NETWORKS:
                    plan.append(
                        Trial(
                            f"dln-{network}/seed={k}",
                            {"family": "dln", "network": network, "replicate": k},
                            settings.dln_steps,
                            settings.dln_eval_every,
                            settings.seed + k,
                        )
                    )
        return plan

    def setup(self, trial, settings, data, generator):
        norm = "batch" if trial.params["network"] == "bn" else "none"
        if trial.params["family"] == "dln":
            regression = gaussian_regression(
                settings.dln_samples,
                settings.dln_width,
                settings.dln_outputs,
                settings.dln_noise,
                settings.seed,
            )
            model = deep_linear(settings.dln_width, settings.dln_depth, settings.dln_outputs, norm)
            initialize_deep_linear(model, generator)
            optimizer = torch.optim.SGD(model.parameters(), lr=settings.dln_learning_rate)
            return Setup(
                model,
                optimizer,
                settings.dln_samples,  # full-batch gradient descent
                loss_fn=nn.functional.mse_loss,
                data=regression,
            )
        model = vgg(data.sample_shape, settings.channels, settings.hidden, data.classes, norm=norm)
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
        return Setup(model, optimizer, settings.batch_size)

    def measure(self, trial, settings, setup: Setup, data) -> dict:
        model, dln = setup.model, trial.params["family"] == "dln"
        batch = probe_batch(data, setup.batch_size, trial.seed, setup.step)
        if dln:
            layers = [f"linear{i}" for i in range(1, settings.dln_depth + 1)]
            loss_fn = nn.functional.mse_loss
            row = {"test_mse": float(loss_fn(model(data.x_test), data.y_test))}
        else:
            layers = _cnn_layers(settings)
            loss_fn = nn.functional.cross_entropy
            count = settings.eval_examples
            accuracy, loss = accuracy_and_loss(model, data.x_test[:count], data.y_test[:count])
            row = {"test_accuracy": accuracy, "test_loss": loss}
        model.train()  # ICS as training sees it: BN with batch statistics
        try:
            shift = ics(model, loss_fn, batch, setup.optimizer, layers=layers)
        finally:
            model.eval()
        row["ics"] = shift.as_dict()
        return row

    def finish(self, trial, settings, setup: Setup, data) -> dict:
        """The whole test set: accuracy and loss for the CNN, the mean squared error for the DLN
        (whose targets are real numbers, so accuracy means nothing)."""
        if trial.params["family"] != "dln":
            return super().finish(trial, settings, setup, data)
        return {"test_mse": float(nn.functional.mse_loss(setup.model(data.x_test), data.y_test))}

    # -- meaning -------------------------------------------------------------------------------
    def summarize(self, record: RunRecord) -> dict:
        settings = record.settings
        per_seed: dict[str, list[dict]] = {}
        for key, final in record.finals().items():
            # after step 0: at initialization the networks are in a transient (the Standard CNN's
            # ICS at step 0 is several times its value at any later evaluation)
            rows = [r for r in record.curve(key) if r.get("ics") and r["step"] > 0]
            layers = list(rows[0]["ics"]["layers"]) if rows else []
            tail_from = final["step"] * (1 - settings["tail"])
            per_seed.setdefault(f"{final['family']}-{final['network']}", []).append(
                {
                    "seed": final["replicate"],
                    "diverged": final["diverged"],
                    "final_train_loss": mean(
                        r["train_loss"] for r in rows if r["step"] > tail_from and r["step"] > 0
                    ),
                    "mean_train_loss": mean(r["train_loss"] for r in rows),
                    "test": final.get("test_accuracy", final.get("test_mse")),
                    "layers": {
                        layer: {
                            q: _median([r["ics"]["layers"][layer][q] for r in rows])
                            for q in ("l2", "cosine", "relative_l2")
                        }
                        for layer in layers
                    },
                }
            )
        arms = {}
        for arm, seeds in per_seed.items():
            layers = list(seeds[0]["layers"])
            arms[arm] = {
                "seeds": len(seeds),
                "diverged": sum(bool(s["diverged"]) for s in seeds),
                "final_train_loss": mean(s["final_train_loss"] for s in seeds),
                "mean_train_loss": mean(s["mean_train_loss"] for s in seeds),
                "test": mean(s["test"] for s in seeds),
                "layers": {
                    layer: {
                        q: mean(s["layers"][layer][q] for s in seeds)
                        for q in ("l2", "cosine", "relative_l2")
                    }
                    for layer in layers
                },
            }
        families = {}
        for family in ("cnn", "dln"):
            standard, bn = arms.get(f"{family}-standard"), arms.get(f"{family}-bn")
            if not standard or not bn:
                continue
            layers = {}
            for layer, s in standard["layers"].items():
                b = bn["layers"][layer]
                if not s["l2"] and not b["l2"]:
                    continue  # the first layer: nothing moves before it, G' = G by definition
                layers[layer] = {
                    "l2_ratio": _ratio(b["l2"], s["l2"]),
                    "angle_ratio": _ratio(_one_minus(b["cosine"]), _one_minus(s["cosine"])),
                    "relative_l2_ratio": _ratio(b["relative_l2"], s["relative_l2"]),
                }
            floor = 1 - settings["similar_within"]
            families[family] = {
                "layers": layers,
                "bn_l2_not_lower": [k for k, v in layers.items() if (v["l2_ratio"] or 0) >= floor],
                "bn_angle_not_lower": [
                    k for k, v in layers.items() if (v["angle_ratio"] or 0) >= floor
                ],
                "bn_relative_not_lower": [
                    k for k, v in layers.items() if (v["relative_l2_ratio"] or 0) >= floor
                ],
                # faster = a lower training loss on average over the run (both may end at the
                # same floor, as the DLNs do at the noise level of their data)
                "bn_trains_faster": (
                    bn["mean_train_loss"] is not None
                    and standard["mean_train_loss"] is not None
                    and bn["mean_train_loss"] < standard["mean_train_loss"]
                ),
            }
        return {"arms": arms, "families": families}

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        arms, families = s["arms"], s["families"]
        data = record.config["data"]["name"]
        floor = 1 - settings["similar_within"]
        names = {
            "cnn": f"small VGG, {data}",
            "dln": f"{settings['dln_depth']}-layer linear net, Gaussian data",
        }
        rows = []
        checks = []
        for family, f in families.items():
            standard, bn = arms[f"{family}-standard"], arms[f"{family}-bn"]
            count = len(f["layers"])
            ratios = [v["l2_ratio"] for v in f["layers"].values() if v["l2_ratio"] is not None]
            angles = [
                v["angle_ratio"] for v in f["layers"].values() if v["angle_ratio"] is not None
            ]
            relative = [
                v["relative_l2_ratio"]
                for v in f["layers"].values()
                if v["relative_l2_ratio"] is not None
            ]
            rows += [
                [
                    f"{names[family]}: ‖G − G′‖₂ with BN vs without",
                    "similar or larger with BN",
                    f"BN / Standard per layer {fmt(min(ratios, default=None), '.2f')}–"
                    f"{fmt(max(ratios, default=None), '.2f')} (median "
                    f"{fmt(_median(ratios), '.2f')})",
                    f"not lower (≥ {floor:g}×) in {len(f['bn_l2_not_lower'])} of {count} layers",
                ],
                [
                    f"{names[family]}: 1 − cos(G, G′) with BN vs without",
                    "similar or larger with BN (cosine further from 1)",
                    f"BN / Standard per layer {fmt(min(angles, default=None), '.2f')}–"
                    f"{fmt(max(angles, default=None), '.2f')} (median "
                    f"{fmt(_median(angles), '.2f')})",
                    f"not lower (≥ {floor:g}×) in {len(f['bn_angle_not_lower'])} of {count} layers",
                ],
                [
                    f"{names[family]}: ‖G − G′‖₂ / ‖G‖₂ with BN vs without (scale-free; ours)",
                    "– (the paper plots ℓ2 and cosine)",
                    f"BN / Standard per layer {fmt(min(relative, default=None), '.2f')}–"
                    f"{fmt(max(relative, default=None), '.2f')} (median "
                    f"{fmt(_median(relative), '.2f')})",
                    f"not lower (≥ {floor:g}×) in {len(f['bn_relative_not_lower'])} of {count} "
                    "layers",
                ],
                [
                    f"{names[family]}: BN trains faster",
                    "yes",
                    f"training loss averaged over the run {fmt(bn['mean_train_loss'], '.4g')} vs "
                    f"{fmt(standard['mean_train_loss'], '.4g')}; at the end "
                    f"{fmt(bn['final_train_loss'], '.4g')} vs "
                    f"{fmt(standard['final_train_loss'], '.4g')}",
                    fmt(f["bn_trains_faster"]),
                ],
            ]
            checks += [
                Check(
                    f"{family}: BN's ICS (ℓ2) not below {floor:g}× Standard's in most layers",
                    len(f["bn_l2_not_lower"]) * 2 > count,
                    f"{len(f['bn_l2_not_lower'])} of {count} layers",
                ),
                Check(
                    f"{family}: BN's 1 − cos(G, G′) not below {floor:g}× Standard's in most layers",
                    len(f["bn_angle_not_lower"]) * 2 > count,
                    f"{len(f['bn_angle_not_lower'])} of {count} layers",
                ),
                Check(
                    f"{family}: BN's training loss, averaged over the run, below Standard's",
                    f["bn_trains_faster"],
                    f"{fmt(bn['mean_train_loss'], '.4g')} vs "
                    f"{fmt(standard['mean_train_loss'], '.4g')}",
                ),
            ]
        comparison = Table(["claim", "published (Fig. 3)", "ours", "agrees?"], rows)
        tables = []
        for family in families:
            standard, bn = arms[f"{family}-standard"], arms[f"{family}-bn"]
            tables.append(
                Table(
                    [
                        "layer",
                        "‖G − G′‖ Standard",
                        "‖G − G′‖ BN",
                        "BN / Standard",
                        "cos Standard",
                        "cos BN",
                        "‖G − G′‖/‖G‖ Standard",
                        "‖G − G′‖/‖G‖ BN",
                    ],
                    [
                        [
                            layer,
                            fmt(v["l2"], ".3g"),
                            fmt(bn["layers"][layer]["l2"], ".3g"),
                            fmt(families[family]["layers"][layer]["l2_ratio"], ".2f"),
                            fmt(v["cosine"], ".4f"),
                            fmt(bn["layers"][layer]["cosine"], ".4f"),
                            fmt(v["relative_l2"], ".3g"),
                            fmt(bn["layers"][layer]["relative_l2"], ".3g"),
                        ]
                        for layer, v in standard["layers"].items()
                        if layer in families[family]["layers"]
                    ],
                    f"{names[family]}: medians over the evaluations after step 0 (means of those over "
                    f"{standard['seeds']} seed(s)); the first layer, whose G' = G by definition, "
                    "is left out.",
                )
            )
        figures = []
        if "cnn" in families:
            figures.append(
                Figure(
                    "ics-cnn",
                    self._figure(record, "cnn", settings["plot_layers"], "test_accuracy"),
                    "Fig. 3 (VGG) in small: training loss and test accuracy; ‖G − G′‖₂ and "
                    f"cos(G, G′) of {', '.join(settings['plot_layers'])} over training (seed 0).",
                )
            )
        if "dln" in families:
            figures.append(
                Figure(
                    "ics-dln",
                    self._figure(record, "dln", settings["dln_plot_layers"], "test_mse"),
                    f"Fig. 3 (DLN): training and test MSE; ‖G − G′‖₂ and cos(G, G′) of "
                    f"{', '.join(settings['dln_plot_layers'])} over training (seed 0).",
                )
            )
        deviations = [
            f"A VGG-style CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, "
            f"fc{settings['hidden']}) on {data} instead of VGG on CIFAR-10; plain SGD at "
            f"{settings['learning_rate']:g} (momentum {settings['momentum']:g}), batch "
            f"{settings['batch_size']}, {settings['steps']} steps.",
            f"DLN: {settings['dln_depth']} layers of width {settings['dln_width']}, "
            f"{settings['dln_samples']} samples of x ~ N(0, I), y = A x + {settings['dln_noise']:g} ε "
            f"({settings['dln_outputs']} output(s)), mean squared error, full-batch GD at "
            f"{settings['dln_learning_rate']:g} for {settings['dln_steps']} steps (the paper's "
            "width, loss and learning rate are not known to us).",
            f"ICS is measured every {settings['eval_every']} steps (DLN: "
            f"{settings['dln_eval_every']}) on a probe batch drawn for that step, not on the "
            'training batch of the step; "similar" means within '
            f"{settings['similar_within']:.0%} below Standard.",
        ]
        headline = "; ".join(
            f"{family}: BN's ‖G − G′‖ not lower in {len(f['bn_l2_not_lower'])} of "
            f"{len(f['layers'])} layers (median BN/Standard "
            f"{fmt(_median([v['l2_ratio'] for v in f['layers'].values() if v['l2_ratio']]), '.2f')})"
            f", BN trains faster: {fmt(f['bn_trains_faster'])}"
            for family, f in families.items()
        )
        return Report(
            comparison,
            [Section("Per layer", tables), Section("Figures", figures)],
            checks,
            deviations,
            headline,
        )

    @staticmethod
    def _figure(record: RunRecord, family: str, layers, test_metric: str):
        figure = new_figure(3.0 * (1 + len(layers)), 5.2)
        axes = figure.subplots(2, 1 + len(layers), squeeze=False)
        for color, network in enumerate(NETWORKS):
            rows = record.curve(f"{family}-{network}/seed=0")
            steps = [r["step"] for r in rows]
            label = NETWORKS[network]
            trained = [r for r in rows if r["train_loss"] is not None]
            axes[0][0].plot(
                [r["step"] for r in trained], [r["train_loss"] for r in trained], label=label
            )
            axes[1][0].plot(steps, [r.get(test_metric) for r in rows], label=label)
            for column, layer in enumerate(layers, start=1):
                values = [r["ics"]["layers"][layer] for r in rows]
                axes[0][column].plot(steps, [v["l2"] for v in values], color=f"C{color}")
                axes[1][column].plot(steps, [v["cosine"] for v in values], color=f"C{color}")
        axes[0][0].set_yscale("log")
        axes[0][0].set_title("training loss")
        axes[1][0].set_title(test_metric.replace("_", " "))
        axes[0][0].legend(fontsize="small")
        for column, layer in enumerate(layers, start=1):
            axes[0][column].set_title(f"{layer}: ‖G − G′‖₂")
            axes[1][column].set_title(f"{layer}: cos(G, G′)")
        for ax in axes.flat:
            ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("training step")
        return figure


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _one_minus(cosine):
    return None if cosine is None else 1.0 - cosine


def _median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
