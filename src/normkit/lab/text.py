"""Text for the lab's sequence experiments: a character corpus that ships with Python, windows with
real padding, and a small causal character-level Transformer whose normalizer is a setting.

- Corpus: Python's own reference documentation, ``pydoc_data.topics`` (the text ``help('TOPIC')``
  prints, about 465,000 characters in CPython 3.11), part of CPython's standard library (on Debian
  in ``libpython3.X-stdlib``), so it is on every machine that runs normkit and is never downloaded;
  or any UTF-8 text file. Characters outside printable ASCII and the newline map to ``?``.
- Model: a pre-norm causal Transformer (Vaswani et al. 2017; GPT-2's pre-norm layout and
  initialization), the normalizer (:class:`TokenNorm`) before attention, before the MLP and before
  the output layer: none, BN with per-time-step statistics (Cooijmans et al. 2016), BN over batch
  and time with or without the padding mask, LayerNorm (Ba et al. 2016) or RMSNorm (Zhang &
  Sennrich 2019).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab.datasets import Dataset

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



def unigram_bits(corpus: str) -> float:
    """The entropy (bits) of the character distribution of ``corpus``'s training text (its first
    90%): the test loss of a model that ignores its input."""
    text, _ = corpus_text(corpus)
    counts = torch.bincount(encode(text[: int(0.9 * len(text))]), minlength=VOCAB).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())
