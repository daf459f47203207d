"""Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", §3: EMA statistics vs PreciseBN.

In eval mode BatchNorm normalizes with population statistics, and what PyTorch keeps for them is an
exponential moving average (EMA) of the batch statistics, ``running = (1 - m) running + m batch``
with m = 0.1 (the paper's λ = 1 - m = 0.9). Wu & Johnson argue that the EMA is a poor estimate: with
a large m it averages only the last few dozen batches, with a small m it remembers batches computed
by weights that have since changed, and both get worse with a large learning rate. PreciseBN
(:func:`normkit.tools.recalibrate`) freezes the weights and takes the plain average of the
statistics of N fresh batches; "10³-10⁴ samples" suffice.

Here: a BN CNN trained at a deliberately high learning rate (SGD 0.2, momentum 0.9, batch 256, two
epochs), and at ``checkpoints`` points of training the eval-mode test error with (i) the EMA at
every momentum of ``ema_momenta`` (the layer keeps the first; the others are kept beside it by
:class:`EmaTracker` from the same batches, so every EMA describes the same weights) and (ii)
PreciseBN with N ∈ ``precise_samples`` training samples (batches of the training batch size; the
smaller sets are prefixes of the largest). Reported: error against step per method, the
checkpoint-to-checkpoint jitter of each over the second half of training, and the error against N.

Decisions: the training set supplies PreciseBN's batches, drawn by a seeded generator that depends
on the step only, so a resumed run recomputes the same numbers; step 0 (untrained weights) is not
measured.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit as nk
from normkit.functional import moments
from normkit.lab.datasets import first_test_examples
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.legacy import Experiment, Settings, Setup, Trial, register
from normkit.lab.models import cnn, initialize
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure
from normkit.lab.seeds import derived_seed

# --------------------------------------------------------------------------- shared with part 4


def batch_norm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm-like layer (torch's, normkit's, Ghost BN) that keeps running statistics."""
    family = (_BatchNorm, nk.BatchRenorm, nk.GhostBatchNorm, nk.BatchNormAct, nk.InPlaceABN)
    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, family) and module.running_mean is not None
    }


@torch.no_grad()
def error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Top-1 error of ``model`` on ``(x, y)`` in whatever mode the model is in."""
    accuracy, _ = accuracy_and_loss(model, x, y, chunk)
    return 1.0 - accuracy


def training_batches(
    x: torch.Tensor, batch_size: int, samples: int, seed: int
) -> list[torch.Tensor]:
    """``ceil(samples / batch_size)`` batches of rows of ``x`` drawn without replacement from a
    seeded permutation (a new permutation when one is used up)."""
    generator = torch.Generator().manual_seed(seed)
    batches, order, cursor = [], torch.randperm(len(x), generator=generator), 0
    for _ in range(max(1, math.ceil(samples / batch_size))):
        if cursor + batch_size > len(x):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        batches.append(x[order[cursor : cursor + batch_size]])
        cursor += batch_size
    return batches


def precise(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with PreciseBN statistics from ``batches`` (nk.tools.recalibrate)."""
    recalibrated, _ = nk.tools.recalibrate(model, batches, num_batches=None, progress=False)
    return recalibrated.eval()


