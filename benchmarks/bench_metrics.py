"""The cost of normkit.lab.metrics in training steps: ``ics`` and ``landscape_probe`` against one
training step (forward, backward, optimizer step) of the same model on the same batch.

Models, as in the santurkar2018-* experiments: the VGG-style CNN (conv16-conv32-conv64, fc128) on
a batch of 128 Fashion-MNIST-shaped images (random inputs: cost does not depend on the values),
without and with BN, SGD; and the 25-layer linear network of width 32 on a full batch of 1024.
Measured per model, alternating over ``--rounds`` rounds in one process (medians):

- a training step;
- ``ics`` on every Conv/Linear layer (the experiments' setting) and on two layers;
- ``landscape_probe`` with 5 step sizes (the experiments' setting).

Expected multiples of a training step (the passes each one makes): ``ics`` over L layers is one
forward/backward for G, an optimizer step, and per layer after the first a forward and a backward
down to that layer, so at most L; ``landscape_probe`` is 1 + 5 forward/backward passes, so about 6.
Targets: ics ≤ 1.25 × L, landscape_probe ≤ 1.25 × 6 (copies and float64 norms on top).

Run: ``.venv/bin/python benchmarks/bench_metrics.py [--rounds 5] [--repeats 10] [--threads 1]``;
writes benchmarks/results/bench_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from normkit.lab.mechanism import deep_linear, vgg
from normkit.lab.metrics import ics, landscape_probe

STEP_SIZES = (0.05, 0.1, 0.2, 0.3, 0.4)


def _cases():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(128, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (128,), generator=generator)
    regression_x = torch.randn(1024, 32, generator=generator)
    regression_y = torch.randn(1024, 1, generator=generator)
    cnn_layers = ["conv1", "conv2", "conv3", "linear4", "output"]
    for norm in ("none", "batch"):
        torch.manual_seed(0)
        model = vgg((1, 28, 28), norm=norm)
        yield (
            f"CNN {'BN' if norm == 'batch' else 'Standard'}, batch 128",
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            nn.functional.cross_entropy,
            (images, labels),
            cnn_layers,
            ["conv2", "conv3"],
        )
    for norm in ("none", "batch"):
        torch.manual_seed(0)
        model = deep_linear(32, 25, 1, norm)
        yield (
            f"DLN-25 {'BN' if norm == 'batch' else 'Standard'}, batch 1024",
            model,
            torch.optim.SGD(model.parameters(), lr=1e-3),
            nn.functional.mse_loss,
            (regression_x, regression_y),
            [f"linear{i}" for i in range(1, 26)],
            ["linear13", "linear23"],
        )


def _seconds(function, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def measure(case, rounds: int, repeats: int) -> dict:
    name, model, optimizer, loss_fn, batch, all_layers, two_layers = case
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(batch[0]), batch[1]).backward()
        optimizer.step()

    work = {
        "training step": step,
        f"ics, {len(all_layers)} layers": lambda: ics(
            model, loss_fn, batch, optimizer, layers=all_layers
        ),
        "ics, 2 layers": lambda: ics(model, loss_fn, batch, optimizer, layers=two_layers),
        f"landscape_probe, {len(STEP_SIZES)} steps": lambda: landscape_probe(
            model, loss_fn, batch, STEP_SIZES
        ),
    }
    for function in work.values():  # warm-up
        function()
    times: dict[str, list[float]] = {k: [] for k in work}
    for _ in range(rounds):
        for key, function in work.items():
            times[key].append(_seconds(function, repeats))
    base = statistics.median(times["training step"])
    expected = {
        f"ics, {len(all_layers)} layers": len(all_layers),
        "ics, 2 layers": 2 + 1,  # G, then G' for each of the two (neither is the first layer)
        f"landscape_probe, {len(STEP_SIZES)} steps": 1 + len(STEP_SIZES),
    }
    rows = {}
    for key, values in times.items():
        median = statistics.median(values)
        ratio = median / base
        rows[key] = {
            "ms": median * 1e3,
            "steps": ratio,
            "round_ratios": [v / t for v, t in zip(values, times["training step"], strict=True)],
            "passes": expected.get(key, 1),
            "target_steps": None if key not in expected else 1.25 * expected[key],
        }
    return {"model": name, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/bench_metrics.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
        f"{os.getloadavg()}"
    )
    models = [measure(case, args.rounds, args.repeats) for case in _cases()]
    print(
        "\n| model | what | ms | × training step | passes | target |\n|---|---|---:|---:|---:|---:|"
    )
    for entry in models:
        for key, row in entry["results"].items():
            target = "–" if row["target_steps"] is None else f"≤ {row['target_steps']:.2f}"
            print(
                f"| {entry['model']} | {key} | {row['ms']:.2f} | {row['steps']:.2f} | "
                f"{row['passes']} | {target} |"
            )
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_at_end": os.getloadavg(),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "models": models,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
