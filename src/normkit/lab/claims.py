"""Claims: each declared once, judged over seeds with a 95% interval, by one verdict function.

A :class:`Claim` names the quantity, the published value with its source, how ours is computed
from the run's rows (a :class:`Quantity`: one value per seed) and the criterion. :meth:`Claim.judge`
gives a :class:`Judgement`, whose :meth:`~Judgement.entry` is the claim's entry in summary.json; the
report's claims card (:func:`card_row`) and the check (:func:`check`) are read from that entry, so
the three cannot disagree.

The verdict rule (:func:`verdict`, documented in docs/lab.md):

1. a claim that needs GPU scale is ``inconclusive`` ("needs GPU scale: --preset gpu") on any preset
   that is not a GPU preset;
2. with fewer than :data:`MIN_SEEDS` seeds that give a value, ``inconclusive`` ("too few seeds");
3. otherwise the 95% Student-t interval of the mean over seeds (of the per-seed difference or ratio
   when arms are paired by seed; Welch's interval when they are not) decides: entirely on the
   criterion's side ``reproduced``, entirely on the other side ``not reproduced``, else
   ``inconclusive`` ("interval straddles the criterion"). A ratio of positive quantities is
   judged on the log scale: the geometric mean over seeds and the interval of the mean log ratio,
   exponentiated (a ratio's spread is multiplicative: one seed at 20× must not give a negative
   lower bound);
4. on a reduced preset (``quick``, ``tiny``: fewer steps or smaller models than the protocol), a
   miss is ``inconclusive`` ("at quick scale, ..."), not ``not reproduced``: a run smaller than the
   protocol can show the effect but cannot refute a claim made at the protocol's scale.

An experiment's verdict is the roll-up (:func:`roll_up`): the common verdict of its judged claims,
or ``partly`` when they differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from normkit.lab.results import Results, TrialResult
from normkit.lab.settings import GPU_PRESET_PREFIX
from normkit.lab.stats import mean_ci, welch_difference

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, PARTLY = "reproduced", "not reproduced", "inconclusive", "partly"
MIN_SEEDS = 3
CONFIDENCE = 0.95
CARD_HEADERS = ["claim", "published (source)", "ours: mean [95% CI], seeds", "verdict"]


@dataclass(frozen=True)
class Published:
    """What the paper reports: ``text`` as a reader would quote it, ``source`` (figure, table or
    page), ``value`` where one number compares with ours, and ``unverified`` when it comes only
    from secondary notes or memory (docs/PROTOCOLS.md's [S] and [M])."""

    text: str
    source: str
    value: float | None = None
    unverified: bool = False


# -------------------------------------------------------------------------------------- quantity


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _where(where: dict) -> str:
    parts = [f"{k}={'(from settings)' if callable(v) else v}" for k, v in where.items()]
    return " of " + ", ".join(parts) if parts else ""


@dataclass(frozen=True)
class Quantity:
    """How ours is computed: ``function(trials, results)`` over the trials of each seed that match
    ``where``, one value per seed (None: the seed gives none, e.g. its trial diverged)."""

    function: Callable[[list[TrialResult], Results], float | None]
    where: dict
    text: str
    log: bool = False  # a ratio of positive values: judged on the log scale (rule 3)

    def per_seed(self, results: Results) -> dict[int, float | None]:
        groups = results.by_seed(**self.where).items()
        return {replicate: _number(self.function(trials, results)) for replicate, trials in groups}


def final(metric: str, **where) -> Quantity:
    """The final row's ``metric`` of the one trial per seed that matches ``where``."""

    def value(trials, results):
        trial = results.one(trials, f"final({metric!r}{_where(where)})")
        return None if trial.final.get("diverged") else trial.final.get(metric)

    return Quantity(value, where, f"final {metric}{_where(where)}")


def from_curve(function: Callable[[list[int], list[float]], float | None], metric: str, text: str,
               **where) -> Quantity:  # fmt: skip
    """``function(steps, values)`` of the evaluation curve of ``metric``, one trial per seed."""

    def value(trials, results):
        trial = results.one(trials, f"from_curve({metric!r}{_where(where)})")
        return None if trial.final.get("diverged") else function(*trial.series(metric))

    return Quantity(value, where, f"{text}, from the curve of {metric}{_where(where)}")


def per_seed(function: Callable[[list[TrialResult], Results], float | None], text: str, *,
             ratio: bool = False, **where) -> Quantity:  # fmt: skip
    """Anything computed from the trials of one seed that match ``where`` (``function(trials,
    results)``), e.g. the rise of BN's error from its best batch size to the smallest; ``ratio``
    when it is a ratio of positive values (judged on the log scale)."""
    return Quantity(function, where, text + _where(where), log=ratio)


@dataclass(frozen=True)
class Comparison:
    """Ours is ``a − b`` or ``a / b``: per seed when ``paired`` (arms that share the batch order),
    else from the two samples' means with Welch's interval (of the logs, for a ratio)."""

    a: Quantity
    b: Quantity
    kind: str  # "difference" or "ratio"
    paired: bool = True

    @property
    def text(self) -> str:
        return f"({self.a.text}) {'−' if self.kind == 'difference' else '/'} ({self.b.text})"

    def per_seed(self, results: Results) -> dict[int, float | None]:
        a, b = self.a.per_seed(results), self.b.per_seed(results)
        values = {}
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k), b.get(k)
            ok = x is not None and y is not None and (self.kind == "difference" or y != 0)
            values[k] = (x - y if self.kind == "difference" else x / y) if ok else None
        return values