class EmaTracker(nn.Module):
    """A network plus exponential moving averages of its BatchNorm statistics at other momenta.

    Each BatchNorm layer keeps one EMA (its ``momentum``); this wrapper keeps one more per momentum
    of ``momenta``, updated from the same training batches by a forward pre-hook, with the layer's
    conventions (mean and unbiased variance over N and the spatial dims, start at 0 and 1). The
    buffers are part of the state dict, so a resumed run continues them. ``steps`` counts training
    forwards (the runner makes one per optimizer step). :meth:`use` swaps an EMA into the layers.
    """

    def __init__(self, net: nn.Module, momenta: tuple[float, ...] = ()):
        super().__init__()
        self.net = net
        self.momenta = tuple(momenta)
        self.layers = batch_norm_layers(net)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        for k in range(len(self.momenta)):
            for path, layer in self.layers.items():
                self.register_buffer(
                    self._name(k, path, "mean"), torch.zeros_like(layer.running_mean)
                )
                self.register_buffer(self._name(k, path, "var"), torch.ones_like(layer.running_var))
        for path, layer in self.layers.items():
            layer.register_forward_pre_hook(self._hook(path))

    @staticmethod
    def _name(k: int, path: str, what: str) -> str:
        return f"ema{k}_{path.replace('.', '_')}_{what}"

    def _hook(self, path: str):
        def update(layer, args):
            # Only the training forwards of this wrapper: a deep copy of the net made by a tool
            # (PreciseBN) shares this hook but runs with the wrapper in eval mode.
            if not (self.training and layer.training and self.momenta):
                return
            x = args[0].detach()
            dims = [0, *range(2, x.dim())]
            m = math.prod(x.shape[d] for d in dims)
            mean, var = moments(x, dims, keepdim=False)
            var = var * (m / (m - 1))
            with torch.no_grad():
                for k, momentum in enumerate(self.momenta):
                    running_mean = getattr(self, self._name(k, path, "mean"))
                    running_var = getattr(self, self._name(k, path, "var"))
                    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                    running_var.lerp_(var.to(running_var.dtype), momentum)

        return update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.steps += 1
        return out

    def ema(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            path: (
                getattr(self, self._name(k, path, "mean")),
                getattr(self, self._name(k, path, "var")),
            )
            for path in self.layers
        }

    @torch.no_grad()
    def use(self, k: int) -> nk.RunningStatsSnapshot:
        """Copy EMA ``k`` into the layers; ``.restore()`` the returned snapshot to undo it."""
        snapshot = nk.snapshot_running_stats(self.net)
        for path, (mean, var) in self.ema(k).items():
            self.layers[path].running_mean.copy_(mean)
            self.layers[path].running_var.copy_(var)
        return snapshot


def ema_key(momentum: float) -> str:
    return f"error_ema_{momentum:g}"


def precise_key(samples: int) -> str:
    return f"error_precise_{samples}"


# ---------------------------------------------------------------------------------- experiment


@dataclass(frozen=True)
class PopulationStatsSettings(Settings):
    steps: int = 468  # two epochs of Fashion-MNIST's 60,000 images at batch 256
    batch_size: int = 256
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 128
    learning_rate: float = 0.2
    momentum: float = 0.9
    checkpoints: int = 20
    ema_momenta: tuple[float, ...] = (0.1, 0.01)  # the first is the layers' own
    precise_samples: tuple[int, ...] = (256, 1024, 4096, 16384)
    test_examples: int = 5_000  # 0: the whole test set


