"""The biased/unbiased variance mismatch of BatchNorm at inference (Ioffe & Szegedy 2015, Algorithm 2;
Chng 2023, "BatchNorm and the curious case of training vs. inference variance").

In training, BatchNorm normalizes with the *biased* batch variance σ²_B (÷ m); for inference,
Algorithm 2 (step 10) uses the *unbiased* estimate m/(m−1)·E[σ²_B], and PyTorch's ``running_var``
stores the unbiased variance for that reason. Since E[σ²_B] = (m−1)/m · σ², an implementation that
kept the average *biased* variance would normalize test activations by too small a variance, and the
normalized activations x̂ = (x − μ)/sqrt(σ² + ε) would have variance m/(m−1) instead of 1: a factor 2
at m = 2, 1.33 at m = 4, negligible at m = 128.

Here: a ReLU MLP with BN before every ReLU, trained at every batch size m of ``batch_sizes`` (a grid;
``seeds`` seeds, paired). At the end, three inference choices on the same weights: (a) the unbiased
running variance (PyTorch, Algorithm 2), (b) the biased running variance, (c) PreciseBN with batches
of m (:func:`normkit.tools.recalibrate`, ``precise_samples`` samples). Measured on the test set: the
variance of each BN layer's x̂ (over the test examples, averaged over features) and the accuracy.
In the first BN layer, whose input does not depend on the choice, the ratio (b) ÷ (a) is m/(m−1)
by construction (up to ε); what is measured there is whether the running statistics describe the
test activations (the absolute values), and in the deeper layers how the choices compound.

Decision: (b) is computed as ``running_var · (m−1)/m``. For a constant batch size the EMA is linear,
so this equals an EMA of the biased variances except for the weight left on the initial value 1,
(1 − momentum)^steps, which is below 10⁻⁴⁰ after 1,000 steps: patching the update is not needed.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from normkit.lab.claims import Claim, Published, above, below, difference, final, per_seed
from normkit.lab.evaluation import accuracy_and_loss, forward_in_chunks
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import MeanTable, VersusSetting
from normkit.lab.models import initialize, mlp
from normkit.lab.plan import Arm, Plan
from normkit.lab.population import batch_norm_layers, precise, training_batches
from normkit.lab.render import Section, Table
from normkit.lab.seeds import derived_seed
from normkit.lab.settings import Settings

CHOICES = {"unbiased": "unbiased running variance (PyTorch)", "biased": "biased running variance",
           "precise": "PreciseBN"}  # fmt: skip
DERIVED = "our derivation from E[σ²_B] = (m−1)/m·σ² (docs/PROTOCOLS.md §12)"
CHNG = "Chng 2023 (blog post, not read: docs/PROTOCOLS.md §12)"
M = "batch_size"


@torch.no_grad()
def normalized_variance(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """For every BN layer (eval mode), Var over the examples of x̂ = (x − μ)/sqrt(σ² + ε) with the
    layer's running statistics, averaged over its features."""
    layers = batch_norm_layers(model)
    sums = {path: [0, 0.0, 0.0] for path in layers}  # count, Σ x̂, Σ x̂² per feature (float64)

    def hook(path):
        def add(layer, args):
            mean, var = layer.running_mean.double(), layer.running_var.double()
            x_hat = (args[0].double() - mean) / (var + layer.eps).sqrt()
            dims = [0, *range(2, x_hat.dim())]
            total = sums[path]
            total[0] += x_hat.numel() // x_hat.shape[1]
            total[1] = total[1] + x_hat.sum(dims)
            total[2] = total[2] + x_hat.square().sum(dims)

        return add

    forward_in_chunks(model, x, [layer.register_forward_pre_hook(hook(p)) for p, layer in layers.items()])
    return {path: float((sq / n - (total / n).square()).mean()) for path, (n, total, sq) in sums.items()}


