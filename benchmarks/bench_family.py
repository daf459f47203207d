"""The layers beyond BatchNorm on the CPU: forward+backward in training, against torch's BatchNorm2d
on the same tensor and against a naive composition of torch ops that computes the same layer.

Every row times three providers in one process, alternating them for several rounds and keeping the
median of each: ``bn`` (``torch.nn.BatchNorm2d``), ``naive`` (the layer written with plain torch ops,
as users write it without normkit) and ``normkit`` (the layer, backend ``auto``). Ratios are
normkit / bn and normkit / naive. Beside them, each provider's fraction of the memory bound: the
passes over the tensor the step needs at least (8 for forward + backward in training: forward
statistics and normalize, backward two sums and dx; 4 for FrozenBatchNorm, whose backward is one
multiply) at the speed of ``y.copy_(x)`` on the same tensor (two passes), timed in the same rounds.
Prints a table with the issue's targets and writes JSON (machine, date, command, every timing).

    python benchmarks/bench_family.py                 # the full table (about two minutes on 2 cores)
    python benchmarks/bench_family.py --quick         # one short round, for a smoke run
    python benchmarks/bench_family.py --only renorm   # rows whose name contains "renorm"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import normkit as nk
from environment import environment
from timing import keep_freed_memory, time_call, train_step

SHAPE = (32, 64, 56, 56)
VIRTUAL_BATCH = 8  # Ghost BN: four ghost batches of 8 in the batch of 32


# --- the naive compositions: each layer as plain torch ops, differentiated by autograd -------------


class NaiveRenorm(nn.Module):
    """Algorithm 1 of Ioffe (2017) transcribed: batch moments, r and d without gradient."""

    def __init__(self, c, r_max=3.0, d_max=5.0, eps=1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("sigma", torch.ones(c))
        self.r_max, self.d_max, self.eps = r_max, d_max, eps

    def forward(self, x):
        dims, view = (0, 2, 3), (1, -1, 1, 1)
        mean = x.mean(dims)
        sigma = torch.sqrt(x.var(dims, unbiased=False) + self.eps)
        with torch.no_grad():
            r = (sigma / self.sigma).clamp(1 / self.r_max, self.r_max)
            d = ((mean - self.mean) / self.sigma).clamp(-self.d_max, self.d_max)
            self.mean.lerp_(mean, 0.01)
            self.sigma.lerp_(sigma, 0.01)
        x_hat = (x - mean.view(view)) / sigma.view(view) * r.view(view) + d.view(view)
        return x_hat * self.weight.view(view) + self.bias.view(view)


class NaiveGhost(nn.Module):
    """Hoffer et al.'s code: BatchNorm on each chunk of the batch, in a loop."""

    def __init__(self, c, virtual_batch_size):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x):
        return torch.cat([self.bn(chunk) for chunk in x.split(self.virtual_batch_size)])


class NaiveBatchInstance(nn.Module):
    """Nam & Kim's code: BatchNorm and InstanceNorm, mixed by the gate."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.rho = nn.Parameter(torch.full((c,), 0.5))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        view = (1, -1, 1, 1)
        x_bn = F.batch_norm(x, self.running_mean, self.running_var, training=True)
        x_in = F.instance_norm(x)
        rho = self.rho.view(view)
        y = rho * x_bn + (1 - rho) * x_in
        return y * self.weight.view(view) + self.bias.view(view)


class NaiveBatchLayer(nn.Module):
    """Ziaee & Çano's layer: BatchNorm and LayerNorm over the channels (permuted), mixed by 1/m."""

    def __init__(self, c, eps=1e-3):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.eps = eps

    def forward(self, x):
        m, c = x.shape[0], x.shape[1]
        view = (1, -1, 1, 1)
        x_b = F.batch_norm(x, self.running_mean, self.running_var, training=True, eps=self.eps)
        x_f = F.layer_norm(x.permute(0, 2, 3, 1), (c,), eps=self.eps).permute(0, 3, 1, 2)
        x_beta = (x_f * (1 / m - 1e-4) + x_b * (1 - (1 / m + 1e-4))) / c**0.5
        return x_beta * self.weight.view(view) + self.bias.view(view)


class NaiveSwitchable(nn.Module):
    """Luo et al.'s code (models/switchable_norm.py): IN moments, LN and BN derived from them."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.mean_weight, self.var_weight = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
        self.eps = eps

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, -1)
        mean_in, var_in = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = (var_in + mean_in**2).mean(1, keepdim=True) - mean_ln**2
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = (var_in + mean_in**2).mean(0, keepdim=True) - mean_bn**2
        mw, vw = torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(n, c, h, w) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class NaiveFrozen(nn.Module):
    """torchvision's FrozenBatchNorm2d: scale and shift from the buffers, two elementwise ops."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((c,), value))
        self.register_buffer("running_var", torch.ones(c))
        self.eps = eps

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


@dataclass(frozen=True)
class Row:
    name: str
    ours: Callable[[], nn.Module]
    naive: Callable[[], nn.Module]
    target: float  # normkit / bn, the bound
    channels_last: bool = False
    passes: int = 8  # passes over the tensor a training step needs at least


