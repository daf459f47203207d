"""Claims: each declared once, judged over seeds with a 95% interval, by one verdict function.

A :class:`Claim` names the quantity, the published value with its source, how ours is computed
from the run's rows (a :class:`Quantity`, one value per seed) and the criterion. :func:`judge`
turns it into a :class:`Judgement`, whose :meth:`~Judgement.entry` is the claim's entry in
summary.json; the report's claims card (:func:`card_row`) and the check (:func:`check`) are read
from that entry, so the three cannot disagree.

The verdict rule (:func:`verdict`, documented in docs/lab.md):

1. a claim that needs GPU scale is ``inconclusive`` ("needs GPU scale: --preset gpu") on any preset
   that is not a GPU preset;
2. with fewer than :data:`MIN_SEEDS` seeds that give a value, ``inconclusive`` ("too few seeds");
3. otherwise the 95% Student-t interval of the mean over seeds (of the per-seed difference or ratio
   when arms are paired by seed; Welch's interval when they are not) decides: entirely on the
   criterion's side ``reproduced``, entirely on the other side ``not reproduced``, else
   ``inconclusive`` ("interval straddles the criterion").

An experiment's verdict is the roll-up (:func:`roll_up`): the common verdict of its judged claims,
or ``partly`` when they differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from normkit.lab.results import Results, TrialResult
from normkit.lab.settings import GPU_PRESET_PREFIX
from normkit.lab.stats import mean_ci, welch_difference

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, PARTLY = (
    "reproduced",
    "not reproduced",
    "inconclusive",
    "partly",
)
MIN_SEEDS = 3
CONFIDENCE = 0.95


# ------------------------------------------------------------------------------------- published


@dataclass(frozen=True)
class Published:
    """What the paper reports: ``text`` as a reader would quote it, ``source`` (figure, table or
    page), ``value`` where one number compares with ours, and ``unverified`` when it comes only
    from secondary notes or memory (docs/PROTOCOLS.md's [S] and [M])."""

    text: str
    source: str
    value: float | None = None
    unverified: bool = False

    def entry(self) -> dict:
        return {
            "text": self.text,
            "source": self.source,
            "value": self.value,
            "unverified": self.unverified,
        }


# -------------------------------------------------------------------------------------- quantity


class Quantity:
    """How ours is computed: one value per seed (``{replicate: value}``; None when a seed gives
    none, e.g. a trial that diverged). ``text`` says how, for ``normkit lab show``."""

    text = ""
    paired = False

    def per_seed(self, results: Results) -> dict[int, float | None]:
        raise NotImplementedError


def _where_text(where: dict) -> str:
    if not where:
        return ""
    parts = [f"{k}={'(from settings)' if callable(v) else v}" for k, v in where.items()]
    return " of " + ", ".join(parts)


@dataclass(frozen=True)
class _PerSeed(Quantity):
    function: Callable[[list[TrialResult], Results], float | None]
    where: dict
    text: str

    def per_seed(self, results):
        return {
            replicate: _number(self.function(trials, results))
            for replicate, trials in results.by_seed(**self.where).items()
        }


def final(metric: str, **where) -> Quantity:
    """The final row's ``metric`` of the one trial per seed that matches ``where``."""

    def value(trials, results):
        trial = results.one(trials, f"final({metric!r}{_where_text(where)})")
        return None if trial.final.get("diverged") else trial.final.get(metric)

    return _PerSeed(value, where, f"final {metric}{_where_text(where)}")


def from_curve(function: Callable[[list[int], list[float]], float | None], metric: str, text: str,
               **where) -> Quantity:  # fmt: skip
    """``function(steps, values)`` of the evaluation curve of ``metric``, one trial per seed."""

    def value(trials, results):
        trial = results.one(trials, f"from_curve({metric!r}{_where_text(where)})")
        return None if trial.final.get("diverged") else function(*trial.series(metric))

    return _PerSeed(value, where, f"{text}, from the curve of {metric}{_where_text(where)}")


def per_seed(function: Callable[[list[TrialResult], Results], float | None], text: str,
             **where) -> Quantity:  # fmt: skip
    """Anything computed from the trials of one seed that match ``where`` (``function(trials,
    results)``), e.g. the rise of BN's error from its best batch size to the smallest."""
    return _PerSeed(function, where, text + _where_text(where))


@dataclass(frozen=True)
class _Compare(Quantity):
    a: Quantity
    b: Quantity
    kind: str  # "difference" or "ratio"
    paired: bool = True
    text: str = field(default="", compare=False)

    def per_seed(self, results):
        a, b = self.a.per_seed(results), self.b.per_seed(results)
        values = {}
        for replicate in sorted(set(a) | set(b)):
            x, y = a.get(replicate), b.get(replicate)
            values[replicate] = None if x is None or y is None else _combine(x, y, self.kind)
        return values


def _combine(x: float, y: float, kind: str) -> float | None:
    if kind == "difference":
        return x - y
    return x / y if y != 0 else None


def difference(a: Quantity, b: Quantity, paired: bool = True) -> Quantity:
    """Ours is ``a − b``: per seed when ``paired`` (arms that share the batch order), else the
    difference of the means with Welch's interval."""
    return _Compare(a, b, "difference", paired, f"({a.text}) − ({b.text})")


def ratio(a: Quantity, b: Quantity, paired: bool = True) -> Quantity:
    """Ours is ``a / b``: per seed when ``paired``, else the ratio of geometric means (Welch's
    interval of the difference of logs, exponentiated)."""
    return _Compare(a, b, "ratio", paired, f"({a.text}) / ({b.text})")


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    value = float(value)
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class Estimate:
    """Ours: the mean over seeds with its 95% interval, the seeds it rests on and how it was made."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    missing: int
    values: dict[int, float | None]
    method: str

    def entry(self) -> dict:
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "missing": self.missing,
            "per_seed": {str(k): v for k, v in self.values.items()},
            "method": self.method,
        }


def _finite(value) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def estimate(quantity: Quantity, results: Results) -> Estimate:
    """The mean over seeds of ``quantity`` and its 95% Student-t interval (Welch's when unpaired)."""
    if isinstance(quantity, _Compare) and not quantity.paired:
        a = [v for v in quantity.a.per_seed(results).values() if v is not None]
        b = [v for v in quantity.b.per_seed(results).values() if v is not None]
        values = {}
        if quantity.kind == "ratio":
            if any(v <= 0 for v in a + b):
                stat = {"n": 0, "mean": None, "low": None, "high": None}
            else:
                stat = welch_difference([math.log(v) for v in a], [math.log(v) for v in b], CONFIDENCE)
                stat = {k: (math.exp(v) if k != "n" and v is not None and math.isfinite(v) else v)
                        for k, v in stat.items()}  # fmt: skip
            method = "ratio of geometric means, Welch interval (unpaired)"
        else:
            stat = welch_difference(a, b, CONFIDENCE) if a and b else {"n": 0, "mean": None}
            method = "difference of means, Welch interval (unpaired)"
        n = stat["n"]
        missing = max(len(quantity.a.per_seed(results)), len(quantity.b.per_seed(results))) - n
    else:
        values = quantity.per_seed(results)
        finite = [v for v in values.values() if v is not None]
        stat = mean_ci(finite, CONFIDENCE) if finite else {"n": 0, "mean": None}
        n, missing = len(finite), len(values) - len(finite)
        method = "mean over seeds, Student-t interval"
        if isinstance(quantity, _Compare):
            method = f"per-seed {quantity.kind} (paired by seed), Student-t interval"
    return Estimate(
        _finite(stat.get("mean")),
        _finite(stat.get("low")),
        _finite(stat.get("high")),
        n,
        missing,
        values,
        method,
    )


# ------------------------------------------------------------------------------------ criterion


@dataclass(frozen=True)
class Criterion:
    """The published claim as a bound on ours: ``ours > threshold`` or ``ours < threshold``."""

    op: str
    threshold: float

    @property
    def text(self) -> str:
        return f"{self.op} {self.threshold:g}"

    def outcome(self, low: float, high: float) -> str | None:
        """``reproduced`` when the whole interval satisfies the bound, ``not reproduced`` when the
        whole interval violates it, None when it straddles."""
        holds, fails = (low > self.threshold, high < self.threshold)
        if self.op == "<":
            holds, fails = high < self.threshold, low > self.threshold
        return REPRODUCED if holds else NOT_REPRODUCED if fails else None


def above(threshold: float) -> Criterion:
    return Criterion(">", threshold)


def below(threshold: float) -> Criterion:
    return Criterion("<", threshold)


def verdict(
    estimate: Estimate, criterion: Criterion | None, preset: str, needs_gpu: str | None = None
) -> tuple[str | None, str]:
    """The one verdict function (see the module docstring): ``(verdict, reason)``; the verdict is
    None for a quantity that is measured but has no criterion."""
    if criterion is None:
        return None, "measured, no criterion"
    if needs_gpu and not preset.startswith(GPU_PRESET_PREFIX):
        return INCONCLUSIVE, f"needs GPU scale: --preset gpu ({needs_gpu})"
    if estimate.n < MIN_SEEDS:
        extra = f"; {estimate.missing} gave no value" if estimate.missing else ""
        return INCONCLUSIVE, f"too few seeds ({estimate.n} of the {MIN_SEEDS} needed{extra})"
    outcome = criterion.outcome(estimate.low, estimate.high)
    if outcome is None:
        return INCONCLUSIVE, f"interval straddles the criterion ({criterion.text})"
    return outcome, ""


def roll_up(verdicts: list[str | None]) -> str | None:
    """An experiment's verdict: its judged claims' common verdict, or ``partly`` when they differ."""
    judged = {v for v in verdicts if v is not None}
    if not judged:
        return None
    return judged.pop() if len(judged) == 1 else PARTLY


# ---------------------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """A published claim, declared once; see the module docstring.

    ``fmt``: how ours is printed (``".3f"``, ``"+.1f"``); ``needs_gpu``: why the CPU presets cannot
    reach the paper's regime, in numbers (the claim is then judged only on a GPU preset).
    """

    name: str
    quantity: str
    published: Published
    ours: Quantity
    criterion: Criterion | None
    needs_gpu: str | None = None
    fmt: str = ".3f"

    def judge(self, results: Results) -> Judgement:
        found = estimate(self.ours, results)
        decided, reason = verdict(found, self.criterion, results.preset, self.needs_gpu)
        return Judgement(self, found, decided, reason)


@dataclass(frozen=True)
class Judgement:
    """A claim judged on one run; :meth:`entry` is what summary.json holds for it."""

    claim: Claim
    estimate: Estimate
    verdict: str | None
    reason: str

    def entry(self) -> dict:
        claim = self.claim
        return {
            "name": claim.name,
            "quantity": claim.quantity,
            "published": claim.published.entry(),
            "ours": self.estimate.entry(),
            "criterion": None if claim.criterion is None else claim.criterion.text,
            "verdict": self.verdict,
            "reason": self.reason,
            "fmt": claim.fmt,
        }


def judge(claims: list[Claim], results: Results) -> list[Judgement]:
    names = [c.name for c in claims]
    if len(set(names)) != len(names):
        raise ValueError(f"claim names must be unique, got {names}")
    return [claim.judge(results) for claim in claims]


# --------------------------------------------------------------- what an entry reads as elsewhere


def ours_text(entry: dict) -> str:
    """``mean [low, high], n seeds`` in the claim's format."""
    ours, spec = entry["ours"], entry.get("fmt", ".3f")
    if "text" in ours:  # a legacy experiment's check
        return ours["text"]

    def f(value):
        return "–" if value is None else format(value, spec)

    text = f(ours["mean"])
    if ours["low"] is not None and ours["high"] is not None:
        text += f" [{f(ours['low'])}, {f(ours['high'])}]"
    text += f", {ours['n']} seed{'' if ours['n'] == 1 else 's'}"
    if ours.get("missing"):
        text += f" ({ours['missing']} without a value)"
    return text


def published_text(entry: dict) -> str:
    published = entry["published"]
    text = f"{published['text']} ({published['source']})"
    return text + (" — unverified" if published.get("unverified") else "")


def verdict_text(entry: dict) -> str:
    if entry["verdict"] is None:
        return "– (measured)"
    text = f"**{entry['verdict']}**"
    if entry["reason"]:
        return f"{text}: {entry['reason']}"
    return f"{text} (criterion: ours {entry['criterion']})"


def card_row(entry: dict) -> list[str]:
    """The claim's row in the claims card: claim | published (source) | ours | verdict."""
    return [entry["quantity"], published_text(entry), ours_text(entry), verdict_text(entry)]


CARD_HEADERS = ["claim", "published (source)", "ours: mean [95% CI], seeds", "verdict"]


@dataclass(frozen=True)
class Check:
    """A criterion as pass/fail (None: inconclusive or not judged), with the numbers behind it."""

    name: str
    passed: bool | None
    detail: str


def check(entry: dict) -> Check:
    """The claim as a check: passed when reproduced, failed when not, None when inconclusive."""
    passed = {REPRODUCED: True, NOT_REPRODUCED: False}.get(entry["verdict"])
    detail = ours_text(entry) + (f"; {entry['reason']}" if entry["reason"] else "")
    criterion = f" {entry['criterion']}" if entry["criterion"] else ""
    return Check(f"{entry['quantity']}{criterion}", passed, detail)
