"""Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", §4: the train-test inconsistency.

BatchNorm normalizes with the statistics of the *normalization batch* in training and with
population statistics in eval mode. When the normalization batch size (NBS) is small, the two differ
a lot, and a network trained on the noisy batch statistics is evaluated on a distribution it never
saw. Wu & Johnson vary the NBS from 2 to 1024 inside a fixed gradient batch and track three errors:
the training set with batch statistics, the validation set with batch statistics, and the validation
set with population statistics; at a small NBS the last is much worse than the second. A remedy they
study: use population statistics in training too, by freezing BatchNorm (FrozenBN) for the last part
of training.

Here: a small CNN on Fashion-MNIST (:func:`conv_net`: three conv stages, BN in the conv layers
only, as in the paper's ResNets), gradient batch 256, with the NBS set by
:class:`normkit.GhostBatchNorm` (ghost batches of NBS samples, the running statistics updated per
ghost batch) at every NBS of ``nbs``; at NBS in ``freeze_nbs`` a second trial freezes BatchNorm for
the last ``freeze_fraction`` of the steps. Four errors at the end:

- ``train_error_batch`` / ``test_error_batch``: train mode on chunks of the gradient batch size, so
  every sample is normalized with the statistics of its own ghost batch, as in training (no running
  statistics change);
- ``test_error_population``: eval mode with PreciseBN statistics (:func:`normkit.tools.recalibrate`,
  ``precise_samples`` training samples), which removes the EMA's own error (part 4's
  ``population-stats``) from the comparison;
- ``test_error_ema``: eval mode with the EMA the layers kept.

Decisions: freezing at step F first recomputes the statistics with PreciseBN (the EMA of tiny ghost
batches is noisy; the paper's population statistics are PreciseBN's), then puts every BatchNorm in
eval mode for the remaining steps (γ and β still learn); a frozen model's "population" error uses the
statistics it was frozen with, since those are what its last steps trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import normkit as nk
from normkit.lab import models
from normkit.lab.datasets import first_test_examples
from normkit.lab.experiments.population_stats import (
    batch_norm_layers,
    error_rate,
    precise,
    training_batches,
)
from normkit.lab.legacy import Experiment, Settings, Setup, Trial, register
from normkit.lab.models import initialize
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure
from normkit.lab.seeds import derived_seed


class FreezeBatchNorm(nn.Module):
    """A network whose BatchNorm layers are frozen (eval mode) from training step ``freeze_at`` on.

    ``steps`` (a buffer, so resuming keeps it) counts training forwards, one per optimizer step in
    the runner. At the first training forward with ``steps == freeze_at`` it calls ``before_freeze(net)``
    (e.g. PreciseBN in place); from then on every training forward runs the BatchNorm layers in
    eval mode: population statistics, no updates, gradients through the fixed affine map.
    ``freeze_at=None`` never freezes.
    """

    def __init__(self, net: nn.Module, freeze_at: int | None, before_freeze=None):
        super().__init__()
        self.net = net
        self.freeze_at = freeze_at
        self.before_freeze = before_freeze
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def frozen(self) -> bool:
        """Whether at least one training step ran with the BatchNorm layers frozen."""
        return self.freeze_at is not None and int(self.steps) > self.freeze_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.net(x)
        if self.freeze_at is not None and int(self.steps) == self.freeze_at and self.before_freeze:
            self.before_freeze(self.net)
        if self.freeze_at is not None and int(self.steps) >= self.freeze_at:
            for layer in batch_norm_layers(self.net).values():
                layer.eval()
        out = self.net(x)
        self.steps += 1
        return out


def conv_net(
    sample_shape: tuple[int, ...],
    channels: tuple[int, ...],
    hidden: int,
    classes: int,
    norm: str,
    fc_norm: bool = False,
) -> nn.Sequential:
    """conv3 (no bias) → ``norm`` → ReLU → maxpool2 per stage, then fc ``hidden`` [→ ``norm``] →
    ReLU → fc.

    As in the ResNets of the paper, the normalizer is in the convolutional layers only, unless
    ``fc_norm``: BatchNorm on the fc layer's vectors sees NBS values per feature, and at NBS 2 it
    maps each feature to ±1, an effect of its own (the ``fc_nbs`` trials measure it).
    """
    fc = (lambda features: nk.create_norm(norm, features)) if fc_norm else None
    return models.conv_net(sample_shape, channels, hidden, classes, norm, kernel_size=3, fc_norm=fc)


@torch.no_grad()
def batch_statistics_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    """Error with every normalizer in training mode (batch statistics, here those of each ghost
    batch inside chunks of ``chunk`` samples), running statistics left as they were."""
    modes = {m: m.training for m in model.modules()}
    try:
        with nk.frozen_running_stats(model):
            model.train()
            return error_rate(model, x, y, chunk)
    finally:
        for m, training in modes.items():
            m.train(training)


@dataclass(frozen=True)
class TrainTestGapSettings(Settings):
    steps: int = 468  # two epochs at batch 256
    batch_size: int = 256  # the gradient batch
    nbs: tuple[int, ...] = (2, 4, 16, 64, 256)
    freeze_nbs: tuple[int, ...] = (2, 4)
    freeze_fraction: float = 0.2
    fc_nbs: tuple[int, ...] = (2,)  # NBS at which a trial also normalizes the fc layer
    channels: tuple[int, ...] = (16, 32, 64)  # 28 → 14 → 7 → 3 pixels: the last stage is small
    hidden: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    precise_samples: int = 4096
    train_examples_eval: int = 5_000  # training examples for the train-set error
    test_examples: int = 0  # 0: the whole test set
    eval_every: int = 117


@register
class TrainTestGap(Experiment):
    name = "train-test-gap"
    title = "Train-test inconsistency against the normalization batch size"
    paper = "Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm, §4 (train-test inconsistency)"
    claim = (
        "At a small normalization batch size, evaluating with population statistics is much worse "
        "than evaluating with batch statistics (the train-test inconsistency); using population "
        "statistics for the last part of training (FrozenBN) reduces the gap."
    )
    settings_class = TrainTestGapSettings
    presets = {
        "quick": {
            "steps": 150,
            "nbs": (2, 16, 256),
            "freeze_nbs": (2,),
            "fc_nbs": (2,),
            "channels": (8, 16, 32),
            "hidden": 64,
            "precise_samples": 2048,
            "train_examples_eval": 2_000,
            "test_examples": 2_000,
            "eval_every": 50,
        },
        "tiny": {
            "steps": 6,
            "batch_size": 32,
            "nbs": (2, 32),
            "freeze_nbs": (2,),
            "fc_nbs": (2,),
            "freeze_fraction": 0.5,
            "channels": (4, 8, 8),
            "hidden": 16,
            "precise_samples": 64,
            "train_examples_eval": 64,
            "test_examples": 64,
            "eval_every": 3,
        },
    }

    def prepare_data(self, settings, dataset):
        return first_test_examples(dataset, settings.test_examples)

    def trials(self, settings, data, finals):
        plan = []
        for nbs in settings.nbs:
            variants = [("", False, False)]
            if nbs in settings.freeze_nbs:
                variants.append(("/frozen", True, False))
            if nbs in settings.fc_nbs:
                variants.append(("/fc", False, True))
            for suffix, frozen, fc_norm in variants:
                params = {"nbs": nbs, "frozen": frozen, "fc_norm": fc_norm}
                plan.append(
                    Trial(
                        f"nbs={nbs}{suffix}",
                        params,
                        settings.steps,
                        settings.eval_every,
                        settings.seed,
                    )
                )
        return plan

    def setup(self, trial, settings, data, generator):
        nbs = trial.params["nbs"]
        net = conv_net(
            data.sample_shape,
            settings.channels,
            settings.hidden,
            data.classes,
            f"ghost:{nbs}",
            fc_norm=trial.params.get("fc_norm", False),
        )
        initialize(net, "he", generator)
        freeze_at = None
        if trial.params["frozen"]:
            freeze_at = settings.steps - round(settings.freeze_fraction * settings.steps)
        batches = lambda: training_batches(  # noqa: E731
            data.x_train, settings.batch_size, settings.precise_samples, derived_seed(trial.seed, 8)
        )

        def recalibrate_in_place(module):
            nk.tools.recalibrate(module, batches(), num_batches=None, inplace=True, progress=False)

        model = FreezeBatchNorm(net, freeze_at, recalibrate_in_place)
        optimizer = torch.optim.SGD(
            net.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
        return Setup(model, optimizer, settings.batch_size)

    def measure(self, trial, settings, setup, data):
        """During training only the cheap number: test error with the layers' own statistics."""
        return {"test_error_ema": error_rate(setup.model, data.x_test, data.y_test)}

    def finish(self, trial, settings, setup, data):
        model: FreezeBatchNorm = setup.model
        net = model.net
        generator = torch.Generator().manual_seed(derived_seed(trial.seed, 9))
        count = min(settings.train_examples_eval, len(data.y_train))
        index = torch.randperm(len(data.y_train), generator=generator)[:count]
        x_train, y_train = data.x_train[index], data.y_train[index]
        x_test, y_test = data.x_test, data.y_test
        chunk = settings.batch_size
        row = {
            "train_error_batch": batch_statistics_error(net, x_train, y_train, chunk),
            "test_error_batch": batch_statistics_error(net, x_test, y_test, chunk),
            "test_error_ema": error_rate(net, x_test, y_test),
        }
        if model.frozen:
            population = net  # frozen: the statistics its last steps trained with
        else:
            population = precise(
                net,
                training_batches(
                    data.x_train,
                    settings.batch_size,
                    settings.precise_samples,
                    derived_seed(trial.seed, 10),
                ),
            )
        row["test_error_population"] = error_rate(population, x_test, y_test)
        row["train_error_population"] = error_rate(population, x_train, y_train)
        row["inconsistency"] = row["test_error_population"] - row["test_error_batch"]
        return row

    # ------------------------------------------------------------------------------ summary
    def summarize(self, record: RunRecord) -> dict:
        finals = record.finals()
        keys = (
            "train_error_batch",
            "test_error_batch",
            "test_error_population",
            "train_error_population",
            "test_error_ema",
            "inconsistency",
        )
        runs = {
            key: {
                **{k: row[k] for k in (*keys, "nbs", "frozen", "diverged")},
                "fc_norm": row.get("fc_norm", False),
            }
            for key, row in finals.items()
        }
        plain = {r["nbs"]: r for r in runs.values() if not r["frozen"] and not r["fc_norm"]}
        with_fc = {
            str(r["nbs"]): {
                "inconsistency": r["inconsistency"],
                "test_error_batch": r["test_error_batch"],
                "test_error_population": r["test_error_population"],
            }
            for r in runs.values()
            if r["fc_norm"]
        }
        remedy = {
            str(r["nbs"]): {
                "test_error_population": r["test_error_population"],
                "without_freeze": plain[r["nbs"]]["test_error_population"],
                "improvement": plain[r["nbs"]]["test_error_population"]
                - r["test_error_population"],
            }
            for r in runs.values()
            if r["frozen"] and r["nbs"] in plain
        }
        sizes = sorted(plain)
        return {
            "runs": runs,
            "nbs": sizes,
            "inconsistency_by_nbs": {str(n): plain[n]["inconsistency"] for n in sizes},
            "freeze": remedy,
            "fc_norm": with_fc,
        }

    # ------------------------------------------------------------------------------- report
    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        pct = lambda v: fmt(None if v is None else 100 * v, ".2f")  # noqa: E731
        sizes = s["nbs"]
        gap = {int(n): v for n, v in s["inconsistency_by_nbs"].items()}
        smallest, largest = sizes[0], sizes[-1]
        rows = [
            [
                f"test error, population − batch statistics, NBS {smallest} vs {largest}",
                "much larger at small NBS (ResNet-50, NBS 2-1024) [S]",
                f"{pct(gap[smallest])} vs {pct(gap[largest])} pts",
                "matches" if gap[smallest] > max(gap[largest], 0) else "does not match",
            ]
        ]
        checks = [
            Check(
                f"inconsistency at NBS {smallest} > at NBS {largest}",
                gap[smallest] > gap[largest],
                ", ".join(f"NBS {n}: {pct(gap[n])} pts" for n in sizes),
            )
        ]
        for nbs, v in s.get("fc_norm", {}).items():
            rows.append(
                [
                    f"with BN on the fc layer too, NBS {nbs}: test error with batch / population "
                    "statistics",
                    "not in the paper (its ResNets have no BN after the pooling)",
                    f"{pct(v['test_error_batch'])}% / {pct(v['test_error_population'])}%",
                    "–",
                ]
            )
        for nbs, v in s["freeze"].items():
            rows.append(
                [
                    f"FrozenBN for the last {settings['freeze_fraction']:.0%} of steps, NBS {nbs}: "
                    "test error with population statistics",
                    "improves at small NBS [S]",
                    f"{pct(v['test_error_population'])}% vs {pct(v['without_freeze'])}% without",
                    "matches" if v["improvement"] > 0 else "does not match",
                ]
            )
            checks.append(
                Check(
                    f"freezing helps at NBS {nbs}",
                    v["improvement"] > 0,
                    f"{pct(v['improvement'])} pts better",
                )
            )
        comparison = Table(["quantity", "published", "ours", "verdict"], rows)
        table = Table(
            [
                "trial",
                "train, batch stats %",
                "test, batch stats %",
                "test, population (PreciseBN) %",
                "test, EMA %",
                "population − batch",
            ],
            [
                [
                    key,
                    pct(r["train_error_batch"]),
                    pct(r["test_error_batch"]),
                    pct(r["test_error_population"]),
                    pct(r["test_error_ema"]),
                    pct(r["inconsistency"]),
                ]
                for key, r in s["runs"].items()
            ],
            "Final errors; a frozen trial's population statistics are those it was frozen with.",
        )
        figure = Figure(
            "errors-by-nbs",
            self._figure(s),
            "The three errors of Wu & Johnson's Fig. against the normalization batch size "
            "(crosses: FrozenBN for the last part of training).",
        )
        deviations = [
            f"A small CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, fc"
            f"{settings['hidden']}; normalization in the conv layers only) on "
            f"{record.config['data']['name']}, {settings['steps']} steps at gradient batch "
            f"{settings['batch_size']}, SGD lr {settings['learning_rate']:g}, instead "
            "of ResNet-50 on ImageNet; the NBS comes from Ghost BN inside the gradient batch.",
            f"FrozenBN for the last {settings['freeze_fraction']:.0%} of the steps (the paper: the "
            "last ~20 epochs), after a PreciseBN pass.",
            "The paper's numbers were not available to us verbatim (secondary sources, [S]).",
        ]
        if settings.get("fc_nbs"):
            deviations.append(
                "Not in the paper: at NBS "
                + ", ".join(str(n) for n in settings["fc_nbs"])
                + " a trial also normalizes the fc layer (few values per feature)."
            )
        headline = (
            f"population − batch statistics: {pct(gap[smallest])} pts at NBS {smallest}, "
            f"{pct(gap[largest])} at NBS {largest}"
        )
        return Report(
            comparison, [Section("Results", [figure, table])], checks, deviations, headline
        )

    @staticmethod
    def _figure(s):
        figure = new_figure()
        axes = figure.add_subplot()
        plain = sorted(
            (r for r in s["runs"].values() if not r["frozen"] and not r.get("fc_norm")),
            key=lambda r: r["nbs"],
        )
        nbs = [r["nbs"] for r in plain]
        for key, label in (
            ("train_error_batch", "train, batch statistics"),
            ("test_error_batch", "test, batch statistics"),
            ("test_error_population", "test, population statistics"),
        ):
            axes.plot(nbs, [100 * r[key] for r in plain], "o-", label=label)
        fc = [r for r in s["runs"].values() if r.get("fc_norm")]
        for key, marker, label in (
            ("test_error_batch", "s", "test, batch statistics, BN on the fc layer too"),
            ("test_error_population", "D", "test, population statistics, BN on the fc layer too"),
        ):
            if fc:
                axes.plot(
                    [r["nbs"] for r in fc],
                    [100 * r[key] for r in fc],
                    marker,
                    fillstyle="none",
                    markersize=8,
                    color="C1" if key == "test_error_batch" else "C2",
                    label=label,
                )
        frozen = [r for r in s["runs"].values() if r["frozen"]]
        if frozen:
            axes.plot(
                [r["nbs"] for r in frozen],
                [100 * r["test_error_population"] for r in frozen],
                "kx",
                markersize=9,
                label="test, population, FrozenBN at the end",
            )
        axes.set_xscale("log", base=2)
        axes.set_xticks(nbs, [str(n) for n in nbs])
        axes.set_xlabel("normalization batch size")
        axes.set_ylabel("error (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        return figure
