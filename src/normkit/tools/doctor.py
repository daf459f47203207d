"""The doctor: find the normalization mistakes in a model, say why they matter and how to fix them.

Each check reads the model's layers, buffers and data flow, and, given an example input or data, what
the layers see. Each finding names the module, a severity, the evidence, why it matters (citing the
paper) and the fix, often one of normkit's tools. The checks:

| code | severity | what |
|---|---|---|
| ``eps-not-positive`` | error | eps <= 0: a constant channel normalizes to NaN |
| ``nonfinite-running-stats`` | error | NaN/Inf (or negative variance) in running statistics |
| ``never-updated`` | error | eval-mode BatchNorm whose statistics are still mean 0, var 1 |
| ``wrong-mode`` | error / warning | BN or dropout training in an eval model; BN in eval in a training one |
| ``small-batch`` | error / warning | per-device batch < 16 (<= 4: error) for a BatchNorm |
| ``bias-before-norm`` | warning | a Conv/Linear bias right before a BatchNorm |
| ``norm-after-final-layer`` | warning | BatchNorm on the model's output |
| ``norm-reused`` | warning | one BatchNorm called several times per forward (a recurrent loop) |
| ``train-test-discrepancy`` | warning | running statistics far from those of the given data |
| ``dead-channels`` | warning / info | γ ≈ 0: channels whose output is β whatever the input |
| ``momentum-looks-like-decay`` | warning | momentum in (0.5, 1): a Keras/Flax decay given as momentum |
| ``normalizer-choice`` | info | the model's normalizer is not the guideline's (``tools.advice``) |
| ``forward-failed`` | error | the model did not run on the example input |
| ``converted-to-torch-sync`` | error / warning | a torch SyncBatchNorm stands where a normkit layer was |

The model is not modified: forward passes run under ``torch.no_grad`` with every running statistic
restored afterwards, and every mode restored.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from normkit.errors import ConfigError
from normkit.factory import DEFAULT_GROUPS
from normkit.nn._origin import marked_origin
from normkit.nn.snapshot import frozen_running_stats
from normkit.tools import _graph
from normkit.tools._norms import (
    has_running_stats,
    is_batch_norm,
    is_frozen_batch_norm,
    is_normalizer,
    is_small_batch_layer,
    num_channels,
)
from normkit.tools._statistics import ChannelStatistics, private_copy
from normkit.tools.advice import SMALL_BATCH, Advice, advise, canonical_task, guess_task

SEVERITIES = ("error", "warning", "info")
DEAD_GAMMA = 1e-5  # |γ| below this: the channel's output is β, whatever the input
# Train/test discrepancy thresholds, on channel averages (robust to a few noisy channels):
# rms over channels of |μ_data - μ_running| / σ_running, and of |log(σ_data / σ_running)|.
MEAN_SHIFT_LIMIT = 0.3
LOG_STD_RATIO_LIMIT = math.log(1.3)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

_WHY = {
    "eps": (
        "eps keeps 1/sqrt(var + eps) finite; with eps = 0 a channel whose values are all equal "
        "(a dead ReLU, zero padding) has variance 0 and normalizes to NaN (Ioffe & Szegedy 2015, "
        "Algorithm 1 adds a positive constant for numerical stability)"
    ),
    "nonfinite": (
        "in eval mode every output is computed from these statistics, so one NaN or Inf makes the "
        "channel's outputs NaN; it usually comes from an fp16 overflow step that reached the "
        "running average"
    ),
    "never": (
        "in eval mode BatchNorm normalizes with its population statistics (Ioffe & Szegedy 2015, "
        "Algorithm 2); mean 0 and variance 1 are the initial values, so no training batch ever "
        "reached this layer and eval-mode outputs are not normalized"
    ),
    "train_in_eval": (
        "the model is in eval mode but this layer is in training mode: at inference it uses each "
        "batch's statistics (outputs depend on the other samples) and keeps updating its running "
        "statistics (Ioffe & Szegedy 2015, §3.1: inference must use population statistics)"
    ),
    "eval_in_train": (
        "the model is training but this BatchNorm is in eval mode, so it normalizes with fixed "
        "statistics; if that is meant (fine-tuning with frozen BatchNorm, Wu & Johnson 2021, §4), "
        "model.train() will silently undo it"
    ),
    "small": (
        "BatchNorm's statistics come from the per-device batch; with few samples they are noisy and "
        "differ from the population statistics used at inference. ResNet-50 on ImageNet: 23.6% "
        "error at 32 images per GPU, 24.8% at 8, 27.3% at 4, 34.7% at 2 (Wu & He 2018, Table 2)"
    ),
    "bias": (
        "BatchNorm subtracts the batch mean, which contains the bias: 'the bias b can be ignored "
        "since its effect will be canceled by the subsequent mean subtraction' (Ioffe & Szegedy "
        "2015, §3.2). Its gradient is zero; it costs memory, weight decay and a fold step"
    ),
    "final": (
        "normalizing the model's output forces every output unit to the batch's mean and variance "
        "in training (then to γ, β-scaled running statistics in eval), which constrains the "
        "predictions and couples the samples of a batch; normalizers go inside the network, "
        "before a layer's non-linearity (Ioffe & Szegedy 2015, §3.2)"
    ),
    "reused": (
        "one set of running statistics then averages inputs of different positions (time steps in "
        "a recurrent loop) whose statistics differ, and eval mode uses that average everywhere; "
        "recurrent BatchNorm keeps separate statistics per time step (Cooijmans et al. 2017, §3), "
        "and LayerNorm needs none (Ba, Kiros & Hinton 2016)"
    ),
    "discrepancy": (
        "eval mode normalizes with the running statistics; when they differ from the statistics of "
        "the data the model is applied to, outputs are shifted and scaled (train-test inconsistency "
        "and domain shift, Wu & Johnson 2021, §4-5; the running average also lags the weights, §3)"
    ),
    "dead": (
        "with γ ≈ 0 the channel outputs β whatever the input: the channel carries no information "
        "and its filter gets no gradient through it"
    ),
    "zero_init": (
        "γ = 0 at initialisation is deliberate in the last BatchNorm of residual blocks (Goyal et "
        "al. 2017, §5.1: each block starts as the identity); after training it means dead channels"
    ),
    "decay": (
        "PyTorch's momentum is the weight of the new batch (running = (1 - m) running + m batch); "
        "Keras and Flax call 1 - m their momentum (0.99). With m in (0.5, 1) the running "
        "statistics follow the last batch or two"
    ),
}


@dataclass
class Finding:
    """One mistake: where, how bad, what, why, and the fix."""

    code: str
    path: str  # the module's qualified name; "" is the model itself
    severity: str
    message: str
    why: str
    fix: str


@dataclass
class DoctorReport:
    """The doctor's findings, the guideline's advice, and the checks that could not run."""

    model: str
    findings: list[Finding] = field(default_factory=list)
    advice: Advice | None = None
    task: str | None = None
    batch_size: int | None = None
    notes: list[str] = field(default_factory=list)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def as_dict(self) -> dict:
        data = asdict(self)
        data["advice"] = self.advice.as_dict() if self.advice else None
        data["summary"] = {s: self.count(s) for s in SEVERITIES}
        return data

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.as_dict(), **kwargs)

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts = []
        summary = ", ".join(f"{self.count(s)} {s}(s)" for s in SEVERITIES)
        parts.append(Text(f"normkit doctor: {self.model}: {summary}", style="bold"))
        if self.findings:
            table = Table(show_lines=True, expand=True)
            table.add_column("severity", no_wrap=True)
            table.add_column("module", overflow="fold", max_width=24)
            table.add_column("finding, why, fix", ratio=1)
            styles = {"error": "bold red", "warning": "yellow", "info": "cyan"}
            for f in self.findings:
                detail = Text()
                detail.append(f.code, style="bold")
                detail.append(f": {f.message}\n")
                detail.append("why: ", style="dim")
                detail.append(f"{f.why}\n")
                detail.append("fix: ", style="green")
                detail.append(f.fix)
                table.add_row(
                    Text(f.severity, style=styles[f.severity]), Text(f.path or "(model)"), detail
                )
            parts.append(table)
        if self.advice is not None:
            a = self.advice
            parts.append(
                Text(
                    f"advice for {a.task} (per-device batch {a.batches}): {a.layer} "
                    f"(spec {a.spec!r}): {a.reason} [{a.source}]"
                )
            )
        parts.extend(Text(f"note: {note}", style="dim") for note in self.notes)
        return Group(*parts)

    def print(self, console=None) -> None:
        from rich.console import Console

        (console or Console()).print(self)

    def __str__(self) -> str:
        lines = [f"{self.model}: " + ", ".join(f"{self.count(s)} {s}(s)" for s in SEVERITIES)]
        for f in self.findings:
            lines.append(f"  {f.severity}: {f.path or '(model)'}: [{f.code}] {f.message}")
        return "\n".join(lines)


def _batch_family(module: nn.Module) -> bool:
    return is_batch_norm(module) or is_frozen_batch_norm(module)


def _synchronized(module: nn.Module) -> bool:
    return "Sync" in type(module).__name__


def _check_static(model: nn.Module, report: DoctorReport) -> None:
    """Checks that read only the layers and their buffers."""
    root_training = model.training
    for path, m in model.named_modules():
        if isinstance(m, _DROPOUT) and m.training and not root_training:
            report.findings.append(
                Finding("wrong-mode", path, "error", f"{type(m).__name__} is in training mode "
                        "inside an eval-mode model", "dropout then zeroes activations at "
                        "inference, so outputs are random", "call model.eval() on the whole model")
            )  # fmt: skip
        if not is_normalizer(m):
            continue
        name = type(m).__name__
        eps = getattr(m, "eps", None)
        if isinstance(eps, (int, float)) and eps <= 0:
            report.findings.append(
                Finding("eps-not-positive", path, "error", f"{name} has eps={eps}", _WHY["eps"],
                        "set eps to a small positive value such as 1e-5 (layer.eps = 1e-5)")
            )  # fmt: skip
        momentum = getattr(m, "momentum", None)
        if _batch_family(m) and isinstance(momentum, float) and 0.5 < momentum < 1.0:
            report.findings.append(
                Finding("momentum-looks-like-decay", path, "warning",
                        f"{name} has momentum={momentum}", _WHY["decay"],
                        f"use momentum={1 - momentum:.3g} (normkit layers: decay={momentum})")
            )  # fmt: skip
        _check_statistics(path, m, report)
        _check_mode(path, m, root_training, report)
        _check_gamma(path, m, report)


def _check_statistics(path: str, m: nn.Module, report: DoctorReport) -> None:
    if not (_batch_family(m) and has_running_stats(m)):
        return
    name = type(m).__name__
    mean, var = m.running_mean.detach(), m.running_var.detach()
    bad = (~torch.isfinite(mean)) | (~torch.isfinite(var)) | (var < 0)
    if bad.any():
        report.findings.append(
            Finding("nonfinite-running-stats", path, "error",
                    f"{name}: {int(bad.sum())} of {bad.numel()} channels have NaN/Inf or negative "
                    "running statistics", _WHY["nonfinite"],
                    "re-estimate them: nk.tools.recalibrate(model, training_batches); train with "
                    "normkit layers, whose running statistics never take a non-finite batch")
        )  # fmt: skip
        return
    tracked = getattr(m, "num_batches_tracked", None)
    untouched = bool((mean == 0).all() and (var == 1).all())
    if isinstance(tracked, torch.Tensor):
        untouched = untouched and int(tracked) == 0
    uses_running = is_frozen_batch_norm(m) or (
        not m.training and getattr(m, "track_running_stats", True)
    )
    if untouched and uses_running:
        report.findings.append(
            Finding("never-updated", path, "error",
                    f"{name} is used with its running statistics but they were never updated "
                    "(mean 0, var 1, no batch counted)", _WHY["never"],
                    "train the model, or estimate the statistics: nk.tools.recalibrate(model, "
                    "training_batches); check that the checkpoint's BatchNorm buffers were loaded")
        )  # fmt: skip


def _check_mode(path: str, m: nn.Module, root_training: bool, report: DoctorReport) -> None:
    if not is_batch_norm(m):
        return
    name = type(m).__name__
    if m.training and not root_training:
        report.findings.append(
            Finding("wrong-mode", path, "error", f"{name} is in training mode inside an "
                    "eval-mode model", _WHY["train_in_eval"], "call model.eval() on the whole "
                    "model, not on some of its layers")
        )  # fmt: skip
    elif not m.training and root_training and has_running_stats(m):
        report.findings.append(
            Finding("wrong-mode", path, "warning", f"{name} is in eval mode inside a training "
                    "model", _WHY["eval_in_train"], "to freeze BatchNorm on purpose use "
                    "nk.tools.freeze(model), which model.train() cannot undo; else call "
                    "model.train()")
        )  # fmt: skip


def _check_gamma(path: str, m: nn.Module, report: DoctorReport) -> None:
    gamma = getattr(m, "weight", None)
    if not isinstance(gamma, torch.Tensor) or gamma.dim() != 1 or not gamma.numel():
        return
    dead = gamma.detach().abs() < DEAD_GAMMA
    if not dead.any():
        return
    name, count = type(m).__name__, int(dead.sum())
    tracked = getattr(m, "num_batches_tracked", None)
    at_init = bool(dead.all()) and isinstance(tracked, torch.Tensor) and int(tracked) == 0
    if at_init:
        report.findings.append(
            Finding("dead-channels", path, "info", f"{name}: γ = 0 in all {count} channels and no "
                    "batch seen yet (zero-initialised)", _WHY["zero_init"],
                    "nothing to do before training; if this persists after training, see why the "
                    "block's branch is unused")
        )  # fmt: skip
    else:
        report.findings.append(
            Finding("dead-channels", path, "warning", f"{name}: |γ| < {DEAD_GAMMA:g} in {count} "
                    f"of {gamma.numel()} channels", _WHY["dead"], "prune those channels (and the "
                    "filters feeding them), or lower the weight decay on γ")
        )  # fmt: skip


def _check_converted_to_torch_sync(model: nn.Module, report: DoctorReport) -> None:
    """A ``torch.nn.SyncBatchNorm`` holding tensors a normkit layer made: a converter replaced it.

    Converters move the old layer's parameters and buffers into the new one, and normkit's layers
    mark those tensors with their class (:mod:`normkit.nn._origin`), so the mark tells what stood
    there. Plain BatchNorm (a torch ``_BatchNorm`` subclass) keeps its maths and loses normkit's
    additions; any other layer's maths are gone.
    """
    import normkit

    for path, m in model.named_modules():
        origin = marked_origin(m) if isinstance(m, nn.SyncBatchNorm) else None
        if origin is None:
            continue
        cls = getattr(normkit, origin, None)
        plain = isinstance(cls, type) and issubclass(cls, nn.modules.batchnorm._BatchNorm)
        fix = ("convert with nk.SyncBatchNorm.convert_sync_batchnorm(model), which keeps "
               "normkit's layers and leaves those that are not plain BatchNorm")  # fmt: skip
        if plain:
            report.findings.append(
                Finding("converted-to-torch-sync", path, "warning", f"a torch SyncBatchNorm "
                        f"stands where nk.{origin} was", "it computes the same statistics but "
                        "without normkit's guard (a NaN/Inf batch enters the running statistics) "
                        "and, unlike nk.SyncBatchNorm, only on CUDA", fix)
            )  # fmt: skip
        else:
            report.findings.append(
                Finding("converted-to-torch-sync", path, "error", f"a torch SyncBatchNorm "
                        f"stands where nk.{origin} was", f"it computes plain BatchNorm: what "
                        f"{origin} adds (its activation, its renormalization or virtual batches, "
                        "its mixture) is gone, silently", f"keep the {origin} (synchronize only "
                        f"plain BatchNorm): {fix}")
            )  # fmt: skip


def _check_batch_size(model: nn.Module, batch_size: int, report: DoctorReport) -> None:
    layers = [
        path
        for path, m in model.named_modules()
        if is_batch_norm(m) and not _synchronized(m) and not is_small_batch_layer(m)
    ]
    if not layers or batch_size >= SMALL_BATCH:
        return
    severity = "error" if batch_size <= 4 else "warning"
    more = f" and {len(layers) - 1} other BatchNorm layer(s)" if len(layers) > 1 else ""
    report.findings.append(
        Finding("small-batch", layers[0], severity, f"a per-device batch of {batch_size} feeds "
                f"'{layers[0]}'{more} (below {SMALL_BATCH})", _WHY["small"],
                f"nk.tools.convert(model, '{_group_spec(model)}') (GroupNorm, Wu & He 2018); "
                "'sync' to share "
                "statistics across devices (SyncBatchNorm); 'renorm' (Batch Renorm, Ioffe 2017); "
                "'ws_gn' (Weight Standardization + GroupNorm, Qiao et al. 2019), 'mabn' (Yan et "
                "al. 2020) or 'cbn' (Cross-Iteration BN, Yao et al. 2021); "
                "or nk.tools.freeze(model) when fine-tuning. When the batch is small only because "
                "gradients are accumulated, train inside nk.accumulate(model, micro_batches=k) "
                "for the large batch's running statistics")
    )  # fmt: skip


def _group_spec(model: nn.Module) -> str:
    """``group:G`` with G the largest number of groups up to Wu & He's 32 (2018, §4) that divides
    the channels of every BatchNorm-family layer, so that ``nk.tools.convert(model, spec)`` can
    build each GroupNorm (a 16-channel layer gets 16 groups, not 32)."""
    channels = [
        c for m in model.modules() if _batch_family(m) and (c := num_channels(m)) is not None
    ]
    common = math.gcd(*channels) if channels else DEFAULT_GROUPS
    return f"group:{max(g for g in range(1, DEFAULT_GROUPS + 1) if common % g == 0)}"


def _fitted(advice: Advice, model: nn.Module) -> Advice:
    """The guideline's advice with a group count that this model's channels allow."""
    if not advice.spec.startswith("group:"):
        return advice
    spec = _group_spec(model)
    if spec == advice.spec:
        return advice
    groups = spec.partition(":")[2]
    return dataclasses.replace(
        advice,
        spec=spec,
        layer=f"GroupNorm({groups})",
        reason=f"{advice.reason}; {groups} groups: the largest count up to {DEFAULT_GROUPS} that "
        "divides every BatchNorm's channels in this model",
    )


def _check_data_flow(model: nn.Module, inputs, report: DoctorReport, calls: Counter | None):
    sites, graph_module, trace_error = _graph.find_sites(model, is_batch_norm, inputs)
    modules = dict(model.named_modules())
    if trace_error is not None:
        report.notes.append(
            f"the model does not trace with torch.fx ({trace_error}); data-flow checks used "
            "nn.Sequential neighbours only"
        )
    for site in sites:
        if site.candidate is None or site.obstacle is not None:
            continue
        producer, norm = modules[site.candidate], modules[site.norm]
        if producer.bias is None:
            continue
        if _graph.channel_obstacle(norm, producer, site.producer_shape) is not None:
            continue
        report.findings.append(
            Finding("bias-before-norm", site.candidate, "warning", f"'{site.candidate}' "
                    f"({type(producer).__name__}) has a bias and feeds only the BatchNorm "
                    f"'{site.norm}'", _WHY["bias"], f"build '{site.candidate}' with bias=False, "
                    "or nk.tools.remove_redundant_bias(model) (outputs unchanged)")
        )  # fmt: skip
    for path in _final_norms(model, graph_module):
        report.findings.append(
            Finding("norm-after-final-layer", path, "warning", f"'{path}' "
                    f"({type(modules[path]).__name__}) normalizes the model's output",
                    _WHY["final"], "remove it (unless the normalized output is meant, e.g. an "
                    "embedding); put normalizers after the hidden layers only")
        )  # fmt: skip
    if calls is None and graph_module is not None:
        calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
    if calls is None:
        report.notes.append("no example input and no trace: repeated BatchNorm calls not checked")
        return
    for path, m in model.named_modules():
        if _batch_family(m) and calls.get(path, 0) > 1:
            report.findings.append(
                Finding("norm-reused", path, "warning", f"'{path}' ({type(m).__name__}) is called "
                        f"{calls[path]} times per forward", _WHY["reused"], "give each position "
                        "its own layer, or use nk.tools.convert(model, 'layer') (LayerNorm)")
            )  # fmt: skip


def _final_norms(model: nn.Module, graph_module) -> list[str]:
    modules = dict(model.named_modules())
    if graph_module is None:
        if isinstance(model, nn.Sequential) and len(model) and _batch_family(model[-1]):
            return [str(len(model) - 1)]
        return []
    found = []
    for node in graph_module.graph.nodes:
        if node.op != "output":
            continue
        for item in _flatten(node.args):
            module = modules.get(item.target) if item.op == "call_module" else None
            if module is not None and _batch_family(module):
                found.append(item.target)
    return found


def _flatten(value) -> list[torch.fx.Node]:
    if isinstance(value, torch.fx.Node):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [n for item in value for n in _flatten(item)]
    return []


def _placed(model: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    parameter = next(itertools.chain(model.parameters(), model.buffers()), None)
    if parameter is None:
        return tensor
    dtype = (
        parameter.dtype if tensor.is_floating_point() and parameter.is_floating_point() else None
    )
    return tensor.to(device=parameter.device, dtype=dtype)


def _count_calls(model: nn.Module, inputs: tuple) -> Counter:
    calls: Counter = Counter()
    handles = [
        m.register_forward_pre_hook(lambda *_args, path=path: calls.update([path]))
        for path, m in model.named_modules()
        if is_normalizer(m)
    ]
    try:
        with torch.no_grad(), frozen_running_stats(model):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _check_discrepancy(model: nn.Module, data, num_batches: int, report: DoctorReport) -> None:
    from normkit.tools._statistics import default_forward, watch_inputs

    layers = {
        path: m
        for path, m in model.named_modules()
        if _batch_family(m) and has_running_stats(m) and getattr(m, "track_running_stats", True)
    }
    if not layers:
        return
    found = {path: ChannelStatistics() for path in layers}
    handles = watch_inputs(layers, found)
    batches = [data] if isinstance(data, torch.Tensor) else data
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # what the layers see at inference
        with torch.no_grad(), frozen_running_stats(model):
            for batch in itertools.islice(batches, num_batches):
                if isinstance(batch, torch.Tensor):
                    batch = _placed(model, batch)
                elif isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
                    batch = (_placed(model, batch[0]), *batch[1:])
                default_forward(model, private_copy(batch))
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.train(training)
    for path, m in layers.items():
        statistics = found[path]
        if statistics.batches == 0 or statistics.count < 2:
            continue
        mean, var = statistics.population()
        eps = float(m.eps)
        running_std = (m.running_var.detach().double() + eps).sqrt()
        shift = ((mean - m.running_mean.detach().double()) / running_std).square().mean().sqrt()
        log_ratio = ((var + eps).sqrt() / running_std).log().square().mean().sqrt()
        if shift > MEAN_SHIFT_LIMIT or log_ratio > LOG_STD_RATIO_LIMIT:
            report.findings.append(
                Finding("train-test-discrepancy", path, "warning", f"on the given data the input "
                        f"of '{path}' is {float(shift):.2f} running std away from the running mean "
                        f"and its std is x{math.exp(float(log_ratio)):.2f} off (rms over channels;"
                        f" limits {MEAN_SHIFT_LIMIT}, x{math.exp(LOG_STD_RATIO_LIMIT):.2f})",
                        _WHY["discrepancy"], "if the data is the training distribution, "
                        "nk.tools.recalibrate(model, training_batches) (PreciseBN); if it is a new "
                        "domain, nk.tools.adapt(model, its_batches) (AdaBN)")
            )  # fmt: skip


def _current_kind(model: nn.Module) -> str | None:
    kinds = Counter()
    for m in model.modules():
        if is_small_batch_layer(m):
            continue  # a remedy for small batches, not the BatchNorm the advice replaces
        if _batch_family(m):
            kinds["batch"] += 1
        elif isinstance(m, nn.GroupNorm):
            kinds["group"] += 1
        elif isinstance(m, nn.LayerNorm) or type(m).__name__.startswith("LayerNorm"):
            kinds["layer"] += 1
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
            kinds["instance"] += 1
    return kinds.most_common(1)[0][0] if kinds else None


def doctor(
    model: nn.Module,
    example_input=None,
    batch_size: int | None = None,
    data=None,
    *,
    task: str | None = None,
    num_batches: int = 50,
) -> DoctorReport:
    """Check a model for normalization mistakes (the table in the module docstring).

    Args:
        model: any model, in the mode it will be used in (training or eval).
        example_input: a tensor or tuple of the forward's inputs: enables the checks that need a
            forward pass (repeated calls, Linear shapes). Moved to the model's device and dtype.
        batch_size: the per-device training batch: enables ``small-batch`` and the vision advice.
        data: a tensor or an iterable of batches from the data the model will be applied to
            (first ``num_batches``): enables ``train-test-discrepancy``.
        task: ``"vision"``, ``"sequence"`` or ``"style"`` for the advice; guessed from the layers
            when None (convolutions: vision; recurrent/attention/embedding layers: sequence).

    Returns:
        A :class:`DoctorReport`: ``findings`` (most severe first), ``advice``, ``notes`` on checks
        that could not run; print it (a rich table) or ``report.to_json()``.

    Example::

        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), nk.BatchNorm2d(8), torch.nn.ReLU())
        >>> report = nk.tools.doctor(model, torch.randn(2, 3, 8, 8), batch_size=4)
        >>> sorted(report.codes())
        ['bias-before-norm', 'small-batch']
        >>> report.advice.spec  # Wu & He's 32 groups, as many as 8 channels allow
        'group:8'
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    task = canonical_task(task) if task is not None else guess_task(model)
    report = DoctorReport(type(model).__name__, task=task, batch_size=batch_size)
    inputs = _graph.as_inputs(example_input)
    calls = None
    if inputs is not None:
        # copies: a model may write over its input (InPlaceABN first), the caller's must not change
        inputs = private_copy(
            tuple(_placed(model, x) if isinstance(x, torch.Tensor) else x for x in inputs)
        )
        try:
            calls = _count_calls(model, inputs)
        except Exception as error:  # any failure of the user's forward is a finding
            report.findings.append(
                Finding("forward-failed", "", "error", f"the model failed on the example input: "
                        f"{type(error).__name__}: {error}", "the checks that need a forward pass "
                        "could not run", "pass an input the model accepts (--input-shape)")
            )  # fmt: skip
            inputs = None
    else:
        report.notes.append("no example input: a Linear's output shape is not checked")
    _check_static(model, report)
    _check_converted_to_torch_sync(model, report)
    if batch_size is not None:
        _check_batch_size(model, batch_size, report)
    else:
        report.notes.append("no batch size: the small-batch check did not run")
    _check_data_flow(model, inputs, report, calls)
    if data is not None:
        _check_discrepancy(model, data, num_batches, report)
    else:
        report.notes.append("no data: running statistics were not compared with data")
    if task is not None and (task != "vision" or batch_size is not None):
        report.advice = _fitted(advise(task, batch_size), model)
        current = _current_kind(model)
        wanted = report.advice.spec.split(":")[0]
        said = "small-batch" in report.codes()  # which already gives the same advice
        if current is not None and current != wanted and not said:
            report.findings.append(
                Finding("normalizer-choice", "", "info", f"the model mostly uses {current} "
                        f"normalization; for {task} with per-device batch {report.advice.batches} "
                        f"the guideline is {report.advice.layer}", f"{report.advice.reason} "
                        f"({report.advice.source})", f"nk.tools.convert(model, "
                        f"{report.advice.spec!r})")
            )  # fmt: skip
    elif task == "vision":
        report.notes.append("vision model without a batch size: no normalizer advice")
    report.findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    return report
