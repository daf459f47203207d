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
:mod:`normkit.lab.small_batch`) on a class-balanced subset of Fashion-MNIST, one process with B
images per step for B in ``batch_sizes`` (the grid), SGD with momentum, learning rate
``base_lr``·B/``base_batch`` (linear scaling) and the same number of epochs for every B (so small
batches take more steps). Arms: BN, GN (``groups`` groups: neither LN nor IN), LN, IN, Batch Renorm
(Wu & He's bounds r_max 1.5, d_max 0.5, reached by Ioffe 2017's ramps scaled to each run), Ghost
BN (``ghost_batch`` samples per ghost batch; BN exactly when B <= that, so those cells are not
trained), Switchable Norm, and SyncBN across ``sync_processes`` gloo processes holding b images each
(its own grid, b in ``sync_batch_sizes``; gradient and statistics over the processes·b images, the
learning rate scaled by that global batch). ``seeds`` seeds, paired (each seed's arms see the
same batches at a given B).

Measured per trial: test error in eval mode (running statistics) on the whole test set; the error
with batch statistics (test images in batches shaped like the training batches, normalized in
training mode), which separates a bad running estimate from a badly trained network; the training
error; and, for SN, the learned importance weights.
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
    "LN": [(32, 25.3)],
    "IN": [(32, 28.4)],
    "Batch Renorm": [(4, 26.3)],  # Wu & He §5.1, r_max = 1.5, d_max = 0.5
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
    renorm_r_max: float = 1.5  # Wu & He's Batch Renorm: r_max 1.5, d_max 0.5
    renorm_d_max: float = 0.5
    renorm_momentum: float = 0.1  # BN's default: the runs are too short for the paper's 0.01
    hidden_norm: bool = True
    seeds: int = 3
    evaluations: int = 4  # evaluations per trial (besides step 0), on eval_examples test images
    eval_examples: int = 1_000
    batch_stat_examples: int = 2_000  # test (and training) images for the extra errors


def _smallest(s):
    return min(s.batch_sizes)


def _largest(s):
    return max(s.batch_sizes)


def _near_4(s):
    return 4 if 4 in s.batch_sizes else min(s.batch_sizes)


def _errors(trials) -> dict[int, float]:
    return {t.params[BATCH]: t.final["test_error"] for t in trials if not t.final["diverged"]}


def _bn_rise(trials, results) -> float | None:
    errors = _errors(trials)
    smallest = _smallest(results.settings)
    return errors[smallest] - min(errors.values()) if smallest in errors else None


