"""What the small-batch experiments share: the normalizers they compare, built into the lab's small
CNN; Batch Renorm's schedule scaled to a run; accuracy with batch statistics; and the figure of
error against batch size.

Also the trial plans: :func:`measured_trial` and :func:`batch_sweep`; and the protocol that
``batch-size`` and ``switchable`` share (:class:`NormalizationBatchSettings`): a fixed gradient
batch normalized in microbatches (:class:`PerMicrobatch`), so that only the normalization batch
varies, at equal updates (issue 17).

Used by ``batch-size`` (Wu & He 2018), ``renorm`` (Ioffe 2017), ``switchable`` (Luo et al. 2018)
and, for the figure and the measurements, ``ghost-bn``, ``layer-norm`` and ``batch-layer-norm``.

The network is the lab's small CNN (:func:`normkit.lab.models.cnn`: per stage conv5, norm, ReLU,
max-pool 2; then a fully connected hidden layer, norm, ReLU; then the classifier), with the
normalizer after every convolution and after the hidden layer. The hidden layer's norm is where
the batch matters most: its statistics are over the B samples alone (a convolution's are over B
times its map), the small-scale counterpart of the late, low-resolution layers of a ResNet.

Decisions (documented in the reports too):

- LN is Wu & He's: statistics over (C, H, W) of a sample, ``GroupNorm(1, C)``; on the hidden
  layer that is LayerNorm over its features.
- IN, SN, EvoNorm (and in effect FRN: x/|x|) need spatial dims (IN's set on a fully connected
  layer is one value, whose output is always β); their networks use LN on the hidden layer. (The
  official SN code mixes LN and BN there, which ``nk.SwitchableNorm`` does not offer.)
- Batch Renorm's r_max/d_max ramps follow the paper's steps as fractions of the run (below); the
  final values and the moving averages' momentum are each experiment's choice.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab.claims import Claim, Published, arm_gap, below
from normkit.lab.models import cnn, initialize, resnet
from normkit.lab.plan import Trial
from normkit.lab.render import Section, Table, new_figure
from normkit.lab.settings import Settings

# Key -> label, in the order the figures and tables list them.
NORMALIZERS: dict[str, str] = {
    "bn": "BN",
    "gn": "GN",
    "ln": "LN",
    "in": "IN",
    "brn": "Batch Renorm",
    "gbn": "Ghost BN",
    "sn": "Switchable Norm",
    "syncbn": "SyncBN",
    "ws_gn": "WS + GN",
    "frn": "FRN + TLU",
    "evo_s0": "EvoNorm-S0",
    "evo_b0": "EvoNorm-B0",
    "mabn": "MABN",
    "cbn": "CBN",
}
BATCH_DEPENDENT = frozenset({"bn", "brn", "gbn", "sn", "syncbn", "evo_b0", "mabn", "cbn"})
# nk.tools.convert's small-batch remedies, applied to the BN network: they change the convolutions
# too (WS + GN: standardized filters; MABN: centred ones; CBN: attached to the conv feeding it).
CONVERTED = {"ws_gn": "ws_gn:{groups}", "mabn": "mabn", "cbn": "cbn"}
ACTIVATING = frozenset({"frn", "evo_b0", "evo_s0"})  # they replace BN *and* the ReLU after it
RESNET_NORMALIZERS = ("bn", "gn", "ln", "in")  # those of Wu & He's Fig. 1 and Table 1

# Ioffe (2017), §4: r_max = 1, d_max = 0 for 5k steps, then linear (our choice of shape) to d_max = 5
# at 25k and r_max = 3 at 40k steps, of runs of about 140k steps: as fractions of the run,
RENORM_BEGIN, RENORM_D_END, RENORM_R_END = 0.035, 0.18, 0.28
RENORM_R_MAX, RENORM_D_MAX = 3.0, 5.0


def renorm_ramps(
    steps: int, r_max: float = RENORM_R_MAX, d_max: float = RENORM_D_MAX
) -> tuple[nk.RenormRamp, nk.RenormRamp]:
    """Ioffe (2017)'s r_max and d_max schedules scaled to a run of ``steps`` forwards of a layer:
    plain BN until 3.5% of the run, then linear ramps to ``d_max`` (the paper: 5) at 18% and
    ``r_max`` (3) at 28%."""
    begin = round(RENORM_BEGIN * steps)
    r_ramp = nk.RenormRamp(1.0, r_max, begin, max(begin, round(RENORM_R_END * steps)))
    d_ramp = nk.RenormRamp(0.0, d_max, begin, max(begin, round(RENORM_D_END * steps)))
    return r_ramp, d_ramp


def norm_spec(normalizer: str, groups: int, ghost_batch: int) -> str:
    """The ``nk.create_norm`` name of a normalizer key (see :data:`NORMALIZERS`)."""
    specs = {
        "bn": "batch",
        "gn": f"group:{groups}",
        "ln": "group:1",
        "in": "group_instance",
        "brn": "renorm",
        "gbn": f"ghost:{ghost_batch}",
        "sn": "switchable",
        "syncbn": "batch",
        "frn": "frn",
        "evo_b0": "evonorm_b0",
        "evo_s0": f"evonorm_s0:{groups}",
        **dict.fromkeys(CONVERTED, "batch"),
    }
    if normalizer not in specs:
        raise ConfigError(
            f"normalizer {normalizer!r} is not known; choose from {', '.join(NORMALIZERS)}"
        )
    return specs[normalizer]


def small_cnn(
    sample_shape: Sequence[int],
    classes: int,
    normalizer: str,
    generator: torch.Generator,
    *,
    channels: Sequence[int] = (16, 32),
    hidden: int = 128,
    groups: int = 4,
    ghost_batch: int = 4,
    renorm_steps: int = 1,
    renorm_limits: tuple[float, float] = (RENORM_R_MAX, RENORM_D_MAX),
    renorm_momentum: float | None = None,
    hidden_norm: bool = True,
    norm_batch: int | None = None,
    burn_in: int = 0,
) -> nn.Sequential:
    """The lab's small CNN with ``normalizer`` after every convolution and the hidden layer, He
    initialization drawn from ``generator``.

    Batch Renorm: ``renorm_steps`` forwards of each layer in the run, for the ramps to
    ``renorm_limits`` = (r_max, d_max); ``renorm_momentum`` for its moving averages (None: the
    layer's default, the paper's 0.01); MABN's first 3.5% of them use the batch's statistics and
    r = 1; CBN's first ``burn_in`` forwards are plain BN. FRN and EvoNorm replace the ReLU after
    them. ``hidden_norm`` False leaves the hidden layer unnormalized (with a bias), so that only
    convolutions normalize. ``norm_batch`` B: the batch-dependent normalizers (not SyncBN) see each
    run of B samples of a training batch on its own (:class:`PerMicrobatch`; BN becomes
    ``nk.GhostBatchNorm``, the same map), as each device of a data-parallel run sees its own B.
    """
    for name, value in (("groups", groups), ("ghost_batch", ghost_batch)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be >= 1")
    if normalizer in ("gn", "ws_gn"):
        for width in (*channels, hidden):
            if width % groups or groups in (1, width):
                raise ConfigError(
                    f"GN with groups={groups} on {width} channels is not a group norm (it must "
                    "divide the channels and be neither 1, which is LN, nor the channels, which is "
                    "IN); choose another --set groups=G"
                )
    model = cnn(
        tuple(sample_shape),
        tuple(channels),
        hidden,
        classes,
        activation="relu",
        norm=norm_spec("gbn", groups, norm_batch)  # BN per B: Ghost BN, vectorized
        if normalizer == "bn" and norm_batch is not None
        else norm_spec(normalizer, groups, ghost_batch),
    )
    last = f"norm{len(channels) + 1}"
    if not hidden_norm:
        position = f"linear{len(channels) + 1}"
        old = model._modules[position]
        model._modules[position] = nn.Linear(old.in_features, old.out_features)
        model._modules[last] = nn.Identity()
    elif normalizer in ("in", "sn", "frn", "evo_b0", "evo_s0"):  # spatial dims (FRN: else ≈ sign)
        model._modules[last] = nk.LayerNorm(hidden)
    for index in range(1, len(channels) + 1 if normalizer in ACTIVATING else 1):
        model._modules[f"act{index}"] = nn.Identity()  # FRN's TLU, EvoNorm's max or gate
    if normalizer in CONVERTED:  # MABN's warm-up and renorm-free steps: BRN's 3.5% of the run
        begin = max(1, round(RENORM_BEGIN * renorm_steps))
        options = {"warmup_iters": begin, "renorm_iters": begin} if normalizer == "mabn" else (
            {"burn_in": burn_in} if normalizer == "cbn" else {})  # CBN: forwards as plain BN
        spec = CONVERTED[normalizer].format(groups=groups)
        model, _ = nk.tools.convert(model, spec, inplace=True, **options)
    if normalizer == "brn":
        r_max, d_max = renorm_ramps(renorm_steps, *renorm_limits)
        for module in model.modules():
            if isinstance(module, nk.BatchRenorm):
                module.r_max, module.d_max = r_max, d_max
                if renorm_momentum is not None:
                    module.momentum = renorm_momentum
    if normalizer == "syncbn":
        model = nk.SyncBatchNorm.convert_sync_batchnorm(model)
    elif norm_batch is not None and normalizer in BATCH_DEPENDENT - {"bn"}:
        for name, module in list(model.named_children()):
            if name.startswith("norm") and not isinstance(module, nn.Identity):
                model._modules[name] = PerMicrobatch(module, norm_batch)
    initialize(model, "he", generator)
    return model


class PerMicrobatch(nn.Module):
    """Applies ``layer`` to each run of ``size`` consecutive samples in training (each normalized
    with its own batch statistics; running statistics updated once per microbatch, in order), and to
    the whole batch in eval mode (running statistics: the batch does not matter)."""

    def __init__(self, layer: nn.Module, size: int):
        super().__init__()
        if size < 1:
            raise ConfigError(f"microbatch size {size} must be >= 1")
        self.layer, self.size = layer, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.layer(x)
        return torch.cat([self.layer(chunk) for chunk in x.split(self.size)])


@dataclass(frozen=True)
class NormalizationBatchSettings(Settings):
    """The protocol ``batch-size`` and ``switchable`` share (issue 17): every trial takes the same
    ``steps`` updates of ``gradient_batch`` images at one learning rate, and only the batch the
    normalizers see (``batch_sizes``, each dividing the gradient batch) varies, as Wu & He's per-GPU
    statistics sat inside a larger gradient batch. No normalizer on the fully connected hidden layer
    unless ``hidden_norm`` (there a batch of B gives B values per feature, not B·H·W)."""

    batch_sizes: tuple[int, ...] = (64, 32, 16, 8, 4, 2)  # normalization batches
    gradient_batch: int = 64
    train_examples: int = 15_000
    steps: int = 700  # updates, every arm (3 epochs of 15,000 at 64)
    lr: float = 0.1  # the legacy protocol's rate at 64 (0.1·B/64)
    momentum: float = 0.9
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    groups: int = 4
    hidden_norm: bool = False
    seeds: int = 3
    evaluations: int = 4  # evaluations per trial (besides step 0), on eval_examples test images
    eval_examples: int = 1_000
    batch_stat_examples: int = 2_000  # test (and training) images for the extra errors
    resnet_blocks: tuple[int, ...] = ()  # bottleneck blocks per stage: a ResNet instead of the CNN
    resnet_width: int = 64

    def __post_init__(self):
        for b in self.batch_sizes:
            if b < 1 or self.gradient_batch % b:
                raise ConfigError(f"normalization batch {b} must divide gradient_batch={self.gradient_batch}")
        arms = set(getattr(self, "normalizers", ()))  # batch-size's arms (bn-fc: BN on a hidden fc)
        if self.resnet_blocks and (arms - set(RESNET_NORMALIZERS) or self.hidden_norm):
            raise ConfigError(f"the ResNet (resnet_blocks={tuple(self.resnet_blocks)}) takes the normalizers "
                              f"{', '.join(RESNET_NORMALIZERS)} and no hidden_norm; got normalizers="
                              f"{','.join(sorted(arms))}, hidden_norm={self.hidden_norm}")  # fmt: skip


# The shared presets: the two experiments' trials of one arm, batch and seed are the same trial.
NORMALIZATION_BATCH_PRESETS = {
    "quick": {"batch_sizes": (64, 2), "train_examples": 3_000, "steps": 150, "seeds": 2,
              "evaluations": 2, "eval_examples": 500, "batch_stat_examples": 1_000},
    "tiny": {"batch_sizes": (8, 2), "gradient_batch": 8, "train_examples": 64, "steps": 4,
             "channels": (4, 8), "hidden": 16, "groups": 2, "seeds": 1, "evaluations": 1,
             "eval_examples": 40, "batch_stat_examples": 40},
    # Wu & He's scale on a GPU: ResNet-50 (He et al. 2016, Table 1) on CIFAR-10, B = 32 ... 2 images
    # in a gradient batch of 256 = 8 × 32 at lr 0.1 (their 0.1·B/32 at B = 32), 30 epochs, GN 32 groups
    "gpu": {"dataset": "cifar10", "resnet_blocks": (3, 4, 6, 3), "batch_sizes": (32, 16, 8, 4, 2),
            "gradient_batch": 256, "train_examples": 50_000, "steps": 5_860, "groups": 32,
            "evaluations": 10, "eval_examples": 10_000, "batch_stat_examples": 10_000},
}  # fmt: skip
# Their trials do not depend on the normalization batch:
PER_SAMPLE = frozenset({"gn", "ln", "in", "ws_gn", "frn", "evo_s0"})


def normalization_batch_cnn(s: NormalizationBatchSettings, data, normalizer: str, norm_batch: int,
                            generator: torch.Generator, **options) -> tuple[nn.Module, torch.optim.Optimizer]:
    """:func:`small_cnn` normalized per ``norm_batch`` samples, or where ``s.resnet_blocks`` is set
    (the gpu presets) :func:`normalization_batch_resnet`; and its SGD optimizer."""
    options.setdefault("hidden_norm", s.hidden_norm)
    if s.resnet_blocks:
        model = normalization_batch_resnet(s, data, normalizer, norm_batch, generator, options["hidden_norm"])
    else:
        model = small_cnn(data.sample_shape, data.classes, normalizer, generator, channels=s.channels,
                          hidden=s.hidden, groups=s.groups, norm_batch=norm_batch, **options)  # fmt: skip
    return model, torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum)


def normalization_batch_resnet(s: NormalizationBatchSettings, data, normalizer: str, norm_batch: int,
                               generator: torch.Generator, hidden_norm: bool = False) -> nn.Module:
    """He et al. 2016's bottleneck ResNet (:func:`normkit.lab.models.resnet`: ``s.resnet_blocks``
    per stage, width ``s.resnet_width``) with ``normalizer`` after every convolution, BN per
    ``norm_batch`` samples (Ghost BN, as in :func:`small_cnn`), He initialization from
    ``generator``. The normalizers of Wu & He's Fig. 1 and Table 1 only (:data:`RESNET_NORMALIZERS`);
    the ResNet has no hidden fc layer to normalize."""
    if normalizer not in RESNET_NORMALIZERS or hidden_norm:
        raise ConfigError(f"the ResNet (resnet_blocks={tuple(s.resnet_blocks)}) takes the normalizers "
                          f"{', '.join(RESNET_NORMALIZERS)} and no hidden_norm; got {normalizer!r}"
                          f"{' with hidden_norm' if hidden_norm else ''}")  # fmt: skip
    if normalizer == "gn" and (s.resnet_width % s.groups or s.groups in (1, s.resnet_width)):
        raise ConfigError(f"GN with groups={s.groups} on a ResNet of width {s.resnet_width}: the groups "
                          "must divide the width and be neither 1 (LN) nor the width (IN)")  # fmt: skip
    spec = norm_spec("gbn" if normalizer == "bn" else normalizer, s.groups, norm_batch)
    model = resnet(tuple(data.sample_shape), data.classes, spec, tuple(s.resnet_blocks), s.resnet_width)
    initialize(model, "he", generator)
    return model


def network_name(s: NormalizationBatchSettings, brief: bool = False) -> str:
    """The network of :func:`normalization_batch_cnn` in words (``brief``: its name only)."""
    if s.resnet_blocks:
        name, blocks = f"ResNet-{3 * sum(s.resnet_blocks) + 2}", "-".join(map(str, s.resnet_blocks))
        return name if brief else f"{name} (bottleneck blocks {blocks}, width {s.resnet_width}, CIFAR stem)"
    return "small CNN" if brief else f"A small CNN (conv{'-conv'.join(map(str, s.channels))}, fc{s.hidden})"


def sn_vs_bn_claim(setting: str) -> Claim:
    """SN − BN at the largest normalization batch: one claim, declared alike by ``batch-size`` and
    ``switchable``, on the same trials (issue 16: the two had contradicted each other)."""
    largest = {setting: lambda s: max(s.batch_sizes)}
    return arm_gap("sn-vs-bn-large", "SN − BN error at the largest normalization batch (points)",
                   Published("−0.5 at 32 per GPU (SN 23.1 vs BN 23.6)",
                             "Switchable-Normalization README, ResNet-50, ImageNet, 8 GPUs", -0.5),
                   "test_error", "sn", "bn", below(0.5), **largest)  # fmt: skip


def hidden_norm_name(channels: Sequence[int]) -> str:
    """The name, in :func:`small_cnn`'s model, of the hidden layer's normalizer."""
    return f"norm{len(channels) + 1}"


class RefusalRecorder:
    """The runner's training step (cross-entropy, backward, optimizer step) that records a
    normalizer's refusal of a batch (``BatchTooSmallError``) instead of raising it; from then on
    the loss is NaN, which ends the trial (marked diverged) at its next evaluation."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer, self.refusal = model, optimizer, None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.refusal is None:
            try:
                loss = nn.functional.cross_entropy(self.model(x), y)
            except nk.errors.BatchTooSmallError as error:
                self.refusal = f"{type(error).__name__}: {error}"
            else:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                return loss
        return torch.tensor(float("nan"))


