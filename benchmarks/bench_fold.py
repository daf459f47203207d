"""Inference latency of a ResNet-18-sized model on the CPU, before and after nk.tools.fold_batchnorm.

The model is ResNet-18's architecture (He et al. 2016: 7x7 stem, basic blocks [2, 2, 2, 2] of 64 to 512
channels, 1000 classes; 11.7 M parameters, 20 BatchNorm layers) built here with random weights and
running statistics from a few training-mode batches: no download. Each row times single forward
calls of the original and the folded model on the same input in the same process (inference mode),
alternating them call by call, and keeps the median wall time and the median process CPU time of
each; the ratios are folded / original. Prints a table and writes JSON (machine, date, command, every
timing).

    python benchmarks/bench_fold.py            # the full table (about a minute on 2 cores)
    python benchmarks/bench_fold.py --quick    # 3 calls per row, for a smoke run
    python benchmarks/bench_fold.py --threads 1   # one thread: CPU time is the computation
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import normkit as nk
from environment import environment


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(num_classes: int = 1000) -> nn.Module:
    layers = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def prepared_model() -> nn.Module:
    """ResNet-18 with non-trivial running statistics and γ/β, in eval mode."""
    torch.manual_seed(0)
    model = resnet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 112, 112))
    return model.eval()


def measure(batch: int, channels_last: bool, calls: int) -> dict:
    model = prepared_model()
    x = torch.randn(batch, 3, 224, 224)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    folded, report = nk.tools.fold_batchnorm(model, x)
    providers = {"original": model, "folded": folded}
    wall: dict[str, list[float]] = {name: [] for name in providers}
    cpu: dict[str, list[float]] = {name: [] for name in providers}
    with torch.inference_mode():
        for network in providers.values():  # warm-up
            network(x)
            network(x)
        # Alternate single calls (original, folded, folded, original, ...), so that a change in
        # the load of the machine hits both alike. Wall time is what a user waits; the process's
        # CPU time is steadier on a loaded machine (with one thread, it is the computation).
        for i in range(calls):
            order = list(providers.items())
            for name, network in order if i % 2 == 0 else reversed(order):
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                network(x)
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
    ms = {name: statistics.median(values) * 1e3 for name, values in wall.items()}
    cpu_ms = {name: statistics.median(values) * 1e3 for name, values in cpu.items()}
    return {
        "batch": batch,
        "channels_last": channels_last,
        "calls": calls,
        "ms": ms,
        "cpu_ms": cpu_ms,
        "ratio": ms["folded"] / ms["original"],
        "cpu_ratio": cpu_ms["folded"] / cpu_ms["original"],
        "modules": [report.modules_before, report.modules_after],
        "folded_layers": len(report.folded),
        "left_layers": len(report.left),
        "max_relative_error": report.max_relative_error,
    }



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 calls per row, for a smoke run")
    parser.add_argument("--calls", type=int, default=40, help="calls per model at batch 1")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_fold.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [(1, False, args.calls), (8, False, args.calls // 4), (8, True, args.calls // 4)]
    results = []
    for batch, channels_last, calls in rows:
        calls = 3 if args.quick else max(calls, 3)
        results.append(measure(batch, channels_last, calls))
        print(f"measured batch {batch}{' CL' if channels_last else ''}", file=sys.stderr)
    print(f"{'input':18s} {'calls':>5s} {'original ms':>12s} {'folded ms':>10s} {'ratio':>6s} "
          f"{'orig. CPU ms':>12s} {'folded CPU ms':>13s} {'CPU ratio':>9s} {'modules':>8s} "
          f"{'max rel err':>11s}")  # fmt: skip
    for r in results:
        shape = f"{r['batch']}x3x224x224" + (" CL" if r["channels_last"] else "")
        modules = f"{r['modules'][0]}->{r['modules'][1]}"
        print(f"{shape:18s} {r['calls']:5d} {r['ms']['original']:12.2f} {r['ms']['folded']:10.2f} "
              f"{r['ratio']:6.3f} {r['cpu_ms']['original']:12.2f} {r['cpu_ms']['folded']:13.2f} "
              f"{r['cpu_ratio']:9.3f} {modules:>8s} {r['max_relative_error']:11.2e}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), "results": results}, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
