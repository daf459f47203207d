"""Wu & He (2018), Fig. 1 and Table: BN's error grows as the batch per device shrinks; GN's does not.

Group Normalization (arXiv 1803.08494), ResNet-50 on ImageNet, 8 GPUs with BN statistics per GPU,
learning rate 0.1·N/32 for N images per GPU, 100 epochs; validation error (%) by images per GPU:

    | per GPU | 32   | 16   | 8    | 4    | 2    |
    | BN      | 23.6 | 23.7 | 24.8 | 27.3 | 34.7 |
    | GN      | 24.1 | 24.2 | 24.0 | 24.2 | 24.1 |

and at 32 per GPU LN 25.3, IN 28.4; Batch Renorm (r_max 1.5, d_max 0.5) at 4 per GPU 26.3 (§5.1);
SN 23.1 ... 24.4 % at 32 ... 2 per GPU (Switchable Norm's README, ResNet-50, 8 GPUs).

Here (CPU protocol 4, issue 17): the lab's small CNN on Fashion-MNIST; every trial takes ``steps``
SGD updates of ``gradient_batch`` (64) images at one rate, and the batch-dependent normalizers see
each run of B of them on its own (B in ``batch_sizes``, a device's batch; BN per B *is* Ghost BN).
No norm on the hidden FC layer but in arm ``bn-fc``. The batch-independent ones (GN, LN, IN, and
issue 18's WS + GN, FRN + TLU, EvoNorm-S0) train at the largest and smallest B only (the same trial
twice); so do, for the budget, EvoNorm-B0, MABN and CBN (``every_batch``). SyncBN: ``sync_processes``
gloo processes. Seeds paired. Measured: test error (eval mode, batch statistics, training images).
"""

from __future__ import annotations

from dataclasses import dataclass

from normkit.lab.claims import Claim, Published, above, below, difference, final, per_seed
from normkit.lab.evaluation import accuracy_and_loss, error_on_test_set, error_percent, on_test_set
from normkit.lab.experiment import Experiment, Setup, register, training_subset
from normkit.lab.figures import Bars, Heatmap, MeanTable, VersusSetting
from normkit.lab.gloo import GlooDataParallel
from normkit.lab.plan import Arm, Plan
from normkit.lab.small_batch import (
    ACTIVATING,
    BATCH_DEPENDENT,
    NORMALIZATION_BATCH_PRESETS,
    NORMALIZERS,
    PER_SAMPLE,
    NormalizationBatchSettings,
    batch_statistics_accuracy,
    importance_section,
    network_name,
    normalization_batch_cnn,
    sn_vs_bn_claim,
    switchable_importance,
)

