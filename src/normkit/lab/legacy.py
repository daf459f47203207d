"""LEGACY: the contract of experiments not yet ported to Lab v2 (delete when the last one is).

A legacy experiment lists its trials itself (``trials``) and writes its own ``summarize`` and
``report``; the runner, the workers, the lock and the reports treat it like any other. Its
summary.json gets a ``claims`` list made from its checks, each ``inconclusive`` ("legacy
experiment: judged on one run, not over seeds"), so the scoreboard lists it without a confident
verdict it has not earned.

To delete once every experiment is ported: this file, ``normkit/lab/plots.py``, the ``Report``
class in ``normkit/lab/report.py``, and the ``from normkit.lab.legacy import ...`` lines in
``normkit/lab/experiments/``. Porting an experiment: docs/lab.md, "Porting a legacy experiment".
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from normkit.lab.claims import INCONCLUSIVE, roll_up
from normkit.lab.experiment import Setup, register
from normkit.lab.plan import Trial
from normkit.lab.records import RunRecord
from normkit.lab.render import Section, Table
from normkit.lab.report import Report, RunReport
from normkit.lab.settings import Settings, resolve

__all__ = ["Experiment", "Settings", "Setup", "Trial", "register", "seeded_trials"]

LEGACY_REASON = "legacy experiment: judged on one run, not over seeds"


class Experiment:
    """LEGACY base class: ``trials``, ``setup``, ``measure``, ``finish``, ``summarize``, ``report``."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]
    claim: ClassVar[str]
    settings_class: ClassVar[type[Settings]] = Settings
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    divergence_loss: ClassVar[float] = 1e3
    legacy: ClassVar[bool] = True

    @classmethod
    def preset_names(cls) -> list[str]:
        return ["full", *cls.presets]

    @classmethod
    def settings(cls, preset: str = "full", overrides: dict[str, Any] | None = None) -> Settings:
        return resolve(cls.name, cls.settings_class, cls.presets, preset, overrides)

    def prepare_data(self, settings, dataset):
        return dataset

    def trials(self, settings, data, finals: dict[str, dict]) -> list[Trial]:
        raise NotImplementedError

    def preview(self, settings, data) -> list[Trial]:
        return self.trials(settings, data, {})

    def setup(self, trial, settings, data, generator) -> Setup:
        raise NotImplementedError

    def measure(self, trial, settings, setup, data) -> dict:
        from normkit.lab.evaluation import accuracy_and_loss

        x, y, split = data.evaluation_split()
        accuracy, loss = accuracy_and_loss(setup.model, x, y)
        return {f"{split}_accuracy": accuracy, f"{split}_loss": loss}

    def finish(self, trial, settings, setup, data) -> dict:
        from normkit.lab.evaluation import accuracy_and_loss

        accuracy, loss = accuracy_and_loss(setup.model, data.x_test, data.y_test)
        return {"test_accuracy": accuracy, "test_loss": loss}

    def summarize(self, record: RunRecord) -> dict:
        raise NotImplementedError

    def report(self, record: RunRecord) -> Report:
        raise NotImplementedError

    def claims(self, settings) -> list:
        return []

    # -- the adapter to Lab v2 ---------------------------------------------------------------
    def summary(self, record: RunRecord) -> dict:
        summary = self.summarize(record)
        previous, record.summary = record.summary, {**(record.summary or {}), **summary}
        try:
            checks = self.report(record).checks
        finally:
            record.summary = previous
        entries = [_entry(check, self.paper) for check in checks]
        return {**summary, "verdict": roll_up([e["verdict"] for e in entries]), "claims": entries}

    def run_report(self, record: RunRecord) -> RunReport:
        report = self.report(record)
        sections = [Section("Published beside ours", [report.comparison])]
        if report.checks:
            results = {True: "pass", False: "FAIL", None: "n/a"}
            rows = [[c.name, results[c.passed], c.detail] for c in report.checks]
            sections.append(Section("Checks", [
                "A legacy experiment: these checks are judged on one run, not over seeds.",
                Table(["check", "result", "numbers"], rows),
            ]))  # fmt: skip
        return RunReport(report.headline, sections + report.sections, report.deviations)


def _entry(check, paper: str) -> dict:
    outcome = {True: "held", False: "failed", None: "could not be evaluated"}[check.passed]
    return {
        "name": re.sub(r"[^a-z0-9]+", "-", check.name.lower()).strip("-")[:60],
        "quantity": check.name,
        "published": {"text": "see the report", "source": paper, "value": None, "unverified": False},
        "ours": {"text": f"{outcome} on one run: {check.detail}", "n": 1},
        "criterion": None,
        "verdict": INCONCLUSIVE,
        "reason": LEGACY_REASON,
    }


def seeded_trials(arms: dict[str, dict], settings: Settings, seeds: int) -> list[Trial]:
    """One trial per arm and seed, keyed ``ARM/seed=K`` with the arm's params plus ``replicate=K``.

    Seeds are the outer loop, so every arm of seed 0 finishes before seed 1 starts, and seed K of
    every arm draws the same batches (the trial seed is ``settings.seed + K``): arms are paired.
    """
    return [
        Trial(
            f"{arm}/seed={k}",
            {**params, "replicate": k},
            settings.steps,
            settings.eval_every,
            settings.seed + k,
        )
        for k in range(seeds)
        for arm, params in arms.items()
    ]


