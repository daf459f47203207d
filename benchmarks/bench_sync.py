"""SyncBatchNorm vs local BatchNorm: per-step time of a small CNN under DDP on 2 gloo ranks (CPU).

Each rank builds the same CNN twice, with ``nk.BatchNorm2d`` (local statistics) and with
``nk.SyncBatchNorm`` (statistics over both ranks), wraps each in DistributedDataParallel, and times
a full training step (forward, backward with DDP's gradient all-reduce, SGD step), alternating the
two for several rounds and keeping the median of each; the ratio is sync / local. The collectives
SyncBatchNorm issues are counted by wrapping torch.distributed's functions for one step (DDP's own
gradient all-reduce runs in C++ and is the same in both). Prints a table and writes JSON (machine,
date, command, every timing).

    python benchmarks/bench_sync.py            # the full table (about a minute on 2 cores)
    python benchmarks/bench_sync.py --quick    # fewer rounds, for a smoke run
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import json
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import normkit as nk
from environment import environment

WORLD = 2
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce")


@dataclass(frozen=True)
class Row:
    name: str
    batch_per_rank: int
    image: int  # H = W of the (1, H, W) input
    width: int  # channels of the first conv


ROWS = [
    Row("cnn3 28x28 b8", 8, 28, 16),
    Row("cnn3 28x28 b32", 32, 28, 16),
    Row("cnn3 32x32 b16 w64", 16, 32, 64),
]


def small_cnn(width: int) -> nn.Module:
    """The lab's CNN (normkit.lab.ddp): three conv-BN-ReLU blocks, pooling, a classifier."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nk.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nk.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False),
        nk.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def _setup(row: Row, provider: str):
    torch.manual_seed(0)
    model = small_cnn(row.width)
    if provider == "sync":
        model = nk.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    x = torch.randn(row.batch_per_rank, 1, row.image, row.image)
    y = torch.randint(10, (row.batch_per_rank,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()

    return step


def _time_steps(step, steps: int) -> float:
    """Seconds per step over ``steps`` steps; the ranks start together (a barrier)."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _count_collectives(step) -> dict[str, int]:
    calls: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        step()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return dict(calls)


def _collective_latency(repeats: int = 200) -> dict[str, float]:
    """Microseconds per gloo all-gather of one SyncBN row (C = 16) and per all-reduce of the
    backward's sums, as SyncBatchNorm issues them."""
    channels = 16
    row = torch.zeros(10 + 2 * channels, dtype=torch.float64)
    rows = torch.empty(WORLD, row.numel(), dtype=torch.float64)
    sums = torch.zeros(2 * channels, dtype=torch.float64)
    calls = {
        "all_gather_us": lambda: dist.all_gather(list(rows.unbind(0)), row),
        "all_reduce_us": lambda: dist.all_reduce(sums),
    }
    latency = {}
    for name, call in calls.items():
        for _ in range(20):
            call()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        latency[name] = 1e6 * (time.perf_counter() - start) / repeats
    return latency


def _rank_main(rank: int, port: int, rounds: int, steps: int, out: str):
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)  # every collective fails rather than hangs
    store = dist.TCPStore("127.0.0.1", port, WORLD, rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    latency = _collective_latency()
    results = []
    for row in ROWS:
        providers = {p: _setup(row, p) for p in ("local", "sync")}
        samples: dict[str, list[float]] = {p: [] for p in providers}
        counts = {p: _count_collectives(step) for p, step in providers.items()}  # + warm-up
        for _ in range(rounds):  # alternate providers so drift hits them alike
            for p, step in providers.items():
                samples[p].append(_time_steps(step, steps))
        ms = {p: 1e3 * statistics.median(v) for p, v in samples.items()}
        results.append(
            {
                **asdict(row),
                "ms": ms,
                "ratio": ms["sync"] / ms["local"],
                "sync_collectives_per_step": counts["sync"],
                "local_collectives_per_step": counts["local"],
                "bn_layers": 3,
            }
        )
    if rank == 0:
        Path(out).write_text(json.dumps({"latency": latency, "rows": results}))
    dist.destroy_process_group()


def print_table(results: list[dict]) -> None:
    header = (
        f"{'model':20s} {'local ms':>9s} {'sync ms':>9s} {'sync/local':>11s} "
        f"{'SyncBN collectives/step':>24s} {'extra ms/collective':>20s}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        counts = r["sync_collectives_per_step"]
        calls = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        extra = (r["ms"]["sync"] - r["ms"]["local"]) / max(sum(counts.values()), 1)
        print(
            f"{r['name']:20s} {r['ms']['local']:9.2f} {r['ms']['sync']:9.2f} "
            f"{r['ratio']:11.2f} {calls:>24s} {extra:20.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 10 steps")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40, help="steps per timing")
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_sync.json"))
    args = parser.parse_args(argv)
    rounds, steps = (2, 10) if args.quick else (args.rounds, args.steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = args.out.with_suffix(".rank0.json")
    context = mp.start_processes(
        _rank_main,
        args=(port, rounds, steps, str(scratch)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + args.deadline
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            sys.exit(f"the ranks did not finish within {args.deadline} s")
    measured = json.loads(scratch.read_text())
    scratch.unlink()
    results, latency = measured["rows"], measured["latency"]
    print_table(results)
    print(
        f"\none gloo all-gather of a SyncBN row (C = 16): {latency['all_gather_us']:.0f} us; "
        f"one all-reduce of the backward sums: {latency['all_reduce_us']:.0f} us"
    )
    setting = environment(ranks=WORLD, backend="gloo", torch_threads_per_rank=1)
    report = {"environment": setting, "collective_latency": latency, "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
