"""The lab's performance targets: the runner's training step against a plain PyTorch loop, the
trials per minute of ``--workers 2`` against ``--workers 1``, and the wall time of the full
ioffe2015-mnist.

1. Step overhead: the Fig. 1 MLP with BN (784-100-100-100-10, batch 60, SGD) trained for ``--steps``
   steps by (a) a plain loop (epoch permutation, index, forward, loss, backward, step) and (b) the
   lab's runner with everything it adds to a step: its batch order, the running loss, a metrics row
   every 250 steps, the progress callback and checkpoints every 10 s. The experiment's
   measurements are switched off in (b), since a plain loop has none. Both alternate over
   ``--rounds`` rounds in one process; the median ratio (b)/(a) is the overhead (target ≤ 1.10).
2. ``--workers``: a multi-trial quick experiment (``--experiment``, default placement: a sweep
   of 2 arms × 3 rates, then 2 arms × 3 seeds) run with ``workers=1`` and ``workers=2``, one
   torch thread per worker, alternated over ``--worker-rounds`` rounds; trials per minute of wall
   time, worker start-up included (target on 2 cores: ≥ 1.6×). The machine's load average is
   recorded before and after each run.
3. ``--full``: time ``normkit lab run ioffe2015-mnist`` (full preset) end to end.

Run: ``.venv/bin/python benchmarks/bench_lab.py [--steps 3000] [--rounds 5] [--threads N]
[--workers] [--full]``; writes benchmarks/results/bench_lab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from normkit.lab.datasets import load_dataset
from normkit.lab.executors import InProcess
from normkit.lab.experiment import Experiment, Setup
from normkit.lab.models import initialize, mlp
from normkit.lab.plan import Arm, Plan
from normkit.lab.progress import TrainingProgress
from normkit.lab.runfolder import Restored, RunFolder
from normkit.lab.runner import _train, run_experiment
from normkit.lab.settings import Settings
from normkit.lab.trial import DataSpec, Execution

BATCH, LR, EVAL_EVERY = 60, 0.5, 250


def _model(features: int, classes: int) -> nn.Module:
    model = mlp(features, (100, 100, 100), classes, activation="sigmoid", norm="batch")
    initialize(model, "gaussian:0.01", torch.Generator().manual_seed(0))
    return model


def plain_loop(data, steps: int) -> tuple[float, float]:
    """Seconds for ``steps`` steps of the plainest loop that trains the same model the same way."""
    model = _model(data.features, data.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(1)
    x, y = data.x_train, data.y_train
    order, cursor = torch.randperm(len(y), generator=generator), 0
    start, cpu = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(steps):
        if cursor + BATCH > len(y):
            order, cursor = torch.randperm(len(y), generator=generator), 0
        index = order[cursor : cursor + BATCH]
        cursor += BATCH
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, time.process_time() - cpu


@dataclass(frozen=True)
class _StepSettings(Settings):
    steps: int = 1000


class _StepsOnly(Experiment):
    """The Fig. 1 BN network with the runner's bookkeeping and no measurements."""

    name = "bench-steps"
    title = paper = claim = "benchmark"
    settings_class = _StepSettings

    def plan(self, settings, data):
        return Plan([Arm("bn", {"network": "bn"})], settings.steps, eval_every=EVAL_EVERY)

    def setup(self, trial, settings, data, generator):
        model = _model(data.features, data.classes)
        return Setup(model, torch.optim.SGD(model.parameters(), lr=LR), BATCH)

    def measure(self, trial, settings, setup, data):
        return {}

    def finish(self, trial, settings, setup, data):
        return {}


