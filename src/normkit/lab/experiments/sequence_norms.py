"""Normalization for sequences (Ba, Kiros & Hinton 2016, "Layer Normalization"; Cooijmans et al. 2016,
"Recurrent Batch Normalization"): a character-level language model with no normalization, BatchNorm
with per-time-step statistics, BatchNorm with masked statistics, LayerNorm and RMSNorm.

BatchNorm needs batch statistics, and a sequence adds a second axis to share them over. Cooijmans et
al. keep separate statistics per time step (and reuse the last step's beyond the training length);
sharing them over time instead must keep the padding of variable-length sequences out (masked
statistics, ``nk.BatchNorm1d(C)(x, mask=m)``). LayerNorm (Ba et al. 2016) and RMSNorm (Zhang &
Sennrich 2019) normalize each token over its features: nothing depends on the batch or the time step,
"works with batch size 1 and needs no per-time-step statistics". The claim measured here: LN (and
RMSNorm) train as well as or better than BN on sequences, and at batch size 1 they are unaffected
while BN breaks.

The corpus is Python's own reference documentation, ``pydoc_data.topics`` (the text ``help('TOPIC')``
prints, about 465,000 characters in CPython 3.11): it ships inside CPython's standard library (on
Debian in the ``libpython3.X-stdlib`` package), so it is on every machine that runs normkit and is
never downloaded. ``corpus=PATH`` trains on any UTF-8 text file instead. Characters outside printable
ASCII and the newline map to ``?``; the first 90% is the training text, the rest the test text.

The model: a pre-norm causal Transformer (``depth`` blocks of width ``width``, ``heads`` heads,
learned positions), the normalizer before attention, before the MLP and before the output layer.
Training windows of ``context`` characters; half of them (seeded) are cut to a random length in
[context/4, context) and right-padded, so padding is real and the masked variant has something to
mask (padded targets are ignored by the loss; causal attention keeps real tokens from seeing padding).
Trials: every normalizer at ``batch_size`` and at batch size 1 (``batch1_steps`` steps); per-time-step
BN cannot take a training step on one sequence (one value per channel and position), so its batch-1
trial trains nothing and records the error of one attempted step instead. Measured: the
test loss in bits per character (eval mode) along training; at the end, for the BN variants, the test
loss with batch statistics (train mode, test windows in batches of the training batch size), and for
every model the largest difference between evaluating one window at a time and in a batch.

Decisions: per-time-step BN is one ``nk.BatchNorm1d`` per position, each masked to the real tokens at
that position; BN shared over time is masked (``"batch"`` without the mask is the variant that lets
padding into the statistics). With statistics over the whole sequence, BN in a causal model lets a
token's normalization depend on later tokens of the batch; the train-mode test loss shows how much
the model relies on that.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab.datasets import Dataset
from normkit.lab.experiments.population_stats import batch_norm_layers
from normkit.lab.legacy import Experiment, Settings, Setup, Trial, register
from normkit.lab.plots import curves
from normkit.lab.records import RunRecord
from normkit.lab.report import Check, Figure, Report, Section, Table, fmt
from normkit.lab.seeds import derived_seed

PAD = 0
IGNORE = -100  # cross_entropy's ignore_index: padded targets
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))  # ids 1..96; 0 is padding
VOCAB = len(ALPHABET) + 1
NORMS = {
    "none": "no normalization",
    "batch_time": "BN, per-time-step statistics",
    "batch_masked": "BN, masked statistics over batch and time",
    "batch": "BN over batch and time, padding included",
    "layer": "LayerNorm",
    "rms": "RMSNorm",
}
LN2 = math.log(2)


# ------------------------------------------------------------------------------------------- data


def corpus_text(corpus: str) -> tuple[str, str]:
    """The text of ``corpus`` (``"pydoc"`` or a path) and a description of where it came from."""
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key] for key in sorted(topics))
        version = ".".join(map(str, sys.version_info[:3]))
        return text, f"pydoc_data.topics of CPython {version} (standard library)"
    path = Path(corpus)
    if not path.is_file():
        raise ConfigError(
            f"corpus={corpus!r} is neither 'pydoc' nor a text file; pass --set corpus=PATH"
        )
    return path.read_text(encoding="utf-8", errors="replace"), str(path.resolve())


def encode(text: str) -> torch.Tensor:
    """Character ids: the newline and printable ASCII are 1..96, anything else is '?'."""
    table = {c: i + 1 for i, c in enumerate(ALPHABET)}
    unknown = table["?"]
    return torch.tensor([table.get(c, unknown) for c in text], dtype=torch.long)


def windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: inputs ``ids[i : i + context]`` and targets shifted by one."""
    count = (len(ids) - 1) // context
    x = ids[: count * context].view(count, context)
    y = ids[1 : count * context + 1].view(count, context)
    return x.clone(), y.clone()


