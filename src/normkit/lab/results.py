"""A finished run's trials, grouped the way claims and figures ask for them.

:class:`Results` reads a :class:`~normkit.lab.records.RunRecord`: each trial's params, final row and
evaluation curve, selected by params (``arm="bn"``, ``batch_per_device=2``) and grouped by seed
(``replicate``). A selection value may be a function of the settings, e.g.
``batch_per_device=lambda s: min(s.batch_sizes)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from normkit.lab.records import RunRecord
from normkit.lab.settings import Settings


@dataclass
class TrialResult:
    """One finished trial: its key, params, final row and evaluation rows (in step order)."""

    key: str
    params: dict  # the final row: the trial's params and its final measurements
    final: dict
    curve: list[dict]

    @property
    def replicate(self) -> int:
        return self.params.get("replicate", 0)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``metric`` over the evaluations that recorded it."""
        rows = [r for r in self.curve if r.get(metric) is not None]
        return [r["step"] for r in rows], [r[metric] for r in rows]


class Results:
    """The trials of a run; ``settings`` is the run's settings object, ``labels`` the arms' legends."""

    def __init__(self, record: RunRecord, settings: Settings, labels: dict[str, str] | None = None):
        self.record, self.settings = record, settings
        self.labels = labels or {}
        curves: dict[str, list[dict]] = {}
        for row in record.rows:
            if row["kind"] == "eval":
                curves.setdefault(row["trial"], []).append(row)
        # a final row holds the trial's params beside its measurements; selections match on it
        self.all = [
            TrialResult(key, final, final, curves.get(key, []))
            for key, final in record.finals().items()
        ]

    @property
    def preset(self) -> str:
        return self.record.config.get("preset", "full")

    def label(self, arm: str) -> str:
        return self.labels.get(arm, arm)

    def resolve(self, where: dict[str, Any]) -> dict[str, Any]:
        """``where`` with any value given as a function of the settings evaluated."""
        return {k: v(self.settings) if callable(v) else v for k, v in where.items()}

    def trials(self, phase: str = "main", **where) -> list[TrialResult]:
        """The finished trials of ``phase`` whose params match ``where``, in the order they ran."""
        where = self.resolve(where)
        return [
            t
            for t in self.all
            if t.params.get("phase", "main") == phase
            and all(t.params.get(k) == v for k, v in where.items())
        ]

    def by_seed(self, **where) -> dict[int, list[TrialResult]]:
        """The main trials matching ``where``, grouped by replicate."""
        groups: dict[int, list[TrialResult]] = {}
        for trial in self.trials(**where):
            groups.setdefault(trial.replicate, []).append(trial)
        return dict(sorted(groups.items()))

    def values(self, name: str, **where) -> list:
        """The distinct values of parameter ``name`` among the matching main trials, in run order."""
        return list(dict.fromkeys(t.params.get(name) for t in self.trials(**where)))

    def one(self, trials: list[TrialResult], what: str) -> TrialResult:
        if len(trials) != 1:
            keys = [t.key for t in trials]
            raise ValueError(f"{what} selects {len(trials)} trials of one seed, not 1: {keys}")
        return trials[0]


Where = dict[str, Any | Callable[[Settings], Any]]
