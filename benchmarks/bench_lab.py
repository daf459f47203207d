"""The lab's performance targets: the runner's training step against a plain PyTorch loop, and the
wall time of the full ioffe2015-mnist (both networks, 50,000 steps each, plus the baseline's
learning-rate sweep).

1. Step overhead: the Fig. 1 MLP with BN (784-100-100-100-10, batch 60, SGD) trained for ``--steps``
   steps by (a) a plain loop (epoch permutation, index, forward, loss, backward, step) and (b) the
   lab's runner with everything it adds to a step: its batch order, the running loss, a metrics row
   every 250 steps, the progress callback and checkpoints every 10 s. The experiment's
   measurements are switched off in (b), since a plain loop has none. Both alternate over
   ``--rounds`` rounds in one process; the median ratio (b)/(a) is the overhead (target ≤ 1.10).
2. ``--full``: time ``normkit lab run ioffe2015-mnist`` (full preset) end to end (target ≤ 8 min).

Run: ``.venv/bin/python benchmarks/bench_lab.py [--steps 3000] [--rounds 5] [--threads N] [--full]``;
writes
benchmarks/results/bench_lab.json.
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
from normkit.lab.experiment import Experiment, Settings, Setup, Trial
from normkit.lab.models import initialize, mlp
from normkit.lab.runner import Runner, run_experiment

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

    def trials(self, settings, data, finals):
        return [Trial("bn", {"network": "bn"}, settings.steps, EVAL_EVERY, 0)]

    def setup(self, trial, settings, data, generator):
        model = _model(data.features, data.classes)
        return Setup(model, torch.optim.SGD(model.parameters(), lr=LR), BATCH)

    def measure(self, trial, settings, setup, data):
        return {}

    def finish(self, trial, settings, setup, data):
        return {}

    def summarize(self, record):
        return {}


class _CountingProgress:
    def plan(self, total, done):
        self.total = total

    def advance(self, steps, trial):
        pass


def runner_loop(data, steps: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "config.json").write_text('{"settings": {}}')
        runner = Runner(
            _StepsOnly(),
            _StepSettings(steps=steps),
            data,
            Path(directory),
            progress=_CountingProgress(),
        )
        start, cpu = time.perf_counter(), time.process_time()
        runner.run(resume=False)
        return time.perf_counter() - start, time.process_time() - cpu


def full_run() -> dict:
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        record = run_experiment("ioffe2015-mnist", "full", out=Path(directory) / "run")
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "training_seconds": record.summary["timing"]["total_seconds"],
            "final_test_accuracy": record.summary["final_test_accuracy"],
            "data": record.config["data"]["name"],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="also time the full ioffe2015-mnist")
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
    plain_loop(data, 200), runner_loop(data, 200)  # warm-up
    plain, instrumented = [], []
    for round_ in range(args.rounds):
        plain.append(plain_loop(data, args.steps))
        instrumented.append(runner_loop(data, args.steps))
        (a_wall, a_cpu), (b_wall, b_cpu) = (
            (v / args.steps * 1e3 for v in plain[-1]),
            (v / args.steps * 1e3 for v in instrumented[-1]),
        )
        print(
            f"round {round_ + 1} (ms/step): plain {a_wall:.3f} (CPU {a_cpu:.3f}), "
            f"runner {b_wall:.3f} (CPU {b_cpu:.3f})"
        )
    wall = [b[0] / a[0] for a, b in zip(plain, instrumented, strict=True)]
    cpu = [b[1] / a[1] for a, b in zip(plain, instrumented, strict=True)]

    def per_step(runs, which):
        return statistics.median(r[which] for r in runs) / args.steps * 1e3

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_at_end": os.getloadavg(),
        "steps": args.steps,
        "rounds": args.rounds,
        "plain_ms_per_step": per_step(plain, 0),
        "runner_ms_per_step": per_step(instrumented, 0),
        "plain_cpu_ms_per_step": per_step(plain, 1),
        "runner_cpu_ms_per_step": per_step(instrumented, 1),
        "ratio_median": statistics.median(wall),
        "ratios": wall,
        "cpu_ratio_median": statistics.median(cpu),
        "cpu_ratios": cpu,
    }
    print(
        f"\n| loop | wall ms/step | CPU ms/step |  (medians of {args.rounds} rounds)\n|---|---:|---:|"
    )
    print(
        f"| plain PyTorch | {result['plain_ms_per_step']:.3f} | {result['plain_cpu_ms_per_step']:.3f} |"
    )
    print(
        f"| lab runner | {result['runner_ms_per_step']:.3f} | {result['runner_cpu_ms_per_step']:.3f} |"
    )
    print(
        f"runner / plain: wall {result['ratio_median']:.3f} (rounds {', '.join(f'{r:.3f}' for r in wall)}), "
        f"CPU {result['cpu_ratio_median']:.3f} (rounds {', '.join(f'{r:.3f}' for r in cpu)}); target <= 1.10"
    )
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
