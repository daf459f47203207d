"""Santurkar et al. (2018), §2.2 and Fig. 3: BN does not reduce internal covariate shift, measured
as the change of a layer's gradient when the layers before it update first.

The paper measures ICS (Definition 2.1, :func:`normkit.lab.metrics.ics`) for VGG on CIFAR-10 and a
25-layer deep linear network (DLN): with BN it is similar or *larger* (a larger ℓ2 difference, a
cosine further from 1), although BN trains faster. Here (docs/PROTOCOLS.md §3, protocol 3b),
Standard and BN for two families: ``cnn-*``, the VGG-style CNN of :mod:`normkit.lab.mechanism`
(plain SGD, cross-entropy), and ``dln-*``, a DLN (``dln_depth`` × ``dln_width``, Xavier-normal, BN
after every layer but the last) trained by full-batch gradient descent on the mean squared error of
synthetic regression (x ~ N(0, I), y = A x + 0.1 ε). Every ``eval_every`` steps ICS is measured on
a probe batch drawn for that step (the DLN: its full batch), with the trial's own optimizer, for
every Conv/Linear layer; the measurement restores model and optimizer bit for bit. Decisions (a
median over *all* evaluations of the absolute ‖G − G′‖ depended on the run's length: the quick run
reversed the full run's DLN verdict):

- Matched phase: the claims read the same early window in every preset, the evaluations at steps
  0 < t ≤ ``window``; the quick preset trains the full networks for ``window`` steps with fewer
  seeds, so each of its seeds gives the full run's value for that seed: they cannot contradict.
- Scale-free statistics decide: per layer the window's median of ‖G − G′‖/‖G‖ and of 1 − cos(G, G′),
  per seed the geometric mean over layers of BN's / Standard's; ‖G − G′‖₂ is shown, not judged.
- Layers: the CNN's convolutions (as the paper's figure), all the DLN's; never the first (G′ = G).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from normkit.lab import mechanism
from normkit.lab.claims import Claim, Published, above, below, per_seed
from normkit.lab.evaluation import on_test_set
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Curves
from normkit.lab.metrics import ics
from normkit.lab.models import initialize
from normkit.lab.plan import Arm, Plan
from normkit.lab.render import Section, Table, fmt

FIG3 = "Santurkar et al. 2018, Fig. 3"
NETWORKS = {"standard": "Standard", "bn": "Standard + BatchNorm"}
FAMILIES = {"cnn": "VGG-style CNN", "dln": "deep linear network"}
STATISTICS = ("l2", "turn", "relative_l2")  # turn: 1 − cos(G, G′)


@dataclass(frozen=True)
class IcsSettings(mechanism.NetworkSettings):
    window: int = 300  # claims: the evaluations at steps 0 < t <= window, in every preset
    eval_every: int = 50  # ICS is measured at every evaluation
    eval_examples: int = 1_000  # test images for the accuracy curve
    seeds: int = 5
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


def _judged(family: str, names) -> list[str]:
    """Of the layers after the first (G′ = G), those a claim reads: the CNN's convolutions."""
    return [k for k in names if k.startswith("conv")] if family == "cnn" else list(names)


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _window_medians(trial, window: int) -> dict[str, dict[str, float | None]]:
    """Per layer (the first left out), the median of each statistic over the window's evaluations."""
    rows = [r["ics"]["layers"] for r in trial.curve if r.get("ics") and 0 < r["step"] <= window]
    pick = {"l2": lambda v: v["l2"], "relative_l2": lambda v: v["relative_l2"],
            "turn": lambda v: None if v["cosine"] is None else 1 - v["cosine"]}  # fmt: skip
    medians = {}
    for layer in list(rows[0])[1:] if rows else []:
        found = {q: _finite(pick[q](r[layer]) for r in rows) for q in STATISTICS}
        medians[layer] = {q: statistics.median(v) if v else None for q, v in found.items()}
    return medians


def _geometric_mean(values) -> float | None:
    logs = [math.log(v) for v in _finite(values) if v > 0]
    return math.exp(statistics.fmean(logs)) if logs else None