WU_HE = "Wu & He 2018, Fig. 1 and Table 1 (ResNet-50, ImageNet, error %)"
PUBLISHED = {  # images per GPU -> validation error (%)
    "BN": [(32, 23.6), (16, 23.7), (8, 24.8), (4, 27.3), (2, 34.7)],
    "GN": [(32, 24.1), (16, 24.2), (8, 24.0), (4, 24.2), (2, 24.1)],
    "LN": [(32, 25.3)], "IN": [(32, 28.4)], "Batch Renorm": [(4, 26.3)],  # BRN: §5.1, r/d_max 1.5/0.5
    "Switchable Norm": [(32, 23.1), (16, 23.3), (8, 23.3), (4, 24.1), (2, 24.4)],  # SN README
}
QIAO, SINGH, LIU = "Qiao et al. 2019, abstract, Table 2", "Singh & Krishnan 2020, abstract", "Liu et al. 2020"
S, L, YAN, YAO = ("smallest",) * 2, ("largest",) * 2, "Yan et al. 2020, abstract", "Yao et al. 2021, Tab. 1-4"
REMEDIES = [  # issue 18: name, arm − arm at (B, B), text, published (docstrings), value, criterion, source
    ("ws-gn-beats-bn-small", "ws_gn", "bn", S, "WS+GN − BN error",
     "< 0: GN+WS trains at 1 image per GPU, where BN fails (ResNet-50)", None, below(0.0), QIAO),
    ("ws-gn-small-vs-bn-large", "ws_gn", "bn", ("smallest", "largest"), "WS+GN (small) − BN (large) error",
     "≈ 0: GN+WS at 1 image per GPU reaches BN's large-batch accuracy", 0.0, below(1.0), QIAO),
    ("frn-beats-gn-small", "frn", "gn", S, "FRN − GN error",
     "< −1: FRN is '>1% better than GN in the small mini-batch regime'", -1.0, below(0.0), SINGH),
    ("frn-vs-bn-large", "frn", "bn", L, "FRN − BN error",
     "−0.7 to −1.0: FRN '≈0.7–1.0% better than BN' at large batches", -0.7, below(0.0), SINGH),
    ("evonorm-s0-beats-bn-small", "evo_s0", "bn", S, "EvoNorm-S0 − BN error", "< 0: S0 keeps ResNet-50's "
     "accuracy from 1024 to 32 images over 8 workers, BN-ReLU not", None, below(0.0), f"{LIU}, Fig. 1"),
    ("evonorm-b0-vs-bn-large", "evo_b0", "bn", L, "EvoNorm-B0 − BN error",
     "≤ 0: B0 ahead of BN-ReLU on most ImageNet classifiers", None, below(0.5), f"{LIU}, Tables 2-3"),
    ("mabn-beats-bn-small", "mabn", "bn", S, "MABN − BN error", "< 0: MABN 'can completely restore the "
     "performance of vanilla BN in small batch cases'", None, below(0.0), YAN),
    ("mabn-small-vs-bn-large", "mabn", "bn", ("smallest", "largest"), "MABN (small) − BN (large) error",
     "≈ 0: MABN at small batches restores BN's large-batch accuracy", 0.0, below(1.0), YAN),
    ("cbn-beats-bn-small", "cbn", "bn", S, "CBN − BN error",
     "< 0: CBN ahead of BN at small batches (ImageNet, COCO)", None, below(0.0), YAO),
    ("cbn-vs-gn-small", "cbn", "gn", S, "CBN − GN error",
     "< 0: CBN ahead of GN at small batches (ImageNet, COCO)", None, below(0.0), YAO),
]  # fmt: skip
BATCH = "batch_per_device"


@dataclass(frozen=True)
class BatchSizeSettings(NormalizationBatchSettings):
    normalizers: tuple[str, ...] = ("bn", "bn-fc", "gn", "ln", "in", "brn", "sn",  # bn-fc: BN on FC too
                                    "ws_gn", "frn", "evo_s0", "evo_b0", "mabn", "cbn")  # issue 18
    sync_processes: int = 4  # SyncBN across P processes of gradient_batch/P images; 0: no SyncBN
    renorm_limits: tuple[float, ...] = (1.5, 0.5)  # Wu & He's Batch Renorm: r_max, d_max
    renorm_momentum: float = 0.1  # BN's default: the runs are too short for the paper's 0.01
    every_batch: tuple[str, ...] = ("bn", "bn-fc", "brn", "sn")  # the others: largest, smallest B only
    warmup_steps: int = 50  # FRN's, EvoNorm's linear LR warm-up; CBN's burn-in (else they can collapse)


AT = {"smallest": lambda s: min(s.batch_sizes), "largest": lambda s: max(s.batch_sizes),
      "near 4": lambda s: 4 if 4 in s.batch_sizes else min(s.batch_sizes)}  # fmt: skip
LARGEST = {BATCH: AT["largest"]}


def _bn_rise(trials, results) -> float | None:
    errors = {t.params[BATCH]: t.final["test_error"] for t in trials if not t.final["diverged"]}
    return errors[b] - min(errors.values()) if (b := AT["smallest"](results.settings)) in errors else None


