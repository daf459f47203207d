"""Kernels and fused layers against PyTorch: op, shape, dtype, layout, ours ms, torch ms, ratio,
GB/s and % of a same-run copy (minimum-byte formulas in normkit/benchmark.py and docs/benchmarks.md),
and on the CPU each side's fraction of the memory bound: the passes over the tensor a streaming
implementation needs at least (:data:`PASSES`) at the speed of the same run's copy.

On the CPU "ours" is a chosen backend (default: each of native and compiled for the fused ops;
auto elsewhere); on a GPU it is the triton backend, timed with triton.testing.do_bench medians.
Prints the table and writes JSON (environment, every row).

    python benchmarks/bench_kernels.py                       # the CPU table of docs/benchmarks.md
    python benchmarks/bench_kernels.py --op bn_relu --quick  # one op, short timings
    python benchmarks/bench_kernels.py --device cuda         # on a GPU (triton backend)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from normkit import benchmark as B

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Passes over the tensor (reads and writes of T*s bytes) each op needs at least when its statistics
# take their own pass: forward = statistics 1 + normalize 2 (+ 1 per residual read); backward =
# the two sums 2 (+ the residual, read again to recompute the pre-activation) + dx 3 (+ dz).
PASSES = {
    "bn_fwd": 3, "bn": 8, "bn_eval": 2, "bn_relu": 8, "bn_add_relu": 12, "iabn": 8,
    "gn_fwd": 3, "gn": 8, "ln_fwd": 3, "ln": 8,
}  # fmt: skip


def bound_fractions(row: B.Row) -> tuple[float, float]:
    """(ours, torch's) fraction of the memory bound: PASSES[op] passes at the copy's speed."""
    ours = PASSES[row.op] / B.OPS[row.op][1] * row.pct_copy / 100
    return ours, ours / row.ratio


def format_bounds(rows: list[B.Row]) -> str:
    lines = [f"{'op':12s} {'shape':14s} {'dtype':9s} {'layout':6s} {'passes':>6s} "
             f"{'ours/torch':>10s} {'ours bound':>10s} {'torch bound':>11s}"]  # fmt: skip
    for row in rows:
        ours, theirs = bound_fractions(row)
        lines.append(
            f"{row.op:12s} {'x'.join(map(str, row.shape)):14s} {row.dtype:9s} {row.layout:6s} "
            f"{PASSES[row.op]:6d} {row.ratio:10.2f} {ours:10.0%} {theirs:11.0%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", choices=sorted(B.OPS), help="repeatable")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable")
    parser.add_argument("--backend", action="append", help="normkit backend(s) for 'ours'")
    parser.add_argument("--quick", action="store_true", help="1 round of 0.1 s per timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time per call"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_kernels.json"))
    args = parser.parse_args(argv)
    timing = (
        B.Timing(rounds=1, min_run_time=0.1, rep_ms=50)
        if args.quick
        else B.Timing(
            rounds=args.rounds,
            min_run_time=args.min_run_time,
            threads=args.threads,
            clock=args.clock,
        )
    )
    dtypes = [DTYPES[d] for d in (args.dtype or ["float32", "bfloat16"])]
    ops = args.op or list(B.OPS)
    backends = args.backend or (["triton"] if args.device == "cuda" else ["native", "compiled"])
    rows = []
    for backend in backends:
        for op in ops:
            if backend == "compiled" and op not in ("bn_relu", "bn_add_relu"):
                continue  # the compiled backend implements BatchNormAct only
            rows += B.speed_table(
                [op],
                device=args.device,
                dtypes=dtypes,
                backend=backend,
                timing=timing,
                torch_variants=args.device == "cuda",
                progress=lambda line, b=backend: print(f"[{b}] {line}", file=sys.stderr),
            )
    print(B.format_table(rows))
    if args.device == "cpu":
        print("\nfraction of the memory bound (passes at the copy's speed)")
        print(format_bounds(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(B.to_json(rows, None, args.device))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
