"""Santurkar et al. (2018), §2.2 and Fig. 3: BN does not reduce internal covariate shift, measured
as the change of a layer's gradient when the layers before it update first.

The paper measures ICS (Definition 2.1, :func:`normkit.lab.metrics.ics`) over training, for VGG on
CIFAR-10 and for a 25-layer deep linear network (DLN) on synthetic Gaussian data: networks with BN
show similar or even *larger* ICS (a larger ℓ2 difference, a cosine further from 1) than those
without, although they train faster.

Here (docs/PROTOCOLS.md §3, CPU protocol 3b), two pairs of networks, Standard and BN:

- ``cnn-*``: the VGG-style CNN of :mod:`normkit.lab.mechanism` on the run's data set
  (Fashion-MNIST by default), plain SGD, cross-entropy;
- ``dln-*``: a deep linear network (``dln_depth`` layers of width ``dln_width``, Xavier-normal
  weights; BN after every layer but the last) trained by full-batch gradient descent on the mean
  squared error of synthetic Gaussian regression (x ~ N(0, I), y = A x + 0.1 ε).

Every ``eval_every`` steps (step 0 included) ICS is measured on a probe batch of ``batch_size``
training examples drawn for that step (the whole training set for the DLN, i.e. its full batch),
with the trial's own optimizer, for every Conv/Linear layer (BN's γ and β are among "the layers
before", and move with them, but are not reported). The measurement restores model and optimizer
bit for bit, so the trajectory is the one training takes without it. Per layer and seed: the
median over the evaluations after step 0 (at initialization the networks are in a transient) of
||G - G'||_2 (the paper's ICS), cos(G, G') and ||G - G'|| / ||G||. Medians, because ICS comes in
spikes that would decide a mean on their own. The first layer (G' = G by definition) is left out.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from normkit.lab.claims import Claim, Published, above, below, per_seed
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Curves
from normkit.lab.mechanism import (
    PAPER,
    deep_linear,
    gaussian_regression,
    initialize_deep_linear,
    probe_batch,
    vgg,
)
from normkit.lab.metrics import ics
from normkit.lab.models import initialize
from normkit.lab.plan import Arm, Plan
from normkit.lab.render import Section, Table, fmt
from normkit.lab.settings import Settings

FIG3 = "Santurkar et al. 2018, Fig. 3"
NETWORKS = {"standard": "Standard", "bn": "Standard + BatchNorm"}
FAMILIES = {"cnn": "VGG-style CNN", "dln": "deep linear network"}
STATISTICS = ("l2", "cosine", "relative_l2")


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
    similar_within: float = 0.2  # BN's ICS counts as "similar" down to (1 - this) x Standard's


def _layer_medians(trial) -> dict[str, dict[str, float]]:
    """Per layer (the first left out), the median over the evaluations after step 0 of each
    statistic."""
    rows = [r["ics"]["layers"] for r in trial.curve if r.get("ics") and r["step"] > 0]
    layers = list(rows[0])[1:] if rows else []
    return {layer: {q: _median([r[layer][q] for r in rows]) for q in STATISTICS} for layer in layers}


def _median(values) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def _share_not_lower(statistic: str):
    """Per seed: the share of layers where BN's median is at least (1 - similar_within) × the
    Standard network's (for the cosine: of 1 - cos)."""

    def value(trials, results):
        medians = {t.params["network"]: _layer_medians(t) for t in trials}
        if set(medians) != set(NETWORKS):
            return None
        floor = 1 - results.settings.similar_within
        shift = (lambda m: 1 - m["cosine"]) if statistic == "cosine" else (lambda m: m[statistic])
        layers = list(medians["standard"])
        held = [shift(medians["bn"][k]) >= floor * shift(medians["standard"][k]) for k in layers]
        return sum(held) / len(held) if held else None

    return value


