"""Where the compiled BatchNorm2d's training step spends its time on the CPU, measured inside the
step: each C pass (the statistics' sums, normalize, the backward sums, dx), the C steps between
them (``_channel_epilogue``, where this version has them) and the rest (Python, ATen's small ops
on per-channel tensors, autograd, the running statistics' guard), float32, NCHW and channels_last.

The C libraries' functions are wrapped with a clock (``time.perf_counter`` around each call); the
step runs as in every benchmark of docs/benchmarks.md (``timing.train_step``, the allocator's freed
memory kept) with a one-pair copy of the tensor between steps, the yardstick of the bound (8 passes
at the copy's speed). The small ops cost more here than alone, because each follows a pass that
has streamed the tensor through the caches. Medians over the steps; prints a table and writes JSON.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_bn_step.py             # about a minute
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_bn_step.py --steps 20  # a smoke run
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_bn_step.py --stub      # the C calls skipped

``--stub`` replaces every C call by a no-op (outputs left unwritten: a timing, not a result): the
step is then only its rest, still after the copy of each step, and the difference from the rest
measured between real passes is what the passes' traffic costs the small ops.

It wraps only the libraries' entry points, so the same command measures an earlier checkout of
normkit (``PYTHONPATH=<checkout>/src``) without changing it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import normkit as nk
from environment import environment
from normkit.functional import _channel_pass, _plane_sums
from timing import keep_freed_memory

try:  # the C steps between the passes (absent from earlier versions)
    from normkit.functional import _channel_epilogue
except ImportError:
    _channel_epilogue = None

SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (32, 1024, 14, 14), (32, 2048, 7, 7)]


class Clocked:
    """A ctypes library whose every call adds its seconds to ``seconds[label(name, args)]``; with
    ``stub``, each call returns 0 without running."""

    def __init__(self, library, label, seconds: dict[str, list[float]], stub: bool = False):
        self._library, self._label, self._seconds, self._stub = library, label, seconds, stub

    def __getattr__(self, name):
        function = (lambda *args: 0) if self._stub else getattr(self._library, name)

        def call(*args):
            start = time.perf_counter()
            result = function(*args)
            self._seconds.setdefault(self._label(name, args), []).append(time.perf_counter() - start)
            return result

        return call


def _pass_name(name: str, args: tuple) -> str:
    if name == "channel_pass":
        return "dx" if args[0] else "normalize"
    return "stats sums" if args[2] is not None else "backward sums"  # shifted by the sampled mean


def measure(shape, channels_last: bool, steps: int, calls: dict[str, list[float]]) -> dict:
    """The step's medians; ``calls`` is where the clocked libraries write."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3 + 5
    dy = torch.randn(shape, generator=generator)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    copy = torch.empty_like(x)
    layer = nk.BatchNorm2d(shape[1])
    per_step: dict[str, list[float]] = {}
    totals: dict[str, list[float]] = {"step": [], "copy": []}
    with nk.backend("compiled"):
        for step in range(steps + 5):  # 5 warm-up steps
            calls.clear()
            leaf = x.detach().requires_grad_(True)
            start = time.perf_counter()
            layer(leaf).backward(dy)
            middle = time.perf_counter()
            copy.copy_(x)
            end = time.perf_counter()
            if step >= 5:
                totals["step"].append(middle - start)
                totals["copy"].append(end - middle)
                for name, seconds in calls.items():
                    per_step.setdefault(name, []).append(sum(seconds))
            del leaf
    ms = {name: statistics.median(values) * 1e3 for name, values in per_step.items()}
    step_ms, copy_ms = (statistics.median(totals[k]) * 1e3 for k in ("step", "copy"))
    return {
        "shape": list(shape), "layout": "CL" if channels_last else "NCHW", "step_ms": step_ms,
        "copy_ms": copy_ms, "parts_ms": ms, "rest_ms": step_ms - sum(ms.values()),
        "of_bound": 4 * copy_ms / step_ms,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--stub", action="store_true", help="skip every C call (see above)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bn_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    kept = keep_freed_memory()
    seconds: dict[str, list[float]] = {}
    plane_sums, channel_pass = _plane_sums._library(), _channel_pass._library()
    if plane_sums is None or channel_pass is None:
        raise SystemExit("the C passes are not built on this machine (a C compiler with OpenMP)")
    _plane_sums._library = lambda: Clocked(plane_sums, _pass_name, seconds, args.stub)
    _channel_pass._library = lambda: Clocked(channel_pass, _pass_name, seconds, args.stub)
    if _channel_epilogue is not None:
        epilogue = _channel_epilogue._library()
        _channel_epilogue._library = lambda: Clocked(
            epilogue, lambda name, _: "C steps", seconds, args.stub
        )
    parts = ["stats sums", "normalize", "backward sums", "dx", "C steps"]
    print(f"{'shape':16s} {'layout':6s} {'step ms':>8s} {'copy ms':>8s} {'bound':>6s} "
          + " ".join(f"{p:>13s}" for p in parts) + f" {'rest':>6s}")  # fmt: skip
    rows = []
    for shape in SHAPES:
        for channels_last in (False, True):
            row = measure(shape, channels_last, args.steps, seconds)
            rows.append(row)
            cells = " ".join(f"{row['parts_ms'].get(p, float('nan')):13.3f}" for p in parts)
            bound = "-" if args.stub else f"{row['of_bound']:.0%}"  # no passes: no bound
            print(f"{'x'.join(map(str, shape)):16s} {row['layout']:6s} {row['step_ms']:8.3f} "
                  f"{row['copy_ms']:8.3f} {bound:>6s} {cells} {row['rest_ms']:6.3f}",
                  flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(kept_freed_memory=kept, stub=args.stub), "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print("\nms per step (medians); bound: 8 passes at the one-pair copy's speed; rest: the step "
          "outside the C calls (Python, small ATen ops, autograd, the running statistics' guard)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
