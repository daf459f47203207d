"""The channels_last plane sums (normkit.functional._plane_sums) against the reductions Inductor
compiles for the same maths: each reduction alone (time and error against float64 sums), then
each compiled layer that uses them, forward + backward, with and without them, beside torch's
BatchNorm2d. Float32, channels_last, torch's thread count; every provider in one process,
alternating for several rounds, medians. Prints two tables and writes JSON (machine, date,
command, every timing).

    python benchmarks/bench_plane_sums.py            # about two minutes on 2 cores
    python benchmarks/bench_plane_sums.py --quick    # one short round, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import normkit as nk
from environment import environment
from normkit.functional import _channel_epilogue, _compiled, _instance_stats_compiled, _plane_sums
from normkit.functional._batch_norm import batch_dims
from normkit.functional._batch_norm_compiled import channel_moments, channel_sum, sample_mean
from timing import alternate, train_step

SHAPE = (32, 64, 56, 56)
LAYERS = {
    "BatchNorm2d": lambda c: nk.BatchNorm2d(c),
    "GhostBatchNorm": lambda c: nk.GhostBatchNorm(c, virtual_batch_size=8),
    "BatchInstanceNorm": lambda c: nk.BatchInstanceNorm(c),
    "SwitchableNorm": lambda c: nk.SwitchableNorm(c),
}


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().reshape(-1) - want.reshape(-1)).abs().max())


def channel_variance(x, shift):
    """BatchNorm's per-channel biased variance as its C engine computes it: the plane sums shifted
    by ``shift``, added over the samples (``_channel_epilogue``)."""
    s1, s2 = _plane_sums.shifted_sums(x, x, shift, shift)
    return _channel_epilogue.statistics(s1, s2, shift, None, 0.0, x.numel() // x.shape[1])[1]


def centred_channel_sum(dy, x, mean):
    """``sum(dy * (x - mean))`` per channel as BatchNorm's C backward computes it (its
    ``sum(dy * x_hat)`` with 1/std = 1)."""
    sg, sgx = _plane_sums.shifted_sums(dy, x, None, mean)
    ones = torch.ones(x.shape[1])
    return _channel_epilogue.input_grad_coefficients(sg, sgx, None, ones, x.numel() // x.shape[1])[1]


def reductions(x, dy):
    """name -> (plane sums' call, Inductor's call, float64 value of what both compute)."""
    spatial, dims = tuple(range(2, x.dim())), batch_dims(x.dim())
    x64, dy64 = x.double(), dy.double()
    mean = x64.mean(dims).float()
    compiled = _compiled.CompiledMaths.call
    plane_shift = sample_mean(x, spatial).flatten(1)
    channel_shift = sample_mean(x, dims).reshape(-1)
    return {
        "plane variance": (lambda: _plane_sums.plane_moments(x, plane_shift)[1],
                           lambda: compiled(_instance_stats_compiled._moments_maths, x)[1],
                           x64.var(spatial, unbiased=False)),
        "plane sum(dy*x)": (lambda: _plane_sums.plane_sums(dy, x)[0],
                            lambda: compiled(_instance_stats_compiled._sums_maths, dy, x, x.dtype)[0],
                            (dy64 * x64).sum(spatial)),
        "channel variance": (lambda: channel_variance(x, channel_shift),
                             lambda: compiled(channel_moments, x)[1],
                             x64.var(dims, unbiased=False)),
        "channel sum(dy*(x-mean))": (
            lambda: centred_channel_sum(dy, x, mean),
            lambda: compiled(lambda g, t, m: channel_sum(g * (t - m.view(1, -1, 1, 1))), dy, x, mean),
            (dy64 * (x64 - mean.double().view(1, -1, 1, 1))).sum(dims)),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 0.2 s per timing")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plane_sums.json"))
    args = parser.parse_args()
    rounds, min_run_time = (1, 0.2) if args.quick else (args.rounds, args.min_run_time)
    if _plane_sums._library() is None:
        sys.exit("no C compiler with OpenMP: the plane sums cannot be built here")
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=generator) * 3 + 5).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(SHAPE, generator=generator).contiguous(memory_format=torch.channels_last)
    copy_out = torch.empty_like(x)
    _compiled.MIN_NUMEL = 0  # nothing below it here; explicit for the reductions' direct calls

    cases = reductions(x, dy)
    errors = {name: {"plane sums": _error(plane(), want), "inductor": _error(inductor(), want)}
              for name, (plane, inductor, want) in cases.items()}  # fmt: skip
    built = _plane_sums.built  # every engine asks it before taking the plane sums

    def step(make, plane: bool):
        layer = make(SHAPE[1])
        run = train_step(layer, x, dy)

        def call():
            _plane_sums.built = built if plane else (lambda: False)
            try:
                with nk.backend("compiled"):
                    run()
            finally:
                _plane_sums.built = built

        return call

    providers = {"copy": lambda: copy_out.copy_(x),
                 "torch BatchNorm2d": train_step(torch.nn.BatchNorm2d(SHAPE[1]), x, dy)}  # fmt: skip
    for name, (plane, inductor, _) in cases.items():
        providers[f"{name}: plane sums"], providers[f"{name}: inductor"] = plane, inductor
    for name, make in LAYERS.items():
        providers[f"{name}: plane sums"], providers[f"{name}: inductor"] = step(make, True), step(make, False)
    times = alternate(providers, rounds, min_run_time, warm=2)  # compile and warm every path
    ms = {name: statistics.median(values) for name, values in times.items()}

    print(f"{'reduction, (32, 64, 56, 56) CL':28s} {'plane ms':>9s} {'inductor ms':>12s} "
          f"{'plane err':>10s} {'inductor err':>13s}   (copy {ms['copy']:.3f} ms)")  # fmt: skip
    for name in cases:
        print(f"{name:28s} {ms[name + ': plane sums']:9.3f} {ms[name + ': inductor']:12.3f} "
              f"{errors[name]['plane sums']:10.2e} {errors[name]['inductor']:13.2e}")  # fmt: skip
    torch_ms = ms["torch BatchNorm2d"]
    print(f"\n{'layer, compiled, fwd+bwd':28s} {'plane ms':>9s} {'inductor ms':>12s} {'plane/torch':>12s} "
          f"{'inductor/torch':>15s}   (torch BatchNorm2d {torch_ms:.3f} ms)")  # fmt: skip
    for name in LAYERS:
        plane, inductor = ms[name + ": plane sums"], ms[name + ": inductor"]
        ratios = f"{plane / torch_ms:12.2f} {inductor / torch_ms:15.2f}"
        print(f"{name:28s} {plane:9.3f} {inductor:12.3f} {ratios}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "shape": SHAPE, "errors": errors, "ms": ms, "rounds_ms": times}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
