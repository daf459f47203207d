"""BatchNorm2d training forward + backward on ResNet-50's batch-norm shapes (batch 32; plus the
stem at batch 8), float32, NCHW and channels_last: torch's layer, normkit's ``native`` (ATen) and
``compiled`` (its C passes from 1M elements, ATen below) and ``auto``, beside the copy of the
shape's tensor cycled over four pairs (from memory): the data behind ``auto``'s choice per layout
(``_dispatch.AUTO_PREFERENCES``). Every provider in one process, alternating for several rounds,
medians; ``--keep-memory`` as in bench_layers.py, and the page faults per call of torch's layer
and of ``compiled`` (fresh outputs larger than glibc's mmap threshold, 32 MiB at most, are mapped
and zeroed again at every call, whatever computes them). Prints a table and writes JSON (machine,
date, command, every timing).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_bn_shapes.py --keep-memory   # ~5 minutes
    python benchmarks/bench_bn_shapes.py --quick                                 # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

import normkit as nk
from environment import environment
from timing import alternate, faults_per_call, keep_freed_memory, train_step

# (N, C, H, W): ResNet-50's distinct batch-norm shapes at batch 32 (stages 1-4, their widths),
# and the stem's 112 x 112 at batch 8.
SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 128, 28, 28), (32, 512, 28, 28),
          (32, 256, 14, 14), (32, 1024, 14, 14), (32, 512, 7, 7), (32, 2048, 7, 7),
          (8, 64, 112, 112)]  # fmt: skip
BACKENDS = ("native", "compiled", "auto")
PASSES = 8  # forward: statistics, normalize; backward: two sums, dx (a copy moves 2)


def providers(shape, channels_last: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3 + 5
    dy = torch.randn(shape, generator=generator)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    pairs = itertools.cycle([(torch.empty_like(x), torch.empty_like(x)) for _ in range(4)])

    def copy_from_memory():  # each call copies the pair least recently used
        source, destination = next(pairs)
        destination.copy_(source)

    def under(backend: str):
        step = train_step(nk.BatchNorm2d(shape[1]), x, dy)

        def call():
            with nk.backend(backend):
                step()

        return call

    return {"memory": copy_from_memory, "torch": train_step(torch.nn.BatchNorm2d(shape[1]), x, dy),
            **{backend: under(backend) for backend in BACKENDS}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 0.1 s, two shapes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--keep-memory", action="store_true", help="glibc keeps freed memory")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bn_shapes.json"))
    args = parser.parse_args()
    rounds, min_run_time = (1, 0.1) if args.quick else (args.rounds, args.min_run_time)
    kept = keep_freed_memory() if args.keep_memory else False
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    columns = " ".join(f"{b + ' ms':>12s} {b + '/torch':>15s} {'bound':>6s}" for b in BACKENDS)
    print(f"{'shape':18s} {'layout':6s} {'memory':>7s} {'torch ms':>9s} {columns} "
          f"{'torch pf':>8s} {'comp. pf':>8s}")  # fmt: skip
    for shape, channels_last in itertools.product(shapes, (False, True)):
        calls = providers(shape, channels_last)
        times = alternate(calls, rounds, min_run_time)
        ms = {name: statistics.median(values) for name, values in times.items()}
        faults = {name: faults_per_call(calls[name], 3) for name in ("torch", "compiled")}
        bound = PASSES / 2 * ms["memory"]
        layout = "CL" if channels_last else "NCHW"
        rows.append({"shape": shape, "layout": layout, "ms": ms, "rounds_ms": times,
                     "of_memory_bound": {name: bound / ms[name] for name in ms if name != "memory"},
                     "page_faults": faults})  # fmt: skip
        cells = " ".join(f"{ms[b]:12.3f} {ms[b] / ms['torch']:15.2f} {bound / ms[b]:6.0%}"
                         for b in BACKENDS)  # fmt: skip
        name = "x".join(map(str, shape))
        print(f"{name:18s} {layout:6s} {ms['memory']:7.3f} {ms['torch']:9.3f} {cells} "
              f"{faults['torch']:8.0f} {faults['compiled']:8.0f}", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(kept_freed_memory=kept), "passes": PASSES, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nbound: {PASSES} passes at the speed of the copy from memory (the 'memory' column, ms);"
          " pf: page faults per call of torch's layer and of compiled")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
