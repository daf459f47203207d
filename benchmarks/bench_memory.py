"""Memory of the fused layers against PyTorch's unfused pairs: bytes saved for backward by one
norm + activation layer (unique storages packed by autograd) and by a conv -> norm+act -> conv ->
norm+act block, and the peak memory of one training step of that block (CUDA's allocator peak; on
the CPU the running total of the profiler's allocation events). Prints a table, writes JSON.

    python benchmarks/bench_memory.py                      # CPU, float32, 16x64x56x56
    python benchmarks/bench_memory.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from normkit import benchmark as B

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--shape", default="16,64,56,56", help="N,C,H,W")
    parser.add_argument("--backend", default="auto", help="normkit backend for the fused layers")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_memory.json"))
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    rows = B.memory_table(args.device, shape, DTYPES[args.dtype], args.backend)
    print(B.format_memory(rows))
    unfused = {r["variant"]: r["layer_saved_bytes"] for r in rows}
    iabn = unfused["nk.InPlaceABN(leaky_relu)"] / unfused["torch BatchNorm2d -> LeakyReLU"]
    act = unfused["nk.BatchNormAct(relu)"] / unfused["torch BatchNorm2d -> ReLU"]
    print(f"\nsaved bytes: InPlaceABN / (BatchNorm2d -> LeakyReLU) = {iabn:.3f}")
    print(f"saved bytes: BatchNormAct / (BatchNorm2d -> ReLU) = {act:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": B.environment(args.device), "memory": rows,
              "ratios": {"inplace_abn_vs_bn_leaky_relu": iabn, "batch_norm_act_vs_bn_relu": act}}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
