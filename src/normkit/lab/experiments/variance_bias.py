"""The biased/unbiased variance mismatch of BatchNorm at inference (Ioffe & Szegedy 2015, Algorithm 2;
Chng 2023, "BatchNorm and the curious case of training vs. inference variance").

In training, BatchNorm normalizes with the *biased* batch variance σ²_B (÷ m); for inference,
Algorithm 2 (step 10) uses the *unbiased* estimate m/(m−1)·E[σ²_B], and PyTorch's ``running_var``
stores the unbiased variance for that reason. Since E[σ²_B] = (m−1)/m · σ², an implementation that
kept the average *biased* variance would normalize test activations by too small a variance, and the
normalized activations x̂ = (x − μ)/sqrt(σ² + ε) would have variance m/(m−1) instead of 1: a factor 2
at m = 2, 1.33 at m = 4, negligible at m = 128.

Here: a ReLU MLP with BN before every ReLU, trained at every batch size m of ``batch_sizes``
(``seeds`` seeds each). At the end, three inference choices on the same weights: (a) the unbiased
running variance (PyTorch, Algorithm 2), (b) the biased running variance, (c) PreciseBN with batches
of m (:func:`normkit.tools.recalibrate`, ``precise_samples`` samples). Measured on the test set: the
variance of each BN layer's x̂ (over the test examples, averaged over features) and the accuracy.
Predicted: Var(x̂) ≈ 1 under (a) and (c) and ≈ m/(m−1) under (b). In the first BN layer, whose
input does not depend on the choice, the ratio (b) ÷ (a) is m/(m−1) by construction (up to ε); what
is measured there is whether the running statistics describe the test activations (the absolute
values), and in the deeper layers how the choices compound.

Decision: (b) is computed as ``running_var · (m−1)/m``. For a constant batch size the EMA is linear,
so this equals an EMA of the biased variances except for the weight left on the initial value 1,
(1 − momentum)^steps, which is below 10⁻⁴⁰ after 1,000 steps: patching the update is not needed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from normkit.lab.evaluation import EVAL_CHUNK, accuracy_and_loss
from normkit.lab.experiments.population_stats import batch_norm_layers, precise, training_batches
from normkit.lab.legacy import Experiment, Settings, Setup, register, seeded_trials
from normkit.lab.models import initialize, mlp
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure
from normkit.lab.seeds import derived_seed

CHOICES = ("unbiased", "biased", "precise")


@torch.no_grad()
def normalized_variance(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """For every BN layer (eval mode), Var over the examples of x̂ = (x − μ)/sqrt(σ² + ε) with the
    layer's running statistics, averaged over its features."""
    layers = batch_norm_layers(model)
    sums = {path: [0, 0.0, 0.0] for path in layers}  # count, Σ x̂, Σ x̂² per feature (float64)

    def hook(path):
        def add(layer, args):
            x_hat = (args[0].double() - layer.running_mean.double()) / (
                layer.running_var.double() + layer.eps
            ).sqrt()
            dims = [0, *range(2, x_hat.dim())]
            total = sums[path]
            total[0] += x_hat.numel() // x_hat.shape[1]
            total[1] = total[1] + x_hat.sum(dims)
            total[2] = total[2] + x_hat.square().sum(dims)

        return add

    handles = [layer.register_forward_pre_hook(hook(p)) for p, layer in layers.items()]
    try:
        for start in range(0, len(x), EVAL_CHUNK):
            model(x[start : start + EVAL_CHUNK])
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for path, (n, total, squares) in sums.items():
        mean = total / n
        result[path] = float((squares / n - mean.square()).mean())
    return result


@dataclass(frozen=True)
class VarianceBiasSettings(Settings):
    batch_sizes: tuple[int, ...] = (2, 4, 8, 32, 128)
    steps: int = 4_000
    hidden: tuple[int, ...] = (100, 100)
    learning_rate: float = 0.01
    momentum: float = 0.9
    seeds: int = 3
    precise_samples: int = 4_096
    eval_every: int = 1_000


