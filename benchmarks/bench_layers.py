"""Core layers against torch.nn on the CPU: forward+backward (training) and eval forward.

Every row times torch.nn's layer and normkit's (``auto``, what a user gets, and each backend) on the
same tensor in the same process, alternating them for several rounds and keeping the median of
each; the ratio is ours / torch's. Beside it, each provider's fraction of the memory bound: the
time of the passes over the tensor that the computation needs at least, at the speed of a tensor
copy (``y.copy_(x)``, two passes, timed in the same rounds): 8 passes for forward + backward in
training (forward: statistics, normalize; backward: two sums, then dx), 2 for the eval forward.
That copy repeats on one pair of tensors, which a large L3 partly holds (a 25 MB tensor against
32 MB on the machine of docs/benchmarks.md), while a training step's four tensors cannot; so each
row also times a copy cycled over four pairs of tensors, from memory, and gives the fraction of
that bound ("memory bound"), and the page faults per call (``getrusage``: fresh outputs whose
pages the allocator gave back, see ``timing.keep_freed_memory``). Prints a table and writes JSON
(machine, date, command, every timing).

    python benchmarks/bench_layers.py                # the full table (a few minutes on 2 cores)
    python benchmarks/bench_layers.py --quick        # fewer rounds, for a smoke run
    python benchmarks/bench_layers.py --only bn2d    # rows whose name contains "bn2d"
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import normkit as nk
from environment import environment
from timing import faults_per_call, keep_freed_memory, time_call, train_step


class PermutedLayerNorm(nn.Module):
    """What users write without LayerNorm2d: permute, torch.nn.LayerNorm(C), permute back, and
    (as LayerNorm2d does) give the output the input's memory format."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        y = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return y.contiguous(memory_format=nk.backends.memory_format_of(x))


@dataclass(frozen=True)
class Row:
    name: str
    shape: tuple[int, ...]
    ours: Callable[[], nn.Module]
    torch_layer: Callable[[], nn.Module]
    channels_last: bool = False


ROWS = [
    Row("bn2d", (32, 64, 56, 56), lambda: nk.BatchNorm2d(64), lambda: nn.BatchNorm2d(64)),
    Row("bn2d_cl", (32, 64, 56, 56), lambda: nk.BatchNorm2d(64), lambda: nn.BatchNorm2d(64), True),
    # ResNet-50's smaller batch norms at batch 32 (layer3, layer4): under the Inductor passes'
    # 4M-element floor, above the C passes' 1M one (auto: compiled) and below it (auto: ATen)
    Row("bn2d_s14", (32, 256, 14, 14), lambda: nk.BatchNorm2d(256), lambda: nn.BatchNorm2d(256)),
    Row("bn2d_s7", (32, 512, 7, 7), lambda: nk.BatchNorm2d(512), lambda: nn.BatchNorm2d(512)),
    Row("bn1d", (256, 1024), lambda: nk.BatchNorm1d(1024), lambda: nn.BatchNorm1d(1024)),
    Row("ln", (256, 1024), lambda: nk.LayerNorm(1024), lambda: nn.LayerNorm(1024)),
    Row("gn32", (32, 64, 56, 56), lambda: nk.GroupNorm(32, 64), lambda: nn.GroupNorm(32, 64)),
    Row(
        "gn32_cl",
        (32, 64, 56, 56),
        lambda: nk.GroupNorm(32, 64),
        lambda: nn.GroupNorm(32, 64),
        True,
    ),
    Row(
        "in2d",
        (32, 64, 56, 56),
        lambda: nk.InstanceNorm2d(64, affine=True),
        lambda: nn.InstanceNorm2d(64, affine=True),
    ),
    Row(
        "ln2d",
        (32, 64, 56, 56),
        lambda: nk.LayerNorm2d(64),
        lambda: PermutedLayerNorm(64),
    ),
    Row(
        "ln2d_cl", (32, 64, 56, 56), lambda: nk.LayerNorm2d(64), lambda: PermutedLayerNorm(64), True
    ),
]
BACKENDS = ["auto", "native", "reference"]  # the default; --backends chooses others (compiled)
# Passes over the tensor each mode needs at least (see the module docstring).
PASSES = {"train": 8, "eval": 2}


def _eval_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        with torch.no_grad():
            layer(x)

    return step


