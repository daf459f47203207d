"""Santurkar et al. (2018), §3.1, §3.3 and Fig. 4: BN makes the loss landscape smoother.

At points along training, the paper moves along the gradient by a range of step sizes and looks
at how much the loss changes (the loss landscape), how much the gradient changes (gradient
predictiveness) and the ratio of the gradient's change to the step's length (effective
β-smoothness) (:func:`normkit.lab.metrics.landscape_probe`). With BN all three are smaller: the loss
band is narrower, the gradient more predictive, β lower. §3.3: normalizing by the ℓ1, ℓ2 or ℓ∞
average of the activations instead of the standard deviation trains comparably and smooths the
landscape the same way.

Here (docs/PROTOCOLS.md §3, CPU protocol 3c, d): the VGG-style CNN of :mod:`normkit.lab.mechanism`
on the run's data set (Fashion-MNIST by default), plain SGD, Standard, BN and (``lp_variants``)
the ℓ1/ℓ2/ℓ∞ layers of :class:`~normkit.lab.mechanism.LpBatchNorm` in BN's place, ``seeds`` seeds
(paired: a seed's networks see the same batches and the same probe batches). Every ``eval_every``
steps (step 0 included), on a probe batch of ``batch_size`` training examples drawn for that step,
in training mode: L(θ - η g) and ||∇L(θ - η g) - g|| for η in ``step_sizes``.

Step sizes (our choice; configurable): η ∈ {0.05, 0.1, 0.2, 0.3, 0.4}, the grid the paper's
appendix is reported to use for VGG, which with our training learning rate 0.1 is {0.5, 1, 2, 3,
4} × the learning rate: from half a training step to four. Per seed, the probes after step 0 (at
step 0 the networks have not been trained yet) are reduced by their median, a probe whose step
overflowed (a non-finite loss or gradient, more likely without BN) counting as +inf rather than
being dropped (issue 17: dropping it favoured the network without BN); the share of overflowed
probes per arm is a claim of its own.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from normkit.lab.claims import Claim, Published, below, difference, from_curve, per_seed
from normkit.lab.evaluation import on_test_set
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Curves
from normkit.lab.mechanism import LABELS, PAPER, NetworkSettings, describe, network, probe_batch
from normkit.lab.metrics import landscape_probe
from normkit.lab.models import initialize
from normkit.lab.plan import Arm, Plan

FIG4 = "Santurkar et al. 2018, Fig. 4"
NORM_OF = {"standard": "none", "bn": "batch", "l1": "l1", "l2": "l2", "linf": "linf"}
LP = ("l1", "l2", "linf")


@dataclass(frozen=True)
class LandscapeSettings(NetworkSettings):
    step_sizes: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4)
    lp_variants: bool = True  # also the ℓ1, ℓ2, ℓ∞ normalizations of §3.3
    seeds: int = 3
    eval_every: int = 50  # the landscape is probed at every evaluation
    eval_examples: int = 1_000  # test images for the accuracy curve
    tail: float = 0.2  # "final" training loss: the mean over the last 20% of the steps
    comparable: float = 0.25  # ℓp variants "train comparably": final loss <= (1 + this) x BN's


MEASURES = {  # what a probe gives, by the name the claims use
    "loss_band": lambda p: None if p["loss_max"] is None or p["loss_min"] is None
    else p["loss_max"] - p["loss_min"],
    "grad_change_max": lambda p: p["grad_change_max"],
    "beta_smoothness": lambda p: p["beta_smoothness"],
}


def _overflowed(probe) -> bool:
    """A step along the gradient made the loss or the gradient non-finite (null in the rows)."""
    return None in probe["losses"] or None in probe["grad_changes"]


def _median_over_probes(measure: str):
    """The median over the probes after step 0, an overflowed probe counting as +inf (not dropped)."""

    def reduce(steps, probes):
        values = [MEASURES[measure](p) for s, p in zip(steps, probes, strict=True) if s > 0]
        return statistics.median(math.inf if v is None else v for v in values) if values else None

    return reduce


def _overflow_rate(steps, probes) -> float | None:
    found = [_overflowed(p) for s, p in zip(steps, probes, strict=True) if s > 0]
    return sum(found) / len(found) if found else None


def _over(a: float | None, b: float | None) -> float | None:
    """a / b of two medians where +inf is an overflow: b = +inf gives 0 (a finite), a = +inf none."""
    if a is None or b is None or math.isinf(a) or not b:
        return None
    return 0.0 if math.isinf(b) else a / b


def _median_ratio(measure: str, arm: str, against: str, by_arm: dict) -> float | None:
    medians = [_median_over_probes(measure)(*by_arm[k].series("landscape")) if k in by_arm else None
               for k in (arm, against)]  # fmt: skip
    return _over(*medians)


def _smoother(measure: str):
    """Per seed: BN's median of ``measure`` over probes / Standard's."""

    def value(trials, results):
        by_arm = {t.params["arm"]: t for t in trials if not t.final["diverged"]}
        return _median_ratio(measure, "bn", "standard", by_arm)

    return value


def _tail_loss(trial, settings) -> float | None:
    steps, losses = trial.series("train_loss")
    tail = [v for s, v in zip(steps, losses, strict=True) if s > trial.final["step"] * (1 - settings.tail)]
    return statistics.fmean(tail) if tail and not trial.final["diverged"] else None


def _tail(trials, results) -> float | None:
    return _tail_loss(results.one(trials, "tail loss"), results.settings)


def _worst_lp(what: str):
    """Per seed, the worst ℓp variant: its final loss over BN's (``what="loss"``), or the larger of
    its median loss band and β over Standard's (``what="smooth"``)."""

    def value(trials, results):
        by_arm = {t.params["arm"]: t for t in trials if not t.final["diverged"]}
        found = []
        for arm in (a for a in LP if a in by_arm):
            if what == "loss":
                lp, bn = (_tail_loss(by_arm[a], results.settings) for a in (arm, "bn"))
                found.append(None if lp is None or not bn else lp / bn)
                continue
            found += [_median_ratio(m, arm, "standard", by_arm) for m in ("loss_band", "beta_smoothness")]
        return None if not found or None in found else max(found)

    return value


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
        "quick": {"steps": 300, "channels": (8, 16, 32), "hidden": 64, "eval_every": 50, "seeds": 2},
        "tiny": {"steps": 6, "channels": (4, 8), "hidden": 8, "batch_size": 16, "eval_every": 3,
                 "eval_examples": 40, "step_sizes": (0.1, 0.4), "seeds": 1},
        "gpu": {"dataset": "cifar10", "vgg": "11", "hidden": 512, "steps": 7_820, "eval_every": 100,
                "eval_examples": 2_000, "seeds": 3},  # 20 epochs at batch 128
    }  # fmt: skip

    def plan(self, s, data):
        networks = ["standard", "bn", *(LP if s.lp_variants else ())]
        arms = [Arm(k, {"network": k, "norm": NORM_OF[k]}, LABELS[k]) for k in networks]
        return Plan(arms, s.steps, seeds=s.seeds, seed=s.seed, eval_every=s.eval_every)

    def setup(self, trial, s, data, generator):
        model = network(s, data.sample_shape, data.classes, trial.params["norm"])
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=s.learning_rate, momentum=s.momentum)
        return Setup(model, optimizer, s.batch_size)

    def measure(self, trial, s, setup, data):
        model, count = setup.model, s.eval_examples
        row = on_test_set(model, data, count)
        batch = probe_batch(data, s.batch_size, trial.seed, setup.step)
        model.train()  # the landscape training sees: normalization with batch statistics
        try:
            probe = landscape_probe(model, nn.functional.cross_entropy, batch, s.step_sizes)
        finally:
            model.eval()
        return {**row, "landscape": probe.as_dict()}

    def claims(self, s):
        def smoother(name, measure, quantity, published, source):
            return Claim(name, f"{quantity}, BN / Standard (medians over probes, an overflow = +∞)",
                         Published(published, source, unverified=True),
                         per_seed(_smoother(measure), f"median {measure}, BN / Standard", ratio=True),
                         below(1.0))

        tail = f"training loss over the last {s.tail:.0%} of the steps"
        claims = [
            smoother("loss-band", "loss_band", "range of L(θ − ηg) over η", "narrower with BN",
                     f"{FIG4}(a)"),
            smoother("gradient-change", "grad_change_max", "max over η of ‖∇L(θ − ηg) − g‖",
                     "smaller with BN: the gradient is more predictive", f"{FIG4}(b)"),
            smoother("beta", "beta_smoothness", "effective β-smoothness", "lower with BN", f"{FIG4}(c)"),
            *(Claim(f"overflow-{arm}", f"share of probes where a step along the gradient overflowed, {arm}",
                    Published("not reported (an overflow counts as +∞ in the medians above)", FIG4),
                    from_curve(_overflow_rate, "landscape", "overflowed probes / probes", arm=arm), None,
                    fmt=".3f") for arm in ("standard", "bn")),
            Claim("faster", f"{tail}, BN − Standard",
                  Published("BN trains faster", "Santurkar et al. 2018, Fig. 1", unverified=True),
                  difference(per_seed(_tail, tail, arm="bn"), per_seed(_tail, tail, arm="standard")),
                  None, fmt="+.4f"),
        ]  # fmt: skip
        if s.lp_variants:
            claims += [
                Claim("lp-comparable", "worst ℓp variant's final training loss / BN's",
                      Published("ℓp normalizations train comparably to BN", "Santurkar et al. 2018, §3.3",
                                unverified=True),
                      per_seed(_worst_lp("loss"), "max over ℓ1, ℓ2, ℓ∞", ratio=True),
                      below(1 + s.comparable)),
                Claim("lp-smoother", "worst ℓp variant's median loss band and β / Standard's",
                      Published("ℓp normalizations smooth the landscape like BN",
                                "Santurkar et al. 2018, §3.3", unverified=True),
                      per_seed(_worst_lp("smooth"), "max over ℓ1, ℓ2, ℓ∞ and the two medians", ratio=True),
                      below(1.0)),
            ]  # fmt: skip
        return claims

    def figures(self, s):
        return [Curves("training-loss", "train_loss", "training loss",
                       "Training loss, mean over each interval.", logy=True),
                Curves("test-accuracy", "test_accuracy", "test accuracy (fraction)",
                       f"Test accuracy in eval mode on the first {s.eval_examples} test images.")
                ]  # fmt: skip

    def deviations(self, s):
        return [
            f"{describe(s)}; plain SGD at {s.learning_rate:g} (momentum {s.momentum:g}), batch "
            f"{s.batch_size}, {s.steps} steps.",
            f"The landscape is probed every {s.eval_every} steps on a probe batch drawn for that step (the "
            f"paper: at the training batch of each step), at the step sizes "
            f"{', '.join(f'{e:g}' for e in s.step_sizes)} (our reading of the paper's grid).",
            "ℓp layers: γ (x − μ_B) / (S_p + eps) + β per channel with S_1 = mean|x|, S_2 = sqrt(mean x²), "
            "S_∞ = max|x| over the batch and space, taken before the mean is subtracted (our reading of "
            "§3.3).",
        ]  # fmt: skip
