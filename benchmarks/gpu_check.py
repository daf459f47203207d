"""One-call GPU check of normkit's Triton kernels: correctness on the GPU, then every figure.

Run on a CUDA machine from a copy of the repository (no installation, no network; PyTorch >= 2.11
and Triton 3.6), in one command:

    PYTHONPATH=src:tests python benchmarks/gpu_check.py --out results/gpu

Steps, each timed and recorded even if a later one fails, each within its time budget
(:data:`BUDGETS`, printed at the start; a step that reaches its budget stops and says how far it
got), so that the whole check ends within 8 minutes:

1. copy: the roofline, ``y.copy_(x)`` GB/s at 256 MB, 512 MB and 1 GB;
2. prewarm: every kernel configuration of the launch plans (normkit.kernels._launch_plans) compiled
   ahead of time for this GPU's capability in parallel processes (normkit.kernels._aot), which
   fills triton's cache for the later steps and gives ptxas's registers and spills per
   configuration;
3. sweep: a built-in sweep of the kernels against the float64 oracle (every op, dtype and
   layout; both the one-program-per-channel and the split paths);
4. plans: every row of the launch plans (ResNet-50 batch norms at batch 32 and 256, NCHW and
   NHWC; SD-UNet group norms; transformer layer norms; bfloat16 and float32) timed with
   triton.testing.do_bench: achieved GB/s of the bytes the plan moves, achieved / ideal against
   the spec 3.35 TB/s and against this run's copy; and the registers and spills the driver
   reports for every kernel launched, beside the ahead-of-time prediction of step 2;
5. speed: every op of normkit.benchmark at the PERF shapes, bfloat16 and float32, NCHW and NHWC;
   triton backend against torch with cuDNN and with cuDNN disabled;
6. memory: bytes saved for backward and the peak memory of a block's training step;
7. pytest: the kernel test files (tests/kernels/test_kernels_*.py and the triton cases of
   tests/nn/test_inplace_abn.py) and SyncBatchNorm's CUDA/NCCL tests
   (tests/distributed/test_sync_batch_norm_gpu.py) with NORMKIT_KERNEL_DEVICE=cuda, when pytest
   and hypothesis are importable, in the time that is left.

Prints one table per step with the device name and writes gpu_check.json (and the pytest log) to
``--out``. ``--quick`` runs one shape per family in the speed step and bfloat16 plans only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "src", ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from normkit import benchmark as B  # noqa: E402

# Seconds per step. Their sum, plus CUDA's start and Python's imports, stays under the 8 minutes
# (480 s) the check may take (470 s planned); a step that reaches its budget stops where it is
# and says so.
BUDGETS = {
    "copy": 15,
    "prewarm": 40,
    "sweep": 50,
    "plans": 110,
    "speed": 110,
    "memory": 15,
    "pytest": 90,
}
TOTAL_BUDGET = 480
STARTUP_ALLOWANCE = 40  # CUDA context, imports, writing the JSON
PLAN_DTYPES = ("bfloat16", "float32")

GPU_TESTS = [
    "tests/kernels/test_kernels_batch_norm.py",
    "tests/kernels/test_kernels_group_norm.py",
    "tests/kernels/test_kernels_layer_norm.py",
    "tests/nn/test_inplace_abn.py::test_triton_equals_the_unfused_computation",
    # SyncBatchNorm on CUDA: one GPU always, NCCL across two or more when the machine has them
    "tests/distributed/test_sync_batch_norm_gpu.py",
]


def run_pytest(out: Path, seconds: float) -> dict:
    """The kernel tests on the GPU (compiled kernels, CUDA tensors), stopped after ``seconds``."""
    missing = [m for m in ("pytest", "hypothesis") if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "not run", "why": f"{', '.join(missing)} not importable here"}
    env = dict(
        os.environ, NORMKIT_KERNEL_DEVICE="cuda", PYTHONPATH=f"{ROOT / 'src'}:{ROOT / 'tests'}"
    )
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "pytest", *GPU_TESTS, "-q", "-p", "no:cacheprovider",
               "-o", "addopts=", "--rootdir", str(ROOT)]  # fmt: skip
    started = time.time()
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(seconds, 1)
        )
    except subprocess.TimeoutExpired as expired:
        log = _text(expired.stdout) + _text(expired.stderr)
        (out / "gpu_check_pytest.log").write_text(log)
        return {"status": "cut at budget", "seconds": round(time.time() - started, 1),
                "summary": log.strip().splitlines()[-1] if log.strip() else ""}  # fmt: skip
    log = result.stdout + result.stderr
    (out / "gpu_check_pytest.log").write_text(log)
    summary = log.strip().splitlines()[-1] if log.strip() else ""
    return {"status": "passed" if result.returncode == 0 else "FAILED",
            "summary": summary, "seconds": round(time.time() - started, 1)}  # fmt: skip


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def sweep(device: str = "cuda", deadline: float = float("inf")) -> list[dict]:
    """Every kernel against the float64 oracle on the GPU, in both launch paths (until
    ``deadline``, a time.time(); the cases not reached are recorded as such)."""
    from fused_oracle import PARAMS, compare, expected_batch_norm_act, make_case, run_batch_norm_act
    from helpers import assert_close
    from normkit import reference as R
    from normkit.kernels import ops
    from normkit.kernels._utils import launch_overrides

    results = []

    def check(name, fn):
        if time.time() > deadline:
            results.append({"case": name, "ok": True, "skipped": "budget"})
            return
        try:
            fn()
            results.append({"case": name, "ok": True})
        except Exception as error:  # record and go on: the sweep reports every case
            results.append({"case": name, "ok": False, "error": f"{type(error).__name__}: {error}"})

    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    bn_cases = [  # shape, layout, activation, residual, training, (tile, rows per chunk) or None
        ((4, 6, 5, 5), "contiguous", "relu", True, True, None),
        ((4, 6, 5, 5), "channels_last", "leaky_relu", False, True, (64, 4)),
        ((3, 5, 7), "contiguous", "silu", False, True, (32, 1)),
        ((3, 5, 7), "channels_inner", "gelu", True, False, None),
        ((2, 3, 3, 4, 5), "channels_last", "identity", False, True, (256, 2)),
        ((9, 5), "contiguous", "identity", False, True, None),
        ((16, 64, 14, 14), "contiguous", "relu", False, True, None),
        ((16, 64, 14, 14), "channels_last", "relu", True, True, None),
        ((16, 64, 14, 14), "contiguous", "identity", False, True, (1024, 2)),
    ]
    for shape, layout, activation, residual, training, split in bn_cases:
        for dtype in dtypes:
            name = f"bn {shape} {dtype} {layout} {activation} z={residual} train={training} {split}"

            def one(shape=shape, dtype=dtype, layout=layout, activation=activation,
                    residual=residual, training=training, split=split, name=name):  # fmt: skip
                case = make_case(shape, dtype, layout)
                param = PARAMS.get(activation, 0.0)

                def fn(x, z, m, v, w, b):
                    return ops.batch_norm_act(x, z, m, v, w, b, training, 0.1, 1e-5,
                                              activation, param)  # fmt: skip

                tile, rows = split or (None, None)
                with launch_overrides(tile=tile, rows_per_chunk=rows):
                    actual = run_batch_norm_act(
                        fn, case, training=training, residual=residual, device=device
                    )
                expected = expected_batch_norm_act(
                    case, training=training, activation=activation, residual=residual
                )
                compare(actual, expected, dtype, name)

            check(name, one)
    for shape, groups in (((4, 6, 5, 5), 3), ((2, 64, 16, 16), 32), ((3, 5, 7), 5)):
        for dtype in dtypes:
            for channels_last in (False, True):
                if channels_last and len(shape) != 4:
                    continue
                name = f"gn {shape} G={groups} {dtype} channels_last={channels_last}"

                def one(
                    shape=shape, groups=groups, dtype=dtype, channels_last=channels_last, name=name
                ):
                    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype)
                    w = torch.rand(shape[1]) + 0.5
                    b = torch.randn(shape[1])
                    xc = x.to(device)
                    if channels_last:
                        xc = xc.to(memory_format=torch.channels_last)
                    y = ops.group_norm(xc, groups, w.to(device), b.to(device), 1e-5)
                    expected, _ = R.group_norm(x.double().numpy(), groups, w.double().numpy(),
                                               b.double().numpy())  # fmt: skip
                    assert_close(y, torch.from_numpy(expected), dtype, name)

                check(name, one)
    for shape in ((64, 1024), (8, 20000), (37, 33)):
        for dtype in dtypes:
            name = f"ln {shape} {dtype}"

            def one(shape=shape, dtype=dtype, name=name):
                x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype)
                w = torch.rand(shape[-1]) + 0.5
                b = torch.randn(shape[-1])
                xc = x.to(device, copy=True).requires_grad_()
                y = ops.layer_norm(xc, (shape[-1],), w.to(device), b.to(device), 1e-5)
                dy = torch.randn(shape, dtype=torch.float64).to(dtype)
                y.backward(dy.to(device))
                expected, cache = R.layer_norm(x.double().numpy(), 1, w.double().numpy(),
                                               b.double().numpy())  # fmt: skip
                dx, _, _ = R.normalize_backward(dy.double().numpy(), cache)
                assert_close(y, torch.from_numpy(expected), dtype, name + " y")
                assert_close(xc.grad, torch.from_numpy(dx), dtype, name + " dx")

            check(name, one)
    return results


def copy_roofline(timing: B.Timing) -> list[dict]:
    rows = []
    for megabytes in (256, 512, 1024):
        x = torch.empty(megabytes * 2**20 // 4, device="cuda")
        y = torch.empty_like(x)
        seconds = timing.compare("cuda", {"copy": lambda x=x, y=y: y.copy_(x)})["copy"]
        rows.append({"megabytes": megabytes, "gbps": 2 * x.nbytes / seconds / 1e9})
    return rows


# --- the launch plans on the GPU: prewarm, achieved / ideal, registers ------------------------------


def plan_cases(dtypes=PLAN_DTYPES) -> list:
    """Every plan row of normkit.kernels._launch_plans (the docs' shapes) in each dtype."""
    from dataclasses import replace

    from normkit.kernels import _launch_plans as launch_plans

    return [
        replace(case, dtype=getattr(torch, dtype))
        for dtype in dtypes
        for case in launch_plans.doc_cases()
    ]


def launch_key(launch) -> tuple:
    """What makes triton compile a kernel anew: kernel, launcher's choices, dtypes, specialization."""
    from normkit.kernels import _aot as aot

    return (launch.name, aot.config_label(launch), aot.input_dtype(launch),
            aot.signature_label(launch))  # fmt: skip


def plan_launches(dtypes=PLAN_DTYPES, multiprocessors: int = 132) -> list:
    """One launch (on meta tensors) per distinct compilation the plan rows need."""
    from normkit.kernels import _launch_plans as launch_plans

    seen: dict[tuple, object] = {}
    for case in plan_cases(dtypes):
        for launch in launch_plans.record_case(case, multiprocessors):
            seen.setdefault(launch_key(launch), launch)
    return list(seen.values())


_PREWARM: list = []


def _prewarm_init(dtypes, multiprocessors) -> None:
    global _PREWARM
    os.environ.pop("TRITON_INTERPRET", None)
    _PREWARM = plan_launches(dtypes, multiprocessors)


def _prewarm_one(job: tuple[int, int]) -> tuple[tuple, dict]:
    from normkit.kernels import _aot as aot

    index, capability = job
    launch = _PREWARM[index]
    return launch_key(launch), aot.compile_launch(
        launch, aot.target_for_capability(capability)
    ).as_dict()


def prewarm(dtypes, multiprocessors: int, capability: int, jobs: int, deadline: float) -> dict:
    """Compile the plan rows' configurations ahead of time in ``jobs`` processes (the same source,
    target and options as the JIT, so its cache serves the later steps). Returns ptxas's report
    per launch key; configurations not compiled by ``deadline`` are left to the JIT."""
    count = len(plan_launches(dtypes, multiprocessors))
    predicted: dict[tuple, dict] = {}
    pool = ProcessPoolExecutor(jobs, initializer=_prewarm_init, initargs=(dtypes, multiprocessors))
    futures = [pool.submit(_prewarm_one, (i, capability)) for i in range(count)]
    done, _ = wait(futures, timeout=max(deadline - time.time(), 1))
    pool.shutdown(wait=False, cancel_futures=True)
    for future in done:
        if future.exception() is None:
            key, row = future.result()
            predicted[key] = row
    return predicted


def achieved(row, seconds: float, copy_gbps: float | None) -> dict:
    """A plan row's measured time against its ideal: the bytes it moves at the spec bandwidth
    (normkit.kernels._launch_plans.H100_BANDWIDTH) and at this run's copy rate."""
    gbps = row.bytes / seconds / 1e9
    return {
        "op": row.case.op, "shape": list(row.case.shape), "layout": row.case.layout,
        "dtype": str(row.case.dtype).removeprefix("torch."), "bytes": row.bytes,
        "minimum_bytes": row.minimum, "ideal_us": row.ideal_us, "measured_us": seconds * 1e6,
        "achieved_gbps": gbps, "achieved_over_ideal": row.ideal_us / (seconds * 1e6),
        "achieved_over_copy": gbps / copy_gbps if copy_gbps else None,
    }  # fmt: skip


def compare_registers(predicted: dict, launches) -> list[dict]:
    """Registers and spills the driver reports for each launched kernel (``launch.compiled``,
    triton's CompiledKernel) beside the ahead-of-time prediction for the same compilation."""
    rows = []
    for launch in launches:
        key = launch_key(launch)
        guess = predicted.get(key)
        regs = getattr(launch.compiled, "n_regs", None)
        spills = getattr(launch.compiled, "n_spills", None)
        rows.append({
            "kernel": key[0], "config": key[1], "dtype": key[2],
            "predicted_registers": guess["registers"] if guess else None,
            "driver_registers": regs,
            "predicted_spills": guess["spills"] if guess else None,
            "driver_spills": spills,
            "match": guess is not None and regs == guess["registers"],
        })  # fmt: skip
    return rows


def plans_on_gpu(predicted: dict, copy_gbps: float | None, rep_ms: int, deadline: float,
                 dtypes=PLAN_DTYPES) -> dict:  # fmt: skip
    """Time every plan row on this GPU; compare its launches with the plan and their registers
    with the prediction. Stops at ``deadline``."""
    import triton.testing

    from normkit.kernels import _launch_plans as launch_plans
    from normkit.kernels._utils import recording

    props = torch.cuda.get_device_properties(0)
    device = launch_plans.Device(props.name, props.multi_processor_count)
    cases = plan_cases(dtypes)
    rows, registers, mismatches, seen = [], [], [], set()
    for case in cases:
        if time.time() > deadline:
            break
        plan = launch_plans.plan_row(case, device)
        run = launch_plans.workload(case, "cuda")
        with recording(execute=True) as launches:
            run()
        torch.cuda.synchronize()
        ran = [(launch.name, launch.grid) for launch in launches]
        planned = [(r.kernel, r.grid) for r in plan.launches]
        if ran != planned:
            mismatches.append({"case": case.label, "planned": planned, "ran": ran})
        fresh = [launch for launch in launches if launch_key(launch) not in seen]
        seen.update(launch_key(launch) for launch in fresh)
        registers += compare_registers(predicted, fresh)
        seconds = triton.testing.do_bench(run, warmup=10, rep=rep_ms, return_mode="median") / 1e3
        rows.append(achieved(plan, seconds, copy_gbps))
        del run, launches
    return {"rows": rows, "registers": registers, "plan_mismatches": mismatches,
            "cut_at_budget": len(rows) < len(cases), "cases": len(cases)}  # fmt: skip


def format_plans_on_gpu(result: dict) -> str:
    lines = [f"{'op':7s} {'shape':17s} {'layout':6s} {'dtype':8s} {'MB':>8s} {'ideal us':>9s} "
             f"{'us':>9s} {'GB/s':>7s} {'/ideal':>6s} {'/copy':>6s}"]  # fmt: skip
    for r in result["rows"]:
        copy = f"{r['achieved_over_copy']:6.2f}" if r["achieved_over_copy"] else "     -"
        lines.append(
            f"{r['op']:7s} {'x'.join(map(str, r['shape'])):17s} {r['layout']:6s} {r['dtype']:8s} "
            f"{r['bytes'] / 1e6:8.1f} {r['ideal_us']:9.1f} {r['measured_us']:9.1f} "
            f"{r['achieved_gbps']:7.0f} {r['achieved_over_ideal']:6.2f} {copy}"
        )
    lines.append(
        f"\n{'kernel':27s} {'dtype':8s} {'predicted':>9s} {'driver':>6s} {'spills':>6s}  config"
    )
    for r in result["registers"]:
        lines.append(
            f"{r['kernel']:27s} {r['dtype']:8s} {str(r['predicted_registers']):>9s} "
            f"{str(r['driver_registers']):>6s} {str(r['driver_spills']):>6s}  {r['config']}"
            + ("" if r["match"] else "  <-- differs")
        )
    return "\n".join(lines)


def speed_rows(timing: B.Timing, shapes, deadline: float) -> list:
    """normkit.benchmark's speed table, one (op, shape) at a time until ``deadline``."""
    rows = []
    family_shapes = shapes or B.SHAPES["cuda"]
    for op, (_, _, family) in B.OPS.items():
        for shape in family_shapes[family]:
            if time.time() > deadline:
                return rows
            rows += B.speed_table(
                [op], device="cuda", dtypes=(torch.bfloat16, torch.float32), backend="triton",
                timing=timing, shapes={family: [shape]}, torch_variants=True,
                progress=lambda line: print("  " + line, file=sys.stderr, flush=True),
            )  # fmt: skip
    return rows


def print_budgets() -> None:
    total = sum(BUDGETS.values()) + STARTUP_ALLOWANCE
    print("## time budget (s): " + ", ".join(f"{k} {v}" for k, v in BUDGETS.items())
          + f", start-up {STARTUP_ALLOWANCE}: {total} of {TOTAL_BUDGET}\n")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    parser.add_argument("--quick", action="store_true", help="one shape per family; bf16 plans")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--rep-ms", type=int, default=50, help="do_bench rep per speed timing")
    parser.add_argument("--plan-rep-ms", type=int, default=20, help="do_bench rep per plan row")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="prewarm processes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: gpu_check needs one", file=sys.stderr)
        return 2
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    capability = props.major * 10 + props.minor
    report: dict = {"environment": B.environment("cuda"), "budgets": BUDGETS, "steps": {}}
    print(f"# normkit gpu_check on {device} ({props.multi_processor_count} SMs, sm_{capability})\n")
    print_budgets()

    def step(name, fn):
        began = time.time()
        deadline = began + BUDGETS[name]
        try:
            value = fn(deadline)
            report["steps"][name] = {"seconds": round(time.time() - began, 1), "result": value}
        except Exception:
            report["steps"][name] = {"seconds": round(time.time() - began, 1),
                                     "error": traceback.format_exc()}  # fmt: skip
            print(traceback.format_exc(), file=sys.stderr)
        spent = report["steps"][name]["seconds"]
        print(
            f"   [{name}: {spent:.0f} s of its {BUDGETS[name]} s; {time.time() - started:.0f} s in all]\n"
        )
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        return report["steps"][name].get("result")

    timing = B.Timing(rep_ms=args.rep_ms)
    copies = step("copy", lambda deadline: copy_roofline(timing)) or []
    print(f"## copy roofline on {device}")
    for c in copies:
        print(f"  y.copy_(x) {c['megabytes']:5d} MB: {c['gbps']:7.1f} GB/s")
    copy_gbps = max((c["gbps"] for c in copies), default=None)
    dtypes = PLAN_DTYPES[:1] if args.quick else PLAN_DTYPES
    predicted = step("prewarm", lambda deadline: prewarm(
        dtypes, props.multi_processor_count, capability, args.jobs, deadline)) or {}  # fmt: skip
    print(f"## prewarm: {len(predicted)} configurations compiled ahead of time for sm_{capability}")
    results = step("sweep", lambda deadline: sweep(deadline=deadline)) or []
    failed = [r for r in results if not r["ok"]]
    skipped = [r for r in results if r.get("skipped")]
    print(f"## built-in sweep on {device}: {len(results) - len(failed) - len(skipped)}/"
          f"{len(results)} passed, {len(skipped)} not reached within the budget")  # fmt: skip
    for r in failed[:20]:
        print(f"  FAILED {r['case']}: {r['error'][:300]}")
    plans = step("plans", lambda deadline: plans_on_gpu(
        predicted, copy_gbps, args.plan_rep_ms, deadline, dtypes)) or {}  # fmt: skip
    if plans:
        print(
            f"## launch plans on {device}: achieved / ideal (3.35 TB/s) and / copy "
            f"({copy_gbps or 0:.0f} GB/s); {len(plans['rows'])}/{plans['cases']} rows"
        )
        print(format_plans_on_gpu(plans))
        for m in plans["plan_mismatches"]:
            print(f"  PLAN MISMATCH {m['case']}: planned {m['planned']} ran {m['ran']}")
    shapes = None
    if args.quick:
        shapes = {family: shapes_[:1] for family, shapes_ in B.SHAPES["cuda"].items()}

    def speed(deadline):
        rows = speed_rows(timing, shapes, deadline)
        print(f"\n## speed on {device} (ours = triton; torch = cuDNN, or ATen with cuDNN off)")
        print(B.format_table(rows))
        return [r.__dict__ for r in rows]

    step("speed", speed)

    def memory(deadline):
        rows = B.memory_table(device="cuda", shape=(64, 256, 56, 56), dtype=torch.bfloat16,
                              backend="triton")  # fmt: skip
        print(f"\n## memory on {device} (bfloat16, 64x256x56x56)")
        print(B.format_memory(rows))
        return rows

    step("memory", memory)
    if not args.skip_pytest:
        left = TOTAL_BUDGET - STARTUP_ALLOWANCE / 2 - (time.time() - started)
        result = step("pytest", lambda deadline: run_pytest(
            args.out, min(left, deadline - time.time())))  # fmt: skip
        print(f"## kernel tests on {device}: {result}\n")
    print(f"\nwrote {args.out / 'gpu_check.json'} after {time.time() - started:.0f} s")
    bad_registers = [r for r in (plans or {}).get("registers", []) if not r["match"]]
    return 1 if failed or bad_registers or (plans or {}).get("plan_mismatches") else 0


if __name__ == "__main__":
    sys.exit(main())