@torch.enable_grad()  # CBN differentiates its statistics in the forward (nothing else needs it)
def batch_statistics_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> float:
    """Accuracy with the normalizers in training mode: each run of ``batch_size`` consecutive
    examples is normalized with its own batch statistics, as in training (the last incomplete batch
    is dropped). Works on a copy, so the model's running statistics are untouched."""
    replica = copy.deepcopy(model).train()
    count = len(y) // batch_size * batch_size
    if count == 0:
        raise ConfigError(f"batch statistics need {batch_size} examples, got {len(y)}")
    correct = 0
    for start in range(0, count, batch_size):
        logits = replica(x[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    return correct / count


def error_vs_batch_figure(
    lines: dict[str, list[tuple[int, float]]],
    title: str,
    xlabel: str = "batch size per device (log scale)",
    published: dict[str, list[tuple[int, float]]] | None = None,
    published_title: str = "",
):
    """Error (%) against batch size on a log axis, one line per normalizer; with ``published``, the
    paper's numbers in a second panel with the same axes' style."""
    panels = [(lines, title)] + ([(published, published_title)] if published else [])
    figure = new_figure(5.2 * len(panels) + 0.6, 4.0)
    styles = {label: (f"C{i}", "os^vDP*Xh"[i % 9]) for i, label in enumerate(NORMALIZERS.values())}
    others = [label for series, _ in panels for label in series if label not in styles]
    for i, label in enumerate(dict.fromkeys(others)):  # e.g. "no normalization", BLN: own styles
        styles[label] = (
            ("k", "x") if i == 0 else (f"C{(len(NORMALIZERS) + i - 1) % 10}", "<>ph"[i % 4])
        )
    for index, (series, heading) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        ticks: set[int] = set()
        for label, points in series.items():
            points = sorted((b, e) for b, e in points if e is not None)
            if not points:
                continue
            color, marker = styles.get(label, (None, "o"))
            axes.plot(
                [b for b, _ in points],
                [e for _, e in points],
                marker=marker,
                color=color,
                linestyle="--" if label == "SyncBN" else "-",
                label=label,
            )
            ticks |= {b for b, _ in points}
        axes.set_xscale("log", base=2)
        if ticks:
            axes.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            axes.minorticks_off()
        axes.set_xlabel(xlabel)
        axes.set_ylabel("test error (%)")
        axes.set_title(heading, fontsize="medium")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def switchable_importance(model: torch.nn.Module) -> dict[str, dict[str, list[float]]]:
    """Each SwitchableNorm layer's (IN, LN, BN) softmax weights of the mean and the variance."""
    return {
        name.removesuffix(".layer"): {"mean": mean.tolist(), "var": var.tolist()}  # PerMicrobatch
        for name, module in model.named_modules()
        if isinstance(module, nk.SwitchableNorm)
        for mean, var in [module.importance()]
    }


def bn_share(importance: dict[str, dict[str, list[float]]], stat: str) -> float | None:
    """BN's weight in SN's ``stat`` ("mean" or "var"), averaged over the layers of
    :func:`switchable_importance`."""
    values = [weights[stat][2] for weights in importance.values()]
    return sum(values) / len(values) if values else None


def importance_section(results, setting: str, arm: str) -> Section | None:
    """SN's learned (IN, LN, BN) weights per layer at the end of training, mean over seeds, for
    each value of ``setting`` (the batch): a table for an experiment's extra section."""
    rows = []
    for batch in sorted(results.values(setting, arm=arm), reverse=True):
        trials = [t.final["importance"] for t in results.trials(arm=arm, **{setting: batch})]
        for layer in trials[0] if trials else []:
            mean = [[statistics.fmean(t[layer][stat][i] for t in trials) for i in range(3)]
                    for stat in ("mean", "var")]  # fmt: skip
            rows.append([batch, layer, *(" / ".join(f"{w:.2f}" for w in m) for m in mean)])
    table = Table(["B", "layer", "mean: IN / LN / BN", "variance: IN / LN / BN"], rows,
                  "Softmax weights at the end of training, mean over seeds.")  # fmt: skip
    return Section("Switchable Norm's learned importance weights", [table]) if rows else None


def measured_trial(key: str, params: dict, steps: int, settings) -> Trial:
    """A trial of ``steps`` steps, measured ``settings.evaluations`` times along the way."""
    return Trial(key, params, steps, max(1, steps // max(1, settings.evaluations)), settings.seed)


def batch_sweep(settings, examples: int, batch_sizes: Sequence[int], **params) -> list[Trial]:
    """One trial per batch size and normalizer (``settings.normalizers``), in the given order, each
    ``settings.epochs`` epochs of ``examples`` training examples; ``params`` join every trial's."""
    plan = []
    for batch in batch_sizes:
        steps = max(1, round(settings.epochs * examples / batch))
        for normalizer in settings.normalizers:
            key = f"{normalizer}/b={batch}"
            plan.append(
                measured_trial(
                    key, {"normalizer": normalizer, "batch_size": batch, **params}, steps, settings
                )
            )
    return plan
