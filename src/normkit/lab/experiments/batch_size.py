"""Wu & He (2018), Fig. 1 and Table: BN's error grows as the batch per device shrinks; GN's does not.

Group Normalization (arXiv 1803.08494), ResNet-50 on ImageNet, 8 GPUs with BN statistics per GPU,
learning rate 0.1·N/32 for N images per GPU, 100 epochs; validation error (%) by images per GPU:

    | per GPU | 32   | 16   | 8    | 4    | 2    |
    | BN      | 23.6 | 23.7 | 24.8 | 27.3 | 34.7 |
    | GN      | 24.1 | 24.2 | 24.0 | 24.2 | 24.1 |

and at 32 per GPU LN 25.3, IN 28.4; Batch Renorm (r_max 1.5, d_max 0.5) at 4 per GPU 26.3 (Wu & He,
§5.1). Switchable Norm's README (switchablenorms/Switchable-Normalization, ResNet-50 top-1, 8 GPUs)
gives SN 76.9 / 76.7 / 76.7 / 75.9 / 75.6 % at 32 / 16 / 8 / 4 / 2 per GPU: errors 23.1 ... 24.4.

Here (CPU protocol 4 of the lab's notes, extended to the issue's eight normalizers): the lab's
small CNN (conv8-conv16, fc64; the normalizer after both convolutions and the hidden layer, see
``_small_batch``) on a class-balanced subset of Fashion-MNIST, one process with B images per step
for B in ``batch_sizes``, SGD with momentum, learning rate ``base_lr``·B/``base_batch`` (linear
scaling) and the same number of epochs for every B (so small batches take more steps). Normalizers:
BN, GN (``groups`` groups: neither LN nor IN), LN, IN, Batch Renorm (Wu & He's bounds r_max 1.5,
d_max 0.5, reached by Ioffe 2017's ramps scaled to each run), Ghost BN (``ghost_batch`` samples per
ghost batch; it is BN exactly when B <= that, so those cells are BN's), Switchable Norm, and SyncBN
across ``sync_processes`` gloo processes holding b images each (b in ``sync_batch_sizes``; the
gradient and the statistics are over the processes·b images, and the learning rate is scaled by that
global batch).

Measured per trial: test error in eval mode (running statistics) on the whole test set; the error
with batch statistics (test images in batches shaped like the training batches, normalized in
training mode), which separates a bad running estimate from a badly trained network; the training
error; and, for SN, the learned importance weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.lab.datasets import subset
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.experiment import Experiment, Settings, Setup, Trial, register
from normkit.lab.experiments._gloo import GlooDataParallel
from normkit.lab.experiments._small_batch import (
    BATCH_DEPENDENT,
    NORMALIZERS,
    batch_statistics_accuracy,
    error_percent,
    error_vs_batch_figure,
    measured_trial,
    small_cnn,
    switchable_importance,
)
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt, new_figure

# Wu & He (2018), Fig. 1 / Table (validation error %, ResNet-50, images per GPU).
PUBLISHED_BN = {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7}
PUBLISHED_GN = {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1}
PUBLISHED_AT_32 = {"bn": 23.6, "gn": 24.1, "ln": 25.3, "in": 28.4}
PUBLISHED_BRN_AT_4 = 26.3  # Wu & He §5.1, r_max = 1.5, d_max = 0.5
# Switchable Norm README, ResNet-50 top-1 (%) on 8 GPUs -> error.
PUBLISHED_SN = {32: 100 - 76.9, 16: 100 - 76.7, 8: 100 - 76.7, 4: 100 - 75.9, 2: 100 - 75.6}


@dataclass(frozen=True)
class BatchSizeSettings(Settings):
    batch_sizes: tuple[int, ...] = (64, 32, 16, 8, 4, 2)
    normalizers: tuple[str, ...] = ("bn", "gn", "ln", "in", "brn", "gbn", "sn")
    sync_batch_sizes: tuple[int, ...] = (2,)  # per process; () for no SyncBN trials
    sync_processes: int = 4
    train_examples: int = 15_000  # with epochs: the full sweep in <= 15 minutes on 2 cores
    epochs: float = 1.0
    base_lr: float = 0.1  # at base_batch, scaled linearly with the (global) batch
    base_batch: int = 64
    momentum: float = 0.9
    weight_decay: float = 0.0
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    groups: int = 4
    ghost_batch: int = 4
    renorm_r_max: float = 1.5  # Wu & He's Batch Renorm: r_max 1.5, d_max 0.5
    renorm_d_max: float = 0.5
    renorm_momentum: float = 0.1  # BN's default: the runs are too short for the paper's 0.01
    hidden_norm: bool = True
    evaluations: int = 4  # evaluations per trial (besides step 0), on eval_examples test images
    eval_examples: int = 1_000
    batch_stat_examples: int = 2_000  # test (and training) images for the extra errors


def _key(normalizer: str, batch: int, processes: int = 1) -> str:
    return f"{normalizer}/b={batch}" + (f"x{processes}" if processes > 1 else "")


@register
class BatchSize(Experiment):
    name = "batch-size"
    title = "Error against the batch per device: BN, GN, LN, IN, Batch Renorm, Ghost BN, SN, SyncBN"
    paper = "Wu & He 2018, Group Normalization, Fig. 1 and Table (§5.1)"
    claim = (
        "BN's error rises rapidly as the batch per device shrinks (ResNet-50: 23.6% at 32 images "
        "per GPU, 34.7% at 2), while GN's stays flat (24.1%) because it does not use the batch."
    )
    settings_class = BatchSizeSettings
    presets = {
        "quick": {
            "batch_sizes": (64, 8, 2),
            "sync_processes": 2,
            "train_examples": 3_000,
            "epochs": 1.0,
            "evaluations": 2,
            "eval_examples": 500,
            "batch_stat_examples": 1_000,
        },
        "tiny": {
            "batch_sizes": (8, 2),
            "sync_batch_sizes": (2,),
            "sync_processes": 2,
            "train_examples": 64,
            "epochs": 0.25,
            "channels": (4, 8),
            "hidden": 16,
            "groups": 2,
            "ghost_batch": 4,
            "evaluations": 1,
            "eval_examples": 40,
            "batch_stat_examples": 40,
        },
    }

    def prepare_data(self, settings, dataset):
        return subset(dataset, settings.train_examples, settings.seed)

    def trials(self, settings, data, finals):
        n = settings.train_examples if data is None else len(data.y_train)
        plan = []
        for batch in sorted(settings.batch_sizes, reverse=True):
            for normalizer in settings.normalizers:
                if normalizer == "gbn" and batch <= settings.ghost_batch:
                    continue  # Ghost BN is BN exactly here: the report uses BN's trial
                plan.append(self._trial(settings, n, normalizer, batch, 1))
        for batch in sorted(settings.sync_batch_sizes, reverse=True):
            plan.append(self._trial(settings, n, "syncbn", batch, settings.sync_processes))
        return plan

    @staticmethod
    def _trial(settings, n: int, normalizer: str, batch: int, processes: int) -> Trial:
        steps = max(1, round(settings.epochs * n / (batch * processes)))
        return measured_trial(
            _key(normalizer, batch, processes),
            {
                "normalizer": normalizer,
                "batch_per_device": batch,
                "processes": processes,
                "global_batch": batch * processes,
            },
            steps,
            settings,
        )

    def setup(self, trial, settings, data, generator):
        p = trial.params
        model = small_cnn(
            data.sample_shape,
            data.classes,
            p["normalizer"],
            generator,
            channels=settings.channels,
            hidden=settings.hidden,
            groups=settings.groups,
            ghost_batch=settings.ghost_batch,
            renorm_steps=trial.steps,
            renorm_limits=(settings.renorm_r_max, settings.renorm_d_max),
            renorm_momentum=settings.renorm_momentum,
            hidden_norm=settings.hidden_norm,
        )
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=settings.base_lr * p["global_batch"] / settings.base_batch,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
        step = None
        if p["processes"] > 1:
            step = GlooDataParallel(model, optimizer, p["processes"])
        return Setup(model, optimizer, p["global_batch"], train_step=step)

    def measure(self, trial, settings, setup, data):
        k = settings.eval_examples
        accuracy, _ = accuracy_and_loss(setup.model, data.x_test[:k], data.y_test[:k])
        return {"test_error": error_percent(accuracy)}

    def finish(self, trial, settings, setup, data):
        if isinstance(setup.train_step, GlooDataParallel):
            setup.train_step.close()
        p, k = trial.params, settings.batch_stat_examples
        model = setup.model
        accuracy, loss = accuracy_and_loss(model, data.x_test, data.y_test)
        train, _ = accuracy_and_loss(model, data.x_train[:k], data.y_train[:k])
        values = {
            "test_error": error_percent(accuracy),
            "test_loss": loss,
            "train_error": error_percent(train),
            "batch_stat_error": None,
        }
        if p["normalizer"] in BATCH_DEPENDENT:
            values["batch_stat_error"] = error_percent(
                batch_statistics_accuracy(
                    model, data.x_test[:k], data.y_test[:k], min(p["global_batch"], k)
                )
            )
        if p["normalizer"] == "sn":
            values["importance"] = switchable_importance(model)
        return values

    # -- meaning -------------------------------------------------------------------------------
    def summarize(self, record: RunRecord) -> dict:
        settings = record.settings
        finals = record.finals()
        table: dict[str, dict[str, dict]] = {}
        for row in finals.values():
            cell = {
                key: row.get(key)
                for key in ("test_error", "train_error", "batch_stat_error", "diverged")
            }
            table.setdefault(row["normalizer"], {})[str(row["batch_per_device"])] = cell
        if "gbn" in settings["normalizers"] and "bn" in table:
            for batch in settings["batch_sizes"]:
                if batch <= settings["ghost_batch"] and str(batch) in table["bn"]:
                    cell = dict(table["bn"][str(batch)], same_as="bn")
                    table.setdefault("gbn", {})[str(batch)] = cell

        def error(normalizer, batch):
            return table.get(normalizer, {}).get(str(batch), {}).get("test_error")

        sizes = sorted(settings["batch_sizes"])
        smallest, largest = sizes[0], sizes[-1]
        bn = [error("bn", b) for b in sizes if error("bn", b) is not None]
        gn = [error("gn", b) for b in sizes if error("gn", b) is not None]
        sync = {
            str(b): {
                "syncbn": error("syncbn", b),
                "bn_same_per_device": error("bn", b),
                "bn_at_global_batch": error("bn", b * settings["sync_processes"]),
            }
            for b in settings["sync_batch_sizes"]
        }
        return {
            "errors": table,
            "batch_sizes": sizes,
            "bn_rise": None if not bn else error("bn", smallest) - min(bn),
            "gn_range": None if not gn else max(gn) - min(gn),
            "gn_minus_bn_at_smallest": _difference(error("gn", smallest), error("bn", smallest)),
            "order_at_largest": {n: error(n, largest) for n in ("bn", "gn", "ln", "in")},
            "sync": sync,
            "importance": {
                str(row["batch_per_device"]): row["importance"]
                for row in finals.values()
                if row["normalizer"] == "sn" and row.get("importance")
            },
        }

    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        errors, sizes = s["errors"], s["batch_sizes"]
        smallest, largest = sizes[0], sizes[-1]
        data_name = record.config["data"]["name"]

        def err(normalizer, batch, key="test_error"):
            return errors.get(normalizer, {}).get(str(batch), {}).get(key)

        near_32 = 32 if 32 in sizes else largest
        near_4 = 4 if 4 in sizes else smallest
        order = s["order_at_largest"]
        known = [order[n] for n in ("bn", "gn", "ln", "in")]
        ordered = None
        if None not in known:
            ordered = known[0] <= known[1] + 0.5 and known[1] < known[2] < known[3]
        sync_rows = []
        for b, cell in sorted(s["sync"].items(), key=lambda item: int(item[0])):
            sync_rows.append(
                f"b = {b} × {settings['sync_processes']} processes: SyncBN {fmt(cell['syncbn'], '.1f')}"
                f", BN at {b} {fmt(cell['bn_same_per_device'], '.1f')}, BN at "
                f"{int(b) * settings['sync_processes']} {fmt(cell['bn_at_global_batch'], '.1f')}"
            )
        comparison = Table(
            [
                "quantity",
                "published (ResNet-50, ImageNet, error %)",
                f"ours ({data_name}, small CNN, error %)",
                "verdict",
            ],
            [
                [
                    f"BN error from the largest batch to {smallest} per device",
                    "23.6 at 32 → 34.7 at 2 (+11.1)",
                    f"{fmt(err('bn', largest), '.1f')} at {largest} → {fmt(err('bn', smallest), '.1f')} at "
                    f"{smallest} (rise over its best: {fmt(s['bn_rise'], '+.1f')})",
                    "BN degrades (> 2 points): " + fmt(_above(s["bn_rise"], 2.0)),
                ],
                [
                    "GN error across batch sizes",
                    "24.1 / 24.2 / 24.0 / 24.2 / 24.1 (range 0.2)",
                    " / ".join(fmt(err("gn", b), ".1f") for b in reversed(sizes))
                    + f" (range {fmt(s['gn_range'], '.1f')})",
                    "GN flat (range ≤ 1 point): " + fmt(_below(s["gn_range"], 1.0)),
                ],
                [
                    f"GN − BN at {smallest} per device",
                    "−10.6 at 2",
                    fmt(s["gn_minus_bn_at_smallest"], "+.1f"),
                    "GN better: " + fmt(_below(s["gn_minus_bn_at_smallest"], 0.0)),
                ],
                [
                    f"BN / GN / LN / IN at {largest} (paper: 32)",
                    "23.6 / 24.1 / 25.3 / 28.4",
                    " / ".join(fmt(order[n], ".1f") for n in ("bn", "gn", "ln", "in")),
                    "BN ≲ GN < LN < IN: " + fmt(ordered),
                ],
                [
                    f"Batch Renorm / BN / GN at {near_4} per device",
                    "26.3 / 27.3 / 24.2 at 4 (r_max 1.5, d_max 0.5)",
                    " / ".join(fmt(err(n, near_4), ".1f") for n in ("brn", "bn", "gn")),
                    "BRN better than BN: "
                    + fmt(_below(_difference(err("brn", near_4), err("bn", near_4)), 0.0)),
                ],
                [
                    f"Switchable Norm at {near_32} and {smallest} per device",
                    "23.1 at 32, 24.4 at 2 (SN README)",
                    f"{fmt(err('sn', near_32), '.1f')} at {near_32}, {fmt(err('sn', smallest), '.1f')} at "
                    f"{smallest}",
                    "–",
                ],
                [
                    "SyncBN with a small batch per process",
                    "not measured by the paper; expected ≈ BN at the global batch",
                    "; ".join(sync_rows) or "not run",
                    "–",
                ],
                [
                    "Ghost BN (ghost batches of "
                    f"{settings['ghost_batch']}) at {largest} vs BN at {largest} and at "
                    f"{settings['ghost_batch']}",
                    "not measured in this setting",
                    f"{fmt(err('gbn', largest), '.1f')} vs {fmt(err('bn', largest), '.1f')} and "
                    f"{fmt(err('bn', settings['ghost_batch']), '.1f')}",
                    "–",
                ],
            ],
        )
        checks = [
            Check(
                f"BN's error at {smallest} is more than 2 points above its best",
                _above(s["bn_rise"], 2.0),
                f"rise {fmt(s['bn_rise'], '+.2f')} points",
            ),
            Check(
                "GN's error stays within 1 point across batch sizes",
                _below(s["gn_range"], 1.0),
                f"range {fmt(s['gn_range'], '.2f')} points",
            ),
            Check(
                f"GN beats BN at {smallest} per device",
                _below(s["gn_minus_bn_at_smallest"], 0.0),
                f"GN − BN = {fmt(s['gn_minus_bn_at_smallest'], '+.2f')}",
            ),
            Check(
                f"order BN ≲ GN < LN < IN at {largest}",
                ordered,
                ", ".join(f"{n.upper()} {fmt(order[n], '.2f')}" for n in ("bn", "gn", "ln", "in")),
            ),
        ]
        for b, cell in s["sync"].items():
            gap = _difference(cell["syncbn"], cell["bn_same_per_device"])
            checks.append(
                Check(
                    f"SyncBN (b = {b} × {settings['sync_processes']}) beats BN at b = {b}",
                    _below(gap, 0.0),
                    f"difference {fmt(gap, '+.2f')} points",
                )
            )
        columns = sorted(sizes, reverse=True)
        lines = [n for n in NORMALIZERS if n in errors]
        table = Table(
            ["normalizer", *[f"B = {b}" for b in columns]],
            [
                [NORMALIZERS[n], *[self._cell(errors[n].get(str(b))) for b in columns]]
                for n in lines
            ],
            "Test error (%) in eval mode, whole test set; SyncBN's B is the batch per process "
            f"({settings['sync_processes']} processes). † Ghost BN equals BN at B ≤ "
            f"{settings['ghost_batch']} (BN's number); × diverged.",
        )
        detail = Table(
            ["normalizer", "B", "eval-mode error", "batch-statistics error", "training error"],
            [
                [
                    NORMALIZERS[n],
                    b,
                    fmt(err(n, b), ".2f"),
                    fmt(err(n, b, "batch_stat_error"), ".2f"),
                    fmt(err(n, b, "train_error"), ".2f"),
                ]
                for n in lines
                for b in columns
                if str(b) in errors[n] and not errors[n][str(b)].get("same_as")
            ],
            f"Batch-statistics error: {settings['batch_stat_examples']} test images in batches of the "
            "training batch (SyncBN: the global batch), normalized in training mode. Training "
            f"error: eval mode, {settings['batch_stat_examples']} training images.",
        )
        published = {
            "BN": list(PUBLISHED_BN.items()),
            "GN": list(PUBLISHED_GN.items()),
            "LN": [(32, PUBLISHED_AT_32["ln"])],
            "IN": [(32, PUBLISHED_AT_32["in"])],
            "Batch Renorm": [(4, PUBLISHED_BRN_AT_4)],
            "Switchable Norm": list(PUBLISHED_SN.items()),
        }
        ours = {  # Ghost BN's cells borrowed from BN (B <= its ghost batch) stay out of the figure
            NORMALIZERS[n]: [
                (int(b), c["test_error"]) for b, c in errors[n].items() if not c.get("same_as")
            ]
            for n in lines
        }
        figures = [
            Figure(
                "error-vs-batch",
                error_vs_batch_figure(
                    ours,
                    f"ours: small CNN, {data_name}",
                    published=published,
                    published_title="Wu & He 2018 (ResNet-50, ImageNet); SN README",
                ),
                "Test error against the batch per device (log scale), one line per normalizer; "
                "SyncBN dashed, at its batch per process; Ghost BN drawn where it differs from BN. "
                "Right: the published numbers.",
            ),
            Figure(
                "bn-inconsistency",
                self._bn_figure(errors, columns),
                "BN: error in eval mode (running statistics), with batch statistics (training "
                "mode) and on training images, against the batch size.",
            ),
        ]
        sections = [Section("Results", [figures[0], table, detail, figures[1]])]
        if s.get("importance"):
            sections.append(
                Section(
                    "Switchable Norm's learned importance weights",
                    [
                        Table(
                            ["B", "layer", "mean: IN / LN / BN", "variance: IN / LN / BN"],
                            [
                                [
                                    b,
                                    layer,
                                    " / ".join(f"{w:.2f}" for w in weights["mean"]),
                                    " / ".join(f"{w:.2f}" for w in weights["var"]),
                                ]
                                for b, layers in sorted(
                                    s["importance"].items(), key=lambda i: -int(i[0])
                                )
                                for layer, weights in layers.items()
                            ],
                            "Softmax weights at the end of training (the hidden layer uses LN).",
                        )
                    ],
                )
            )
        deviations = [
            f"A small CNN (conv{'-conv'.join(str(c) for c in settings['channels'])}, fc{settings['hidden']}) "
            f"on {record.config['data']['train']} {data_name} training images for "
            f"{settings['epochs']:g} epoch{'' if settings['epochs'] == 1 else 's'}, instead of "
            "ResNet-50 on ImageNet for 100 epochs; "
            "absolute errors are not comparable, only the shapes of the curves.",
            "One process with B images per step: the per-device batch is also the gradient batch "
            "(Wu & He's 8 GPUs had a gradient batch 8× the per-GPU one). Learning rate "
            f"{settings['base_lr']:g}·B/{settings['base_batch']}, SGD momentum {settings['momentum']:g}, "
            "no schedule, one seed.",
            "The normalizer is after both convolutions and after the fully connected hidden layer, "
            "whose statistics are over the B samples alone: that layer stands in for ResNet's deep "
            "low-resolution layers"
            + ("" if settings["hidden_norm"] else " (this run: no norm on the hidden layer)")
            + ". IN and SN need spatial dims, so their networks use LN on the hidden layer.",
            f"GN with {settings['groups']} groups (Wu & He: 32, on far wider layers); LN is "
            "GroupNorm(1, C) as in the paper.",
            f"Batch Renorm: Wu & He's bounds (r_max {settings['renorm_r_max']:g}, d_max "
            f"{settings['renorm_d_max']:g}) reached by Ioffe (2017)'s ramps scaled to each run "
            f"(plain BN for the first 3.5%), moving averages at momentum {settings['renorm_momentum']:g} "
            "(the paper's 0.01 is too slow for runs of a few hundred steps).",
            f"SyncBN: {settings['sync_processes']} gloo processes on this machine, the learning rate "
            "scaled by the global batch.",
        ]
        headline = (
            f"BN {fmt(err('bn', largest), '.1f')}% at {largest} → {fmt(err('bn', smallest), '.1f')}% at "
            f"{smallest}; GN {fmt(err('gn', largest), '.1f')}% → {fmt(err('gn', smallest), '.1f')}%"
        )
        return Report(comparison, sections, checks, deviations, headline)

    @staticmethod
    def _cell(cell: dict | None) -> str:
        if cell is None:
            return "–"
        text = fmt(cell.get("test_error"), ".1f")
        if cell.get("same_as"):
            text += " †"
        if cell.get("diverged"):
            text += " ×"
        return text

    @staticmethod
    def _bn_figure(errors: dict, columns: list[int]):
        figure = new_figure(5.6, 3.8)
        axes = figure.add_subplot()
        cells = errors.get("bn", {})
        for key, label, style in (
            ("test_error", "eval mode (running statistics)", "o-"),
            ("batch_stat_error", "batch statistics (training mode)", "s--"),
            ("train_error", "training images, eval mode", "^:"),
        ):
            points = sorted(
                (b, cells[str(b)][key])
                for b in columns
                if str(b) in cells and cells[str(b)].get(key) is not None
            )
            axes.plot([b for b, _ in points], [e for _, e in points], style, label=label)
        axes.set_xscale("log", base=2)
        axes.set_xticks(sorted(columns), [str(b) for b in sorted(columns)])
        axes.minorticks_off()
        axes.set_xlabel("batch size (log scale)")
        axes.set_ylabel("error (%)")
        axes.set_title("BN: where the error comes from", fontsize="medium")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        return figure


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _above(value: float | None, threshold: float) -> bool | None:
    return None if value is None else value > threshold


def _below(value: float | None, threshold: float) -> bool | None:
    return None if value is None else value < threshold
