"""The runner: trains an experiment's trials into a run folder, on any executor, resumable.

A run folder holds ``config.json`` (the experiment, preset, settings, data, command, how it ran and
the environment), ``metrics.jsonl`` (one JSON row per evaluation, ``"kind": "eval"``, and per
finished trial, ``"kind": "final"``), ``checkpoints/`` while trials are in progress, and once every
trial has finished ``summary.json`` (with its ``claims``) and the report.

The parent process plans the trials, sends segments of them to the executor
(:mod:`normkit.lab.executors`: here, ``--workers N`` processes, or a Dask cluster), and is the only
writer of the folder, under its lock (:mod:`normkit.lab.runfolder`). Each trial is seeded by its
own seed and continues exactly from its state, so the rows are the same for any executor and
after a resume following a kill of the parent or of a worker; at the end metrics.jsonl is put in
plan order, so the finished file is byte-identical to a ``--workers 1`` run with the same torch
threads per worker (and torch build, and device).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from normkit.errors import ConfigError
from normkit.lab.catalog import get_experiment
from normkit.lab.datasets import load_dataset
from normkit.lab.executors import (
    Dask,
    InProcess,
    Processes,
    WorkerLost,
    default_threads,
    usable_cores,
)
from normkit.lab.files import write_json
from normkit.lab.plan import PICKED
from normkit.lab.records import SCHEMA, SCHEMA_VERSION, SUMMARY, RunFolderError, RunRecord
from normkit.lab.report import write_combined_report as _write_combined
from normkit.lab.report import write_run_report as _write_report
from normkit.lab.runfolder import Restored, RunFolder, writing
from normkit.lab.settings import from_json
from normkit.lab.trial import DataSpec, Execution, Task, calibrate, comparable

PROGRESS_S = 5.0  # a segment returns at the first evaluation this long after it started
ATTEMPTS = 3  # a trial whose worker dies this many times stops the run


def default_out(name: str, preset: str) -> Path:
    return Path("runs") / (name if preset == "full" else f"{name}-{preset}")


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: give 1 or more (or leave it out: free cores ÷ workers)")


def _device(device: str | None, amp: bool) -> str:
    device = device or "cpu"
    if device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"--device {device!r}: choose cpu, cuda or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    if amp and device != "cuda":
        raise ConfigError("--amp (bfloat16 autocast) is for --device cuda; drop it on the CPU")
    return device


def _executor(workers: int, scheduler: str | None, threads: int, preload_args: tuple):
    """The executor; worker processes start at once and load the data while the parent does."""
    if scheduler:
        if workers != 1:
            raise ConfigError("--scheduler sends trials to the Dask cluster: drop --workers")
        return Dask(scheduler)
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give 1 or more")
    return None if workers == 1 else Processes(workers, threads, preload_args)


def write_summary(experiment, record: RunRecord, timing: dict) -> None:
    """Summarize the run's rows into summary.json (and ``record.summary``)."""
    summary = {
        "experiment": experiment.name,
        "complete": True,
        "preset": record.config.get("preset"),
        **experiment.summary(record),
        "timing": timing,
    }
    with writing(record.directory / SUMMARY, "`normkit lab report`"):
        write_json(record.directory / SUMMARY, summary)
    record.summary = RunRecord.load(record.directory).summary


