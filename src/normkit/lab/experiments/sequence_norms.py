"""Normalization for sequences (Ba, Kiros & Hinton 2016, "Layer Normalization"; Cooijmans et al. 2016,
"Recurrent Batch Normalization"): a character-level language model with no normalization, BatchNorm
with per-time-step statistics, BatchNorm with masked statistics, LayerNorm and RMSNorm.

BatchNorm needs batch statistics, and a sequence adds a second axis to share them over. Cooijmans et
al. keep separate statistics per time step; sharing them over time instead must keep the padding of
variable-length sequences out (masked statistics, ``nk.BatchNorm1d(C)(x, mask=m)``). LayerNorm (Ba et
al. 2016) and RMSNorm (Zhang & Sennrich 2019) normalize each token over its features: nothing depends
on the batch or the time step, "works with batch size 1 and needs no per-time-step statistics". The
claim measured: LN (and RMSNorm) train as well as or better than BN on sequences, and at batch size 1
they are unaffected while BN breaks.

Data and model (:mod:`normkit.lab.text`): Python's own reference documentation
(``pydoc_data.topics``, shipped with CPython, never downloaded; ``corpus=PATH`` for any UTF-8 file),
the first 90% for training in ``context``-character windows of which ``pad_fraction`` (seeded) are cut
to a random length in [context/4, context) and right-padded, so that the masked variant has padding to
mask (padded targets are ignored by the loss; causal attention keeps real tokens from seeing it); a
pre-norm causal Transformer of ``depth`` blocks, width ``width``. Adam at ``learning_rate``.

Trials: every normalizer at ``batch_size`` (``steps`` steps) and at batch size 1 (``batch1_steps``),
``seeds`` seeds, paired (the normalizers of a seed draw the same windows). Per-time-step BN cannot
take a training step on one sequence (one value per channel and position), so its batch-1 trial
trains nothing and records the error of one attempted step. Measured: the eval-mode test loss in bits
per character along training; at the end, for the BN variants, the test loss with batch statistics
(train mode, test windows in batches of the trial's batch size), and for every model the largest
difference between evaluating one window at a time and in a batch.

Decisions: per-time-step BN is one ``nk.BatchNorm1d`` per position, each masked to the real tokens at
that position; BN shared over time is masked (``"batch"`` without the mask is the variant that lets
padding into the statistics). With statistics over the whole sequence, BN in a causal model lets a
token's normalization depend on later tokens of the batch; the train-mode test loss shows how much
the model relies on that.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.nn import functional as F

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab.claims import Claim, Published, above, arm_gap, below, per_seed
from normkit.lab.experiment import Experiment, Setup, register
from normkit.lab.figures import Curves, MeanTable
from normkit.lab.plan import Arm, Plan
from normkit.lab.render import Section, Table
from normkit.lab.seeds import derived_seed
from normkit.lab.settings import Settings
from normkit.lab.text import (
    IGNORE,
    NORMS,
    CharModel,
    bits_per_char,
    initialize_char_model,
    text_dataset,
    unigram_bits,
)

BN_KINDS = ("batch_time", "batch_masked", "batch")
PER_SAMPLE = ("layer", "rms")
BA = "Ba, Kiros & Hinton 2016"


@dataclass(frozen=True)
class SequenceNormsSettings(Settings):
    dataset: str = "digits"  # not used (the data is the text corpus); digits is the cheapest to load
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
    seeds: int = 3


def _probe(params: dict) -> bool:
    """Per-time-step BN on one sequence: it cannot take a step; its trial only records the attempt."""
    return params["batch_size"] == 1 and params["norm"] == "batch_time"


def _best_gap(batch):
    """Best of LN/RMSNorm − best BN variant that trained (test bits/char) at ``batch``, per seed."""

    def value(trials, results):
        bpc = {t.params["norm"]: t.final["test_bpc"] for t in trials
               if t.params["batch_size"] == batch(results.settings) and t.final["steps"] > 0
               and not t.final["diverged"]}  # fmt: skip
        bn, ps = [bpc[k] for k in BN_KINDS if k in bpc], [bpc[k] for k in PER_SAMPLE if k in bpc]
        return min(ps) - min(bn) if bn and ps else None

    return value


def _probe_failed(trials, results) -> float | None:
    probes = [t for t in trials if t.final["steps"] == 0]
    return float(probes[0].final["training_step_error"] is not None) if probes else None


def _batch_stats_gap(trials, results) -> float | None:
    final = results.one(trials, "masked BN").final
    found = final.get("test_bpc_batch_stats")
    return None if found is None or final["diverged"] else found - final["test_bpc"]


def _training_step_error(model, setup: Setup, data) -> str | None:
    """Try one training step on the first ``setup.batch_size`` training windows (on a copy); the
    error it raises as ``"Name: message"``, or None when it works."""
    trial_model = copy.deepcopy(model).train()
    batch = slice(0, setup.batch_size)
    try:
        with torch.enable_grad():
            logits = trial_model(data.x_train[batch])
            F.cross_entropy(logits, data.y_train[batch], ignore_index=IGNORE).backward()
    except (ValueError, TypeError) as error:  # normkit's errors are ValueError/TypeError
        return f"{type(error).__name__}: {error}"
    return None


@register
class SequenceNorms(Experiment):
    name = "sequence-norms"
    title = "Normalizers for sequences: BN per step, masked BN, LN, RMSNorm"
    paper = ("Ba, Kiros & Hinton 2016, Layer Normalization; Cooijmans et al. 2016, Recurrent Batch "
             "Normalization; Zhang & Sennrich 2019, RMSNorm")  # fmt: skip
    claim = ("For sequences, per-sample normalizers (LayerNorm, RMSNorm) train as well as or better than "
             "BatchNorm without per-time-step statistics or padding masks, and work unchanged at batch "
             "size 1, where BatchNorm's statistics break down.")  # fmt: skip
    settings_class = SequenceNormsSettings
    presets = {
        "quick": {"context": 16, "width": 32, "steps": 300, "batch1_steps": 300, "test_windows": 200,
                  "eval_every": 100},
        "tiny": {"context": 8, "width": 8, "depth": 1, "heads": 2, "steps": 6, "batch_size": 4,
                 "batch1_steps": 4, "test_windows": 8, "eval_every": 3, "seeds": 1},
    }  # fmt: skip

    def prepare_data(self, s, dataset):
        return text_dataset(s.corpus, s.context, s.pad_fraction, s.test_windows, s.seed)

    def plan(self, s, data):
        arms = [Arm(norm, {"norm": norm}, NORMS[norm]) for norm in s.norms]
        steps = lambda p: 0 if _probe(p) else s.steps if p["batch_size"] == s.batch_size else s.batch1_steps
        return Plan(arms, steps, seeds=s.seeds, seed=s.seed, eval_every=s.eval_every,
                    grid={"batch_size": (s.batch_size, 1)})  # fmt: skip

    def setup(self, trial, s, data, generator):
        model = CharModel(trial.params["norm"], s.width, s.depth, s.heads, s.context)
        initialize_char_model(model, generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=s.learning_rate)
        return Setup(model, optimizer, trial.params["batch_size"])

    def measure(self, trial, s, setup, data):
        return {"test_bpc": bits_per_char(setup.model, data.x_test, data.y_test)}

    def finish(self, trial, s, setup, data):
        model = setup.model
        row = {"test_bpc": bits_per_char(model, data.x_test, data.y_test)}
        if trial.steps == 0:
            row["training_step_error"] = _training_step_error(model, setup, data)
        if trial.params["norm"] in BN_KINDS:
            try:
                with nk.frozen_running_stats(model):
                    model.train()
                    row["test_bpc_batch_stats"] = bits_per_char(
                        model, data.x_test, data.y_test, trial.params["batch_size"])
            except (ValueError, TypeError):  # per-time-step statistics of one window
                row["test_bpc_batch_stats"] = None
            finally:
                model.eval()
        sample = data.x_test[:8]
        one_at_a_time = torch.cat([model(sample[i : i + 1]) for i in range(len(sample))])
        row["batch1_inference_difference"] = float((one_at_a_time - model(sample)).abs().max())
        generator = torch.Generator().manual_seed(derived_seed(trial.seed, 15))
        index = torch.randperm(len(data.y_train), generator=generator)[: len(data.y_test)]
        row["train_bpc"] = bits_per_char(model, data.x_train[index], data.y_train[index])
        return row

    def claims(self, s):
        big, where = s.batch_size, {"batch_size": s.batch_size}
        return [
            Claim("ln-vs-bn", f"test bits/char at batch {big}: best of LN/RMSNorm − best BN",
                  Published("LN-LSTM converges faster and to a better validation error than BN-LSTM "
                            "(attentive reader)", f"{BA}, §6.2 and Fig. 2", unverified=True),
                  per_seed(_best_gap(lambda s: s.batch_size), "best LN/RMSNorm − best BN"),
                  below(0.0), fmt="+.3f"),
            Claim("ln-vs-bn-batch1", "test bits/char after training at batch 1: best of LN/RMSNorm − best "
                  "BN that trained", Published("LN works with batch size 1; BN needs a batch",
                                               f"{BA}, §3 and §3.1"),
                  per_seed(_best_gap(lambda s: 1), "best LN/RMSNorm − best BN at batch 1"),
                  below(0.0), fmt="+.3f"),
            arm_gap("ln-vs-none", f"test bits/char at batch {big}: LN − no normalization",
                    Published("LN speeds up training over the unnormalized baseline", f"{BA}, §6"),
                    "test_bpc", "layer", "none", None, "+.3f", **where),
            Claim("per-step-bn-batch1", "per-time-step BN refuses a training step on one sequence "
                  "(1 = refused)", Published("one value per channel per time step: no statistics",
                                             "Cooijmans et al. 2016, §3", unverified=True),
                  per_seed(_probe_failed, "1 if the attempted step raised", arm="batch_time"),
                  above(0.5), fmt=".0f"),
            Claim("bn-batch-stats", f"masked BN at batch {big}: test bits/char with batch − with running "
                  "statistics", Published("not reported", "–"),
                  per_seed(_batch_stats_gap, "batch − running statistics", arm="batch_masked", **where),
                  None, fmt="+.3f"),
            Claim("eval-per-sample", "eval mode: largest logit difference, one window at a time vs batched",
                  Published("LN: identical at any batch size; BN: with running statistics too",
                            f"{BA}, §3"),
                  per_seed(lambda t, r: max(x.final["batch1_inference_difference"] for x in t),
                           "max over the seed's models"), below(1e-4), fmt=".2g"),
        ]  # fmt: skip

    def figures(self, s):
        return [
            *(Curves(f"loss-batch{b}", "test_bpc", "test bits per character",
                     f"Test loss (eval mode) along training at batch size {b}.",
                     where={"batch_size": b}, title=f"batch size {b}") for b in (s.batch_size, 1)),
            MeanTable("test-bpc", "test_bpc", "batch_size", "Final test bits/char (eval mode); per-time-step "
                      "BN at batch size 1 cannot train: its cell is the untrained model.", ".3f"),
            MeanTable("batch-stats", "test_bpc_batch_stats", "batch_size",
                      "Final test bits/char of the BN variants with batch statistics (train mode).", ".3f"),
        ]  # fmt: skip

    def extra_section(self, results):
        rows = [[t.key, t.final["training_step_error"] or "it worked"]
                for t in results.all if t.final.get("steps") == 0]  # fmt: skip
        try:
            unigram = f"{unigram_bits(results.settings.corpus):.3f}"
        except ConfigError:  # the corpus file is no longer there
            unigram = "–"
        return Section("Batch size 1, and the unigram baseline", [
            f"A model that ignores its input reaches {unigram} bits/char (the training text's unigram "
            "entropy).", Table(["trial", "one training step at batch size 1"], rows)])  # fmt: skip

    def deviations(self, s):
        return [
            f"A {s.depth}-block causal Transformer of width {s.width} on {s.corpus} ({s.context}-character "
            f"windows), Adam {s.learning_rate:g}, {s.steps} steps at batch {s.batch_size} and "
            f"{s.batch1_steps} at batch 1, instead of the papers' LSTMs/GRUs on their tasks; no published "
            "number is comparable, only directions.",
            "RMSNorm is torch.nn.RMSNorm (normkit has no RMSNorm layer).",
        ]  # fmt: skip