def difference(a: Quantity, b: Quantity, paired: bool = True) -> Comparison:
    return Comparison(a, b, "difference", paired)


def ratio(a: Quantity, b: Quantity, paired: bool = True) -> Comparison:
    return Comparison(a, b, "ratio", paired)


# ------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class Estimate:
    """Ours: the mean over seeds, its 95% interval, the seeds it rests on and how it was made."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    missing: int
    values: dict[int, float | None]
    method: str


def estimate(quantity: Quantity | Comparison, results: Results) -> Estimate:
    """The mean over seeds of ``quantity`` and its 95% Student-t interval (Welch's when unpaired)."""
    if isinstance(quantity, Comparison) and not quantity.paired:
        a, b = (list(q.per_seed(results).values()) for q in (quantity.a, quantity.b))
        values, total = {}, max(len(a), len(b))
        a, b = [v for v in a if v is not None], [v for v in b if v is not None]
        log = quantity.kind == "ratio"
        if not a or not b or (log and min(a + b) <= 0):
            stat = {"n": 0}
        else:
            stat = welch_difference(*([math.log(v) for v in s] if log else s for s in (a, b)), CONFIDENCE)
            if log:
                stat = {k: math.exp(v) if k != "n" and math.isfinite(v) else v for k, v in stat.items()}
        method = f"{quantity.kind} of {'geometric ' if log else ''}means, Welch interval (unpaired)"
        n, missing = stat["n"], total - stat["n"]
    else:
        values = quantity.per_seed(results)
        finite = [v for v in values.values() if v is not None]
        n, missing = len(finite), len(values) - len(finite)
        paired = isinstance(quantity, Comparison)
        log = (quantity.kind == "ratio" if paired else quantity.log) and bool(finite)
        if log and min(finite) > 0:
            stat = mean_ci([math.log(v) for v in finite], CONFIDENCE)
            stat = {k: math.exp(v) if k in ("mean", "low", "high") and math.isfinite(v) else v
                    for k, v in stat.items()}  # fmt: skip
            interval = "geometric mean, Student-t interval of the logs"
        else:
            stat = mean_ci(finite, CONFIDENCE) if finite else {}
            interval = "Student-t interval"
            if log:  # a ratio that is not positive in every seed: no log scale
                interval += " (a ratio ≤ 0 in some seed: arithmetic mean)"
        where = f"per-seed {quantity.kind} (paired by seed)" if paired else "mean over seeds"
        method = f"{where}, {interval}"
    found = [_number(stat.get(k)) for k in ("mean", "low", "high")]
    return Estimate(*found, n, missing, values, method)


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
        """Reproduced when the whole interval keeps the bound, not when the whole interval breaks
        it, None when it straddles."""
        holds, fails = (low > self.threshold, high < self.threshold)
        if self.op == "<":
            holds, fails = high < self.threshold, low > self.threshold
        return REPRODUCED if holds else NOT_REPRODUCED if fails else None


def above(threshold: float) -> Criterion:
    return Criterion(">", threshold)


def below(threshold: float) -> Criterion:
    return Criterion("<", threshold)


def reduced_scale(preset: str) -> bool:
    """A preset smaller than the protocol: anything but ``full`` and the GPU presets."""
    return preset != "full" and not preset.startswith(GPU_PRESET_PREFIX)


def verdict(found: Estimate, criterion: Criterion | None, preset: str,
            needs_gpu: str | None = None) -> tuple[str | None, str]:  # fmt: skip
    """The one verdict function (see the module docstring): ``(verdict, reason)``; the verdict is
    None for a quantity that is measured but has no criterion."""
    if criterion is None:
        return None, "measured, no criterion"
    if needs_gpu and not preset.startswith(GPU_PRESET_PREFIX):
        return INCONCLUSIVE, f"needs GPU scale: --preset gpu ({needs_gpu})"
    if found.n < MIN_SEEDS:
        extra = f"; {found.missing} gave no value" if found.missing else ""
        return INCONCLUSIVE, f"too few seeds ({found.n} of the {MIN_SEEDS} needed{extra})"
    outcome = criterion.outcome(found.low, found.high)
    if outcome is None:
        return INCONCLUSIVE, f"interval straddles the criterion ({criterion.text})"
    if outcome == NOT_REPRODUCED and reduced_scale(preset):
        return INCONCLUSIVE, (f"at {preset} scale, where a miss does not refute the claim "
                              f"(the interval lies beyond ours {criterion.text}); the full "
                              "preset judges it")  # fmt: skip
    return outcome, ""


def roll_up(verdicts: list[str | None]) -> str | None:
    """An experiment's verdict: its judged claims' common verdict, or ``partly`` when they differ."""
    judged = {v for v in verdicts if v is not None}
    return None if not judged else judged.pop() if len(judged) == 1 else PARTLY


# ---------------------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """A published claim, declared once; see the module docstring. ``fmt``: how ours is printed
    (``".3f"``, ``"+.1f"``); ``needs_gpu``: why the CPU presets cannot reach the paper's regime, in
    numbers (the claim is then judged only on a GPU preset)."""

    name: str
    quantity: str
    published: Published
    ours: Quantity | Comparison
    criterion: Criterion | None
    needs_gpu: str | None = None
    fmt: str = ".3f"

    def judge(self, results: Results) -> Judgement:
        found = estimate(self.ours, results)
        return Judgement(self, found, *verdict(found, self.criterion, results.preset, self.needs_gpu))


@dataclass(frozen=True)
class Judgement:
    """A claim judged on one run; :meth:`entry` is what summary.json holds for it."""

    claim: Claim
    estimate: Estimate
    verdict: str | None
    reason: str

    def entry(self) -> dict:
        claim, found = self.claim, self.estimate
        ours = {k: getattr(found, k) for k in ("mean", "low", "high", "n", "missing", "method")}
        ours["per_seed"] = {str(k): v for k, v in found.values.items()}
        return {"name": claim.name, "quantity": claim.quantity, "published": asdict(claim.published),
                "ours": ours, "criterion": None if claim.criterion is None else claim.criterion.text,
                "verdict": self.verdict, "reason": self.reason, "fmt": claim.fmt}  # fmt: skip


def arm_gap(name: str, quantity: str, published: Published, metric: str, a: str, b: str,
            criterion: Criterion | None, fmt: str = "+.2f", **where) -> Claim:
    """A claim on arm ``a``'s final ``metric`` − arm ``b``'s, paired by seed (``where``: both)."""
    ours = difference(final(metric, arm=a, **where), final(metric, arm=b, **where))
    return Claim(name, quantity, published, ours, criterion, fmt=fmt)


def judge(claims: list[Claim], results: Results) -> list[Judgement]:
    names = [c.name for c in claims]
    if len(set(names)) != len(names):
        raise ValueError(f"claim names must be unique, got {names}")
    return [claim.judge(results) for claim in claims]


# --------------------------------------------------------------- what an entry reads as elsewhere


def ours_text(entry: dict) -> str:
    """``mean [low, high], n seeds`` in the claim's format (an entry with its own text shows that)."""
    ours, spec = entry["ours"], entry.get("fmt", ".3f")
    if "text" in ours:
        return ours["text"]
    text = "–" if ours["mean"] is None else format(ours["mean"], spec)
    if ours["low"] is not None and ours["high"] is not None:
        text += f" [{format(ours['low'], spec)}, {format(ours['high'], spec)}]"
    text += f", {ours['n']} seed{'' if ours['n'] == 1 else 's'}"
    return text + (f" ({ours['missing']} without a value)" if ours.get("missing") else "")


def card_row(entry: dict) -> list[str]:
    """The claim's row in the claims card: claim | published (source) | ours | verdict."""
    published = entry["published"]
    cited = f"{published['text']} ({published['source']})"
    cited += " — unverified" if published.get("unverified") else ""
    if entry["verdict"] is None:
        decided = "– (measured)"
    elif entry["reason"].startswith("at "):  # "inconclusive at quick scale, ..."
        decided = f"**{entry['verdict']}** {entry['reason']}"
    elif entry["reason"]:
        decided = f"**{entry['verdict']}**: {entry['reason']}"
    elif entry["criterion"]:
        decided = f"**{entry['verdict']}** (criterion: ours {entry['criterion']})"
    else:  # decided by its own evidence (the guideline's rows): nothing to quote
        decided = f"**{entry['verdict']}**"
    return [entry["quantity"], cited, ours_text(entry), decided]


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
