"""What an experiment is: its science, declared; the framework does the rest.

An experiment is one file in ``normkit/lab/experiments/`` holding a subclass of :class:`Experiment`
decorated with :func:`register` (docs/lab.md, "Writing an experiment"). It declares:

- the protocol, in the module docstring (paper, section/figure, every decision where it is silent);
- ``settings_class`` (a frozen dataclass whose defaults are the full protocol) and ``presets``
  (``quick``, ``tiny``, ``gpu``: overrides of the defaults);
- :meth:`plan`: the arms, seeds, grid and sweep (:mod:`normkit.lab.plan`);
- :meth:`setup`: a trial's model and optimizer; :meth:`measure` and :meth:`finish`: what to record;
- :meth:`claims` (:mod:`normkit.lab.claims`), :meth:`figures` (:mod:`normkit.lab.figures`),
  :meth:`deviations`, and at most one :meth:`extra_section`.

The framework turns these into trials, metrics rows, summary.json (with its ``claims``), the report
and the scoreboard; experiments import neither each other nor the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from normkit.errors import ConfigError
from normkit.lab.claims import INCONCLUSIVE, Claim, judge, roll_up
from normkit.lab.datasets import Dataset, subset
from normkit.lab.plan import Plan, Trial
from normkit.lab.render import Section, Table, fmt
from normkit.lab.report import RunReport, claims_card
from normkit.lab.results import Results
from normkit.lab.settings import Settings, from_json, resolve

if TYPE_CHECKING:
    from normkit.lab.figures import FigureSpec
    from normkit.lab.records import RunRecord


@dataclass
class Setup:
    """What a trial trains: a model, its optimizer, the batch size and an optional LR schedule.

    ``lr_factor(step)`` multiplies each parameter group's initial learning rate before the step.
    ``loss_fn(outputs, targets)`` is the training loss (default: cross-entropy), and ``data`` the
    data set this trial trains and is measured on when it is not the run's (default: the run's),
    e.g. synthetic regression data for one network of an experiment that otherwise uses images.
    ``step`` is the number of training steps taken, kept up to date by the runner before every
    call of ``measure`` (so a measurement can seed what it draws by the step, across a resume).
    ``batch_order(labels, batch_size, seed)`` replaces the runner's batch order (shuffled, without
    replacement) with another one, e.g. non-i.i.d. batches of label pairs; it returns an object with
    ``next()`` (the indices of the next batch), ``state()`` and ``load(state)`` (for checkpoints).
    ``train_step(x, y)`` replaces the runner's step (forward, ``loss_fn``, backward, optimizer
    step) and returns the batch's loss, e.g. to train across several processes; the runner still
    sets the learning rates from ``lr_factor`` before it, and measures ``model`` afterwards. If it
    has a ``close()``, the runner calls it when the trial ends or is set aside.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch_size: int
    lr_factor: Callable[[int], float] | None = None
    initial_lrs: list[float] = field(default_factory=list)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    data: Dataset | None = None
    step: int = 0
    batch_order: Callable[[torch.Tensor, int, int], Any] | None = None
    train_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        self.initial_lrs = [group["lr"] for group in self.optimizer.param_groups]