def _ratio(statistic: str):
    """Per seed: the geometric mean over the judged layers of BN's / Standard's window median."""

    def value(trials, results):
        m = {t.params["network"]: _window_medians(t, results.settings.window) for t in trials
             if not t.final["diverged"]}  # fmt: skip
        if set(m) != set(NETWORKS):
            return None
        layers = _judged(trials[0].params["family"], m["standard"])
        return _geometric_mean(m["bn"][k][statistic] / m["standard"][k][statistic] for k in layers
                               if m["bn"][k][statistic] is not None and m["standard"][k][statistic])

    return value


def _window_train_loss(trials, results) -> float | None:
    """BN − Standard: the training loss averaged over the window's evaluations."""
    window, means = results.settings.window, {}
    for t in trials:
        losses = [v for s, v in zip(*t.series("train_loss"), strict=True) if 0 < s <= window]
        if losses and not t.final["diverged"]:
            means[t.params["network"]] = statistics.fmean(losses)
    return means["bn"] - means["standard"] if set(means) == set(NETWORKS) else None


@register
class Santurkar2018Ics(Experiment):
    name = "santurkar2018-ics"
    title = "Internal covariate shift with and without BN (Fig. 3)"
    paper = f"{mechanism.PAPER}, §2.2, Definition 2.1 and Fig. 3"
    claim = (
        "BN does not reduce internal covariate shift in the optimization sense: for VGG and for a "
        "25-layer deep linear network, the networks with BN show similar or even larger ICS (a "
        "larger ℓ2 difference between G and G', a cosine further from 1), yet train faster."
    )
    settings_class = IcsSettings
    presets = {
        "quick": {"steps": 300, "dln_steps": 300, "seeds": 2},  # the full networks, in the window
        "tiny": {"steps": 6, "window": 6, "channels": (4, 8), "hidden": 8, "batch_size": 16, "eval_every": 3,
                 "eval_examples": 40, "dln_depth": 4, "dln_width": 6, "dln_samples": 64, "dln_steps": 6,
                 "dln_eval_every": 3, "seeds": 1},
        "gpu": {"dataset": "cifar10", "vgg": "11", "hidden": 512, "steps": 3_910, "window": 1_000,
                "eval_every": 100, "eval_examples": 2_000, "seeds": 3},  # 10 epochs at batch 128
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
            regression = mechanism.gaussian_regression(s.dln_samples, s.dln_width, s.dln_outputs,
                                                       s.dln_noise, s.seed)  # fmt: skip
            model = mechanism.deep_linear(s.dln_width, s.dln_depth, s.dln_outputs, norm)
            mechanism.initialize_deep_linear(model, generator)
            optimizer = torch.optim.SGD(model.parameters(), lr=s.dln_learning_rate)
            return Setup(model, optimizer, s.dln_samples,  # full-batch gradient descent
                         loss_fn=nn.functional.mse_loss, data=regression)  # fmt: skip
        model = mechanism.network(s, data.sample_shape, data.classes, norm)
        initialize(model, "he", generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=s.learning_rate, momentum=s.momentum)
        return Setup(model, optimizer, s.batch_size)

    def measure(self, trial, s, setup, data):
        model = setup.model
        batch = mechanism.probe_batch(data, setup.batch_size, trial.seed, setup.step)
        if trial.params["family"] == "dln":
            layers, loss_fn = [f"linear{i}" for i in range(1, s.dln_depth + 1)], nn.functional.mse_loss
            row = {"test_mse": float(loss_fn(model(data.x_test), data.y_test))}
        else:
            layers, loss_fn = mechanism.weight_layers(s), nn.functional.cross_entropy
            row = on_test_set(model, data, s.eval_examples)
        model.train()  # ICS as training sees it: BN with batch statistics
        try:
            shift = ics(model, loss_fn, batch, setup.optimizer, layers=layers)
        finally:
            model.eval()
        row["ics"] = shift.as_dict()
        judged = [shift.layers[k] for k in _judged(trial.params["family"], list(shift.layers)[1:])]
        row["ics_relative"] = _geometric_mean(v.relative_l2 for v in judged)
        row["ics_turn"] = _geometric_mean(1 - v.cosine for v in judged)
        return row

    def finish(self, trial, s, setup, data):
        """The whole test set: accuracy and loss (CNN), the mean squared error (DLN)."""
        if trial.params["family"] != "dln":
            return super().finish(trial, s, setup, data)
        return {"test_mse": float(nn.functional.mse_loss(setup.model(data.x_test), data.y_test))}

    def claims(self, s):
        floor, window = 1 - s.similar_within, f"steps 1–{s.window}"
        ratios = [("relative", "relative_l2", "‖G − G′‖/‖G‖", "similar or larger ICS with BN", above(floor)),
                  ("angle", "turn", "1 − cos(G, G′)", "a cosine further from 1 with BN", above(floor)),
                  ("l2", "l2", "‖G − G′‖₂ (scale-dependent: shown, not judged)",
                   "similar or larger ℓ2 difference with BN", None)]  # fmt: skip
        claims = []
        for f in ("cnn", "dln") if s.dln else ("cnn",):
            over = f"BN / Standard, geometric mean over the {'conv ' * (f == 'cnn')}layers after the first"
            claims += [Claim(f"{f}-{slug}", f"{FAMILIES[f]}: {text}, median over {window}, {over}",
                             Published(published, FIG3, unverified=True),
                             per_seed(_ratio(statistic), "ratio of window medians", ratio=True, family=f),
                             criterion, fmt=".2f") for slug, statistic, text, published, criterion in ratios]
            claims.append(Claim(f"{f}-faster", f"{FAMILIES[f]}: training loss averaged over {window}, "
                                "BN − Standard", Published("BN trains faster", FIG3, unverified=True),
                                per_seed(_window_train_loss, "mean train_loss, BN − Standard", family=f),
                                below(0.0), fmt="+.4g"))  # fmt: skip
        return claims

    def figures(self, s):
        figures = []
        for f in ("cnn", "dln") if s.dln else ("cnn",):
            layers = "conv layers" if f == "cnn" else "layers"
            figures += [
                Curves(f"training-loss-{f}", "train_loss", "training loss" + (" (MSE)" if f == "dln" else ""),
                       f"{FAMILIES[f]}: training loss, mean over each interval.", where={"family": f},
                       logy=True),
                Curves(f"ics-{f}", {"‖G − G′‖/‖G‖": "ics_relative", "1 − cos(G, G′)": "ics_turn"},
                       "ICS (scale-free, dimensionless)",
                       f"{FAMILIES[f]}: ICS over training, geometric mean over the {layers} after the "
                       f"first; the claims read steps 1–{s.window}.", where={"family": f}, logy=True),
            ]  # fmt: skip
        return figures

    def extra_section(self, results):
        tables, window = [], results.settings.window
        headers = ["layer"] + [f"{q} {n}" for q in ("‖G − G′‖", "1 − cos", "‖G − G′‖/‖G‖") for n in NETWORKS]
        for family in results.values("family"):
            m = {n: [_window_medians(t, window) for t in results.trials(family=family, network=n)]
                 for n in NETWORKS}  # fmt: skip
            rows = [[layer, *(fmt(statistics.fmean(_finite(x[layer][q] for x in m[n]) or [math.nan]), ".3g")
                              for q in STATISTICS for n in NETWORKS)] for layer in (m["standard"] or [{}])[0]]
            tables.append(Table(headers, rows, f"{FAMILIES[family]}: per layer, the median over the "
                                f"evaluations at steps 1–{window}, mean over seeds."))  # fmt: skip
        return Section("ICS per layer", tables)

    def deviations(self, s):
        return [
            f"{mechanism.describe(s)}; SGD at {s.learning_rate:g} (momentum {s.momentum:g}), batch "
            f"{s.batch_size}, {s.steps} steps.",
            f"DLN: {s.dln_depth} layers of width {s.dln_width}, {s.dln_samples} samples, MSE, full-batch GD "
            f"at {s.dln_learning_rate:g} for {s.dln_steps} steps (the paper's width, loss, rate: unknown).",
            f"ICS every {s.eval_every} steps (DLN: {s.dln_eval_every}) on a probe batch drawn for that step; "
            f"the claims read steps 1–{s.window} and scale-free statistics (the paper plots ‖G − G′‖).",
        ]  # fmt: skip