def _mean_train_loss(trials, results) -> float | None:
    """BN − Standard: the training loss averaged over the evaluations of the run."""
    means = {t.params["network"]: statistics.fmean(v for v in t.series("train_loss")[1]) for t in trials
             if not t.final["diverged"] and t.series("train_loss")[1]}  # fmt: skip
    return means["bn"] - means["standard"] if set(means) == set(NETWORKS) else None


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
        "quick": {"steps": 300, "channels": (8, 16, 32), "hidden": 64, "eval_every": 25, "dln_steps": 300,
                  "dln_eval_every": 25, "seeds": 1},
        "tiny": {"steps": 6, "channels": (4, 8), "hidden": 8, "batch_size": 16, "eval_every": 3,
                 "eval_examples": 40, "dln_depth": 4, "dln_width": 6, "dln_samples": 64, "dln_steps": 6,
                 "dln_eval_every": 3, "seeds": 1},
    }  # fmt: skip

    def plan(self, s, data):
        families = ["cnn", "dln"] if s.dln else ["cnn"]
        arms = [Arm(f"{f}-{n}", {"family": f, "network": n}, f"{FAMILIES[f]}: {NETWORKS[n]}")
                for f in families for n in NETWORKS]  # fmt: skip
        dln = lambda p: p["family"] == "dln"  # noqa: E731
        return Plan(arms, lambda p: s.dln_steps if dln(p) else s.steps, seeds=s.seeds, seed=s.seed,
                    eval_every=lambda p: s.dln_eval_every if dln(p) else s.eval_every)  # fmt: skip

    def setup(self, trial, s, data, generator):
        norm = "batch" if trial.params["network"] == "bn" else "none"
        if trial.params["family"] == "dln":
            regression = gaussian_regression(s.dln_samples, s.dln_width, s.dln_outputs, s.dln_noise, s.seed)
            model = deep_linear(s.dln_width, s.dln_depth, s.dln_outputs, norm)
            initialize_deep_linear(model, generator)
            optimizer = torch.optim.SGD(model.parameters(), lr=s.dln_learning_rate)
            return Setup(model, optimizer, s.dln_samples,  # full-batch gradient descent
                         loss_fn=nn.functional.mse_loss, data=regression)  # fmt: skip
        model = vgg(data.sample_shape, s.channels, s.hidden, data.classes, norm=norm)
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=s.learning_rate, momentum=s.momentum)
        return Setup(model, optimizer, s.batch_size)

    def measure(self, trial, s, setup, data):
        model = setup.model
        batch = probe_batch(data, setup.batch_size, trial.seed, setup.step)
        if trial.params["family"] == "dln":
            layers = [f"linear{i}" for i in range(1, s.dln_depth + 1)]
            loss_fn = nn.functional.mse_loss
            row = {"test_mse": float(loss_fn(model(data.x_test), data.y_test))}
        else:
            layers = [f"conv{i + 1}" for i in range(len(s.channels))] + [f"linear{len(s.channels) + 1}",
                                                                       "output"]  # fmt: skip
            loss_fn = nn.functional.cross_entropy
            accuracy, loss = accuracy_and_loss(model, data.x_test[:s.eval_examples],
                                               data.y_test[:s.eval_examples])  # fmt: skip
            row = {"test_accuracy": accuracy, "test_loss": loss}
        model.train()  # ICS as training sees it: BN with batch statistics
        try:
            shift = ics(model, loss_fn, batch, setup.optimizer, layers=layers)
        finally:
            model.eval()
        row["ics"] = shift.as_dict()
        return row

    def finish(self, trial, s, setup, data):
        """The whole test set: accuracy and loss for the CNN, the mean squared error for the DLN
        (whose targets are real numbers, so accuracy means nothing)."""
        if trial.params["family"] != "dln":
            return super().finish(trial, s, setup, data)
        return {"test_mse": float(nn.functional.mse_loss(setup.model(data.x_test), data.y_test))}

    def claims(self, s):
        floor = 1 - s.similar_within
        claims = []
        for family in ("cnn", "dln") if s.dln else ("cnn",):
            name = FAMILIES[family]
            claims += [
                Claim(f"{family}-l2",
                      f"{name}: share of layers where BN's ‖G − G′‖₂ ≥ {floor:g} × Standard's",
                      Published("similar or larger ICS with BN", FIG3, unverified=True),
                      per_seed(_share_not_lower("l2"), "share of layers", family=family),
                      above(0.5), fmt=".2f"),
                Claim(f"{family}-angle", f"{name}: share of layers where BN's 1 − cos(G, G′) ≥ {floor:g} × "
                      "Standard's", Published("a cosine further from 1 with BN", FIG3, unverified=True),
                      per_seed(_share_not_lower("cosine"), "share of layers", family=family),
                      above(0.5), fmt=".2f"),
                Claim(f"{family}-faster", f"{name}: training loss averaged over the run, BN − Standard",
                      Published("BN trains faster", FIG3, unverified=True),
                      per_seed(_mean_train_loss, "mean train_loss, BN − Standard", family=family),
                      below(0.0), fmt="+.4g"),
            ]  # fmt: skip
        return claims

    def figures(self, s):
        return [Curves(f"training-loss-{f}", "train_loss", "training loss" + (" (MSE)" if f == "dln" else ""),
                       f"{FAMILIES[f]}: training loss, mean over each interval.", where={"family": f},
                       logy=True) for f in (("cnn", "dln") if s.dln else ("cnn",))]  # fmt: skip

    def extra_section(self, results):
        tables = []
        for family in results.values("family"):
            medians = {n: [_layer_medians(t) for t in results.trials(family=family, network=n)]
                       for n in NETWORKS}  # fmt: skip
            layers = list(medians["standard"][0]) if medians["standard"] else []
            rows = [[layer, *(fmt(statistics.fmean(m[layer][q] for m in medians[n]), spec)
                              for q, spec in (("l2", ".3g"), ("cosine", ".4f"), ("relative_l2", ".3g"))
                              for n in NETWORKS)] for layer in layers]  # fmt: skip
            tables.append(Table(["layer", "‖G − G′‖ Standard", "‖G − G′‖ BN", "cos Standard", "cos BN",
                                 "‖G − G′‖/‖G‖ Standard", "‖G − G′‖/‖G‖ BN"], rows,
                                f"{FAMILIES[family]}: per layer, the median over the evaluations after "
                                "step 0, mean over seeds."))  # fmt: skip
        return Section("ICS per layer", tables)

    def deviations(self, s):
        return [
            f"A VGG-style CNN (conv{'-conv'.join(map(str, s.channels))}, fc{s.hidden}) on "
            f"{'Fashion-MNIST' if s.dataset == 'auto' else s.dataset} instead of VGG on CIFAR-10; plain SGD "
            f"at {s.learning_rate:g} (momentum {s.momentum:g}), batch {s.batch_size}, {s.steps} steps.",
            f"DLN: {s.dln_depth} layers of width {s.dln_width}, {s.dln_samples} samples of x ~ N(0, I), "
            f"y = A x + {s.dln_noise:g} ε ({s.dln_outputs} output(s)), mean squared error, full-batch GD at "
            f"{s.dln_learning_rate:g} for {s.dln_steps} steps (the paper's width, loss and learning rate "
            "are not known to us).",
            f"ICS is measured every {s.eval_every} steps (DLN: {s.dln_eval_every}) on a probe batch drawn "
            "for that step, not on the training batch of the step.",
        ]  # fmt: skip