@register
class BatchSize(Experiment):
    name = "batch-size"
    title = "Error against the normalization batch per device: BN, GN, BRN, SN, SyncBN and later remedies"
    paper = "Wu & He 2018, Group Normalization, Fig. 1 and Table (§5.1)"
    claim = ("BN's error rises rapidly as the batch per device shrinks (ResNet-50: 23.6% at 32 images "
             "per GPU, 34.7% at 2), while GN's stays flat (24.1%) because it does not use the batch.")
    settings_class = BatchSizeSettings
    presets = {
        "quick": {**NORMALIZATION_BATCH_PRESETS["quick"], "sync_processes": 2},
        "tiny": {**NORMALIZATION_BATCH_PRESETS["tiny"], "sync_processes": 2},
        "gpu": {**NORMALIZATION_BATCH_PRESETS["gpu"], "normalizers": ("bn", "gn", "ln", "in"),
                "every_batch": ("bn",), "sync_processes": 0},  # those of Fig. 1 and the Table
    }
    prepare_data = training_subset

    def plan(self, s, data):
        sizes = sorted(s.batch_sizes, reverse=True)
        ends = {BATCH: [sizes[0], sizes[-1]]}
        arms = [Arm(n, {"normalizer": n, "processes": 1}, NORMALIZERS.get(n, "BN, also on the FC layer"),
                    grid=ends if n in PER_SAMPLE or n not in s.every_batch else None)
                for n in s.normalizers]  # fmt: skip
        if s.sync_processes > 1:
            arms.append(Arm("syncbn", {"normalizer": "syncbn", "processes": s.sync_processes},
                            NORMALIZERS["syncbn"], grid={BATCH: [s.gradient_batch // s.sync_processes]}))
        return Plan(arms, s.steps, seeds=s.seeds, seed=s.seed, evaluations=s.evaluations,
                    grid={BATCH: sizes})  # fmt: skip

    def setup(self, trial, s, data, generator):
        p = trial.params
        forwards = trial.steps * s.gradient_batch // p[BATCH]  # of each Batch Renorm layer
        fc = {"hidden_norm": True} if p["normalizer"] == "bn-fc" else {}
        model, optimizer = normalization_batch_cnn(
            s, data, p["normalizer"].removesuffix("-fc"), p[BATCH], generator, renorm_steps=forwards,
            renorm_limits=tuple(s.renorm_limits), renorm_momentum=s.renorm_momentum,
            burn_in=s.warmup_steps * s.gradient_batch // p[BATCH], **fc)  # fmt: skip
        step = GlooDataParallel(model, optimizer, p["processes"]) if p["processes"] > 1 else None
        warm = (lambda t: min(1.0, (t + 1) / max(1, s.warmup_steps))) if p["normalizer"] in ACTIVATING else None  # noqa: E501
        return Setup(model, optimizer, s.gradient_batch, warm, train_step=step)

    def measure(self, trial, s, setup, data):
        return {"test_error": error_on_test_set(setup.model, data, s.eval_examples)}

    def finish(self, trial, s, setup, data):
        if isinstance(setup.train_step, GlooDataParallel):
            setup.train_step.close()  # the gloo ranks are done: evaluate on free cores
        p, k, model = trial.params, s.batch_stat_examples, setup.model
        values = on_test_set(model, data, error=True)
        train, _ = accuracy_and_loss(model, data.x_train[:k], data.y_train[:k])
        values.update(train_error=error_percent(train), batch_stat_error=None)
        if p["normalizer"].removesuffix("-fc") in BATCH_DEPENDENT:  # test batches of G, split per B
            values["batch_stat_error"] = error_percent(batch_statistics_accuracy(
                model, data.x_test[:k], data.y_test[:k], min(s.gradient_batch, k)))
        if p["normalizer"] == "sn":
            values["importance"] = switchable_importance(model)
            values["sn_bn_weight"] = {layer: w["mean"][2] for layer, w in values["importance"].items()}
        return values

    def claims(self, s):
        def gap(name, a, b, at, text, published, value, criterion, source=WU_HE, unverified=False):
            ats = (at, at) if isinstance(at, str) else at
            ours = difference(*(final("test_error", arm=x, **{BATCH: AT[w]}) for x, w in zip((a, b), ats)))  # noqa: B905
            where = " and ".join(dict.fromkeys(str(AT[w](s)) for w in ats))
            return Claim(name, f"{text} at {where} per device (points)",
                         Published(published, source, value, unverified), ours, criterion, fmt="+.2f")

        small = AT["smallest"](s)
        return [
            *(Claim(f"bn{fc}-degrades", f"BN's error at {small} per device minus its best{what} (points)",
                    Published("+11.1: 23.6 at 32 → 34.7 at 2 per GPU", WU_HE, 11.1),
                    per_seed(_bn_rise, "BN error at the smallest batch − its lowest", arm=f"bn{fc}"),
                    above(2.0), fmt="+.2f")
              for fc, what in (("", ""), ("-fc", ", BN also on the FC layer"))
              if f"bn{fc}" in s.normalizers),
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
            sn_vs_bn_claim(BATCH),
            Claim("sn-small", f"Switchable Norm's error at {small} per device (%)",
                  Published("24.4 at 2 per GPU", "Switchable-Normalization README, ResNet-50", 24.4),
                  final("test_error", arm="sn", **{BATCH: AT["smallest"]}), None, fmt=".2f"),
            *(gap(*r, unverified=True) for r in REMEDIES if {r[1], r[2]} <= set(s.normalizers)),
        ] + ([] if s.sync_processes < 2 else [Claim(
            "syncbn-whole-batch", f"SyncBN ({s.sync_processes} × {s.gradient_batch // s.sync_processes}) "
            f"− BN over the whole {s.gradient_batch} (points)",
            Published("not in the paper: SyncBN normalizes over the global batch, as one device would",
                      "Wu & He 2018, §3 (BN statistics per GPU)"),
            difference(final("test_error", arm="syncbn"), final("test_error", arm="bn", **LARGEST)),
            below(1.0), fmt="+.2f")])  # fmt: skip

    def figures(self, s):
        bn_errors = {"eval mode (running statistics)": "test_error", "training images, eval mode":
                     "train_error", "batch statistics (training mode)": "batch_stat_error"}
        return [
            VersusSetting("error-vs-batch", "test_error", BATCH, "batch size per device", "test error (%)",
                          "Test error against the normalization batch (gradient batch fixed); GN, LN "
                          "and IN do not depend on it; SyncBN dashed, at its batch per process. Right: "
                          "the published numbers (gradient batch 8 × per GPU).", dashed=("syncbn",),
                          published=PUBLISHED, published_title="Wu & He 2018 (ResNet-50); SN README",
                          title=f"ours: {network_name(s, True)}, {s.train_examples} images"),
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
        return importance_section(results, BATCH, "sn")

    def deviations(self, s):
        return [
            f"{network_name(s)} on {s.train_examples} images, {s.steps} updates of {s.gradient_batch}, not "
            "ResNet-50 on ImageNet for 100 epochs: compare the shapes of the curves, not the errors.",
            f"The gradient batch is fixed at {s.gradient_batch} (SGD momentum {s.momentum:g} at {s.lr:g}, "
            f"no schedule but FRN's and EvoNorm's {s.warmup_steps}-step warm-up) and only the "
            "normalization batch B varies, at equal updates; Wu & He's gradient batch was 8·B with the "
            "rate scaled by it. Running statistics are updated once per B (as on one device).",
            ("No normalizer on the fully connected hidden layer" if not s.hidden_norm else
             "The normalizer also follows the fully connected hidden layer (LN in IN's and SN's networks)")
            + "; arm bn-fc puts BN there: B values per feature (ResNet-50's last 7×7 stage has 49·B).",
            f"GN with {s.groups} groups (Wu & He: 32, on far wider layers); LN is GroupNorm(1, C). "
            "GN's flat curve is not judged: with a fixed gradient batch it holds by construction.",
            f"Batch Renorm's moving averages at momentum {s.renorm_momentum:g} (the paper's 0.01 is too "
            "slow for runs of a few hundred steps); plain BN for the first 3.5% of its forwards.",
            "MABN's, CBN's windows (16, 8 iterations) span the last microbatches of B, mostly of this step; "
            f"MABN's first 3.5% of forwards: batch statistics, r = 1; CBN: BN for {s.warmup_steps} updates.",
            f"SyncBN: {s.sync_processes} gloo processes on this machine, each holding "
            f"{s.gradient_batch // max(1, s.sync_processes)} of the gradient batch.",
        ]  # fmt: skip
