"""What an experiment is, and the registry that finds experiments by name.

An experiment is one file in ``normkit/lab/experiments/`` holding a subclass of :class:`Experiment`
decorated with :func:`register`. It declares its settings (a dataclass whose defaults are the full,
paper-like protocol, plus ``presets`` such as ``quick``), the trials to train, how to build each
trial's model and optimizer, what to measure, and how to summarize and report. The runner
(:mod:`normkit.lab.runner`) does the rest: data, seeding, the training loop, metrics.jsonl,
checkpoints, resume and progress.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from normkit.errors import ConfigError

if TYPE_CHECKING:
    from normkit.lab.datasets import Dataset
    from normkit.lab.records import RunRecord
    from normkit.lab.report import Report


@dataclass(frozen=True)
class Settings:
    """Settings every experiment has; experiments subclass this with their own fields."""

    seed: int = 0
    dataset: str = "auto"  # see normkit.lab.datasets.DATASET_NAMES


@dataclass(frozen=True)
class Trial:
    """One network trained inside a run: a unique key, its parameters, and how long to train it."""

    key: str
    params: dict  # JSON-ready; written into every metrics row of the trial
    steps: int
    eval_every: int
    seed: int = 0  # seeds the weights, the batch order and dropout of this trial


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
    sets the learning rates from ``lr_factor`` before it, and measures ``model`` afterwards.
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
        if preset != "full" and preset not in cls.presets:
            raise ConfigError(
                f"{cls.name}: preset {preset!r} is not known; choose one of "
                f"{', '.join(cls.preset_names())}"
            )
        values = dict(cls.presets.get(preset, {}))
        fields = {f.name: f for f in dataclasses.fields(cls.settings_class)}
        for key, value in (overrides or {}).items():
            if key not in fields:
                raise ConfigError(
                    f"{cls.name} has no setting {key!r}; its settings are {', '.join(fields)}"
                )
            default = values.get(key, fields[key].default)
            values[key] = parse_setting(key, value, default)
        return cls.settings_class(**values)

    # -- what to train -----------------------------------------------------------------------
    def prepare_data(self, settings: Settings, dataset: Dataset) -> Dataset:
        """The data set the trials use (a subset, a validation split); by default as loaded."""
        return dataset

    def trials(self, settings: Settings, data: Dataset, finals: dict[str, dict]) -> list[Trial]:
        """The trials of the run, in order. ``finals`` maps each finished trial's key to its final
        metrics row, so a plan can depend on earlier results (a learning-rate sweep, say)."""
        raise NotImplementedError

    def setup(
        self, trial: Trial, settings: Settings, data: Dataset, generator: torch.Generator
    ) -> Setup:
        """Build the trial's model (weights drawn from ``generator``) and optimizer."""
        raise NotImplementedError

    # -- what to measure ---------------------------------------------------------------------
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
        from normkit.lab.evaluation import accuracy_and_loss

        accuracy, loss = accuracy_and_loss(setup.model, data.x_test, data.y_test)
        return {"test_accuracy": accuracy, "test_loss": loss}

    # -- what it means -----------------------------------------------------------------------
    def summarize(self, record: RunRecord) -> dict:
        """The run's results (JSON-ready): the numbers the report places beside the paper's."""
        raise NotImplementedError

    def report(self, record: RunRecord) -> Report:
        """The run's report: figures, tables, the comparison with the paper, deviations."""
        raise NotImplementedError


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


def parse_setting(key: str, value: Any, default: Any) -> Any:
    """A setting given as a string on the command line, converted to the default's type."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            items = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
            if default:
                return tuple(parse_setting(key, v, default[0]) for v in items)
            return tuple(_number_or_string(v) for v in items)
        if default is None:
            return None if value.lower() == "none" else _number_or_string(value)
    except ValueError as error:
        raise ConfigError(
            f"setting {key}={value!r} does not parse as {type(default).__name__} (default {default!r})"
        ) from error
    return value


def _number_or_string(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


_REGISTRY: dict[str, type[Experiment]] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: make an experiment available as ``normkit lab run <cls.name>``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ConfigError(f"two experiments are named {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module in ``normkit.lab.experiments``: a new file there is all it takes."""
    import normkit.lab.experiments as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def experiment_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_experiment(name: str) -> Experiment:
    """An instance of the experiment registered as ``name``."""
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(
            f"no experiment named {name!r}; `normkit lab list` shows them: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]()
