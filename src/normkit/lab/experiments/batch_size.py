"""Wu & He (2018), Fig. 1 and Table: BN's error grows as the batch per device shrinks; GN's does not.

Group Normalization (arXiv 1803.08494), ResNet-50 on ImageNet, 8 GPUs with BN statistics per GPU,
learning rate 0.1·N/32 for N images per GPU, 100 epochs; validation error (%) by images per GPU:

    | per GPU | 32   | 16   | 8    | 4    | 2    |
    | BN      | 23.6 | 23.7 | 24.8 | 27.3 | 34.7 |
    | GN      | 24.1 | 24.2 | 24.0 | 24.2 | 24.1 |

and at 32 per GPU LN 25.3, IN 28.4; Batch Renorm (r_max 1.5, d_max 0.5) at 4 per GPU 26.3 (Wu & He,
§5.1). Switchable Norm's README (switchablenorms/Switchable-Normalization, ResNet-50 top-1, 8 GPUs)
gives SN 76.9 / 76.7 / 76.7 / 75.9 / 75.6 % at 32 / 16 / 8 / 4 / 2 per GPU: errors 23.1 ... 24.4.

Here (CPU protocol 4, with eight normalizers): the lab's small CNN (:mod:`normkit.lab.small_batch`)
on a Fashion-MNIST subset, one process with B images per step for B in ``batch_sizes`` (the grid),
SGD at ``base_lr``·B/``base_batch``, the same epochs for every B; Ghost BN is not trained where
B <= ``ghost_batch`` (it is BN there); SyncBN has its own grid: ``sync_processes`` gloo processes
of b images. ``seeds`` seeds, paired. Measured: the test error in eval mode, with batch statistics
(test batches shaped like the training batches, in training mode: a bad running estimate or a badly
trained network?) and on training images; SN's learned importance weights.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from normkit.lab.claims import Claim, Published, above, below, difference, final, per_seed
from normkit.lab.datasets import subset
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Bars, Heatmap, MeanTable, VersusSetting
from normkit.lab.gloo import GlooDataParallel
from normkit.lab.plan import Arm, Plan
from normkit.lab.render import Section, Table
from normkit.lab.settings import Settings
from normkit.lab.small_batch import (
    BATCH_DEPENDENT,
    NORMALIZERS,
    batch_statistics_accuracy,
    error_percent,
    small_cnn,
    switchable_importance,
)

WU_HE = "Wu & He 2018, Fig. 1 and Table 1 (ResNet-50, ImageNet, error %)"
PUBLISHED = {  # images per GPU -> validation error (%)
    "BN": [(32, 23.6), (16, 23.7), (8, 24.8), (4, 27.3), (2, 34.7)],
    "GN": [(32, 24.1), (16, 24.2), (8, 24.0), (4, 24.2), (2, 24.1)],
    "LN": [(32, 25.3)], "IN": [(32, 28.4)], "Batch Renorm": [(4, 26.3)],  # BRN: §5.1, r/d_max 1.5/0.5
    "Switchable Norm": [(32, 23.1), (16, 23.3), (8, 23.3), (4, 24.1), (2, 24.4)],  # SN README
}
BATCH = "batch_per_device"


@dataclass(frozen=True)
class BatchSizeSettings(Settings):
    batch_sizes: tuple[int, ...] = (64, 32, 16, 8, 4, 2)
    normalizers: tuple[str, ...] = ("bn", "gn", "ln", "in", "brn", "gbn", "sn")
    sync_batch_sizes: tuple[int, ...] = (2,)  # per process; () for no SyncBN trials
    sync_processes: int = 4
    train_examples: int = 15_000
    epochs: float = 1.0
    base_lr: float = 0.1  # at base_batch, scaled linearly with the (global) batch
    base_batch: int = 64
    momentum: float = 0.9
    weight_decay: float = 0.0
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    groups: int = 4
    ghost_batch: int = 4
    renorm_limits: tuple[float, ...] = (1.5, 0.5)  # Wu & He's Batch Renorm: r_max, d_max
    renorm_momentum: float = 0.1  # BN's default: the runs are too short for the paper's 0.01
    hidden_norm: bool = True
    seeds: int = 3
    evaluations: int = 4  # evaluations per trial (besides step 0), on eval_examples test images
    eval_examples: int = 1_000
    batch_stat_examples: int = 2_000  # test (and training) images for the extra errors


AT = {"smallest": lambda s: min(s.batch_sizes), "largest": lambda s: max(s.batch_sizes),
      "near 4": lambda s: 4 if 4 in s.batch_sizes else min(s.batch_sizes)}  # fmt: skip


def _errors(trials) -> dict[int, float]:
    return {t.params[BATCH]: t.final["test_error"] for t in trials if not t.final["diverged"]}


def _bn_rise(trials, results) -> float | None:
    errors, smallest = _errors(trials), AT["smallest"](results.settings)
    return errors[smallest] - min(errors.values()) if smallest in errors else None


def _gn_range(trials, results) -> float | None:
    errors = _errors(trials)
    return max(errors.values()) - min(errors.values()) if len(errors) > 1 else None


@register
class BatchSize(Experiment):
    name = "batch-size"
    title = "Error against the batch per device: BN, GN, LN, IN, Batch Renorm, Ghost BN, SN, SyncBN"
    paper = "Wu & He 2018, Group Normalization, Fig. 1 and Table (§5.1)"
    claim = ("BN's error rises rapidly as the batch per device shrinks (ResNet-50: 23.6% at 32 images "
             "per GPU, 34.7% at 2), while GN's stays flat (24.1%) because it does not use the batch.")
    settings_class = BatchSizeSettings
    presets = {
        "quick": {"batch_sizes": (64, 8, 2), "sync_processes": 2, "train_examples": 3_000,
                  "seeds": 1, "evaluations": 2, "eval_examples": 500, "batch_stat_examples": 1_000},
        "tiny": {"batch_sizes": (8, 2), "sync_processes": 2, "train_examples": 64, "epochs": 0.25,
                 "channels": (4, 8), "hidden": 16, "groups": 2, "seeds": 1, "evaluations": 1,
                 "eval_examples": 40, "batch_stat_examples": 40},
    }  # fmt: skip

    def prepare_data(self, settings, dataset):
        return subset(dataset, settings.train_examples, settings.seed)

    def plan(self, s, data):
        arms = [Arm(n, {"normalizer": n, "processes": 1}, NORMALIZERS[n]) for n in s.normalizers]
        if s.sync_batch_sizes:
            arms.append(Arm("syncbn", {"normalizer": "syncbn", "processes": s.sync_processes},
                            NORMALIZERS["syncbn"], grid={BATCH: sorted(s.sync_batch_sizes, reverse=True)}))
        steps = lambda p: max(1, round(s.epochs * len(data.y_train) / (p[BATCH] * p["processes"])))
        return Plan(arms, steps, seeds=s.seeds, seed=s.seed, evaluations=s.evaluations,
                    grid={BATCH: sorted(s.batch_sizes, reverse=True)},
                    skip=lambda p: p["normalizer"] == "gbn" and p[BATCH] <= s.ghost_batch)  # fmt: skip

    def setup(self, trial, s, data, generator):
        p = trial.params
        model = small_cnn(data.sample_shape, data.classes, p["normalizer"], generator,
                          channels=s.channels, hidden=s.hidden, groups=s.groups, ghost_batch=s.ghost_batch,
                          renorm_steps=trial.steps, renorm_limits=tuple(s.renorm_limits),
                          renorm_momentum=s.renorm_momentum, hidden_norm=s.hidden_norm)  # fmt: skip
        global_batch = p[BATCH] * p["processes"]
        optimizer = torch.optim.SGD(model.parameters(), lr=s.base_lr * global_batch / s.base_batch,
                                    momentum=s.momentum, weight_decay=s.weight_decay)  # fmt: skip
        step = GlooDataParallel(model, optimizer, p["processes"]) if p["processes"] > 1 else None
        return Setup(model, optimizer, global_batch, train_step=step)

    def measure(self, trial, s, setup, data):
        k = s.eval_examples
        accuracy, _ = accuracy_and_loss(setup.model, data.x_test[:k], data.y_test[:k])
        return {"test_error": error_percent(accuracy)}

    def finish(self, trial, s, setup, data):
        if isinstance(setup.train_step, GlooDataParallel):
            setup.train_step.close()  # the gloo ranks are done: evaluate on free cores
        p, k, model = trial.params, s.batch_stat_examples, setup.model
        accuracy, loss = accuracy_and_loss(model, data.x_test, data.y_test)
        train, _ = accuracy_and_loss(model, data.x_train[:k], data.y_train[:k])
        values = {"test_error": error_percent(accuracy), "test_loss": loss,
                  "train_error": error_percent(train), "batch_stat_error": None}  # fmt: skip
        if p["normalizer"] in BATCH_DEPENDENT:
            global_batch = min(p[BATCH] * p["processes"], k)
            values["batch_stat_error"] = error_percent(
                batch_statistics_accuracy(model, data.x_test[:k], data.y_test[:k], global_batch))
        if p["normalizer"] == "sn":
            values["importance"] = switchable_importance(model)
            values["sn_bn_weight"] = {layer: w["mean"][2] for layer, w in values["importance"].items()}
        return values

    def claims(self, s):
        def gap(name, a, b, at, text, published, value, criterion, source=WU_HE):
            ours = difference(*(final("test_error", arm=arm, **{BATCH: AT.get(at, at)}) for arm in (a, b)))
            return Claim(name, f"{text} at {AT[at](s) if at in AT else at} per device (points)",
                         Published(published, source, value), ours, criterion, fmt="+.2f")

        small = AT["smallest"](s)
        return [
            Claim("bn-degrades", f"BN's error at {small} per device minus its best (points)",
                  Published("+11.1: 23.6 at 32 → 34.7 at 2 per GPU", WU_HE, 11.1),
                  per_seed(_bn_rise, "BN error at the smallest batch − its lowest", arm="bn"),
                  above(2.0), fmt="+.2f"),
            Claim("gn-flat", "GN's error range across batch sizes (points)",
                  Published("0.2: 24.0–24.2 from 32 to 2 per GPU", WU_HE, 0.2),
                  per_seed(_gn_range, "max − min of GN's error over batch sizes", arm="gn"),
                  below(1.0), fmt=".2f"),
            gap("gn-beats-bn-small", "gn", "bn", "smallest", "GN − BN error", "−10.6 at 2 per GPU",
                -10.6, below(0.0)),
            gap("bn-vs-gn-large", "bn", "gn", "largest", "BN − GN error (BN ≲ GN)",
                "−0.5 at 32 per GPU (23.6 vs 24.1)", -0.5, below(0.5)),
            gap("ln-behind-gn", "ln", "gn", "largest", "LN − GN error",
                "+1.2 at 32 per GPU (25.3 vs 24.1)", 1.2, above(0.0)),
            gap("in-behind-ln", "in", "ln", "largest", "IN − LN error",
                "+3.1 at 32 per GPU (28.4 vs 25.3)", 3.1, above(0.0)),
            gap("renorm-helps", "brn", "bn", "near 4", "Batch Renorm − BN error",
                "−1.0 at 4 per GPU (26.3 vs 27.3; r_max 1.5, d_max 0.5)", -1.0, below(0.0),
                "Wu & He 2018, §5.1"),
            Claim("sn-small", f"Switchable Norm's error at {small} per device (%)",
                  Published("24.4 at 2 per GPU", "Switchable-Normalization README, ResNet-50", 24.4),
                  final("test_error", arm="sn", **{BATCH: AT["smallest"]}), None, fmt=".2f"),
        ] + [gap(f"syncbn-b{b}", "syncbn", "bn", b, f"SyncBN ({b} × {s.sync_processes}) − BN error",
                 "not in the paper: SyncBN normalizes over the global batch, so it should beat "
                 "per-device BN", None, below(0.0), "Wu & He 2018, §3 (BN statistics per GPU)")
             for b in s.sync_batch_sizes]  # fmt: skip

    def figures(self, s):
        bn_errors = {"eval mode (running statistics)": "test_error", "training images, eval mode":
                     "train_error", "batch statistics (training mode)": "batch_stat_error"}
        return [
            VersusSetting("error-vs-batch", "test_error", BATCH, "batch size per device", "test error (%)",
                          "Test error against the batch per device; SyncBN dashed, at its batch per "
                          "process; Ghost BN where it differs from BN. Right: the published numbers.",
                          published=PUBLISHED, published_title="Wu & He 2018 (ResNet-50); SN README",
                          title=f"ours: small CNN, {s.train_examples} images", dashed=("syncbn",)),
            MeanTable("errors", "test_error", BATCH, "Test error (%) in eval mode, whole test set.", ".1f"),
            Heatmap("error-heatmap", "test_error", BATCH, "batch size per device", "test error (%)",
                    "Test error (%) per normalizer and batch size per device."),
            VersusSetting("bn-inconsistency", bn_errors, BATCH, "batch size", "error (%)",
                          "BN's error in eval mode, on training images, and with batch statistics.",
                          arms=["bn"], title="BN: where the error comes from"),
            Bars("sn-bn-weight", "sn_bn_weight", "weight of BN's mean (softmax)",
                 "Switchable Norm: the weight its layers give BN's mean, by batch size per device.",
                 by=BATCH, where={"arm": "sn"}, per_layer=True),
        ]  # fmt: skip

    def extra_section(self, results):
        rows = []
        for batch in sorted(results.values(BATCH, arm="sn"), reverse=True):
            trials = [t.final["importance"] for t in results.trials(arm="sn", **{BATCH: batch})]
            for layer in trials[0] if trials else []:
                mean = [[statistics.fmean(t[layer][stat][i] for t in trials) for i in range(3)]
                        for stat in ("mean", "var")]  # fmt: skip
                rows.append([batch, layer, *(" / ".join(f"{w:.2f}" for w in m) for m in mean)])
        table = Table(["B", "layer", "mean: IN / LN / BN", "variance: IN / LN / BN"], rows,
                      "Softmax weights at the end of training, mean over seeds (the hidden layer uses LN).")
        return Section("Switchable Norm's learned importance weights", [table]) if rows else None

    def deviations(self, s):
        return [
            f"A small CNN (conv{'-conv'.join(map(str, s.channels))}, fc{s.hidden}) on {s.train_examples} "
            f"images for {s.epochs:g} epoch(s), not ResNet-50 on ImageNet for 100 epochs: compare the "
            "shapes of the curves, not the errors.",
            "One process with B images per step: the per-device batch is also the gradient batch (Wu & "
            f"He's was 8× the per-GPU one). Learning rate {s.base_lr:g}·B/{s.base_batch}, SGD momentum "
            f"{s.momentum:g}, no schedule.",
            "The normalizer also follows the fully connected hidden layer, whose statistics are over the "
            "B samples alone (standing in for ResNet's deep low-resolution layers)"
            + ("" if s.hidden_norm else "; this run: no norm there") + ". IN's and SN's networks use LN "
            "on that layer (they need spatial dims).",
            f"GN with {s.groups} groups (Wu & He: 32, on far wider layers); LN is GroupNorm(1, C).",
            f"Batch Renorm's moving averages at momentum {s.renorm_momentum:g} (the paper's 0.01 is too "
            "slow for runs of a few hundred steps); plain BN for the first 3.5% of a run.",
            f"SyncBN: {s.sync_processes} gloo processes on this machine, the learning rate scaled by the "
            "global batch.",
        ]  # fmt: skip