def run_experiment(
    name: str,
    preset: str | None = None,
    overrides: dict | None = None,
    *,
    out: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | str = False,
    checkpoint_every_s: float = 10.0,
    command: str | None = None,
    echo: Callable[[str], None] | None = None,
    write_report: bool = True,
    workers: int = 1,
    scheduler: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    amp: bool = False,
) -> RunRecord:
    """Run (or resume) experiment ``name`` into its run folder; returns the finished record.

    Args:
        preset: ``"full"`` (the default for a new run), ``"quick"`` or another preset of the
            experiment; when resuming, None means "as recorded in config.json".
        overrides: settings to change, e.g. ``{"steps": 1000}``; strings are parsed.
        out: the run folder (default ``runs/NAME`` or ``runs/NAME-PRESET``).
        resume: continue the run in ``out``; its settings must match any preset/overrides given.
        overwrite: replace the normkit run in ``out`` (only its own files are deleted).
        progress: ``True``/``"rich"`` for a terminal display, ``"plain"`` for log lines.
        checkpoint_every_s: least time between two checkpoints of a trial (0: every evaluation).
        workers: trials trained at once in worker processes (1: in this process).
        scheduler: the address of a Dask scheduler to send the trials to instead.
        device: ``cpu``, ``cuda`` or ``auto`` (default: as recorded, else ``cpu``).
        threads: torch threads per worker (default: as recorded, else free cores ÷ workers).
        amp: bfloat16 autocast in the training step (CUDA only).
    """
    experiment = get_experiment(name)
    _check_threads(threads)
    echo = echo or (lambda message: None)
    out = Path(out) if out is not None else default_out(name, preset or "full")
    hint = f"`normkit lab run {name} --out {out} --resume`"
    folder = RunFolder(out, hint)
    found = folder.read_config()
    if found is None:
        if resume:
            raise ConfigError(f"nothing to resume in {out} (no config.json); start the run without --resume")
        if folder.foreign_files():
            raise ConfigError(f"{out} exists and is not a lab run; choose an empty or new --out folder")
        experiment.settings(preset or "full", overrides)  # bad settings fail before any file is made
    elif not resume and not overwrite:
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    elif resume and found.get("experiment") != name:
        raise ConfigError(
            f"{out} holds a run of {found.get('experiment')!r}, not {name!r}; resume it with "
            f"`normkit lab run {found.get('experiment')} --out {out} --resume`"
        )
    folder.lock()
    previous_threads = torch.get_num_threads()
    try:
        recorded = folder.read_config()
        if recorded is not None and overwrite and not resume:
            folder.clear()
            recorded = None
        return _run(experiment, folder, recorded, preset, overrides, data_dir, progress,
                    checkpoint_every_s, command, echo, write_report, workers, scheduler, device,
                    threads, amp)  # fmt: skip
    finally:
        folder.unlock()
        torch.set_num_threads(previous_threads)


def _run(experiment, folder, recorded, preset, overrides, data_dir, progress, checkpoint_every_s,
         command, echo, write_report, workers, scheduler, device, threads, amp) -> RunRecord:  # fmt: skip
    out = folder.path
    if recorded is not None:
        settings = from_json(experiment.settings_class, recorded["settings"])
        if preset is not None or overrides:
            asked = experiment.settings(preset or recorded["preset"], overrides)
            if asdict(asked) != asdict(settings):
                differences = {k: (v, asdict(asked)[k]) for k, v in asdict(settings).items()
                               if asdict(asked)[k] != v}  # fmt: skip
                raise ConfigError(
                    f"{out} was run with other settings (recorded, asked): {differences}; resume "
                    "without --preset/--set, or start a new run"
                )
        preset = recorded["preset"]
        ran = recorded.get("execution", {})
        if device is not None and ran and _device(device, amp) != ran.get("device", "cpu"):
            raise ConfigError(f"{out} ran on {ran.get('device')}; resume it there (or drop --device)")
        device = ran.get("device", "cpu") if device is None else device
        amp = amp or ran.get("amp", False)
        if threads is not None and threads != ran.get("threads", recorded.get("torch_threads")):
            echo(f"note: the run used {ran.get('threads', recorded.get('torch_threads'))} torch "
                 f"thread(s); resuming with {threads} may change the rows computed from now on")  # fmt: skip
        threads = threads or ran.get("threads") or recorded.get("torch_threads")
        rule = ran.get("threads_rule", "as recorded")
    else:
        preset = preset or "full"
        settings = experiment.settings(preset, overrides)
        rule = f"--threads {threads}" if threads else ""
    device = _device(device, amp)
    if not threads and scheduler and not os.environ.get("NORMKIT_THREADS"):
        threads, rule = 1, "one per Dask worker process (--threads to change)"
    elif not threads:
        threads, rule = default_threads(workers)
    cores = usable_cores()
    if not scheduler and threads * workers > cores:
        echo(f"note: {workers} worker(s) × {threads} thread(s) is more than the {cores} core(s) "
             "this process may use: the threads will wait on each other (--threads sets threads "
             "per worker)")  # fmt: skip
    torch.set_num_threads(threads)
    data_dir = None if data_dir is None else str(Path(data_dir).resolve())
    executor = _executor(workers, scheduler, threads,
                         (type(experiment), settings, settings.dataset, data_dir, device))  # fmt: skip
    try:
        return _train_run(experiment, folder, recorded, preset, overrides, data_dir, progress,
                          checkpoint_every_s, command, echo, write_report,
                          Execution(threads=threads, device=device, amp=amp),
                          {"workers": workers, "threads": threads, "threads_rule": rule,
                           "device": device, "amp": amp, "scheduler": scheduler,
                           "executor": executor.kind if executor else "in-process"},
                          settings, executor)  # fmt: skip
    finally:
        if executor is not None:
            executor.close()


