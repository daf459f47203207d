"""The runner: trains an experiment's trials, seeded and deterministic on the CPU, and resumable.

A run directory holds:

- ``config.json``: the experiment, preset, settings, data set, command and environment;
- ``metrics.jsonl``: one JSON row per evaluation (``"kind": "eval"``) and per finished trial
  (``"kind": "final"``), appended and flushed as training goes;
- ``checkpoint.pt``: written atomically (temporary file, fsync, rename) at most every
  ``checkpoint_every_s`` seconds at an evaluation step and after every trial. It holds the trial in
  progress (model, optimizer, the batch order and its generator, the global RNG, the running loss)
  and the byte length of metrics.jsonl at that moment;
- ``summary.json`` and the report, once every trial has finished (the checkpoint is then removed).

Resume after a kill at any moment (SIGKILL included): metrics.jsonl is cut back to the length the
checkpoint recorded, which drops rows written after it (they are recomputed) and any torn last line,
and training continues from the checkpoint's state. Every source of randomness is restored, so the
recomputed rows, and the final results, are identical to those of a run that was never interrupted:
no row is lost and none is duplicated.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from normkit.errors import ConfigError
from normkit.lab.datasets import Dataset, load_dataset
from normkit.lab.experiment import Experiment, Settings, Setup, Trial, get_experiment
from normkit.lab.files import json_ready, write_atomic, write_json
from normkit.lab.records import CHECKPOINT, CONFIG, METRICS, SUMMARY, RunRecord, read_rows

CHECKPOINT_FORMAT = 1
RESERVED = frozenset({"kind", "trial", "step", "train_loss", "steps", "diverged"})


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, for independent streams (weights, batches, dropout)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)


class _BatchOrder:
    """Mini-batches drawn without replacement from a seeded permutation; a new one every epoch
    (the last incomplete batch of an epoch is dropped, so every step sees ``batch_size`` examples)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if batch_size > size:
            raise ConfigError(f"batch_size={batch_size} exceeds the {size} training examples")
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(size, generator=self.generator)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator)
            self.cursor = 0
        batch = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "cursor": self.cursor}

    def load(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.cursor = state["order"], state["cursor"]


class Runner:
    """Runs one experiment into one directory; see the module docstring."""

    def __init__(
        self,
        experiment: Experiment,
        settings: Settings,
        data: Dataset,
        out: Path,
        *,
        progress=None,
        checkpoint_every_s: float = 10.0,
    ):
        self.experiment, self.settings, self.data, self.out = experiment, settings, data, out
        self.progress = progress
        self.checkpoint_every_s = checkpoint_every_s
        self.seconds: dict[str, float] = {}
        self._last_checkpoint = time.monotonic()
        self._metrics = None

    # -- files -------------------------------------------------------------------------------
    def _append(self, row: dict) -> None:
        line = json.dumps(json_ready(row), allow_nan=False) + "\n"
        self._metrics.write(line.encode("utf-8"))
        self._metrics.flush()

    def _checkpoint(self, trial: str | None, state: dict | None) -> None:
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        payload = {
            "format": CHECKPOINT_FORMAT,
            "trial": trial,
            "state": state,
            "metrics_bytes": self._metrics.tell(),
            "seconds": dict(self.seconds),
        }
        write_atomic(self.out / CHECKPOINT, lambda p: torch.save(payload, p))
        self._last_checkpoint = time.monotonic()

    def _restore(self) -> dict | None:
        """Cut metrics.jsonl back to the checkpoint and return the checkpoint (None: start over)."""
        metrics = self.out / METRICS
        path = self.out / CHECKPOINT
        checkpoint = torch.load(path, weights_only=True) if path.exists() else None
        if checkpoint is not None and checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(
                f"{path} has checkpoint format {checkpoint.get('format')}, not {CHECKPOINT_FORMAT}"
            )
        keep = 0 if checkpoint is None else checkpoint["metrics_bytes"]
        if metrics.exists():
            if metrics.stat().st_size < keep:
                raise ConfigError(
                    f"{metrics} is shorter than its checkpoint records ({keep} bytes); the run "
                    "directory was changed by hand: start a new run with --overwrite"
                )
            with open(metrics, "r+b") as handle:
                handle.truncate(keep)
        if checkpoint is not None:
            self.seconds = dict(checkpoint["seconds"])
        return checkpoint

    # -- the run -----------------------------------------------------------------------------
    def run(self, resume: bool) -> RunRecord:
        checkpoint = self._restore() if resume else None
        if not resume:
            (self.out / METRICS).unlink(missing_ok=True)
        finals = {r["trial"]: r for r in read_rows(self.out / METRICS) if r["kind"] == "final"}
        with open(self.out / METRICS, "ab") as self._metrics:
            while True:
                plan = self.experiment.trials(self.settings, self.data, finals)
                keys = [t.key for t in plan]
                if len(set(keys)) != len(keys):
                    raise ConfigError(f"{self.experiment.name}: trial keys are not unique: {keys}")
                if self.progress is not None:
                    self.progress.plan(
                        total=sum(t.steps for t in plan),
                        done=sum(t.steps for t in plan if t.key in finals),
                    )
                pending = [t for t in plan if t.key not in finals]
                if not pending:
                    break
                trial = pending[0]
                state = None
                if checkpoint is not None and checkpoint["trial"] == trial.key:
                    state = checkpoint["state"]
                checkpoint = None
                finals[trial.key] = self._run_trial(trial, state)
        record = RunRecord.load(self.out)
        timing = {
            "trial_seconds": self.seconds,
            "total_seconds": sum(self.seconds.values()),
            "note": "wall time of the work kept in the results (work redone after a resume is "
            "not double counted)",
        }
        write_summary(self.experiment, record, timing)
        (self.out / CHECKPOINT).unlink(missing_ok=True)
        return record

    def _run_trial(self, trial: Trial, state: dict | None) -> dict:
        clash = RESERVED & set(trial.params)
        if clash:
            raise ConfigError(f"trial {trial.key}: parameter names {sorted(clash)} are reserved")
        torch.manual_seed(derived_seed(trial.seed, 2))
        setup = self.experiment.setup(
            trial,
            self.settings,
            self.data,
            torch.Generator().manual_seed(derived_seed(trial.seed, 0)),
        )
        model, optimizer = setup.model, setup.optimizer
        data = self.data if setup.data is None else setup.data
        loss_fn = nn.functional.cross_entropy if setup.loss_fn is None else setup.loss_fn
        if setup.batch_order is None:
            batches = _BatchOrder(len(data.y_train), setup.batch_size, derived_seed(trial.seed, 1))
        else:
            batches = setup.batch_order(data.y_train, setup.batch_size, derived_seed(trial.seed, 1))
        loss_sum, loss_count, step = torch.zeros((), dtype=torch.float64), 0, 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            batches.load(state["batches"])
            torch.set_rng_state(state["rng"])
            loss_sum, loss_count, step = state["loss_sum"], state["loss_count"], state["step"]
            if self.progress is not None:
                self.progress.advance(step, trial.key)
        else:
            self._evaluate(trial, setup, data, step=0, train_loss=None)
        started = time.perf_counter() - self.seconds.get(trial.key, 0.0)
        x_train, y_train = data.x_train, data.y_train
        diverged, last_train_loss = False, None if state is None else state["train_loss"]
        last_reported = step
        model.train()
        while step < trial.steps:
            if setup.lr_factor is not None:
                factor = setup.lr_factor(step)
                for group, initial in zip(optimizer.param_groups, setup.initial_lrs, strict=True):
                    group["lr"] = initial * factor
            index = batches.next()
            if setup.train_step is not None:
                loss = setup.train_step(x_train[index], y_train[index])
            else:
                loss = loss_fn(model(x_train[index]), y_train[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            loss_sum += loss.detach()
            loss_count += 1
            step += 1
            if step % trial.eval_every == 0 or step == trial.steps:
                last_train_loss = float(loss_sum) / loss_count
                diverged = not last_train_loss <= self.experiment.divergence_loss  # NaN too
                self._evaluate(trial, setup, data, step, last_train_loss)
                loss_sum, loss_count = torch.zeros((), dtype=torch.float64), 0
                self.seconds[trial.key] = time.perf_counter() - started
                if self.progress is not None:
                    self.progress.advance(step - last_reported, trial.key)
                    last_reported = step
                if diverged:
                    break
                if time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s:
                    self._checkpoint(
                        trial.key,
                        {
                            "step": step,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "batches": batches.state(),
                            "rng": torch.get_rng_state(),
                            "loss_sum": loss_sum,
                            "loss_count": loss_count,
                            "train_loss": last_train_loss,
                        },
                    )
        model.eval()
        with torch.no_grad():
            values = self.experiment.finish(trial, self.settings, setup, data)
        final = {
            "kind": "final",
            "trial": trial.key,
            **trial.params,
            "step": step,
            "steps": trial.steps,
            "diverged": diverged,
            "train_loss": last_train_loss,
            **values,
        }
        self._append(final)
        self.seconds[trial.key] = time.perf_counter() - started
        if self.progress is not None:
            self.progress.advance(trial.steps - last_reported, trial.key)
        self._checkpoint(None, None)
        return json.loads(json.dumps(json_ready(final)))

    def _evaluate(
        self, trial: Trial, setup: Setup, data: Dataset, step: int, train_loss: float | None
    ) -> None:
        setup.model.eval()
        setup.step = step
        with torch.no_grad():
            values = self.experiment.measure(trial, self.settings, setup, data)
        setup.model.train()
        self._append(
            {
                "kind": "eval",
                "trial": trial.key,
                **trial.params,
                "step": step,
                "train_loss": train_loss,
                **values,
            }
        )


def write_summary(experiment: Experiment, record: RunRecord, timing: dict) -> None:
    """Summarize the run's rows into summary.json (and ``record.summary``)."""
    summary = {
        "experiment": experiment.name,
        "complete": True,
        **experiment.summarize(record),
        "timing": timing,
    }
    write_json(record.directory / SUMMARY, summary)
    record.summary = json.loads((record.directory / SUMMARY).read_text(encoding="utf-8"))


def default_out(name: str, preset: str) -> Path:
    return Path("runs") / (name if preset == "full" else f"{name}-{preset}")


def run_experiment(
    name: str,
    preset: str | None = None,
    overrides: dict | None = None,
    *,
    out: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    checkpoint_every_s: float = 10.0,
    command: str | None = None,
    echo: Callable[[str], None] | None = None,
    write_report: bool = True,
) -> RunRecord:
    """Run (or resume) experiment ``name`` and write its directory; returns the finished record.

    Args:
        preset: ``"full"`` (the default for a new run), ``"quick"`` or another preset of the
            experiment; when resuming, None means "as recorded in config.json".
        overrides: settings to change, e.g. ``{"steps": 1000}``; strings are parsed.
        out: the run directory (default ``runs/NAME`` or ``runs/NAME-PRESET``).
        resume: continue the run in ``out``; its settings must match any preset/overrides given.
        overwrite: replace a run already in ``out``.
        progress: show a progress bar with ETA on the terminal.
        checkpoint_every_s: least time between two checkpoints inside a trial (0: every evaluation).
    """
    experiment = get_experiment(name)
    echo = echo or (lambda message: None)
    out = Path(out) if out is not None else default_out(name, preset or "full")
    config_path = out / CONFIG
    recorded = None
    if config_path.exists():
        recorded = json.loads(config_path.read_text(encoding="utf-8"))
        if resume:
            if recorded.get("experiment") != name:
                raise ConfigError(
                    f"{out} holds a run of {recorded.get('experiment')!r}, not {name!r}; resume it "
                    f"with `normkit lab run {recorded.get('experiment')} --out {out} --resume`"
                )
        elif overwrite:
            shutil.rmtree(out)
            recorded = None
        else:
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it, --overwrite to replace "
                "it, or choose another --out"
            )
    elif resume:
        raise ConfigError(
            f"nothing to resume in {out} (no {CONFIG}); start the run without --resume"
        )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"{out} exists and is not a lab run; choose an empty or new --out directory"
        )

    if recorded is not None:
        settings = experiment.settings_class(
            **_settings_from_json(experiment, recorded["settings"])
        )
        if preset is not None or overrides:
            asked = experiment.settings(preset or recorded["preset"], overrides)
            if asdict(asked) != asdict(settings):
                differences = {
                    k: (v, asdict(asked)[k])
                    for k, v in asdict(settings).items()
                    if asdict(asked)[k] != v
                }
                raise ConfigError(
                    f"{out} was run with other settings (recorded, asked): {differences}; resume "
                    "without --preset/--set, or start a new run"
                )
        preset = recorded["preset"]
        torch.set_num_threads(recorded["torch_threads"])
    else:
        preset = preset or "full"
        settings = experiment.settings(preset, overrides)

    dataset = load_dataset(settings.dataset, data_dir)
    data = experiment.prepare_data(settings, dataset)
    for note in data.notes:
        echo(f"note: {note}")
    if recorded is not None and _comparable(recorded["data"]) != _comparable(data.describe()):
        raise ConfigError(
            f"{out} was run on other data ({recorded['data']['name']} from {recorded['data']['source']}); "
            f"now it would use {data.name} from {data.source}. Point --data-dir at the original data"
        )
    if recorded is None:
        out.mkdir(parents=True, exist_ok=True)
        from normkit.lab.environment import collect

        write_json(
            config_path,
            {
                "experiment": name,
                "title": experiment.title,
                "paper": experiment.paper,
                "preset": preset,
                "settings": asdict(settings),
                "data": data.describe(),
                "command": command or _python_command(name, preset, overrides, out),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "torch_threads": torch.get_num_threads(),
                "environment": collect(check=False),
            },
        )

    from normkit.lab.progress import TrainingProgress

    finished = RunRecord.load(out)
    if finished.complete:  # resuming a finished run: nothing to train, the report is redone
        record = finished
        write_summary(experiment, record, record.summary.get("timing", {}))
        if write_report:
            from normkit.lab.report import write_run_report

            write_run_report(record)
        return record
    with TrainingProgress(enabled=progress, title=name) as bar:
        runner = Runner(
            experiment, settings, data, out, progress=bar, checkpoint_every_s=checkpoint_every_s
        )
        record = runner.run(resume=recorded is not None)
    if write_report:
        from normkit.lab.report import write_run_report

        write_run_report(record)
    return record


def _comparable(description: dict) -> dict:
    return {k: description[k] for k in ("name", "train", "validation", "test", "sample_shape")}


def _settings_from_json(experiment: Experiment, values: dict) -> dict:
    """JSON turned tuples into lists; turn them back so settings compare equal."""
    from dataclasses import fields

    result = dict(values)
    for f in fields(experiment.settings_class):
        if isinstance(f.default, tuple) and isinstance(result.get(f.name), list):
            result[f.name] = tuple(result[f.name])
    return result


def _python_command(name: str, preset: str, overrides: dict | None, out: Path) -> str:
    parts = ["normkit", "lab", "run", name]
    if preset != "full":
        parts.append(f"--preset={preset}")
    for key, value in (overrides or {}).items():
        parts.append(f"--set={key}={value}")
    parts.append(f"--out={out}")
    return shlex.join(parts) + f"  # via the Python API, {sys.executable}"