def runner_loop(data, steps: int) -> tuple[float, float]:
    """The parent's loop on one worker in this process: segments, rows committed with their
    checkpoints every 10 s, the progress display (off), as ``normkit lab run`` does."""
    with tempfile.TemporaryDirectory() as directory:
        folder = RunFolder(Path(directory))
        folder.lock()
        try:
            spec = DataSpec("auto", None, data.describe())
            execution = Execution(threads=torch.get_num_threads())
            start, cpu = time.perf_counter(), time.process_time()
            with TrainingProgress("off", "bench") as display:
                _train(_StepsOnly(), _StepSettings(steps=steps), data, spec, execution, folder,
                       InProcess(data), Restored(), display, 10.0)  # fmt: skip
            return time.perf_counter() - start, time.process_time() - cpu
        finally:
            folder.unlock()


def workers_round(experiment: str, workers: int, data_dir) -> dict:
    """One quick run of ``experiment`` with ``workers`` workers of one thread each."""
    with tempfile.TemporaryDirectory() as directory:
        load_before = os.getloadavg()
        start = time.perf_counter()
        record = run_experiment(experiment, "quick", out=Path(directory) / "run", workers=workers,
                                threads=1, data_dir=data_dir, write_report=False)  # fmt: skip
        seconds = time.perf_counter() - start
        trials = len(record.finals())
        return {"workers": workers, "seconds": seconds, "trials": trials,
                "trials_per_minute": trials / seconds * 60, "load_before": load_before,
                "load_after": os.getloadavg(), "data": record.config["data"]["name"],
                "metrics": (Path(directory) / "run" / "metrics.jsonl").read_bytes()}  # fmt: skip


def _timed_segment(task, spool):
    """A whole trial in one segment, with the worker's CPU seconds and wall seconds for it."""
    from normkit.lab.trial import run_segment

    cpu, wall = time.process_time(), time.perf_counter()
    run_segment(task)
    return time.process_time() - cpu, time.perf_counter() - wall