def pad_some(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int):
    """Cut ``fraction`` of the windows (seeded) to a random length in [T/4, T) and right-pad them:
    inputs become ``PAD``, targets ``IGNORE``."""
    generator = torch.Generator().manual_seed(seed)
    count, context = x.shape
    cut = torch.rand(count, generator=generator) < fraction
    low = max(1, context // 4)
    lengths = torch.randint(low, context, (count,), generator=generator)
    lengths = torch.where(cut, lengths, torch.full_like(lengths, context))
    padded = torch.arange(context).unsqueeze(0) >= lengths.unsqueeze(1)
    return x.masked_fill(padded, PAD), y.masked_fill(padded, IGNORE)


def text_dataset(corpus: str, context: int, pad_fraction: float, test_windows: int, seed: int):
    text, source = corpus_text(corpus)
    ids = encode(text)
    split = int(0.9 * len(ids))
    x_train, y_train = windows(ids[:split], context)
    x_train, y_train = pad_some(x_train, y_train, pad_fraction, seed)
    x_test, y_test = windows(ids[split:], context)
    if 0 < test_windows < len(x_test):
        x_test, y_test = x_test[:test_windows], y_test[:test_windows]
    name = "pydoc-topics" if corpus == "pydoc" else Path(corpus).name
    notes = [
        f"{len(text):,} characters, {VOCAB - 1} symbols; {pad_fraction:.0%} of the training "
        "windows cut short and padded; the image data set setting is not used",
    ]
    return Dataset(name, x_train, y_train, x_test, y_test, VOCAB, source, notes)


# ------------------------------------------------------------------------------------------ model


class TokenNorm(nn.Module):
    """One normalizer applied to token features ``h`` (N, T, C), with the padding ``mask`` (N, T)."""

    def __init__(self, kind: str, width: int, context: int):
        super().__init__()
        self.kind = kind
        if kind == "layer":
            self.norm = nk.LayerNorm(width)
        elif kind == "rms":
            self.norm = nn.RMSNorm(width, eps=1e-5)
        elif kind in ("batch", "batch_masked"):
            self.norm = nk.BatchNorm1d(width)
        elif kind == "batch_time":
            self.norm = nn.ModuleList(nk.BatchNorm1d(width) for _ in range(context))
        elif kind != "none":
            raise ConfigError(f"norm={kind!r} is not known; choose one of {', '.join(NORMS)}")

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return h
        if self.kind in ("layer", "rms"):
            return self.norm(h)
        if self.kind == "batch_time":  # statistics of position t over the real tokens at t
            steps = [self.norm[t](h[:, t], mask=mask[:, t]) for t in range(h.shape[1])]
            return torch.stack(steps, dim=1)
        channels_first = h.transpose(1, 2)  # (N, C, T)
        out = self.norm(channels_first, mask=mask if self.kind == "batch_masked" else None)
        return out.transpose(1, 2)


class Block(nn.Module):
    """Pre-norm Transformer block: h + attention(norm(h)), then h + MLP(norm(h))."""

    def __init__(self, width: int, heads: int, kind: str, context: int):
        super().__init__()
        self.heads = heads
        self.norm1 = TokenNorm(kind, width, context)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = TokenNorm(kind, width, context)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, t, c = h.shape
        q, k, v = self.qkv(self.norm1(h, mask)).view(n, t, 3, self.heads, c // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )  # (N, heads, T, C/heads)
        h = h + self.proj(attended.transpose(1, 2).reshape(n, t, c))
        return h + self.mlp(self.norm2(h, mask))


class CharModel(nn.Module):
    """A small causal character-level Transformer; ``forward(tokens (N, T)) -> logits (N, V, T)``."""

    def __init__(self, kind: str, width: int, depth: int, heads: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width, padding_idx=PAD)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads, kind, context) for _ in range(depth))
        self.norm = TokenNorm(kind, width, context)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != PAD  # (N, T)
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h, mask)).transpose(1, 2)