def _gn_range(trials, results) -> float | None:
    errors = _errors(trials)
    return max(errors.values()) - min(errors.values()) if len(errors) > 1 else None


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
        "quick": {"batch_sizes": (64, 8, 2), "sync_processes": 2, "train_examples": 3_000,
                  "seeds": 1, "evaluations": 2, "eval_examples": 500, "batch_stat_examples": 1_000},
        "tiny": {"batch_sizes": (8, 2), "sync_batch_sizes": (2,), "sync_processes": 2,
                 "train_examples": 64, "epochs": 0.25, "channels": (4, 8), "hidden": 16,
                 "groups": 2, "ghost_batch": 4, "seeds": 1, "evaluations": 1, "eval_examples": 40,
                 "batch_stat_examples": 40},
    }  # fmt: skip

    def prepare_data(self, settings, dataset):
        return subset(dataset, settings.train_examples, settings.seed)

    def plan(self, s, data):
        arms = [Arm(n, {"normalizer": n, "processes": 1}, NORMALIZERS[n]) for n in s.normalizers]
        if s.sync_batch_sizes:
            arms.append(Arm("syncbn", {"normalizer": "syncbn", "processes": s.sync_processes},
                            NORMALIZERS["syncbn"], grid={BATCH: sorted(s.sync_batch_sizes, reverse=True)}))

        def steps(params):
            return max(1, round(s.epochs * len(data.y_train) / (params[BATCH] * params["processes"])))

        return Plan(arms, steps, seeds=s.seeds, seed=s.seed, evaluations=s.evaluations,
                    grid={BATCH: sorted(s.batch_sizes, reverse=True)},
                    skip=lambda p: p["normalizer"] == "gbn" and p[BATCH] <= s.ghost_batch)  # fmt: skip

    def setup(self, trial, s, data, generator):
        p = trial.params
        model = small_cnn(data.sample_shape, data.classes, p["normalizer"], generator,
                          channels=s.channels, hidden=s.hidden, groups=s.groups, ghost_batch=s.ghost_batch,
                          renorm_steps=trial.steps, renorm_limits=(s.renorm_r_max, s.renorm_d_max),
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
            setup.train_step.close()
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
        def error(arm, batch):
            return final("test_error", arm=arm, **{BATCH: batch})

        small, large, near_4 = _smallest(s), _largest(s), _near_4(s)
        claims = [
            Claim("bn-degrades", f"BN's error at {small} per device minus its best (points)",
                  Published("+11.1: 23.6 at 32 → 34.7 at 2 per GPU", WU_HE, 11.1),
                  per_seed(_bn_rise, "BN error at the smallest batch − its lowest", arm="bn"),
                  above(2.0), fmt="+.2f"),
            Claim("gn-flat", "GN's error range across batch sizes (points)",
                  Published("0.2: 24.0–24.2 from 32 to 2 per GPU", WU_HE, 0.2),
                  per_seed(_gn_range, "max − min of GN's error over batch sizes", arm="gn"),
                  below(1.0), fmt=".2f"),
            Claim("gn-beats-bn-small", f"GN − BN error at {small} per device (points)",
                  Published("−10.6 at 2 per GPU", WU_HE, -10.6),
                  difference(error("gn", _smallest), error("bn", _smallest)), below(0.0), fmt="+.2f"),
            Claim("bn-vs-gn-large", f"BN − GN error at {large} per device (points); BN ≲ GN",
                  Published("−0.5 at 32 per GPU (23.6 vs 24.1)", WU_HE, -0.5),
                  difference(error("bn", _largest), error("gn", _largest)), below(0.5), fmt="+.2f"),
            Claim("ln-behind-gn", f"LN − GN error at {large} per device (points)",
                  Published("+1.2 at 32 per GPU (25.3 vs 24.1)", WU_HE, 1.2),
                  difference(error("ln", _largest), error("gn", _largest)), above(0.0), fmt="+.2f"),
            Claim("in-behind-ln", f"IN − LN error at {large} per device (points)",
                  Published("+3.1 at 32 per GPU (28.4 vs 25.3)", WU_HE, 3.1),
                  difference(error("in", _largest), error("ln", _largest)), above(0.0), fmt="+.2f"),
            Claim("renorm-helps", f"Batch Renorm − BN error at {near_4} per device (points)",
                  Published("−1.0 at 4 per GPU (26.3 vs 27.3; r_max 1.5, d_max 0.5)",
                            "Wu & He 2018, §5.1", -1.0),
                  difference(error("brn", _near_4), error("bn", _near_4)), below(0.0), fmt="+.2f"),
            Claim("sn-small", f"Switchable Norm's error at {small} per device (%)",
                  Published("24.4 at 2 per GPU", "Switchable-Normalization README, ResNet-50", 24.4),
                  error("sn", _smallest), None, fmt=".2f"),
        ]  # fmt: skip
        for b in s.sync_batch_sizes:
            claims.append(Claim(
                f"syncbn-b{b}", f"SyncBN ({b} × {s.sync_processes} processes) − BN at {b} (points)",
                Published("not in the paper: SyncBN normalizes over the global batch, so it should "
                          "beat per-device BN", "Wu & He 2018, §3 (BN statistics per GPU)"),
                difference(error("syncbn", b), error("bn", b)), below(0.0), fmt="+.2f"))  # fmt: skip
        return claims

    def figures(self, s):
        return [
            VersusSetting("error-vs-batch", "test_error", BATCH, "batch size per device",
                          "test error (%)",
                          "Test error against the batch per device, one line per normalizer; SyncBN "
                          "dashed, at its batch per process; Ghost BN only where it differs from BN. "
                          "Right: the published numbers.",
                          published=PUBLISHED, published_title="Wu & He 2018 (ResNet-50); SN README",
                          title=f"ours: small CNN, {s.train_examples} images", dashed=("syncbn",)),
            MeanTable("errors", "test_error", BATCH,
                      "Test error (%) in eval mode, whole test set; SyncBN's batch is per process.",
                      spec=".1f"),
            Heatmap("error-heatmap", "test_error", BATCH, "batch size per device", "test error (%)",
                    "Test error (%) per normalizer and batch size per device."),
            VersusSetting("bn-inconsistency",
                          {"eval mode (running statistics)": "test_error",
                           "batch statistics (training mode)": "batch_stat_error",
                           "training images, eval mode": "train_error"},
                          BATCH, "batch size", "error (%)",
                          "BN: error in eval mode, with batch statistics (training mode) and on "
                          "training images, against the batch size.", arms=["bn"],
                          title="BN: where the error comes from"),
            Bars("sn-bn-weight", "sn_bn_weight", "weight of BN's mean (softmax)",
                 "Switchable Norm: the weight its layers give BN's mean, by batch size per device.",
                 by=BATCH, where={"arm": "sn"}, per_layer=True),
        ]  # fmt: skip

    def extra_section(self, results):
        rows = []
        for batch in sorted(results.values(BATCH, arm="sn"), reverse=True):
            trials = [t for t in results.trials(arm="sn", **{BATCH: batch}) if t.final.get("importance")]
            for layer in trials[0].final["importance"] if trials else []:
                weights = [[t.final["importance"][layer][stat] for t in trials] for stat in ("mean", "var")]
                cells = [" / ".join(f"{statistics.fmean(w[i] for w in stat):.2f}" for i in range(3))
                         for stat in weights]  # fmt: skip
                rows.append([batch, layer, *cells])
        if not rows:
            return None
        return Section("Switchable Norm's learned importance weights", [Table(
            ["B", "layer", "mean: IN / LN / BN", "variance: IN / LN / BN"], rows,
            "Softmax weights at the end of training, mean over seeds (the hidden layer uses LN).")])

    def deviations(self, s):
        return [
            f"A small CNN (conv{'-conv'.join(str(c) for c in s.channels)}, fc{s.hidden}) on "
            f"{s.train_examples} training images for {s.epochs:g} epoch(s), instead of ResNet-50 on "
            "ImageNet for 100 epochs; absolute errors are not comparable, only the shapes of the curves.",
            "One process with B images per step: the per-device batch is also the gradient batch "
            "(Wu & He's 8 GPUs had a gradient batch 8× the per-GPU one). Learning rate "
            f"{s.base_lr:g}·B/{s.base_batch}, SGD momentum {s.momentum:g}, no schedule.",
            "The normalizer is after both convolutions and after the fully connected hidden layer, "
            "whose statistics are over the B samples alone: that layer stands in for ResNet's deep "
            "low-resolution layers" + ("" if s.hidden_norm else " (this run: no norm on the hidden layer)")
            + ". IN and SN need spatial dims, so their networks use LN on the hidden layer.",
            f"GN with {s.groups} groups (Wu & He: 32, on far wider layers); LN is GroupNorm(1, C) as "
            "in the paper.",
            f"Batch Renorm: Wu & He's bounds (r_max {s.renorm_r_max:g}, d_max {s.renorm_d_max:g}) "
            "reached by Ioffe (2017)'s ramps scaled to each run (plain BN for the first 3.5%), moving "
            f"averages at momentum {s.renorm_momentum:g} (the paper's 0.01 is too slow for runs of a "
            "few hundred steps).",
            f"SyncBN: {s.sync_processes} gloo processes on this machine, the learning rate scaled by "
            "the global batch.",
        ]  # fmt: skip