class Experiment:
    """Base class of the lab's experiments; see the module docstring for the contract."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]  # citation with section/figure
    claim: ClassVar[str]  # the published claim being measured, in one or two sentences
    settings_class: ClassVar[type[Settings]] = Settings
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # preset name -> overrides of the defaults
    # A trial stops, marked diverged, when its mean training loss over an evaluation interval is
    # NaN/Inf or above this (cross-entropy starts near ln(classes) = 2.3; 1000 is far past useful).
    divergence_loss: ClassVar[float] = 1e3

    # -- settings ----------------------------------------------------------------------------
    @classmethod
    def preset_names(cls) -> list[str]:
        return ["full", *cls.presets]

    @classmethod
    def settings(cls, preset: str = "full", overrides: dict[str, Any] | None = None) -> Settings:
        """The settings of ``preset`` with ``overrides`` applied (values parsed from strings)."""
        return resolve(cls.name, cls.settings_class, cls.presets, preset, overrides)

    # -- the science: what an experiment file defines ----------------------------------------
    def prepare_data(self, settings: Settings, dataset: Dataset) -> Dataset:
        """The data set the trials use (a subset, a validation split); by default as loaded."""
        return dataset

    def plan(self, settings: Settings, data: Dataset | None) -> Plan | None:
        """The arms, seeds, grid and sweep (None: nothing is trained). ``data`` is None when only
        the plan's shape is needed (reports, ``normkit lab show``): use it only inside functions
        such as ``steps``."""
        raise NotImplementedError

    def setup(
        self, trial: Trial, settings: Settings, data: Dataset, generator: torch.Generator
    ) -> Setup:
        """Build the trial's model (weights drawn from ``generator``) and optimizer."""
        raise NotImplementedError

    def measure(self, trial: Trial, settings: Settings, setup: Setup, data: Dataset) -> dict:
        """Values for a metrics row at an evaluation step (the model is in eval mode, no grad).

        By default: accuracy and loss on the validation split if there is one, else the test set.
        """
        from normkit.lab.evaluation import accuracy_and_loss

        x, y, split = data.evaluation_split()
        accuracy, loss = accuracy_and_loss(setup.model, x, y)
        return {f"{split}_accuracy": accuracy, f"{split}_loss": loss}

    def finish(self, trial: Trial, settings: Settings, setup: Setup, data: Dataset) -> dict:
        """Values for the trial's final row (eval mode, no grad): accuracy on the whole test set."""
        from normkit.lab.evaluation import on_test_set

        return on_test_set(setup.model, data)

    def claims(self, settings: Settings) -> list[Claim]:
        """The published claims this experiment tests, each declared once."""
        return []

    def figures(self, settings: Settings) -> list[FigureSpec]:
        """The report's figures (and mean tables), from :mod:`normkit.lab.figures`."""
        return []

    def deviations(self, settings: Settings) -> list[str]:
        """Where this protocol departs from the paper's, one sentence each."""
        return []

    def extra_section(self, results: Results) -> Section | None:
        """At most one short section of the experiment's own (a table the shared types lack)."""
        return None

    # -- the framework: not overridden -------------------------------------------------------
    def trials(self, settings: Settings, data: Dataset | None, finals: dict[str, dict]) -> list[Trial]:
        """The trials to run, given the finished ones (the sweep first, then the main trials); none
        where :meth:`plan` is None (an experiment that trains nothing)."""
        plan = self.plan(settings, data)
        return [] if plan is None else plan.trials(finals)

    def preview(self, settings: Settings, data: Dataset | None) -> list[Trial]:
        plan = self.plan(settings, data)
        return [] if plan is None else plan.preview()

    def results(self, record: RunRecord) -> Results:
        settings = from_json(self.settings_class, record.settings)
        plan = self.plan(settings, None)
        labels = {} if plan is None else {arm.name: arm.legend for arm in plan.arms}
        return Results(record, settings, labels)

    def summary(self, record: RunRecord) -> dict:
        """summary.json's content: the experiment's verdict, its claims and its sweeps."""
        results = self.results(record)
        summary = summarize([j.entry() for j in judge(self.claims(results.settings), results)])
        plan = self.plan(results.settings, None)
        if plan is None:  # nothing was trained: no sweep
            return summary
        if plan.sweep is not None and all(t.key in record.finals() for t in plan.sweep_trials()):
            sweep = plan.sweep
            summary["sweeps"] = [
                {
                    "setting": sweep.setting,
                    "group": dict(zip(sweep.by, group, strict=True)),
                    "rule": sweep.rule.description,
                    "value": pick["value"],
                    "note": pick["note"],
                    "table": [{"value": v, **cell} for v, cell in pick["table"].items()],
                }
                for group, pick in plan.picks(record.finals()).items()
            ]
        return summary

    def run_report(self, record: RunRecord) -> RunReport:
        """The run's report: the claims card, the figures, the sweep, the extra section."""
        results = self.results(record)
        entries = record.summary["claims"]
        sections = [Section("Claims", [claims_card(entries)])]
        blocks = [spec.block(results) for spec in self.figures(results.settings)]
        if blocks:
            sections.append(Section("Figures", blocks))
        for sweep in record.summary.get("sweeps", []):
            metric = next(k for k in sweep["table"][0] if k not in ("value", "diverged"))
            group = ", ".join(f"{k} {v}" for k, v in sweep["group"].items())
            sections.append(Section(
                f"Sweep of {sweep['setting']}" + (f" ({group})" if group else ""),
                [f"Rule: {sweep['rule']}. Picked **{sweep['value']:g}**"
                 + (f" ({sweep['note']})." if sweep["note"] else "."),
                 Table([sweep["setting"], f"final {metric}", "diverged"],
                       [[fmt(c["value"], "g"), fmt(c[metric], ".4f"), fmt(c["diverged"])]
                        for c in sweep["table"]])],
            ))  # fmt: skip
        extra = self.extra_section(results)
        if extra is not None:
            sections.append(extra)
        return RunReport(headline(record.summary), sections, self.deviations(results.settings))


def training_subset(experiment: Experiment, settings: Settings, dataset: Dataset) -> Dataset:
    """A :meth:`Experiment.prepare_data` (``prepare_data = training_subset``) for a setting
    ``train_examples``: a seeded, class-balanced subset of that many training examples."""
    return subset(dataset, settings.train_examples, settings.seed)


def summarize(entries: list[dict], **extra) -> dict:
    """summary.json's content from claim entries: the verdict (their :func:`roll_up`), the entries
    as ``claims``, then ``extra``."""
    return {"verdict": roll_up([e["verdict"] for e in entries]), "claims": entries, **extra}


def headline(summary: dict) -> str:
    """``partly: 2 reproduced, 1 inconclusive (too few seeds) of 3 claims``."""
    entries = summary.get("claims", [])
    judged = [e for e in entries if e["verdict"] is not None]
    if not judged:
        return "no claim judged"
    counts: dict[str, int] = {}
    for entry in judged:
        counts[entry["verdict"]] = counts.get(entry["verdict"], 0) + 1
    reasons = sorted({e["reason"].split(" (")[0] for e in judged if e["verdict"] == INCONCLUSIVE})
    parts = [f"{n} {v}" + (f" ({'; '.join(reasons)})" if v == INCONCLUSIVE else "")
             for v, n in counts.items()]  # fmt: skip
    return f"{summary.get('verdict')}: {', '.join(parts)} of {len(judged)} claims"


# Every registered experiment class by name; normkit.lab.catalog reads it.
REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make an experiment available as ``normkit lab run <cls.name>``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ConfigError(f"two experiments are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls
