"""``normkit bench``: the kernel and fused-layer benchmark table, on this machine."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def bench(
    op: Annotated[
        list[str] | None,
        typer.Option(
            help="Op to time (repeatable): bn, bn_fwd, bn_eval, bn_relu, bn_add_relu, "
            "iabn, gn, gn_fwd, ln, ln_fwd. Default: all."
        ),
    ] = None,  # fmt: skip
    device: Annotated[Device, typer.Option(help="Where to run.")] = Device.cpu,
    dtype: Annotated[list[Dtype] | None, typer.Option(help="Repeatable. Default: float32.")] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="normkit backend for 'ours'. Default: auto on the CPU, triton on CUDA."),
    ] = None,
    memory: Annotated[
        bool, typer.Option(help="Also the saved-bytes and peak-memory table.")
    ] = False,
    quick: Annotated[bool, typer.Option(help="One short timing per row (noisier).")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the results as JSON here.")] = None,
) -> None:
    """Time normkit against PyTorch: op, shape, dtype, layout, ms, ratio, GB/s, % of a copy.

    The same table as benchmarks/bench_kernels.py and docs/benchmarks.md, so that the published
    figures can be checked on your hardware. GB/s counts the minimum bytes of each op (docs/benchmarks.md);
    "% copy" compares with y.copy_(x) of the same tensor, timed in the same run.
    """
    import torch

    from normkit import benchmark
    from normkit.errors import ConfigError

    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device here; use --device cpu")
    dtypes = [getattr(torch, d.value) for d in (dtype or [Dtype.float32])]
    chosen = backend or ("triton" if device == Device.cuda else "auto")
    timing = benchmark.Timing(rounds=1, min_run_time=0.1, rep_ms=50) if quick else None
    rows = benchmark.speed_table(
        op or None,
        device=device.value,
        dtypes=dtypes,
        backend=chosen,
        timing=timing,
        progress=lambda line: typer.echo(line, err=True),
    )
    typer.echo(benchmark.format_table(rows))
    memory_rows = None
    if memory:
        memory_rows = benchmark.memory_table(device=device.value, backend=chosen)
        typer.echo("\n" + benchmark.format_memory(memory_rows))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(benchmark.to_json(rows, memory_rows, device.value))
        typer.echo(f"wrote {out}", err=True)
    sys.stdout.flush()
