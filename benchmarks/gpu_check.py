"""One-call GPU check of normkit's Triton kernels: correctness on the GPU, then every figure.

Run on a CUDA machine from a copy of the repository (no installation, no network; PyTorch >= 2.11
and Triton 3.6), in one command:

    PYTHONPATH=src:tests python benchmarks/gpu_check.py --out results/gpu

Steps, each timed and recorded even if a later one fails:

1. correctness: the kernel test files (tests/kernels/test_kernels_*.py and the triton cases of
   tests/nn/test_inplace_abn.py) and SyncBatchNorm's CUDA/NCCL tests
   (tests/distributed/test_sync_batch_norm_gpu.py) under pytest with
   NORMKIT_KERNEL_DEVICE=cuda, when pytest and
   hypothesis are importable; and always a built-in sweep of the same kernels against the float64
   oracle (every op, dtype and layout; both the one-program-per-channel and the split paths);
2. the copy roofline: ``y.copy_(x)`` GB/s at 256 MB, 512 MB and 1 GB;
3. speed: every op of normkit.benchmark at the PERF shapes (ResNet-50 batch norms, SD-UNet group
   norms, transformer layer norms), bfloat16 and float32, NCHW and NHWC; triton backend against
   torch with cuDNN and with cuDNN disabled, medians of triton.testing.do_bench;
4. memory: bytes saved for backward and the peak memory of a block's training step.

Prints one table per step with the device name and writes gpu_check.json (and the pytest log) to
``--out``. ``--quick`` runs the correctness steps and one shape per family.
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "src", ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from normkit import benchmark as B  # noqa: E402

GPU_TESTS = [
    "tests/kernels/test_kernels_batch_norm.py",
    "tests/kernels/test_kernels_group_norm.py",
    "tests/kernels/test_kernels_layer_norm.py",
    "tests/nn/test_inplace_abn.py::test_triton_equals_the_unfused_computation",
    # SyncBatchNorm on CUDA: one GPU always, NCCL across two or more when the machine has them
    "tests/distributed/test_sync_batch_norm_gpu.py",
]


def run_pytest(out: Path) -> dict:
    """The kernel tests on the GPU (compiled kernels, CUDA tensors)."""
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
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    log = result.stdout + result.stderr
    (out / "gpu_check_pytest.log").write_text(log)
    summary = log.strip().splitlines()[-1] if log.strip() else ""
    return {"status": "passed" if result.returncode == 0 else "FAILED",
            "summary": summary, "seconds": round(time.time() - started, 1)}  # fmt: skip


def sweep(device: str = "cuda") -> list[dict]:
    """Every kernel against the float64 oracle on the GPU, in both launch paths."""
    from fused_oracle import PARAMS, compare, expected_batch_norm_act, make_case, run_batch_norm_act
    from helpers import assert_close
    from normkit import reference as R
    from normkit.kernels import ops
    from normkit.kernels._utils import launch_overrides

    results = []

    def check(name, fn):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    parser.add_argument("--quick", action="store_true", help="correctness + one shape per family")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench rep per timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: gpu_check needs one", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    report: dict = {"environment": B.environment("cuda"), "steps": {}}
    print(f"# normkit gpu_check on {device}\n")

    def step(name, fn):
        started = time.time()
        try:
            value = fn()
            report["steps"][name] = {"seconds": round(time.time() - started, 1), "result": value}
        except Exception:
            report["steps"][name] = {"seconds": round(time.time() - started, 1),
                                     "error": traceback.format_exc()}  # fmt: skip
            print(traceback.format_exc(), file=sys.stderr)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        return report["steps"][name].get("result")

    if not args.skip_pytest:
        result = step("pytest", lambda: run_pytest(args.out))
        print(f"## kernel tests on {device}: {result}\n")
    results = step("sweep", sweep) or []
    failed = [r for r in results if not r["ok"]]
    print(f"## built-in sweep on {device}: {len(results) - len(failed)}/{len(results)} passed")
    for r in failed[:20]:
        print(f"  FAILED {r['case']}: {r['error'][:300]}")
    timing = B.Timing(rep_ms=args.rep_ms)
    copies = step("copy", lambda: copy_roofline(timing)) or []
    print(f"\n## copy roofline on {device}")
    for c in copies:
        print(f"  y.copy_(x) {c['megabytes']:5d} MB: {c['gbps']:7.1f} GB/s")
    shapes = None
    if args.quick:
        shapes = {family: shapes_[:1] for family, shapes_ in B.SHAPES["cuda"].items()}

    def speed():
        rows = B.speed_table(
            device="cuda", dtypes=(torch.bfloat16, torch.float32), backend="triton",
            timing=timing, shapes=shapes, torch_variants=True,
            progress=lambda line: print("  " + line, file=sys.stderr, flush=True),
        )  # fmt: skip
        print(f"\n## speed on {device} (ours = triton; torch = cuDNN, or ATen with cuDNN off)")
        print(B.format_table(rows))
        return [r.__dict__ for r in rows]

    step("speed", speed)

    def memory():
        rows = B.memory_table(device="cuda", shape=(64, 256, 56, 56), dtype=torch.bfloat16,
                              backend="triton")  # fmt: skip
        print(f"\n## memory on {device} (bfloat16, 64x256x56x56)")
        print(B.format_memory(rows))
        return rows

    step("memory", memory)
    print(f"\nwrote {args.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
