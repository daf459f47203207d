"""Santurkar et al. (2018), §3.1, §3.3 and Fig. 4: BN makes the loss landscape smoother.

At points along training, the paper moves along the gradient by a range of step sizes and looks
at how much the loss changes (the loss landscape), how much the gradient changes (gradient
predictiveness) and the ratio of the gradient's change to the step's length (effective
β-smoothness) (:func:`normkit.lab.metrics.landscape_probe`). With BN all three are smaller: the loss
band is narrower, the gradient more predictive, β lower. §3.3: normalizing by the ℓ1, ℓ2 or ℓ∞
average of the activations instead of the standard deviation trains comparably and smooths the
landscape the same way.

Here (docs/PROTOCOLS.md §3, CPU protocol 3c, d): the VGG-style CNN of :mod:`santurkar2018_common`
on the run's data set (Fashion-MNIST by default), plain SGD, Standard, BN and (``lp_variants``)
the ℓ1/ℓ2/ℓ∞ layers of :class:`~santurkar2018_common.LpBatchNorm` in BN's place. Every
``eval_every`` steps (step 0 included), on a probe batch of ``batch_size`` training examples drawn
for that step, in training mode: L(θ - η g) and ||∇L(θ - η g) - g|| for η in ``step_sizes``.

Step sizes (our choice; configurable): η ∈ {0.05, 0.1, 0.2, 0.3, 0.4}, the grid the paper's
appendix is reported to use for VGG, which with our training learning rate 0.1 is {0.5, 1, 2, 3,
4} × the learning rate: from half a training step to four. Summaries average over the evaluations
after step 0 (at step 0 the networks have not been trained yet) and over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.experiments.santurkar2018_common import LABELS, PAPER, mean, probe_batch, vgg
from normkit.lab.legacy import Experiment, Settings, Setup, register, seeded_trials
from normkit.lab.metrics import landscape_probe
from normkit.lab.models import initialize
from normkit.lab.plots import curves
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure

NORM_OF = {"standard": "none", "bn": "batch", "l1": "l1", "l2": "l2", "linf": "linf"}


@dataclass(frozen=True)
class LandscapeSettings(Settings):
    steps: int = 1_500
    batch_size: int = 128
    channels: tuple[int, ...] = (16, 32, 64)
    hidden: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.0
    step_sizes: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4)
    lp_variants: bool = True  # also the ℓ1, ℓ2, ℓ∞ normalizations of §3.3
    seeds: int = 1
    eval_every: int = 50  # the landscape is probed at every evaluation
    eval_examples: int = 1_000  # test images for the accuracy curve
    tail: float = 0.2  # "final" training loss: the mean over the last 20% of the steps
    comparable: float = 0.25  # ℓp variants "train comparably": final loss <= (1 + this) x BN's


@register
class Santurkar2018Landscape(Experiment):
    name = "santurkar2018-landscape"
    title = "The optimization landscape with and without BN (Fig. 4, §3.3)"
    paper = f"{PAPER}, §3.1, §3.3 and Fig. 4"
    claim = (
        "BN makes the landscape smoother: along the gradient, the loss varies over a narrower band, "
        "the gradient changes less (it is more predictive) and the effective β-smoothness is "
        "lower; ℓp normalizations in BN's place train comparably and smooth it similarly."
    )
    settings_class = LandscapeSettings
    presets = {
        "quick": {"steps": 300, "channels": (8, 16, 32), "hidden": 64, "eval_every": 50},
        "tiny": {
            "steps": 6,
            "channels": (4, 8),
            "hidden": 8,
            "batch_size": 16,
            "eval_every": 3,
            "eval_examples": 40,
            "step_sizes": (0.1, 0.4),
        },
    }

    def trials(self, settings, data, finals):
        networks = ["standard", "bn"] + (["l1", "l2", "linf"] if settings.lp_variants else [])
        arms = {k: {"network": k, "norm": NORM_OF[k]} for k in networks}
        return seeded_trials(arms, settings, settings.seeds)

    def setup(self, trial, settings, data, generator):
        model = vgg(
            data.sample_shape,
            settings.channels,
            settings.hidden,
            data.classes,
            norm=trial.params["norm"],
        )
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
        return Setup(model, optimizer, settings.batch_size)

    def measure(self, trial, settings, setup: Setup, data) -> dict:
        model = setup.model
        count = settings.eval_examples
        accuracy, loss = accuracy_and_loss(model, data.x_test[:count], data.y_test[:count])
        batch = probe_batch(data, settings.batch_size, trial.seed, setup.step)
        model.train()  # the landscape training sees: normalization with batch statistics
        try:
            probe = landscape_probe(model, nn.functional.cross_entropy, batch, settings.step_sizes)
        finally:
            model.eval()
        return {"test_accuracy": accuracy, "test_loss": loss, "landscape": probe.as_dict()}

    # -- meaning -------------------------------------------------------------------------------
    def summarize(self, record: RunRecord) -> dict:
        settings = record.settings
        per_seed: dict[str, list[dict]] = {}
        for key, final in record.finals().items():
            rows = [r for r in record.curve(key) if r["step"] > 0 and r.get("landscape")]
            probes = [r["landscape"] for r in rows]
            tail_from = final["step"] * (1 - settings["tail"])
            per_seed.setdefault(final["network"], []).append(
                {
                    "diverged": final["diverged"],
                    "final_train_loss": mean(
                        r["train_loss"] for r in rows if r["step"] > tail_from
                    ),
                    "test_accuracy": final["test_accuracy"],
                    "loss_band": mean(_width(p["loss_min"], p["loss_max"]) for p in probes),
                    "grad_change_max": mean(p["grad_change_max"] for p in probes),
                    "grad_change_band": mean(
                        _width(p["grad_change_min"], p["grad_change_max"]) for p in probes
                    ),
                    "beta_smoothness": mean(p["beta_smoothness"] for p in probes),
                    "beta_smoothness_max": max(
                        (p["beta_smoothness"] for p in probes if p["beta_smoothness"] is not None),
                        default=None,
                    ),
                    "non_finite_probes": sum(p["beta_smoothness"] is None for p in probes),
                }
            )
        quantities = (
            "final_train_loss",
            "test_accuracy",
            "loss_band",
            "grad_change_max",
            "grad_change_band",
            "beta_smoothness",
            "beta_smoothness_max",
        )
        arms = {
            network: {
                "seeds": len(seeds),
                "diverged": sum(bool(s["diverged"]) for s in seeds),
                "non_finite_probes": sum(s["non_finite_probes"] for s in seeds),
                **{q: mean(s[q] for s in seeds) for q in quantities},
            }
            for network, seeds in per_seed.items()
        }
        standard, bn = arms.get("standard", {}), arms.get("bn", {})
        ratios = {
            q: _ratio(bn.get(q), standard.get(q))
            for q in ("loss_band", "grad_change_max", "beta_smoothness", "final_train_loss")
        }
        checks = {
            "bn_narrower_loss_band": _below(bn.get("loss_band"), standard.get("loss_band")),
            "bn_more_predictive_gradient": _below(
                bn.get("grad_change_max"), standard.get("grad_change_max")
            ),
            "bn_lower_beta": _below(bn.get("beta_smoothness"), standard.get("beta_smoothness")),
        }
        lp = {}
        for network in ("l1", "l2", "linf"):
            if network in arms and bn.get("final_train_loss"):
                arm = arms[network]
                lp[network] = {
                    "trains_comparably": arm["final_train_loss"] is not None
                    and arm["final_train_loss"]
                    <= bn["final_train_loss"] * (1 + settings["comparable"]),
                    "smoother_than_standard": _below(
                        arm["beta_smoothness"], standard.get("beta_smoothness")
                    )
                    and _below(arm["loss_band"], standard.get("loss_band")),
                }
        return {"arms": arms, "bn_over_standard": ratios, "checks": checks, "lp": lp}

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        arms, ratios, checks, lp = s["arms"], s["bn_over_standard"], s["checks"], s["lp"]
        data = record.config["data"]["name"]
        standard, bn = arms["standard"], arms["bn"]

        def pair(q, spec=".3g"):
            return f"BN {fmt(bn[q], spec)} vs Standard {fmt(standard[q], spec)}"

        def times(q):
            r = ratios.get(q)
            return "–" if r is None else f"×{r:.2f}"

        rows = [
            [
                "loss landscape: range of L(θ − ηg) over η",
                "narrower with BN (Fig. 4a)",
                f"{pair('loss_band')} ({times('loss_band')})",
                fmt(checks["bn_narrower_loss_band"]),
            ],
            [
                "gradient predictiveness: max ‖∇L(θ − ηg) − g‖ over η",
                "smaller with BN (Fig. 4b)",
                f"{pair('grad_change_max')} ({times('grad_change_max')})",
                fmt(checks["bn_more_predictive_gradient"]),
            ],
            [
                "effective β-smoothness",
                "lower with BN (Fig. 4c)",
                f"{pair('beta_smoothness')} ({times('beta_smoothness')})",
                fmt(checks["bn_lower_beta"]),
            ],
            [
                "BN trains faster",
                "yes (Fig. 1)",
                f"final training loss {pair('final_train_loss', '.4f')}",
                fmt(_below(bn["final_train_loss"], standard["final_train_loss"])),
            ],
        ]
        for network, verdict in lp.items():
            arm = arms[network]
            rows.append(
                [
                    f"§3.3: {LABELS[network]} instead of BN",
                    "trains comparably to BN; smooths like BN",
                    f"final training loss {fmt(arm['final_train_loss'], '.4f')} (BN "
                    f"{fmt(bn['final_train_loss'], '.4f')}); loss band "
                    f"{fmt(arm['loss_band'], '.3g')}, β {fmt(arm['beta_smoothness'], '.3g')}",
                    f"comparable (≤ {1 + settings['comparable']:g}× BN's loss): "
                    f"{fmt(verdict['trains_comparably'])}; smoother than Standard: "
                    f"{fmt(verdict['smoother_than_standard'])}",
                ]
            )
        comparison = Table(
            ["claim", "published (VGG, CIFAR-10)", f"ours (small VGG, {data})", "agrees?"], rows
        )
        report_checks = [
            Check(
                "(c) BN's loss band narrower than Standard's, on average over training",
                checks["bn_narrower_loss_band"],
                pair("loss_band"),
            ),
            Check(
                "(c) BN's effective β-smoothness lower than Standard's, on average",
                checks["bn_lower_beta"],
                pair("beta_smoothness"),
            ),
        ]
        if lp:
            report_checks.append(
                Check(
                    f"(d) ℓp variants train comparably to BN (final loss ≤ "
                    f"{1 + settings['comparable']:g}× BN's)",
                    all(v["trains_comparably"] for v in lp.values()),
                    ", ".join(f"{k}: {fmt(arms[k]['final_train_loss'], '.4f')}" for k in lp),
                )
            )
        table = Table(
            [
                "network",
                "final training loss",
                "test accuracy",
                "loss band",
                "max gradient change",
                "β (mean)",
                "β (max)",
                "diverged",
            ],
            [
                [
                    LABELS[k],
                    fmt(a["final_train_loss"], ".4f"),
                    fmt(a["test_accuracy"]),
                    fmt(a["loss_band"], ".3g"),
                    fmt(a["grad_change_max"], ".3g"),
                    fmt(a["beta_smoothness"], ".3g"),
                    fmt(a["beta_smoothness_max"], ".3g"),
                    f"{a['diverged']} of {a['seeds']}",
                ]
                for k, a in arms.items()
            ],
            f"Means over the probes after step 0 (every {settings['eval_every']} steps) and over "
            f"seeds; η ∈ {{{', '.join(f'{e:g}' for e in settings['step_sizes'])}}}."
            + (
                " Probes with a non-finite loss: "
                + ", ".join(f"{k} {a['non_finite_probes']}" for k, a in arms.items())
                if any(a["non_finite_probes"] for a in arms.values())
                else ""
            ),
        )
        networks = list(arms)
        figures = [
            Figure(
                "landscape",
                self._bands(record, ["standard", "bn"]),
                "Fig. 4: (a) the range of the loss along the gradient, (b) the range of the "
                "gradient's change, (c) effective β-smoothness, over training (seed 0).",
            ),
            Figure(
                "training-loss",
                curves(
                    record,
                    [(f"{k}/seed=0", LABELS[k]) for k in networks],
                    "train_loss",
                    "training loss (mean over the interval)",
                    "training loss",
                    logy=True,
                ),
                "Training loss against steps (seed 0).",
            ),
        ]
        if len(networks) > 2:
            figures.append(
                Figure(
                    "landscape-lp",
                    self._bands(record, networks),
                    "§3.3: the same measurements for the ℓ1, ℓ2 and ℓ∞ normalizations beside "
                    "BN and Standard (seed 0).",
                )
            )
        deviations = [
            f"A VGG-style CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, "
            f"fc{settings['hidden']}) on {data} instead of VGG on CIFAR-10; plain SGD at "
            f"{settings['learning_rate']:g} (momentum {settings['momentum']:g}), batch "
            f"{settings['batch_size']}, {settings['steps']} steps.",
            "The landscape is probed every "
            f"{settings['eval_every']} steps on a probe batch drawn for that step (the paper: at "
            "the training batch of each step), at the step sizes "
            f"{', '.join(f'{e:g}' for e in settings['step_sizes'])} (our reading of the paper's grid).",
            "ℓp layers: γ (x − μ_B) / (S_p + eps) + β per channel with S_1 = mean|x|, S_2 = "
            "sqrt(mean x²), S_∞ = max|x| over the batch and space, taken before the mean is "
            "subtracted (our reading of §3.3).",
        ]
        headline = (
            f"BN / Standard: loss band {times('loss_band')}, max gradient change "
            f"{times('grad_change_max')}, β {times('beta_smoothness')}"
        )
        return Report(
            comparison,
            [Section("All networks", [table]), Section("Figures", figures)],
            report_checks,
            deviations,
            headline,
        )

    @staticmethod
    def _bands(record: RunRecord, networks: list[str]):
        figure = new_figure(12.0, 3.6)
        axes = figure.subplots(1, 3)
        for color, network in enumerate(networks):
            rows = [r for r in record.curve(f"{network}/seed=0") if r.get("landscape")]
            steps = [r["step"] for r in rows]
            probes = [r["landscape"] for r in rows]
            style = {"color": f"C{color}", "label": LABELS[network]}
            for ax, low, high in (
                (axes[0], "loss_min", "loss_max"),
                (axes[1], "grad_change_min", "grad_change_max"),
            ):
                lows = [_finite(p[low]) for p in probes]
                highs = [_finite(p[high]) for p in probes]
                ax.fill_between(steps, lows, highs, alpha=0.35, linewidth=0, color=style["color"])
                ax.plot(steps, highs, linewidth=0.6, **style)
            axes[2].plot(steps, [_finite(p["beta_smoothness"]) for p in probes], **style)
        axes[0].set_title("(a) loss landscape: L(θ − ηg)")
        axes[1].set_title("(b) gradient predictiveness: ‖∇L(θ − ηg) − g‖")
        axes[2].set_title("(c) effective β-smoothness")
        for ax in axes:
            ax.set_xlabel("training step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[2].legend(fontsize="small")
        return figure


def _width(low, high):
    return None if low is None or high is None else high - low


def _ratio(a, b):
    return None if a is None or not b else a / b


def _below(a, b) -> bool | None:
    return None if a is None or b is None else a < b


def _finite(value):
    return float("nan") if value is None else value
