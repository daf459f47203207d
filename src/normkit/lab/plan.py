"""Trial plans: arms × seeds × a grid over settings, after an optional sweep that picks a value.

An experiment declares a :class:`Plan`; the framework expands it into :class:`Trial` objects:

- **arms** (:class:`Arm`): the networks compared, e.g. with and without BN;
- **seeds**: replicate ``r`` of every arm (and grid point) is seeded ``seed + r``, so arms share the
  batch order and their comparison is paired by seed;
- **grid**: settings crossed with every arm, e.g. ``{"batch_per_device": (64, 8, 2)}``; an arm may
  bring its own grid (SyncBN at its own batch sizes) and ``skip`` drops cells that are not trained;
- **sweep** (:class:`Sweep`): short trials over candidate values of one parameter (a learning
  rate), from which a stated rule (:func:`lowest`, :func:`highest`, :func:`largest_stable`) picks
  the value the main trials use; the main trials wait for the sweep.

Keys read ``ARM[/NAME=VALUE...]/seed=R`` and ``sweep/ARM[/NAME=VALUE...]/SETTING=V[/seed=R]``. Every
trial's params (written into each of its metrics rows) hold ``arm``, ``phase`` (``"main"`` or
``"sweep"``), the arm's params, its grid point, ``replicate`` and the swept value.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from normkit.errors import ConfigError

PICKED = "(picked by the sweep)"  # the swept value of a main trial before the sweep has run
STRUCTURAL = ("arm", "phase", "replicate")


@dataclass(frozen=True)
class Trial:
    """One network trained inside a run: a unique key, its parameters, and how long to train it."""

    key: str
    params: dict  # JSON-ready; written into every metrics row of the trial
    steps: int
    eval_every: int
    seed: int = 0  # seeds the weights, the batch order and dropout of this trial


@dataclass(frozen=True)
class Arm:
    """One network of the comparison: a name, the parameters its setup reads, a legend label, and
    optionally a grid of its own that replaces the plan's."""

    name: str
    params: dict = field(default_factory=dict)
    label: str = ""
    grid: dict[str, Sequence] | None = None

    @property
    def legend(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Rule:
    """How a sweep picks its value from the final rows of its trials, grouped by value: among the
    values whose trials did not diverge (and, with ``limit``, whose ``metric`` stayed at or below
    it), the one with the lowest / highest mean ``metric``, or the largest value; the smallest
    value if none qualifies (the pick's note says so)."""

    metric: str
    choose: str  # "lowest", "highest" or "largest"
    limit: float | None = None

    @property
    def description(self) -> str:
        bound = "" if self.limit is None else f" and whose final {self.metric} stayed <= {self.limit:g}"
        what = ("the largest value" if self.choose == "largest" else
                f"the value with the {self.choose} final {self.metric} (mean over the sweep's seeds)")
        return f"{what} among those whose trials did not diverge{bound}; else the smallest value"

    def pick(self, rows: dict[Any, list[dict]]) -> tuple[Any, str]:
        scores = {
            value: statistics.fmean(r[self.metric] for r in group)
            for value, group in rows.items()
            if all(not r["diverged"] and r.get(self.metric) is not None for r in group)
            and (self.limit is None or max(r[self.metric] for r in group) <= self.limit)
        }
        if not scores:
            why = "diverged" if self.limit is None else f"diverged or ended above {self.limit:g}"
            return min(rows), f"no value qualified (every one {why}): took the smallest"
        if self.choose == "largest":
            return max(scores), ""
        best = (min if self.choose == "lowest" else max)(scores.values())
        return min(v for v, score in scores.items() if score == best), ""


def lowest(metric: str) -> Rule:
    """Pick the value with the lowest mean final ``metric`` (e.g. ``train_loss``)."""
    return Rule(metric, "lowest")


def highest(metric: str) -> Rule:
    """Pick the value with the highest mean final ``metric`` (e.g. ``validation_accuracy``)."""
    return Rule(metric, "highest")


def largest_stable(metric: str = "train_loss", limit: float | None = None) -> Rule:
    """Pick the largest value that trains without diverging (the edge of stability)."""
    return Rule(metric, "largest", limit)


@dataclass(frozen=True)
class Sweep:
    """Short trials over ``values`` of the parameter ``setting``; ``rule`` picks one value per group.

    ``arms``: the arms swept (None: all). ``by``: the params a pick is made per (``()``: one value
    for every arm; ``("arm",)``: each arm its own, which every arm then needs to be swept; add a
    grid setting to pick per grid point as well).
    """

    setting: str
    values: Sequence
    rule: Rule
    steps: int
    arms: Sequence[str] | None = None
    by: Sequence[str] = ()
    seeds: int = 1
    evaluations: int = 4


@dataclass(frozen=True)
class Plan:
    """What a run trains; see the module docstring. ``steps`` (and ``eval_every``) may be functions
    of a trial's params, e.g. a fixed number of epochs at each batch size. Give either
    ``eval_every`` or ``evaluations`` (evaluations per trial, besides step 0)."""

    arms: Sequence[Arm]
    steps: int | Callable[[dict], int]
    seeds: int = 1
    seed: int = 0
    eval_every: int | None = None
    evaluations: int | None = None
    grid: dict[str, Sequence] = field(default_factory=dict)
    sweep: Sweep | None = None
    skip: Callable[[dict], bool] | None = None

    def __post_init__(self):
        names = [arm.name for arm in self.arms]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"a plan needs arms with distinct names, got {names}")
        if (self.eval_every is None) == (self.evaluations is None):
            raise ConfigError("a plan takes either eval_every or evaluations, not both or neither")
        if self.seeds < 1:
            raise ConfigError(f"seeds={self.seeds}: a plan needs at least one seed")
        sweep = self.sweep
        if sweep is not None:
            unknown = set(sweep.arms or ()) - set(names)
            if unknown:
                raise ConfigError(f"the sweep names arms {sorted(unknown)} that the plan lacks")
            if "arm" in sweep.by and sweep.arms is not None and set(sweep.arms) != set(names):
                raise ConfigError("a sweep that picks per arm must sweep every arm (arms=None)")
            loose = set(self._grid_names()) - set(sweep.by)
            if loose:
                raise ConfigError(f"the sweep must pick per grid setting {sorted(loose)} (add to by)")

    # -- expansion ---------------------------------------------------------------------------
    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def _grid_names(self) -> list[str]:
        names = list(self.grid)
        for arm in self.arms:
            names += [n for n in arm.grid or {} if n not in names]
        return names

    def _points(self, arm: Arm) -> list[dict]:
        grid = self.grid if arm.grid is None else arm.grid
        return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]

    def _params(self, arm: Arm, phase: str, point: dict, replicate: int, extra: dict) -> dict:
        parts = [{"arm": arm.name, "phase": phase}, arm.params, point, extra]
        params: dict = {}
        for part in parts:
            clash = set(params) & set(part)
            if clash:
                raise ConfigError(f"arm {arm.name!r}: parameter names {sorted(clash)} collide")
            params.update(part)
        if "replicate" in params:
            raise ConfigError(f"arm {arm.name!r}: 'replicate' is the framework's parameter")
        params["replicate"] = replicate
        return params

    def _eval_every(self, steps: int, params: dict) -> int:
        if self.evaluations is not None:
            return max(1, steps // max(1, self.evaluations))
        every = self.eval_every(params) if callable(self.eval_every) else self.eval_every
        return max(1, min(every, steps))

    @staticmethod
    def _key(prefix: list[str], point: dict, suffix: list[str]) -> str:
        return "/".join([*prefix, *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in point.items()), *suffix])  # fmt: skip

    def sweep_trials(self) -> list[Trial]:
        sweep = self.sweep
        if sweep is None:
            return []
        trials = []
        for replicate in range(sweep.seeds):
            for arm in self.arms:
                if sweep.arms is not None and arm.name not in sweep.arms:
                    continue
                for point in self._points(arm):
                    for value in sweep.values:
                        params = self._params(arm, "sweep", point, replicate, {sweep.setting: value})
                        if self.skip is not None and self.skip(params):
                            continue
                        key = self._key(
                            ["sweep", arm.name],
                            {**point, sweep.setting: value},
                            [f"seed={replicate}"] if sweep.seeds > 1 else [],
                        )
                        every = max(1, sweep.steps // max(1, sweep.evaluations))
                        trials.append(Trial(key, params, sweep.steps, every, self.seed + replicate))
        return trials

    def main_trials(self, picks: dict[tuple, Any] | None = None) -> list[Trial]:
        """The main trials; ``picks`` maps a sweep group to its value (None: not yet swept)."""
        trials = []
        for replicate in range(self.seeds):
            for arm in self.arms:
                for point in self._points(arm):
                    extra = {}
                    if self.sweep is not None:
                        probe = {"arm": arm.name, **arm.params, **point}
                        group = tuple(probe.get(name) for name in self.sweep.by)
                        extra = {self.sweep.setting: PICKED if picks is None else picks[group]}
                    params = self._params(arm, "main", point, replicate, extra)
                    if self.skip is not None and self.skip(params):
                        continue
                    steps = self.steps(params) if callable(self.steps) else self.steps
                    key = self._key([arm.name], point, [f"seed={replicate}"])
                    trials.append(
                        Trial(key, params, steps, self._eval_every(steps, params), self.seed + replicate)
                    )
        return trials

    def picks(self, finals: dict[str, dict]) -> dict[tuple, dict]:
        """Each sweep group's pick: ``{group: {"value", "note", "table"}}`` from the sweep's finals."""
        sweep = self.sweep
        groups: dict[tuple, dict[Any, list[dict]]] = {}
        for trial in self.sweep_trials():
            row = finals[trial.key]
            group = tuple(trial.params.get(name) for name in sweep.by)
            groups.setdefault(group, {}).setdefault(trial.params[sweep.setting], []).append(row)
        result = {}
        for group, rows in groups.items():
            value, note = sweep.rule.pick(rows)
            metric = sweep.rule.metric
            table = {
                value_: {
                    metric: _mean([r.get(metric) for r in group_rows]),
                    "diverged": any(r["diverged"] for r in group_rows),
                }
                for value_, group_rows in rows.items()
            }
            result[group] = {"value": value, "note": note, "table": table}
        return result

    def trials(self, finals: dict[str, dict]) -> list[Trial]:
        """The trials to run given the finished ones: the sweep alone until it is done, then all."""
        sweep = self.sweep_trials()
        if any(t.key not in finals for t in sweep):
            return sweep
        picks = None
        if self.sweep is not None:
            picks = {group: pick["value"] for group, pick in self.picks(finals).items()}
        return sweep + self.main_trials(picks)

    def preview(self) -> list[Trial]:
        """Every trial the plan will run, the swept value shown as not yet picked (``--dry-run``)."""
        return self.sweep_trials() + self.main_trials(None)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None