C = SHAPE[1]
ROWS = [
    Row("renorm", lambda: nk.BatchRenorm2d(C, r_max=3.0, d_max=5.0), lambda: NaiveRenorm(C), 1.15),
    Row(
        "ghost",
        lambda: nk.GhostBatchNorm(C, virtual_batch_size=VIRTUAL_BATCH),
        lambda: NaiveGhost(C, VIRTUAL_BATCH),
        1.5,
    ),
    Row("batch_instance", lambda: nk.BatchInstanceNorm(C), lambda: NaiveBatchInstance(C), 2.0),
    Row("batch_layer", lambda: nk.BatchLayerNorm(C), lambda: NaiveBatchLayer(C), 2.0),
    Row("switchable", lambda: nk.SwitchableNorm(C), lambda: NaiveSwitchable(C), 2.0),
    Row("frozen", lambda: nk.FrozenBatchNorm(C), lambda: NaiveFrozen(C), float("nan"), passes=4),
]
# channels_last: the same layers on a channels_last input, against BatchNorm2d on it; the per-plane
# family and Batch-Layer have their own goal there (<= 1.5x), Batch Renorm keeps its own.
CHANNELS_LAST_TARGETS = {"ghost": 1.5, "batch_instance": 1.5, "batch_layer": 1.5, "switchable": 1.5}
ROWS += [
    Row(r.name + "_cl", r.ours, r.naive, CHANNELS_LAST_TARGETS.get(r.name, r.target), True)
    for r in ROWS
    if r.name != "frozen"
]


def measure(row: Row, rounds: int, min_run_time: float) -> dict:
    x = torch.randn(SHAPE)
    if row.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    providers = {"bn": nn.BatchNorm2d(C), "naive": row.naive(), "normkit": row.ours()}
    wall: dict[str, list[float]] = {name: [] for name in [*providers, "copy"]}
    cpu: dict[str, list[float]] = {name: [] for name in [*providers, "copy"]}
    copy_out = torch.empty_like(x)
    for _ in range(rounds):  # alternate providers so drift hits them all alike
        for name, layer in providers.items():
            layer.train()
            step = train_step(layer, x, dy)
            step()  # warm-up
            seconds, cpu_seconds = time_call(step, min_run_time)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        seconds, cpu_seconds = time_call(lambda: copy_out.copy_(x), min_run_time)
        wall["copy"].append(seconds)
        cpu["copy"].append(cpu_seconds)
    ms = {name: statistics.median(values) * 1e3 for name, values in wall.items()}
    cpu_ms = {name: statistics.median(values) * 1e3 for name, values in cpu.items()}
    bound_ms = row.passes / 2 * ms["copy"]
    return {
        "name": row.name,
        "shape": list(SHAPE),
        "channels_last": row.channels_last,
        "ms": ms,
        "cpu_ms": cpu_ms,
        "vs_bn": ms["normkit"] / ms["bn"],
        "vs_naive": ms["normkit"] / ms["naive"],
        "cpu_vs_bn": cpu_ms["normkit"] / cpu_ms["bn"],
        "cpu_vs_naive": cpu_ms["normkit"] / cpu_ms["naive"],
        "target_vs_bn": row.target,
        "passes": row.passes,
        "bound_ms": bound_ms,
        "of_bound": {name: bound_ms / ms[name] for name in providers},
        "cpu_of_bound": {
            name: row.passes / 2 * cpu_ms["copy"] / cpu_ms[name] for name in providers
        },
    }



def print_table(results: list[dict]) -> None:
    header = (
        f"{'layer':17s} {'copy ms':>8s} {'bn ms':>8s} {'naive ms':>9s} {'normkit ms':>11s} "
        f"{'/bn':>6s} {'target':>7s} {'/naive':>7s} {'cpu /bn':>8s} {'cpu /naive':>11s} "
        f"{'bound: bn':>9s} {'normkit':>7s}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ms = r["ms"]
        target = "" if r["target_vs_bn"] != r["target_vs_bn"] else f"{r['target_vs_bn']:.2f}"
        print(
            f"{r['name']:17s} {ms['copy']:8.3f} {ms['bn']:8.3f} {ms['naive']:9.3f} "
            f"{ms['normkit']:11.3f} {r['vs_bn']:6.2f} {target:>7s} {r['vs_naive']:7.2f} "
            f"{r['cpu_vs_bn']:8.2f} {r['cpu_vs_naive']:11.2f} {r['of_bound']['bn']:9.0%} "
            f"{r['of_bound']['normkit']:7.0%}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 0.2 s per timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--only", default="", help="only rows whose name contains this")
    parser.add_argument(
        "--keep-memory", action="store_true",
        help="keep freed memory in the process (timing.keep_freed_memory): no page faults per step",
    )  # fmt: skip
    parser.add_argument(
        "--backend", default="auto", help="normkit's backend (auto: what a user gets)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_family.json"))
    args = parser.parse_args(argv)
    kept = keep_freed_memory() if args.keep_memory else False
    rounds, min_run_time = (1, 0.2) if args.quick else (args.rounds, args.min_run_time)
    results = []
    for row in ROWS:
        if args.only in row.name:
            with nk.backend(args.backend):  # the torch.nn providers ignore it
                results.append(measure(row, rounds, min_run_time))
            print(f"measured {row.name}", file=sys.stderr)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(keep_freed_memory=kept), "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