@register
class VarianceBias(Experiment):
    name = "variance-bias"
    title = "Biased vs unbiased running variance at inference"
    paper = (
        "Ioffe & Szegedy 2015, Algorithm 2 (unbiased variance at inference); Chng 2023, BatchNorm "
        "and the curious case of training vs. inference variance"
    )
    claim = (
        "Normalizing test activations with the average biased batch variance inflates their "
        "variance by m/(m−1); the unbiased running variance (and PreciseBN) keeps it near 1. The "
        "accuracy cost of the biased choice shows only at very small batches (m ≤ 4)."
    )
    settings_class = VarianceBiasSettings
    presets = {
        "quick": {"batch_sizes": (2, 4, 32), "steps": 1_500, "seeds": 2, "eval_every": 500},
        "tiny": {
            "batch_sizes": (2, 16),
            "steps": 10,
            "hidden": (16,),
            "seeds": 1,
            "precise_samples": 64,
            "eval_every": 5,
        },
    }

    def trials(self, settings, data, finals):
        arms = {f"m={m}": {"batch_size": m} for m in settings.batch_sizes}
        return seeded_trials(arms, settings, settings.seeds)

    def setup(self, trial, settings, data, generator):
        model = mlp(data.features, settings.hidden, data.classes, activation="relu", norm="batch")
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
        return Setup(model, optimizer, trial.params["batch_size"])

    def finish(self, trial, settings, setup, data):
        m = trial.params["batch_size"]
        model = setup.model
        row = {}
        variants = {
            "unbiased": model,
            "biased": _biased(model, m),
            "precise": precise(
                model,
                training_batches(
                    data.x_train, m, settings.precise_samples, derived_seed(trial.seed, 11)
                ),
            ),
        }
        for choice, variant in variants.items():
            variant.eval()
            accuracy, _ = accuracy_and_loss(variant, data.x_test, data.y_test)
            row[f"accuracy_{choice}"] = accuracy
            row[f"var_xhat_{choice}"] = normalized_variance(variant, data.x_test)
        return row

    # ------------------------------------------------------------------------------ summary
    def summarize(self, record: RunRecord) -> dict:
        settings = record.settings
        finals = list(record.finals().values())
        cells = {}
        for m in settings["batch_sizes"]:
            rows = [r for r in finals if r["batch_size"] == m]
            layers = list(rows[0]["var_xhat_unbiased"]) if rows else []
            cell = {"predicted_ratio": m / (m - 1), "seeds": len(rows)}
            for choice in CHOICES:
                cell[f"accuracy_{choice}"] = statistics.fmean(r[f"accuracy_{choice}"] for r in rows)
                cell[f"var_xhat_{choice}"] = {
                    layer: statistics.fmean(r[f"var_xhat_{choice}"][layer] for r in rows)
                    for layer in layers
                }
            cell["measured_ratio"] = {
                layer: statistics.fmean(
                    r["var_xhat_biased"][layer] / r["var_xhat_unbiased"][layer] for r in rows
                )
                for layer in layers
            }
            cell["accuracy_cost_of_biased"] = cell["accuracy_unbiased"] - cell["accuracy_biased"]
            cell["accuracy_cost_by_seed"] = [
                r["accuracy_unbiased"] - r["accuracy_biased"]
                for r in sorted(rows, key=lambda r: r["replicate"])
            ]
            cells[str(m)] = cell
        return {"batch_sizes": list(settings["batch_sizes"]), "cells": cells}

    # ------------------------------------------------------------------------------- report
    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        cells = s["cells"]
        first = next(iter(next(iter(cells.values()))["measured_ratio"]), None)
        rows, checks = [], []
        for m in s["batch_sizes"]:
            cell = cells[str(m)]
            a, b, c = (cell[f"var_xhat_{choice}"][first] for choice in CHOICES)
            predicted = cell["predicted_ratio"]
            near = abs(a - 1) <= 0.1 and abs(b / predicted - 1) <= 0.1 and abs(c - 1) <= 0.1
            rows.append(
                [
                    f"Var(x̂), first BN layer, m = {m}: unbiased / biased / PreciseBN",
                    f"1 / {predicted:.3f} / 1 (m/(m−1): our derivation; the blog is unverified)",
                    f"{a:.3f} / {b:.3f} / {c:.3f}",
                    "matches" if near else "differs",
                ]
            )
            checks.append(
                Check(
                    f"m = {m}: first-layer Var(x̂) within 10% of 1, m/(m−1), 1",
                    near,
                    f"{a:.3f}, {b:.3f} (predicted {predicted:.3f}), {c:.3f}; the ratio "
                    f"biased ÷ unbiased {cell['measured_ratio'][first]:.4f} follows from the "
                    "definition in this layer",
                )
            )
        small = [m for m in s["batch_sizes"] if m <= 4]
        large = [m for m in s["batch_sizes"] if m >= 32]
        cost = {m: cells[str(m)]["accuracy_cost_of_biased"] for m in s["batch_sizes"]}
        spread = {m: cells[str(m)]["accuracy_cost_by_seed"] for m in s["batch_sizes"]}
        rows.append(
            [
                "accuracy: unbiased − biased (mean [range over seeds])",
                "visible only at m ≤ 4 (protocol's expectation)",
                ", ".join(
                    f"m={m}: {100 * c:+.2f} [{100 * min(spread[m]):+.2f}, {100 * max(spread[m]):+.2f}] pts"
                    for m, c in cost.items()
                ),
                _cost_verdict(cost, small, large),
            ]
        )
        if small and large:
            checks.append(
                Check(
                    "biased variance costs more accuracy at m ≤ 4 than at m ≥ 32",
                    min(cost[m] for m in small) > max(abs(cost[m]) for m in large),
                    ", ".join(f"m={m}: {100 * c:+.2f} pts" for m, c in cost.items()),
                )
            )
        comparison = Table(["quantity", "published / predicted", "ours", "verdict"], rows)
        layers = list(next(iter(cells.values()))["measured_ratio"])
        variance_table = Table(
            [
                "m",
                "layer",
                "Var(x̂) unbiased",
                "biased",
                "PreciseBN",
                "biased ÷ unbiased",
                "m/(m−1)",
            ],
            [
                [
                    m,
                    layer,
                    f"{cells[str(m)]['var_xhat_unbiased'][layer]:.3f}",
                    f"{cells[str(m)]['var_xhat_biased'][layer]:.3f}",
                    f"{cells[str(m)]['var_xhat_precise'][layer]:.3f}",
                    f"{cells[str(m)]['measured_ratio'][layer]:.3f}",
                    f"{cells[str(m)]['predicted_ratio']:.3f}",
                ]
                for m in s["batch_sizes"]
                for layer in layers
            ],
            "Variance of the normalized test activations (mean over features and seeds).",
        )
        accuracy_table = Table(
            ["m", "unbiased (PyTorch)", "biased", "PreciseBN", "seeds"],
            [
                [
                    m,
                    fmt(cells[str(m)]["accuracy_unbiased"], ".4f"),
                    fmt(cells[str(m)]["accuracy_biased"], ".4f"),
                    fmt(cells[str(m)]["accuracy_precise"], ".4f"),
                    cells[str(m)]["seeds"],
                ]
                for m in s["batch_sizes"]
            ],
            "Test accuracy (eval mode, mean over seeds) under each inference choice.",
        )
        figure = Figure(
            "variance-ratio",
            self._figure(s),
            "Left: Var(x̂) of the first BN layer under each choice against the predictions, and the "
            "ratio biased ÷ unbiased in the last BN layer. Right: test accuracy under each choice.",
        )
        deviations = [
            f"A ReLU MLP {'-'.join(str(h) for h in settings['hidden'])} with BN before each ReLU on "
            f"{record.config['data']['name']}, {settings['steps']} steps per batch size, SGD lr "
            f"{settings['learning_rate']:g} momentum {settings['momentum']:g} (the same for every m, "
            "so larger batches see more data: compare the choices within a batch size).",
            "The blog post was not read; the prediction m/(m−1) is our derivation from E[σ²_B] = "
            "(m−1)/m σ².",
        ]
        m0 = s["batch_sizes"][0]
        headline = (
            f"first-layer Var(x̂) ratio at m={m0}: {cells[str(m0)]['measured_ratio'][first]:.3f} "
            f"(predicted {cells[str(m0)]['predicted_ratio']:.3f}); accuracy cost of the biased "
            f"variance {100 * cost[m0]:+.2f} pts at m={m0}"
        )
        return Report(
            comparison,
            [Section("Results", [figure, variance_table, accuracy_table])],
            checks,
            deviations,
            headline,
        )

    @staticmethod
    def _figure(s):
        figure = new_figure(8.0, 3.6)
        left, right = figure.subplots(1, 2)
        sizes = s["batch_sizes"]
        cells = s["cells"]
        layers = list(cells[str(sizes[0])]["measured_ratio"])
        first, last = layers[0], layers[-1]
        grid = [m / 10 for m in range(15, 10 * max(sizes) + 1)]
        left.plot(grid, [m / (m - 1) for m in grid], "-", color="gray", label="m/(m−1) (biased)")
        left.axhline(1.0, color="gray", linestyle=":", label="1 (unbiased, PreciseBN)")
        for i, choice in enumerate(CHOICES):
            left.plot(
                sizes,
                [cells[str(m)][f"var_xhat_{choice}"][first] for m in sizes],
                "o",
                color=f"C{i}",
                label=f"{first}, {choice}",
            )
        if last != first:
            left.plot(
                sizes,
                [cells[str(m)]["measured_ratio"][last] for m in sizes],
                "x",
                color="black",
                label=f"{last}: biased ÷ unbiased",
            )
        left.set_xscale("log", base=2)
        left.set_xticks(sizes, [str(m) for m in sizes])
        left.set_xlabel("batch size m")
        left.set_ylabel("Var(x̂) on the test set")
        left.grid(alpha=0.3)
        left.legend(fontsize="small")
        for choice in CHOICES:
            right.plot(
                sizes,
                [100 * cells[str(m)][f"accuracy_{choice}"] for m in sizes],
                "o-",
                label=choice,
            )
        right.set_xscale("log", base=2)
        right.set_xticks(sizes, [str(m) for m in sizes])
        right.set_xlabel("batch size m")
        right.set_ylabel("test accuracy (%)")
        right.grid(alpha=0.3)
        right.legend(fontsize="small")
        return figure


def _cost_verdict(cost: dict[int, float], small: list[int], large: list[int]) -> str:
    if not (small and large):
        return "–"
    if min(cost[m] for m in small) > max(abs(cost[m]) for m in large):
        return "matches"
    if max(cost[m] for m in small) < -max(abs(cost[m]) for m in large):
        return "differs: at m ≤ 4 the biased variance is the more accurate"
    return "differs: no clear effect at m ≤ 4"


def _biased(model: nn.Module, m: int) -> nn.Module:
    """A copy whose BN layers hold the biased running variance: ``running_var · (m−1)/m``."""
    import copy

    biased = copy.deepcopy(model)
    with torch.no_grad():
        for layer in batch_norm_layers(biased).values():
            layer.running_var.mul_((m - 1) / m)
    return biased