@register
class PopulationStats(Experiment):
    name = "population-stats"
    title = "EMA population statistics vs PreciseBN"
    paper = "Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm, §3 (EMA vs PreciseBN)"
    claim = (
        "The EMA of batch statistics is an inaccurate estimate of the population statistics, "
        "especially at a high learning rate; PreciseBN (the plain average over N batches with frozen "
        "weights) gives eval-mode results at least as good and steadier, saturating at about "
        "10³-10⁴ samples."
    )
    settings_class = PopulationStatsSettings
    presets = {
        "quick": {
            "steps": 120,
            "checkpoints": 6,
            "channels": (8, 16),
            "hidden": 64,
            "precise_samples": (256, 1024, 4096),
            "test_examples": 2_000,
        },
        "tiny": {
            "steps": 6,
            "batch_size": 32,
            "checkpoints": 2,
            "channels": (4, 8),
            "hidden": 16,
            "precise_samples": (32, 64),
            "test_examples": 100,
        },
    }

    def prepare_data(self, settings, dataset):
        return first_test_examples(dataset, settings.test_examples)

    def trials(self, settings, data, finals):
        every = max(1, settings.steps // settings.checkpoints)
        return [Trial("bn", {"norm": "batch"}, settings.steps, every, settings.seed)]

    def setup(self, trial, settings, data, generator):
        net = cnn(data.sample_shape, settings.channels, settings.hidden, data.classes, norm="batch")
        initialize(net, "he", generator)
        for layer in batch_norm_layers(net).values():
            layer.momentum = settings.ema_momenta[0]
        model = EmaTracker(net, settings.ema_momenta[1:])
        optimizer = torch.optim.SGD(
            net.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
        return Setup(model, optimizer, settings.batch_size)

    def measure(self, trial, settings, setup, data):
        tracker: EmaTracker = setup.model
        step = int(tracker.steps)
        if step == 0:
            return {}
        x, y = data.x_test, data.y_test
        row = {ema_key(settings.ema_momenta[0]): error_rate(tracker.net, x, y)}
        for k, momentum in enumerate(settings.ema_momenta[1:]):
            snapshot = tracker.use(k)
            row[ema_key(momentum)] = error_rate(tracker.net, x, y)
            snapshot.restore()
        largest = max(settings.precise_samples)
        batches = training_batches(
            data.x_train, settings.batch_size, largest, derived_seed(trial.seed, 7, step)
        )
        for samples in sorted(settings.precise_samples):
            count = max(1, samples // settings.batch_size)
            row[precise_key(samples)] = error_rate(precise(tracker.net, batches[:count]), x, y)
        return row

    def finish(self, trial, settings, setup, data):
        return {}

    # ------------------------------------------------------------------------------ summary
    def summarize(self, record: RunRecord) -> dict:
        settings = record.settings
        rows = [r for r in record.curve("bn") if ema_key(settings["ema_momenta"][0]) in r]
        methods = [ema_key(m) for m in settings["ema_momenta"]]
        methods += [precise_key(n) for n in sorted(settings["precise_samples"])]
        best = precise_key(max(settings["precise_samples"]))
        curves = {m: [r[m] for r in rows] for m in methods}
        second_half = len(rows) // 2

        def jitter(values):
            return (
                statistics.fmean(abs(b - a) for a, b in zip(values, values[1:], strict=False))
                if len(values) > 1
                else math.nan
            )

        per_method = {
            m: {
                "mean_error": statistics.fmean(v) if v else math.nan,
                "late_mean_error": statistics.fmean(v[second_half:]) if v else math.nan,
                "late_std_error": statistics.pstdev(v[second_half:]) if v else math.nan,
                "jitter": jitter(v[second_half:]),
                "max_error": max(v) if v else math.nan,
            }
            for m, v in curves.items()
        }
        versus_ema = {}
        for momentum in settings["ema_momenta"]:
            ema = curves[ema_key(momentum)]
            differences = [e - p for e, p in zip(ema, curves[best], strict=True)]
            versus_ema[f"{momentum:g}"] = {
                "checkpoints": len(differences),
                "precise_not_worse": sum(d >= 0 for d in differences),
                "mean_advantage": statistics.fmean(differences) if differences else math.nan,
                "max_advantage": max(differences) if differences else math.nan,
                "min_advantage": min(differences) if differences else math.nan,
            }
        saturation = {
            str(n): per_method[precise_key(n)]["mean_error"] - per_method[best]["mean_error"]
            for n in sorted(settings["precise_samples"])
        }
        return {
            "steps": [r["step"] for r in rows],
            "curves": curves,
            "per_method": per_method,
            "precise_vs_ema": versus_ema,
            "saturation": saturation,
            "reference_method": best,
        }

    # ------------------------------------------------------------------------------- report
    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        best_n = max(settings["precise_samples"])
        per = s["per_method"]
        pct = lambda v: fmt(None if v is None else 100 * v, ".2f")  # noqa: E731
        checks, rows = [], []
        for momentum, v in s["precise_vs_ema"].items():
            ema = per[ema_key(float(momentum))]
            rows.append(
                [
                    f"eval error, EMA m={momentum} (λ={1 - float(momentum):g}) vs PreciseBN {best_n}",
                    "EMA worse and high-variance at high LR (ResNet-50, batch 8192) [S]",
                    f"{pct(ema['mean_error'])}% vs {pct(per[s['reference_method']]['mean_error'])}% "
                    f"(mean over {v['checkpoints']} checkpoints); PreciseBN ≤ EMA at "
                    f"{v['precise_not_worse']}/{v['checkpoints']}",
                    "matches" if v["precise_not_worse"] == v["checkpoints"] else "partly",
                ]
            )
            checks.append(
                Check(
                    f"PreciseBN({best_n}) ≤ EMA(m={momentum}) at every checkpoint",
                    v["checkpoints"] > 0 and v["precise_not_worse"] == v["checkpoints"],
                    f"{v['precise_not_worse']}/{v['checkpoints']}; advantage mean "
                    f"{pct(v['mean_advantage'])} pts, range [{pct(v['min_advantage'])}, "
                    f"{pct(v['max_advantage'])}]",
                )
            )
            checks.append(
                Check(
                    f"PreciseBN({best_n}) steadier than EMA(m={momentum})",
                    None
                    if None in (per[s["reference_method"]]["jitter"], ema["jitter"])
                    else per[s["reference_method"]]["jitter"] < ema["jitter"],
                    f"mean |Δ error| between checkpoints {pct(per[s['reference_method']]['jitter'])} "
                    f"vs {pct(ema['jitter'])} pts",
                )
            )
        sat = s["saturation"]
        sizes = sorted(settings["precise_samples"])
        rows.append(
            [
                "PreciseBN error − error at the largest N, by N",
                "near-optimal from 10³-10⁴ samples [S]",
                ", ".join(f"N={n}: {pct(sat[str(n)])}" for n in sizes) + " pts",
                "matches"
                if len(sizes) > 1 and abs(sat[str(sizes[-2])]) <= 0.005 and sat[str(sizes[0])] > 0
                else "partly",
            ]
        )
        if len(sizes) > 1:
            checks.append(
                Check(
                    f"saturated: |error(N={sizes[-2]}) − error(N={sizes[-1]})| ≤ 0.5 pts on average",
                    abs(sat[str(sizes[-2])]) <= 0.005,
                    f"{pct(sat[str(sizes[-2])])} pts; N={sizes[0]}: {pct(sat[str(sizes[0])])} pts",
                )
            )
        comparison = Table(["quantity", "published", "ours", "verdict"], rows)
        table = Table(
            ["method", "mean error %", "late mean %", "late std %", "jitter (mean |Δ|) %", "max %"],
            [
                [
                    _label(m),
                    pct(v["mean_error"]),
                    pct(v["late_mean_error"]),
                    pct(v["late_std_error"]),
                    pct(v["jitter"]),
                    pct(v["max_error"]),
                ]
                for m, v in per.items()
            ],
            "Eval-mode test error over the checkpoints (late: the second half of training).",
        )
        per_checkpoint = Table(
            ["step", *(_label(m) for m in s["curves"])],
            [
                [step, *(pct(s["curves"][m][i]) for m in s["curves"])]
                for i, step in enumerate(s["steps"])
            ],
            "Test error (%) at every checkpoint.",
        )
        figures = [
            Figure("error-by-step", self._by_step(s), "Eval-mode test error at each checkpoint."),
            Figure(
                "error-by-samples",
                self._by_samples(s, settings),
                "PreciseBN error (mean over checkpoints) against the number of samples, with the "
                "EMAs as horizontal lines.",
            ),
        ]
        deviations = [
            f"A small CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, fc"
            f"{settings['hidden']}) on {record.config['data']['name']} for {settings['steps']} steps "
            f"at batch {settings['batch_size']}, SGD lr {settings['learning_rate']:g} momentum "
            f"{settings['momentum']:g} (constant), instead of ResNet-50 on ImageNet at batch 8192.",
            "The paper's numbers were not available to us verbatim (secondary sources only, "
            "marked [S]): the comparison is of directions.",
        ]
        ema0 = per[ema_key(settings["ema_momenta"][0])]
        headline = (
            f"mean eval error EMA(m={settings['ema_momenta'][0]:g}) {pct(ema0['mean_error'])}% vs "
            f"PreciseBN({best_n}) {pct(per[s['reference_method']]['mean_error'])}%; jitter "
            f"{pct(ema0['jitter'])} vs {pct(per[s['reference_method']]['jitter'])} pts"
        )
        return Report(
            comparison,
            [Section("Results", [*figures, table, per_checkpoint])],
            checks,
            deviations,
            headline,
        )

    @staticmethod
    def _by_step(s):
        figure = new_figure()
        axes = figure.add_subplot()
        for m, values in s["curves"].items():
            style = "--" if m.startswith("error_ema") else "-"
            axes.plot(s["steps"], [100 * v for v in values], style, marker=".", label=_label(m))
        axes.set_xlabel("training step")
        axes.set_ylabel("eval-mode test error (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        return figure

    @staticmethod
    def _by_samples(s, settings):
        figure = new_figure(5.6, 3.8)
        axes = figure.add_subplot()
        sizes = sorted(settings["precise_samples"])
        axes.plot(
            sizes,
            [100 * s["per_method"][precise_key(n)]["mean_error"] for n in sizes],
            "o-",
            label="PreciseBN",
        )
        for i, momentum in enumerate(settings["ema_momenta"]):
            axes.axhline(
                100 * s["per_method"][ema_key(momentum)]["mean_error"],
                color=f"C{i + 1}",
                linestyle="--",
                label=f"EMA m={momentum:g}",
            )
        axes.set_xscale("log")
        axes.set_xlabel("PreciseBN samples N")
        axes.set_ylabel("mean eval-mode test error (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        return figure


def _label(method: str) -> str:
    if method.startswith("error_ema_"):
        return f"EMA m={method.removeprefix('error_ema_')}"
    return f"PreciseBN N={method.removeprefix('error_precise_')}"