def _train_run(experiment, folder, recorded, preset, overrides, data_dir, progress,
               checkpoint_every_s, command, echo, write_report, run, execution, settings,
               executor) -> RunRecord:  # fmt: skip
    """Load the data, write the config of a new run, train what is left, summarize, report."""
    name, out = experiment.name, folder.path
    dataset = load_dataset(settings.dataset, data_dir)
    data = experiment.prepare_data(settings, dataset)
    for note in data.notes:
        echo(f"note: {note}")
    if recorded is not None and comparable(recorded["data"]) != comparable(data.describe()):
        raise ConfigError(
            f"{out} was run on other data ({recorded['data']['name']} from {recorded['data']['source']}); "
            f"now it would use {data.name} from {data.source}. Point --data-dir at the original data"
        )
    workers = "Dask" if execution["scheduler"] else execution["workers"]
    echo(f"{name}: {workers} worker(s), {run.threads} torch thread(s) each "
         f"({execution['threads_rule']}), device {run.device}")  # fmt: skip
    if recorded is None:
        from normkit.lab.environment import collect

        folder.write_config({
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "experiment": name, "title": experiment.title, "paper": experiment.paper,
            "preset": preset, "settings": asdict(settings), "data": data.describe(),
            "command": command or _python_command(name, preset, overrides, out),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_threads": run.threads, "execution": execution,
            "environment": collect(check=False),
        })  # fmt: skip
    finished = RunRecord.load(out)
    if finished.complete:  # resuming a finished run: nothing to train, the report is redone
        write_summary(experiment, finished, finished.summary.get("timing", {}))
        if write_report:
            _write_report(finished, experiment)
        return finished
    restored = folder.restore(echo) if recorded is not None else Restored()
    if recorded is None:
        folder.start_fresh()
    spec = DataSpec(settings.dataset, data_dir, data.describe())
    mode = {True: "rich", False: "off"}.get(progress, progress)
    from normkit.lab.progress import TrainingProgress

    started = time.perf_counter()
    with TrainingProgress(mode, name) as display:
        local = executor is None
        executor = InProcess(data) if local else executor
        try:
            keys, seconds = _train(experiment, settings, data, spec, run, folder, executor, restored,
                                   display, checkpoint_every_s)  # fmt: skip
        finally:
            if local:
                executor.close()
    folder.reorder(keys)
    record = RunRecord.load(out)
    timing = {
        "trial_seconds": seconds,
        "total_seconds": sum(seconds.values()),
        "wall_seconds_last_invocation": time.perf_counter() - started,
        "note": "trial seconds are the training wall time kept in the results (work redone after "
        "a resume is not counted twice); trials overlap when several workers run them",
    }
    write_summary(experiment, record, timing)
    if write_report:
        with writing(out / "report.md", "`normkit lab report`"):
            _write_report(record, experiment)
    return record


