"""benchmarks/gpu_check.py on a machine without a GPU: it imports, its time budgets hold the whole
check under 8 minutes, and its CPU-side parts work: the configurations it compiles ahead of time
(those of every launch-plan row), achieved / ideal of a plan row, and the comparison of the
driver's registers with the prediction. The GPU steps themselves run only on a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton", reason="gpu_check's plans need triton (the dev extra)")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_budgets_hold_the_check_under_eight_minutes(gpu_check):
    total = sum(gpu_check.BUDGETS.values()) + gpu_check.STARTUP_ALLOWANCE
    assert total < 8 * 60 == gpu_check.TOTAL_BUDGET
    # every step the script runs has a budget, and every budget belongs to a step
    steps = set(re.findall(r'step\(\s*"(\w+)"', SCRIPT.read_text()))
    assert steps == set(gpu_check.BUDGETS)


def test_without_a_gpu_it_says_so(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_check.main(["--out", "/nonexistent/never-written"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_prewarm_configurations_cover_every_plan_kernel(gpu_check):
    from normkit.kernels import _launch_plans as launch_plans

    launches = gpu_check.plan_launches(("bfloat16",))
    keys = [gpu_check.launch_key(launch) for launch in launches]
    assert len(keys) == len(set(keys))
    planned = {
        launch.kernel
        for row in launch_plans.plan_table(devices=(launch_plans.H100,))
        for launch in row.launches
    }
    assert {launch.name for launch in launches} == planned
    assert all(launch.kernel.__class__.__name__ in ("JITFunction", "InterpretedFunction")
               for launch in launches)  # fmt: skip


def test_achieved_over_ideal(gpu_check):
    from normkit.kernels import _launch_plans as launch_plans

    row = launch_plans.plan_row(launch_plans.Case("bn_fwd", (32, 64, 56, 56), "NHWC"),
                                launch_plans.H100)  # fmt: skip
    seconds = 2 * row.bytes / launch_plans.H100_BANDWIDTH  # twice the ideal time
    copy_gbps = launch_plans.H100_BANDWIDTH / 2 / 1e9  # a copy at half the spec
    result = gpu_check.achieved(row, seconds, copy_gbps)
    assert result["achieved_over_ideal"] == pytest.approx(0.5)
    assert result["achieved_over_copy"] == pytest.approx(1.0)
    assert result["measured_us"] == pytest.approx(2 * result["ideal_us"])
    assert gpu_check.achieved(row, seconds, None)["achieved_over_copy"] is None


def test_registers_are_compared_per_compilation(gpu_check):
    from normkit.kernels import _launch_plans as launch_plans

    case = launch_plans.Case("ln_bwd", (4096, 1024), "rows")
    (launch,) = launch_plans.record_case(case, 132)
    key = gpu_check.launch_key(launch)
    launch.compiled = SimpleNamespace(n_regs=96, n_spills=0)  # what the driver would say
    same = gpu_check.compare_registers({key: {"registers": 96, "spills": 0}}, [launch])
    assert same[0]["match"] and same[0]["driver_registers"] == 96
    differs = gpu_check.compare_registers({key: {"registers": 104, "spills": 0}}, [launch])
    assert not differs[0]["match"] and differs[0]["predicted_registers"] == 104
    missing = gpu_check.compare_registers({}, [launch])
    assert not missing[0]["match"] and missing[0]["predicted_registers"] is None
    table = gpu_check.format_plans_on_gpu({"rows": [], "registers": differs})
    assert "differs" in table


PREWARM = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)
from normkit.kernels import _launch_plans as launch_plans
cases = [launch_plans.Case("ln_fwd", (4096, 1024), "rows"),
         launch_plans.Case("gn_fwd", (2, 320, 64, 64), "NHWC")]
gpu_check.plan_cases = lambda dtypes: cases
predicted = gpu_check.prewarm(("bfloat16",), 132, 90, 2, time.time() + 240)
print(json.dumps([[list(k), v] for k, v in predicted.items()]))
"""


def test_prewarm_compiles_the_plans_ahead_of_time(tmp_path):
    """The prewarm step on two plan rows, for sm_90, in two processes (as on the GPU machine)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PREWARM), str(SCRIPT)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = json.loads(result.stdout.strip().splitlines()[-1])
    kernels = {key[0] for key, _ in predicted}
    assert kernels == {"_layer_norm_forward_kernel", "_moments_kernel",
                       "_merge_moments_kernel", "_normalize_kernel"}  # fmt: skip
    for _, row in predicted:
        assert row["ok"] and row["target"] == "sm_90 (H100)" and row["registers"] > 0, row
    assert any((tmp_path / "cache").iterdir())  # the cache the JIT would read