def initialize_char_model(model: CharModel, generator: torch.Generator) -> None:
    """GPT-2's scheme: weights N(0, 0.02²), biases 0; normalizers keep γ = 1, β = 0."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        model.position.copy_(torch.randn(model.position.shape, generator=generator) * 0.02)


@torch.no_grad()
def bits_per_char(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> float:
    """Mean cross-entropy over the real targets, in bits per character (the model's mode as is)."""
    total, count = 0.0, 0
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        total += float(F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum"))
        count += int((target != IGNORE).sum())
    return total / count / LN2


# ------------------------------------------------------------------------------------ experiment


@dataclass(frozen=True)
class SequenceNormsSettings(Settings):
    dataset: str = (
        "digits"  # not used (the data is the text corpus); digits is the cheapest to load
    )
    corpus: str = "pydoc"
    norms: tuple[str, ...] = ("none", "batch_time", "batch_masked", "layer", "rms")
    context: int = 32
    pad_fraction: float = 0.5
    width: int = 64
    depth: int = 2
    heads: int = 4
    steps: int = 1_200
    batch_size: int = 32
    batch1_steps: int = 1_200
    learning_rate: float = 1e-3
    test_windows: int = 400
    eval_every: int = 150


@register
class SequenceNorms(Experiment):
    name = "sequence-norms"
    title = "Normalizers for sequences: BN per step, masked BN, LN, RMSNorm"
    paper = (
        "Ba, Kiros & Hinton 2016, Layer Normalization; Cooijmans et al. 2016, Recurrent Batch "
        "Normalization; Zhang & Sennrich 2019, RMSNorm"
    )
    claim = (
        "For sequences, per-sample normalizers (LayerNorm, RMSNorm) train as well as or better than "
        "BatchNorm without per-time-step statistics or padding masks, and work unchanged at batch "
        "size 1, where BatchNorm's statistics break down."
    )
    settings_class = SequenceNormsSettings
    presets = {
        "quick": {
            "norms": ("none", "batch_time", "batch_masked", "layer", "rms"),
            "context": 16,
            "width": 32,
            "steps": 300,
            "batch1_steps": 300,
            "test_windows": 200,
            "eval_every": 100,
        },
        "tiny": {
            "norms": ("none", "batch_time", "batch_masked", "layer", "rms"),
            "context": 8,
            "width": 8,
            "depth": 1,
            "heads": 2,
            "steps": 6,
            "batch_size": 4,
            "batch1_steps": 4,
            "test_windows": 8,
            "eval_every": 3,
        },
    }

    def prepare_data(self, settings, dataset):
        return text_dataset(
            settings.corpus,
            settings.context,
            settings.pad_fraction,
            settings.test_windows,
            settings.seed,
        )

    def trials(self, settings, data, finals):
        plan = []
        for batch, steps in ((settings.batch_size, settings.steps), (1, settings.batch1_steps)):
            for norm in settings.norms:
                # One sequence has one value per channel at each time step: per-time-step BN
                # cannot take a training step, and its trial only records the attempt (finish).
                probe = batch == 1 and norm == "batch_time"
                plan.append(
                    Trial(
                        f"{norm}/batch={batch}",
                        {"norm": norm, "batch_size": batch},
                        0 if probe else steps,
                        max(1, min(settings.eval_every, steps)),
                        settings.seed,
                    )
                )
        return plan

    def setup(self, trial, settings, data, generator):
        model = CharModel(
            trial.params["norm"], settings.width, settings.depth, settings.heads, settings.context
        )
        initialize_char_model(model, generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
        return Setup(model, optimizer, trial.params["batch_size"])

    def measure(self, trial, settings, setup, data):
        return {"test_bpc": bits_per_char(setup.model, data.x_test, data.y_test)}

    def finish(self, trial, settings, setup, data):
        model = setup.model
        row = {"test_bpc": bits_per_char(model, data.x_test, data.y_test)}
        if trial.steps == 0:
            row["training_step_error"] = _training_step_error(model, setup, data)
        if batch_norm_layers(model):
            modes = {m: m.training for m in model.modules()}
            try:
                with nk.frozen_running_stats(model):
                    model.train()
                    row["test_bpc_batch_stats"] = bits_per_char(
                        model, data.x_test, data.y_test, trial.params["batch_size"]
                    )
            except (ValueError, TypeError):  # per-time-step statistics of one window
                row["test_bpc_batch_stats"] = None
            finally:
                for m, training in modes.items():
                    m.train(training)
        sample = data.x_test[:8]
        one_at_a_time = torch.cat([model(sample[i : i + 1]) for i in range(len(sample))])
        row["batch1_inference_difference"] = float((one_at_a_time - model(sample)).abs().max())
        generator = torch.Generator().manual_seed(derived_seed(trial.seed, 15))
        index = torch.randperm(len(data.y_train), generator=generator)[: len(data.y_test)]
        row["train_bpc"] = bits_per_char(model, data.x_train[index], data.y_train[index])
        return row

    # ------------------------------------------------------------------------------ summary
    def summarize(self, record: RunRecord) -> dict:
        finals = record.finals()
        runs = {
            key: {
                "norm": row["norm"],
                "batch_size": row["batch_size"],
                "test_bpc": row["test_bpc"],
                "train_bpc": row["train_bpc"],
                "test_bpc_batch_stats": row.get("test_bpc_batch_stats"),
                "batch1_inference_difference": row["batch1_inference_difference"],
                "steps": row["steps"],
                "training_step_error": row.get("training_step_error"),
                "best_test_bpc": min(
                    (r["test_bpc"] for r in record.curve(key) if r.get("test_bpc") is not None),
                    default=row["test_bpc"],
                ),
                "diverged": row["diverged"],
            }
            for key, row in finals.items()
        }
        batch = record.settings["batch_size"]
        by_batch = {
            str(b): {
                r["norm"]: r["test_bpc"]
                for r in runs.values()
                if r["batch_size"] == b and r["steps"] > 0
            }
            for b in (batch, 1)
        }
        return {"runs": runs, "test_bpc": by_batch, "unigram_bpc": _unigram_bits(record)}

    # ------------------------------------------------------------------------------- report
    def report(self, record: RunRecord) -> Report:
        s, settings = record.summary, record.settings
        batch = settings["batch_size"]
        big, one = s["test_bpc"][str(batch)], s["test_bpc"]["1"]
        bpc = lambda v: fmt(v, ".3f")  # noqa: E731
        rows, checks = [], []
        bn_kinds = [k for k in ("batch_time", "batch_masked", "batch") if k in big]
        per_sample = [k for k in ("layer", "rms") if k in big]
        if bn_kinds and per_sample:
            best_bn = min(big[k] for k in bn_kinds)
            best_ps = min(big[k] for k in per_sample)
            rows.append(
                [
                    f"test bits/char at batch {batch}: best of LN/RMSNorm vs best BN",
                    "LN trains faster / better than BN on RNNs (Ba et al. 2016; no comparable "
                    "number for this model)",
                    f"{bpc(best_ps)} vs {bpc(best_bn)}",
                    "matches" if best_ps <= best_bn else "does not match",
                ]
            )
            checks.append(
                Check(
                    f"LN or RMSNorm at least as good as BN at batch {batch}",
                    best_ps <= best_bn,
                    ", ".join(f"{k}: {bpc(v)}" for k, v in big.items()),
                )
            )
        bn_one = [k for k in bn_kinds if k in one]
        if per_sample and bn_one and all(k in one for k in per_sample):
            ps1 = min(one[k] for k in per_sample)
            bn1 = min(one[k] for k in bn_one)
            rows.append(
                [
                    "test bits/char after training at batch size 1: LN/RMSNorm vs BN",
                    "LN works with batch size 1; BN needs a batch (Ba et al. 2016)",
                    f"{bpc(ps1)} vs {bpc(bn1)} ("
                    + ", ".join(f"{k}: {bpc(one[k])}" for k in one)
                    + ")",
                    "matches" if ps1 < bn1 else "does not match",
                ]
            )
            checks.append(
                Check(
                    "at batch size 1, LN/RMSNorm beat every BN variant",
                    ps1 < bn1,
                    f"{bpc(ps1)} vs {bpc(bn1)}",
                )
            )
        if "none" in big and per_sample:
            rows.append(
                [
                    f"test bits/char at batch {batch}: no normalization vs LN",
                    "LN speeds up training over the unnormalized baseline (Ba et al. 2016)",
                    f"{bpc(big['none'])} vs {bpc(big.get('layer', big[per_sample[0]]))}",
                    "–",
                ]
            )
        for r in s["runs"].values():
            if r["steps"] == 0:
                rows.append(
                    [
                        f"{NORMS.get(r['norm'], r['norm'])}: a training step at batch size 1",
                        "impossible: one value per channel per time step",
                        _short(r["training_step_error"]) or "it worked",
                        "matches" if r["training_step_error"] else "does not match",
                    ]
                )
        gaps = {
            key: r["test_bpc_batch_stats"] - r["test_bpc"]
            for key, r in s["runs"].items()
            if r["test_bpc_batch_stats"] is not None
        }
        if gaps:
            rows.append(
                [
                    "BN: test bits/char with batch statistics − with running statistics",
                    "not reported",
                    ", ".join(f"{k}: {v:+.3f}" for k, v in gaps.items()),
                    "–",
                ]
            )
        worst = max(r["batch1_inference_difference"] for r in s["runs"].values())
        rows.append(
            [
                "eval mode, one window at a time vs batched: largest logit difference",
                "LN: identical at any batch size; BN: with running statistics too",
                f"{worst:.2g} over all models",
                "matches" if worst < 1e-4 else "does not match",
            ]
        )
        comparison = Table(["quantity", "published", "ours", "verdict"], rows)
        table = Table(
            [
                "trial",
                "normalizer",
                "test bits/char",
                "best along training",
                "train bits/char",
                "with batch statistics",
                "steps",
            ],
            [
                [
                    key,
                    NORMS.get(r["norm"], r["norm"]),
                    bpc(r["test_bpc"]),
                    bpc(r["best_test_bpc"]),
                    bpc(r["train_bpc"]),
                    bpc(r["test_bpc_batch_stats"]),
                    r["steps"] if r["steps"] else "0 (cannot train)",
                ]
                for key, r in s["runs"].items()
            ],
            f"Eval-mode test loss in bits per character (unigram baseline: {bpc(s['unigram_bpc'])}).",
        )
        figures = []
        for b in (batch, 1):
            series = [
                (f"{norm}/batch={b}", NORMS.get(norm, norm))
                for norm in settings["norms"]
                if s["runs"].get(f"{norm}/batch={b}", {}).get("steps")
            ]
            figures.append(
                Figure(
                    f"loss-batch{b}",
                    curves(
                        record,
                        series,
                        "test_bpc",
                        "test bits per character",
                        f"training at batch size {b}",
                    ),
                    f"Test loss (eval mode) along training at batch size {b}.",
                )  # fmt: skip
            )
        deviations = [
            f"A {settings['depth']}-block causal Transformer of width {settings['width']} on "
            f"{record.config['data']['name']} ({settings['context']}-character windows), Adam "
            f"{settings['learning_rate']:g}, {settings['steps']} steps at batch {batch} and "
            f"{settings['batch1_steps']} at batch 1, instead of the papers' LSTMs/GRUs on their "
            "tasks; no published number is comparable, only directions.",
            "RMSNorm is torch.nn.RMSNorm (normkit has no RMSNorm layer).",
        ]
        headline = f"batch {batch}: " + ", ".join(f"{k} {bpc(v)}" for k, v in big.items())
        if one:
            headline += "; batch 1: " + ", ".join(f"{k} {bpc(v)}" for k, v in one.items())
        headline += " bits/char"
        return Report(
            comparison, [Section("Results", [*figures, table])], checks, deviations, headline
        )


def _short(error: str | None, limit: int = 140) -> str | None:
    """An error message without the layer's repr, cut to ``limit`` characters."""
    if error is None:
        return None
    name, _, message = error.partition(": ")
    message = message.split("): ", 1)[-1]
    return f"{name}: {message[:limit]}{'…' if len(message) > limit else ''}"


def _training_step_error(model: nn.Module, setup: Setup, data: Dataset) -> str | None:
    """Try one training step on the first ``setup.batch_size`` training windows (on a copy); the
    error it raises as ``"Name: message"``, or None when it works."""
    import copy

    trial_model = copy.deepcopy(model).train()
    batch = slice(0, setup.batch_size)
    try:
        with torch.enable_grad():
            logits = trial_model(data.x_train[batch])
            F.cross_entropy(logits, data.y_train[batch], ignore_index=IGNORE).backward()
    except (ValueError, TypeError) as error:  # normkit's errors are ValueError/TypeError
        return f"{type(error).__name__}: {error}"
    return None


def _unigram_bits(record: RunRecord) -> float | None:
    """The entropy of the training text's character distribution, in bits: what a model that
    ignores its input reaches."""
    settings = record.settings
    try:
        text, _ = corpus_text(settings["corpus"])
    except ConfigError:
        return None
    ids = encode(text[: int(0.9 * len(text))])
    counts = torch.bincount(ids, minlength=VOCAB).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())