def _train(experiment, settings, data, spec, execution, folder, executor, restored, display,
           checkpoint_every_s) -> tuple[list[str], dict[str, float]]:  # fmt: skip
    """The parent's loop: keep the executor busy with segments, commit what comes back."""
    finals = dict(restored.finals)
    states = dict(restored.states)
    committed = dict(restored.committed)
    seconds = dict(restored.seconds)
    pending_rows: dict[str, list[dict]] = {}
    last_commit: dict[str, float] = {}
    segment: dict[str, int] = {}
    attempts: dict[str, int] = {}
    step_of: dict[str, int] = {}
    running: dict[object, Task] = {}
    invocation = uuid.uuid4().hex[:12]
    segment_s = min(checkpoint_every_s, PROGRESS_S)

    def show(plan) -> None:
        done = sum(t.steps if t.key in finals else step_of.get(t.key, 0) for t in plan)
        display.plan(sum(t.steps for t in plan), done, len(plan), sum(t.key in finals for t in plan))

    def task_for(trial) -> Task:
        return Task(type(experiment), settings, spec, trial, f"{invocation}/{trial.key}",
                    segment.get(trial.key, 0), states.get(trial.key), segment_s, execution)  # fmt: skip

    while True:
        plan = experiment.trials(settings, data, finals)
        keys = [t.key for t in plan]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"{experiment.name}: trial keys are not unique: {keys}")
        show(plan)
        busy = {task.trial.key for task in running.values()}
        for trial in plan:
            if len(running) >= executor.capacity:
                break
            if trial.key not in finals and trial.key not in busy:
                task = task_for(trial)
                running[executor.submit(task)] = task
                busy.add(trial.key)
        if not running:
            if all(k in finals for k in keys):
                return keys, seconds
            raise ConfigError(f"{experiment.name}: the plan waits on trials it does not list")
        for handle, outcome in executor.wait_any(list(running)):
            task = running.pop(handle)
            key = task.trial.key
            if isinstance(outcome, WorkerLost):
                attempts[key] = attempts.get(key, 0) + 1
                if attempts[key] >= ATTEMPTS:
                    raise RunFolderError(
                        f"trial {key} lost its worker {attempts[key]} times ({outcome}); the run "
                        f"stops with every committed row kept: {folder.resume_hint} continues it"
                    )
                continue  # resent from the last state at the next pass
            if isinstance(outcome, BaseException):
                raise outcome
            result = outcome
            pending_rows.setdefault(key, []).extend(result.rows)
            states[key] = result.state
            seconds[key] = result.seconds
            segment[key] = result.segment + 1
            step_of[key] = result.step
            now = time.monotonic()
            if result.done or now - last_commit.get(key, 0.0) >= checkpoint_every_s:
                rows = pending_rows.pop(key)
                committed[key] = committed.get(key, 0) + len(rows)
                folder.commit(key, rows, None if result.done else result.state, committed[key],
                              result.seconds)  # fmt: skip
                last_commit[key] = now
            if result.done:
                finals[key] = result.rows[-1]
                states.pop(key, None)
            show(plan)
            display.trial(key, result.step, task.trial.steps, result.done)


def rebuild_report(directory: str | os.PathLike) -> tuple[Path, Path]:
    """Recompute summary.json from the rows (keeping the recorded timing) and rewrite the report,
    under the folder's lock (``normkit lab report DIR``)."""
    record = RunRecord.load(directory)
    experiment = get_experiment(record.config["experiment"])
    if not record.complete:
        raise ConfigError(
            f"{record.directory} has not finished; finish it with `normkit lab run "
            f"{record.config['experiment']} --out {record.directory} --resume` first"
        )
    folder = RunFolder(record.directory)
    folder.lock()
    try:
        write_summary(experiment, record, record.summary.get("timing", {}))
        return _write_report(record, experiment)
    finally:
        folder.unlock()