def measure(row: Row, rounds: int, min_run_time: float, backends: list[str]) -> dict:
    x = torch.randn(row.shape)
    if row.channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    result = {"name": row.name, "shape": list(row.shape), "channels_last": row.channels_last}
    copy_out = torch.empty_like(x)
    pairs = [(torch.randn_like(x), torch.empty_like(x)) for _ in range(4)]
    turn = itertools.cycle(pairs)

    def copy_from_memory():  # each call copies the pair least recently used
        source, destination = next(turn)
        destination.copy_(source)

    for mode in ("train", "eval"):
        providers = {"torch": row.torch_layer()} | {b: row.ours() for b in backends}
        samples: dict[str, list[float]] = {name: [] for name in [*providers, "copy", "memory"]}
        cpu: dict[str, list[float]] = {name: [] for name in [*providers, "copy", "memory"]}
        faults: dict[str, list[float]] = {name: [] for name in providers}
        for _ in range(rounds):  # alternate providers so drift hits them all alike
            for name, layer in providers.items():
                layer.train(mode == "train")
                step = train_step(layer, x, dy) if mode == "train" else _eval_step(layer, x)
                with nk.backend(name if name in backends else "auto"):
                    step()  # warm-up
                    seconds, cpu_seconds = time_call(step, min_run_time)
                    samples[name].append(seconds)
                    cpu[name].append(cpu_seconds)
                    faults[name].append(faults_per_call(step, 5))
            seconds, cpu_seconds = time_call(lambda: copy_out.copy_(x), min_run_time)
            samples["copy"].append(seconds)
            cpu["copy"].append(cpu_seconds)
            seconds, cpu_seconds = time_call(copy_from_memory, min_run_time)
            samples["memory"].append(seconds)
            cpu["memory"].append(cpu_seconds)
        medians = {name: statistics.median(values) for name, values in samples.items()}
        cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
        bound = PASSES[mode] / 2 * medians["copy"]
        memory_bound = PASSES[mode] / 2 * medians["memory"]
        cpu_bound = PASSES[mode] / 2 * cpu_medians["copy"]
        result[mode] = {
            "ms": {name: value * 1e3 for name, value in medians.items()},
            "ratio": {b: medians[b] / medians["torch"] for b in backends},
            "passes": PASSES[mode],
            "bound_ms": bound * 1e3,
            "of_bound": {name: bound / medians[name] for name in providers},
            "memory_bound_ms": memory_bound * 1e3,
            "of_memory_bound": {name: memory_bound / medians[name] for name in providers},
            "cpu_ms": {name: value * 1e3 for name, value in cpu_medians.items()},
            "cpu_ratio": {b: cpu_medians[b] / cpu_medians["torch"] for b in backends},
            "cpu_of_bound": {name: cpu_bound / cpu_medians[name] for name in providers},
            "page_faults": {name: statistics.median(values) for name, values in faults.items()},
        }
    return result



def print_table(results: list[dict], backends: list[str]) -> None:
    header = (
        f"{'layer':9s} {'shape':17s} {'mode':5s} {'copy ms':>8s} {'torch ms':>9s} {'bound':>6s} "
        + " ".join(f"{b + ' ms':>12s} {b + '/torch':>15s} {'bound':>6s}" for b in backends)
    )
    print(header)
    print("-" * len(header))
    for r in results:
        for mode in ("train", "eval"):
            ms, ratio, of_bound = r[mode]["ms"], r[mode]["ratio"], r[mode]["of_bound"]
            shape = "x".join(map(str, r["shape"])) + (" CL" if r["channels_last"] else "")
            cells = " ".join(f"{ms[b]:12.3f} {ratio[b]:15.2f} {of_bound[b]:6.0%}" for b in backends)
            print(
                f"{r['name']:9s} {shape:17s} {mode:5s} {ms['copy']:8.3f} {ms['torch']:9.3f} "
                f"{of_bound['torch']:6.0%} {cells}"
            )
    print("\nmemory bound (the copy cycled over four pairs of tensors, from memory); page faults per call:")
    for r in results:
        for mode in ("train", "eval"):
            of_memory, faults = r[mode]["of_memory_bound"], r[mode]["page_faults"]
            cells = "  ".join(f"{name} {of_memory[name]:.0%} ({faults[name]:.0f})" for name in of_memory)
            print(f"{r['name']:9s} {mode:5s} copy {r[mode]['ms']['memory']:7.3f} ms  {cells}")


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
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads"
    )
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="normkit backends to time, comma-separated"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_layers.json"))
    args = parser.parse_args(argv)
    kept = keep_freed_memory() if args.keep_memory else False
    rounds, min_run_time = (1, 0.2) if args.quick else (args.rounds, args.min_run_time)
    torch.set_num_threads(args.threads)
    backends = args.backends.split(",")
    results = []
    for row in ROWS:
        if args.only in row.name:
            results.append(measure(row, rounds, min_run_time, backends))
            print(f"measured {row.name}", file=sys.stderr)
    print_table(results, backends)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(keep_freed_memory=kept), "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