def _biased(model: nn.Module, m: int) -> nn.Module:
    """A copy whose BN layers hold the biased running variance: ``running_var · (m−1)/m``."""
    biased = copy.deepcopy(model)
    with torch.no_grad():
        for layer in batch_norm_layers(biased).values():
            layer.running_var.mul_((m - 1) / m)
    return biased


def _worst(choice: str):
    """Per seed, the largest |first-layer Var(x̂) ÷ its prediction − 1| over the batch sizes (the
    prediction: m/(m−1) for the biased variance, 1 otherwise)."""

    def value(trials, results):
        found = [abs(t.final[f"var_first_{choice}"] / (m / (m - 1) if choice == "biased" else 1.0) - 1)
                 for t in trials if not t.final["diverged"] for m in [t.params[M]]]  # fmt: skip
        return max(found) if found else None

    return per_seed(value, "max over m of |Var(x̂) ÷ prediction − 1|, first BN layer")


def _cost_only_small(trials, results):
    """min over m ≤ 4 of the accuracy cost of the biased variance − max over m ≥ 32 of |cost|."""
    cost = {t.params[M]: t.final["accuracy_unbiased"] - t.final["accuracy_biased"] for t in trials}
    small, large = [c for m, c in cost.items() if m <= 4], [abs(c) for m, c in cost.items() if m >= 32]
    return min(small) - max(large) if small and large else None


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
    paper = ("Ioffe & Szegedy 2015, Algorithm 2 (unbiased variance at inference); Chng 2023, BatchNorm "
             "and the curious case of training vs. inference variance")  # fmt: skip
    claim = (
        "Normalizing test activations with the average biased batch variance inflates their "
        "variance by m/(m−1); the unbiased running variance (and PreciseBN) keeps it near 1. The "
        "accuracy cost of the biased choice shows only at very small batches (m ≤ 4)."
    )
    settings_class = VarianceBiasSettings
    presets = {
        "quick": {"batch_sizes": (2, 4, 32), "steps": 1_500, "seeds": 2, "eval_every": 500},
        "tiny": {"batch_sizes": (2, 16), "steps": 10, "hidden": (16,), "seeds": 1,
                 "precise_samples": 64, "eval_every": 5},
    }  # fmt: skip

    def plan(self, s, data):
        return Plan([Arm("mlp", {}, "BN MLP")], s.steps, seeds=s.seeds, seed=s.seed,
                    eval_every=s.eval_every, grid={M: list(s.batch_sizes)})  # fmt: skip

    def setup(self, trial, s, data, generator):
        model = mlp(data.features, s.hidden, data.classes, activation="relu", norm="batch")
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=s.learning_rate, momentum=s.momentum)
        return Setup(model, optimizer, trial.params[M])

    def finish(self, trial, s, setup, data):
        m, model, row = trial.params[M], setup.model, {}
        batches = training_batches(data.x_train, m, s.precise_samples, derived_seed(trial.seed, 11))
        for choice, variant in {"unbiased": model, "biased": _biased(model, m),
                                "precise": precise(model, batches)}.items():  # fmt: skip
            variant.eval()
            row[f"accuracy_{choice}"], _ = accuracy_and_loss(variant, data.x_test, data.y_test)
            row[f"var_xhat_{choice}"] = normalized_variance(variant, data.x_test)
        for choice in CHOICES:  # the first and last BN layers, as plain numbers for the figures
            variances = list(row[f"var_xhat_{choice}"].values())
            row[f"var_first_{choice}"], row[f"var_last_{choice}"] = variances[0], variances[-1]
        row["ratio_last"] = row["var_last_biased"] / row["var_last_unbiased"]
        return row

    def claims(self, s):
        small = min(s.batch_sizes)
        cost = difference(final("accuracy_unbiased", **{M: small}), final("accuracy_biased", **{M: small}))
        return [
            Claim("unbiased-near-1", "first BN layer: max over m of |Var(x̂) − 1|, unbiased running variance",
                  Published("Var(x̂) ≈ 1 (Algorithm 2's unbiased estimate)", DERIVED, 0.0),
                  _worst("unbiased"), below(0.1), fmt=".3f"),
            Claim("biased-inflates", "first BN layer: max over m of |Var(x̂) ÷ (m/(m−1)) − 1|, biased",
                  Published("Var(x̂) ≈ m/(m−1): 2 at m = 2, 1.33 at m = 4", DERIVED, 0.0),
                  _worst("biased"), below(0.1), fmt=".3f"),
            Claim("precise-near-1", "first BN layer: max over m of |Var(x̂) − 1|, PreciseBN",
                  Published("Var(x̂) ≈ 1", DERIVED, 0.0), _worst("precise"), below(0.1), fmt=".3f"),
            Claim(f"cost-at-m{small}", f"test accuracy, unbiased − biased running variance, m = {small}",
                  Published("an accuracy cost visible at m ≤ 4", CHNG, unverified=True),
                  cost, above(0.0), fmt="+.4f"),
            Claim("cost-only-small", "accuracy cost of the biased variance: min over m ≤ 4 − max |cost| "
                  "over m ≥ 32", Published("visible only at m ≤ 4", CHNG, unverified=True),
                  per_seed(_cost_only_small, "per seed, from the final rows"), above(0.0), fmt="+.4f"),
            Claim(f"compounds-m{small}", f"last BN layer: Var(x̂) biased ÷ unbiased at m = {small}",
                  Published("not in the source: m/(m−1) in the first layer; deeper layers compound", DERIVED,
                            small / (small - 1)),
                  final("ratio_last", **{M: small}), None, fmt=".3f"),
        ]  # fmt: skip

    def figures(self, s):
        predicted = {"m/(m−1): biased, predicted": [(m, m / (m - 1)) for m in s.batch_sizes],
                     "1: unbiased and PreciseBN, predicted": [(m, 1.0) for m in s.batch_sizes]}  # fmt: skip
        return [
            VersusSetting("variance-first-layer", {v: f"var_first_{k}" for k, v in CHOICES.items()}, M,
                          "batch size m", "Var(x̂) on the test set", "Var(x̂) of the first BN layer "
                          "under each inference choice; right: the predictions.", published=predicted,
                          published_title="predicted (our derivation)"),
            VersusSetting("accuracy", {v: f"accuracy_{k}" for k, v in CHOICES.items()}, M, "batch size m",
                          "test accuracy (fraction)", "Test accuracy (eval mode) under each choice."),
            MeanTable("ratio-last", "ratio_last", M, "Last BN layer: Var(x̂) biased ÷ unbiased.", ".3f"),
        ]  # fmt: skip

    def extra_section(self, results):
        rows = []
        for m in sorted(results.values(M)):
            finals = [t.final for t in results.trials(**{M: m})]
            for layer in finals[0]["var_xhat_unbiased"] if finals else []:
                mean = {c: statistics.fmean(f[f"var_xhat_{c}"][layer] for f in finals) for c in CHOICES}
                rows.append([m, layer, *(f"{v:.3f}" for v in mean.values()),
                             f"{mean['biased'] / mean['unbiased']:.3f}", f"{m / (m - 1):.3f}"])  # fmt: skip
        table = Table(["m", "layer", "Var(x̂) unbiased", "biased", "PreciseBN", "biased ÷ unbiased",
                       "m/(m−1)"], rows, "Mean over features and seeds.")  # fmt: skip
        return Section("Variance of the normalized test activations, per BN layer", [table])

    def deviations(self, s):
        return [
            f"A ReLU MLP {'-'.join(map(str, s.hidden))} with BN before each ReLU, {s.steps} steps per batch "
            f"size, SGD lr {s.learning_rate:g} momentum {s.momentum:g} (the same for every m, so larger "
            "batches see more data: compare the choices within a batch size).",
        ]  # fmt: skip
