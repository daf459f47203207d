"""Compile every Triton kernel of normkit ahead of time for the A100 (sm_80) and the H100 (sm_90),
without a GPU, and check registers, spills and occupancy; then print the launch plans of the
shapes of docs/benchmarks.md with the bytes each kernel moves.

    python benchmarks/aot_check.py                       # every configuration (about 25 min on 2 cores)
    python benchmarks/aot_check.py --ci                  # one per kernel, path and dtype (< 1 min)
    python benchmarks/aot_check.py --json aot.json       # also write the rows as a JSON list
    python benchmarks/aot_check.py --plans-only          # the launch plans alone (seconds)

Configurations are what the launchers choose (normkit.kernels._aot.configurations): every
compile-time flag the entry points reach (activation, residual, training or eval, affine or not,
running statistics, InPlace-ABN's from-output backward, which gradients are asked for), the tile
shapes and warps of the plans on the docs' shapes, each in float32, bfloat16 and float16. ``--ci``
keeps per kernel, path (the flags that change the loop structure) and dtype the heaviest one: the
largest tile per thread with every optional input and the costliest activation.

Each row: kernel, configuration, input dtype, target, registers per thread, spill bytes, shared
memory, warps, resident CTAs per SM allowed by registers and in all (occupancy formula in
normkit/kernels/_aot.py). Fails (exit 1) on a compile error, any spill, or fewer than 2 CTAs per SM
by registers; and on a launch plan that leaves the SMs unfilled without a reason or falls back to
one program per channel with a long serial loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for a GPU, never interpret

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from normkit.kernels import _aot as aot  # noqa: E402
from normkit.kernels import _launch_plans as launch_plans  # noqa: E402

# The flags that change a kernel's loop structure; --ci keeps the heaviest configuration per
# kernel, value of these, and dtype.
PATH_FLAGS = ("INTERLEAVED", "FUSED", "SINGLE", "FROM_OUTPUT", "TRAINING")
ACTIVATION_COST = {0: 0, 1: 1, 2: 1, 5: 2, 3: 2, 4: 3}  # identity .. gelu (erf): work per element


def heaviness(launch) -> tuple:
    """Order configurations by expected register pressure: elements per thread of the tile, then
    optional inputs and outputs, then the activation."""
    k = launch.constexprs
    tile = k.get("BLOCK_A", k.get("BLOCK_M", 1)) * k.get("BLOCK_COLS", k.get("BLOCK_W", 1))
    per_thread = tile / (32 * launch.num_warps)
    flags = sum(
        bool(k.get(name)) for name in ("HAS_Z", "HAS_W", "HAS_B", "WRITE_DX", "HAS_RUNNING")
    )
    return (per_thread, flags, ACTIVATION_COST.get(k.get("ACT", 0), 0), tile)


def ci_selection(launches) -> list:
    best: dict[tuple, object] = {}
    for launch in launches:
        key = (
            launch.name,
            aot.input_dtype(launch),
            tuple(launch.constexprs.get(f) for f in PATH_FLAGS),
        )
        if key not in best or heaviness(launch) > heaviness(best[key]):
            best[key] = launch
    return list(best.values())


_WORKER_LAUNCHES: list = []


def _init_worker(full: bool, ci: bool) -> None:
    global _WORKER_LAUNCHES
    launches = aot.configurations(full=full)
    _WORKER_LAUNCHES = ci_selection(launches) if ci else launches


def _compile(job: tuple[int, str]) -> dict:
    index, target = job
    return aot.compile_launch(_WORKER_LAUNCHES[index], aot.TARGETS[target]).as_dict()


def compile_all(full: bool, ci: bool, targets: list[str], jobs: int, progress) -> list[dict]:
    launches = aot.configurations(full=full)
    launches = ci_selection(launches) if ci else launches
    work = [(i, t) for t in targets for i in range(len(launches))]
    rows: list[dict] = []
    if jobs <= 1:
        global _WORKER_LAUNCHES
        _WORKER_LAUNCHES = launches
        for done, job in enumerate(work, 1):
            rows.append(_compile(job))
            progress(done, len(work))
        return rows
    with ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(full, ci)) as pool:
        for done, row in enumerate(pool.map(_compile, work, chunksize=8), 1):
            rows.append(row)
            progress(done, len(work))
    return rows


def format_rows(rows: list[dict]) -> str:
    header = (
        f"{'kernel':27s} {'dtype':8s} {'target':13s} {'regs':>4s} {'spill B':>7s} {'smem B':>7s} "
        f"{'warps':>5s} {'CTA/SM regs':>11s} {'CTA/SM':>6s}  configuration"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        flag = "" if r["ok"] else "  <-- " + "; ".join(r["problems"])
        lines.append(
            f"{r['kernel']:27s} {r['dtype']:8s} {r['target']:13s} {r['registers']:4d} "
            f"{r['spills']:7d} {r['shared']:7d} {r['num_warps']:5d} {r['ctas_by_registers']:11d} "
            f"{r['ctas']:6d}  {r['config']}{flag}"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per kernel and target: configurations, most registers, fewest CTAs, spills, failures."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["target"])].append(r)
    header = (
        f"{'kernel':27s} {'target':13s} {'configs':>7s} {'max regs':>8s} {'min CTA/SM regs':>15s} "
        f"{'spill B':>7s} {'max smem B':>10s} {'failed':>6s}"
    )
    lines = [header, "-" * len(header)]
    for (kernel, target), group in sorted(groups.items()):
        compiled = [r for r in group if not r["error"]]
        lines.append(
            f"{kernel:27s} {target:13s} {len(group):7d} "
            f"{max((r['registers'] for r in compiled), default=0):8d} "
            f"{min((r['ctas_by_registers'] for r in compiled), default=0):15d} "
            f"{sum(r['spills'] for r in compiled):7d} "
            f"{max((r['shared'] for r in compiled), default=0):10d} "
            f"{sum(not r['ok'] for r in group):6d}"
        )
    return "\n".join(lines)


SHORT = {
    "_moments_kernel": "moments",
    "_merge_moments_kernel": "merge",
    "_normalize_kernel": "normalize",
    "_grad_sums_kernel": "sums",
    "_grad_coefficients_kernel": "coefficients",
    "_input_grad_kernel": "dx",
    "_layer_norm_forward_kernel": "ln forward",
    "_layer_norm_backward_kernel": "ln backward",
}


def summary_markdown(rows: list[dict]) -> str:
    """Per kernel, target and dtype: configurations, registers, CTAs, spills, shared memory."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["target"], r["dtype"])].append(r)
    lines = [
        "| kernel | target | dtype | configurations | registers (min-max) | min CTAs/SM by "
        "registers | spill bytes | max shared B | failed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (kernel, target, dtype), group in sorted(groups.items()):
        ok = [r for r in group if not r["error"]]
        regs = [r["registers"] for r in ok] or [0]
        lines.append(
            f"| `{kernel}` | {target} | {dtype} | {len(group)} | {min(regs)}-{max(regs)} | "
            f"{min((r['ctas_by_registers'] for r in ok), default=0)} | "
            f"{sum(r['spills'] for r in ok)} | {max((r['shared'] for r in ok), default=0)} | "
            f"{sum(not r['ok'] for r in group)} |"
        )
    return "\n".join(lines)


def plans_markdown(plans: list) -> str:
    """One line per (op, shape, layout): the H100's launches (grid, programs per SM; the A100's
    programs per SM beside), bytes moved in bfloat16 and the time they take at 3.35 TB/s."""
    by_case: dict = {}
    for row in plans:
        by_case.setdefault(row.case, {})[row.device.name] = row
    lines = [
        "| op | shape | layout | launches on an H100: kernel grid (programs/SM; A100's) | "
        "MB (bf16) | ideal us at 3.35 TB/s | x minimum |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for case, devices in by_case.items():
        h100 = devices[launch_plans.H100.name]
        a100 = devices.get(launch_plans.A100.name)
        same = a100 and [r.kernel for r in a100.launches] == [r.kernel for r in h100.launches]
        parts = []
        for i, launch in enumerate(h100.launches):
            other = f"; {a100.launches[i].programs_per_sm:.1f}" if same else ""
            grid = "x".join(map(str, launch.grid))
            parts.append(
                f"{SHORT.get(launch.kernel, launch.kernel)} {grid} "
                f"({launch.programs_per_sm:.1f}{other})"
            )
        text = ", ".join(parts)
        if a100 and not same:
            text += "; A100: " + ", ".join(
                f"{SHORT.get(r.kernel, r.kernel)} {'x'.join(map(str, r.grid))} "
                f"({r.programs_per_sm:.1f})"
                for r in a100.launches
            )
        lines.append(
            f"| {case.op} | {'x'.join(map(str, case.shape))} | {case.layout} | {text} | "
            f"{h100.bytes / 1e6:.1f} | {h100.ideal_us:.1f} | {h100.bytes / h100.minimum:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true", help="the heaviest configuration per kernel, "
                        "path and dtype")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the compiled rows here, a JSON list")
    parser.add_argument("--plans-json", type=Path, help="write the launch plans here")
    parser.add_argument("--target", action="append", choices=sorted(aot.TARGETS),
                        help="repeatable; default both")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--plans-only", action="store_true", help="skip the compilation")
    parser.add_argument("--failures-only", action="store_true", help="print failing rows only")
    parser.add_argument("--markdown", type=Path, help="write the docs' tables (markdown) here")
    args = parser.parse_args(argv)
    started = time.time()
    rows: list[dict] = []
    if not args.plans_only:
        targets = args.target or sorted(aot.TARGETS)

        def progress(done, total):
            if done % 200 == 0 or done == total:
                print(f"  compiled {done}/{total} ({time.time() - started:.0f} s)", file=sys.stderr)

        rows = compile_all(not args.ci, args.ci, targets, args.jobs, progress)
        shown = [r for r in rows if not r["ok"]] if args.failures_only else rows
        print(f"# ahead-of-time compilation: {len(rows)} rows, triton {aot.triton.__version__}\n")
        print(format_rows(shown))
        print("\n## per kernel and target\n")
        print(summary(rows))
    plans = launch_plans.plan_table()
    print(
        f"\n# launch plans ({len(plans)} rows; bytes at {launch_plans.H100_BANDWIDTH / 1e12} TB/s)\n"
    )
    print(launch_plans.format_plans(plans))
    plan_problems = launch_plans.check(plans)
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"FAILED {r['kernel']} {r['dtype']} {r['target']} {r['config']}: "
              f"{'; '.join(r['problems'])}")  # fmt: skip
    for problem in plan_problems:
        print(f"FAILED plan {problem}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        text = (summary_markdown(rows) + "\n\n" if rows else "") + plans_markdown(plans)
        args.markdown.write_text(text + "\n")
    for path, value in ((args.json, rows), (args.plans_json, [p.as_dict() for p in plans])):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value, indent=1))
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} configurations pass; "
        f"{len(plan_problems)} plan problems; {time.time() - started:.0f} s",
        file=sys.stderr,
    )
    return 1 if failed or plan_problems else 0


if __name__ == "__main__":
    sys.exit(main())