def worker_cpu(experiment: str, workers: int) -> dict:
    """The CPU seconds the trials of ``experiment``'s quick preset cost inside the worker
    processes, against the wall time: what the machine's other load cannot change."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from normkit.lab import get_experiment
    from normkit.lab.executors import Processes
    from normkit.lab.trial import DataSpec, Execution, Task

    lab = get_experiment(experiment)
    settings = lab.settings("quick")
    data = lab.prepare_data(settings, load_dataset(settings.dataset))
    spec = DataSpec(settings.dataset, None, data.describe())
    executor = Processes(workers, 1, (type(lab), settings, settings.dataset, None, "cpu"))
    start, cpu, pending, running = time.perf_counter(), 0.0, lab.trials(settings, data, {}), {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                trial = pending.pop(0)
                task = Task(type(lab), settings, spec, trial, "bench/" + trial.key, 0, None, 1e9,
                            Execution(threads=1))  # fmt: skip
                pool = executor._pools[len(running) % workers]
                running[pool.submit(_timed_segment, task, executor._spool)] = trial
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                cpu += future.result()[0]
                running.pop(future)
    finally:
        executor.close()
    return {"workers": workers, "cpu_seconds": cpu, "wall_seconds": time.perf_counter() - start,
            "load": os.getloadavg()}  # fmt: skip


def workers_benchmark(experiment: str, rounds: int, data_dir=None) -> dict:
    runs = []
    for _ in range(rounds):
        for workers in (1, 2):
            runs.append(workers_round(experiment, workers, data_dir))
            r = runs[-1]
            print(f"{experiment} quick, --workers {workers}: {r['trials']} trials in {r['seconds']:.1f} s "
                  f"= {r['trials_per_minute']:.2f} trials/min (load {r['load_before'][0]:.1f} → "
                  f"{r['load_after'][0]:.1f})")  # fmt: skip
    identical = len({r.pop("metrics") for r in runs}) == 1
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
    ratios = [two["trials_per_minute"] / one["trials_per_minute"] for one, two in pairs]
    print(f"--workers 2 / --workers 1: {statistics.median(ratios):.2f}× trials per minute (rounds "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); metrics.jsonl identical: {identical}; "
          "target >= 1.6")  # fmt: skip
    cpu = [worker_cpu(experiment, w) for w in (1, 2)]
    for c in cpu:
        print(f"--workers {c['workers']}: the trials cost {c['cpu_seconds']:.1f} CPU s in the workers, "
              f"{c['wall_seconds']:.1f} s of wall time (load {c['load'][0]:.1f})")  # fmt: skip
    return {"experiment": experiment, "runs": runs, "ratios": ratios, "cpu": cpu,
            "ratio_median": statistics.median(ratios), "identical_metrics": identical}  # fmt: skip


def full_run() -> dict:
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        record = run_experiment("ioffe2015-mnist", "full", out=Path(directory) / "run")
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "training_seconds": record.summary["timing"]["total_seconds"],
            "verdict": record.summary["verdict"],
            "data": record.config["data"]["name"],
        }


def step_overhead(data, steps: int, rounds: int) -> dict:
    plain_loop(data, 200), runner_loop(data, 200)  # warm-up
    plain, instrumented = [], []
    for round_ in range(rounds):
        plain.append(plain_loop(data, steps))
        instrumented.append(runner_loop(data, steps))
        (a_wall, a_cpu), (b_wall, b_cpu) = (
            (v / steps * 1e3 for v in plain[-1]),
            (v / steps * 1e3 for v in instrumented[-1]),
        )
        print(
            f"round {round_ + 1} (ms/step): plain {a_wall:.3f} (CPU {a_cpu:.3f}), "
            f"runner {b_wall:.3f} (CPU {b_cpu:.3f})"
        )
    wall = [b[0] / a[0] for a, b in zip(plain, instrumented, strict=True)]
    cpu = [b[1] / a[1] for a, b in zip(plain, instrumented, strict=True)]

    def per_step(runs, which):
        return statistics.median(r[which] for r in runs) / steps * 1e3

    result = {
        "steps": steps,
        "rounds": rounds,
        "plain_ms_per_step": per_step(plain, 0),
        "runner_ms_per_step": per_step(instrumented, 0),
        "plain_cpu_ms_per_step": per_step(plain, 1),
        "runner_cpu_ms_per_step": per_step(instrumented, 1),
        "ratio_median": statistics.median(wall),
        "ratios": wall,
        "cpu_ratio_median": statistics.median(cpu),
        "cpu_ratios": cpu,
    }
    print(f"\n| loop | wall ms/step | CPU ms/step |  (medians of {rounds} rounds)\n|---|---:|---:|")
    print(f"| plain PyTorch | {result['plain_ms_per_step']:.3f} | {result['plain_cpu_ms_per_step']:.3f} |")
    print(f"| lab runner | {result['runner_ms_per_step']:.3f} | {result['runner_cpu_ms_per_step']:.3f} |")
    print(
        f"runner / plain: wall {result['ratio_median']:.3f} (rounds {', '.join(f'{r:.3f}' for r in wall)}), "
        f"CPU {result['cpu_ratio_median']:.3f} (rounds {', '.join(f'{r:.3f}' for r in cpu)}); target <= 1.10"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="also time the full ioffe2015-mnist")
    parser.add_argument("--workers", action="store_true", help="also compare --workers 2 with 1")
    parser.add_argument("--experiment", default="placement", help="the --workers experiment")
    parser.add_argument("--worker-rounds", type=int, default=2)
    parser.add_argument("--skip-steps", action="store_true", help="skip the step-overhead rounds")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--out", default="benchmarks/results/bench_lab.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("auto")
    print(
        f"data: {data.name} ({len(data.y_train)} training examples); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()}"
    )
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if not args.skip_steps:
        result.update(step_overhead(data, args.steps, args.rounds))
    if args.workers:
        result["workers"] = workers_benchmark(args.experiment, args.worker_rounds)
    result["load_average_at_end"] = os.getloadavg()
    if args.full:
        result["full_ioffe2015_mnist"] = full_run()
        full = result["full_ioffe2015_mnist"]
        print(
            f"full ioffe2015-mnist on {full['data']}: {full['seconds'] / 60:.1f} min wall "
            f"({full['training_seconds'] / 60:.1f} min training); target <= 8 min"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