def write_run_report(record: RunRecord, resummarize: bool = False) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into the run's folder."""
    if resummarize:
        return rebuild_report(record.directory)
    return _write_report(record, get_experiment(record.config["experiment"]))


def write_combined_report(directories: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """The scoreboard of every claim of every run, then each run's report, in ``out``."""
    records = []
    for directory in directories:
        rebuild_report(directory)
        records.append(RunRecord.load(directory))
    experiments = [get_experiment(r.config["experiment"]) for r in records]
    return _write_combined(records, experiments, Path(out))


def dry_run(name: str, preset: str | None = None, overrides: dict | None = None, *,
            data_dir=None, workers: int = 1, threads: int | None = None, device: str | None = None,
            budget_s: float = 60.0) -> dict:  # fmt: skip
    """The trial plan and its estimated cost on this machine, without writing anything: each kind
    of trial (arm and grid point) is timed for a few steps and one evaluation."""
    experiment = get_experiment(name)
    settings = experiment.settings(preset or "full", overrides)
    device = _device(device, False)
    _check_threads(threads)
    threads = threads or default_threads(workers)[0]
    data = experiment.prepare_data(settings, load_dataset(settings.dataset, data_dir))
    trials = experiment.preview(settings, data)
    plan = experiment.plan(settings, data)  # None for an experiment that trains nothing
    sweep = plan.sweep if plan is not None else None
    execution = Execution(threads=threads, device=device)
    costs: dict[tuple, tuple[float, float]] = {}
    spent = time.perf_counter()
    rows = []
    for trial in trials:
        params = dict(trial.params)
        if sweep is not None and params.get(sweep.setting) == PICKED:
            params[sweep.setting] = sweep.values[0]
        kind = tuple(sorted((k, str(v)) for k, v in params.items() if k not in ("replicate",)))
        if kind not in costs and time.perf_counter() - spent < budget_s:
            probe = type(trial)(trial.key, params, trial.steps, trial.eval_every, trial.seed)
            costs[kind] = calibrate(experiment, settings, data, probe, execution)
        per_step, per_eval = costs.get(kind) or _mean_cost(costs)
        estimate = trial.steps * per_step + (trial.steps // trial.eval_every + 2) * per_eval
        rows.append({"key": trial.key, "steps": trial.steps, "eval_every": trial.eval_every,
                     "seed": trial.seed, "estimated_s": estimate})  # fmt: skip
    total = sum(r["estimated_s"] for r in rows)
    return {
        "experiment": name, "preset": preset or "full", "settings": asdict(settings),
        "data": data.describe()["name"], "device": device, "threads": threads, "workers": workers,
        "trials": rows, "total_steps": sum(r["steps"] for r in rows),
        "estimated_s_one_worker": total,
        "estimated_s": total / max(1, min(workers, len(rows))),
        "calibrated_kinds": len(costs),
        "note": "each kind of trial timed for 10 steps and one evaluation on this machine; with "
        "several workers the estimate assumes the trials divide evenly",
    }  # fmt: skip


def _mean_cost(costs: dict) -> tuple[float, float]:
    values = list(costs.values()) or [(0.0, 0.0)]
    return sum(v[0] for v in values) / len(values), sum(v[1] for v in values) / len(values)


def _python_command(name: str, preset: str, overrides: dict | None, out: Path) -> str:
    parts = ["normkit", "lab", "run", name]
    if preset != "full":
        parts.append(f"--preset={preset}")
    for key, value in (overrides or {}).items():
        parts.append(f"--set={key}={value}")
    parts.append(f"--out={out}")
    return shlex.join(parts) + f"  # via the Python API, {sys.executable}"
