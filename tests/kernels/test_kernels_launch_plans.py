"""Launch plans of the Triton kernels, computed without a GPU (normkit.kernels._launch_plans and the
pure plan functions of normkit.kernels._utils and layer_norm): the docs' shapes fill an H100's 132
and an A100's 108 SMs with at least two programs per SM (or say why they cannot), no reduction is
left to one program per channel with a long serial loop, the split covers every tile exactly once,
and the bytes each launch moves follow its sweeps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the launch plans need triton (the dev extra)")


@pytest.fixture(scope="module")
def plans():
    # imported here: tests/kernels_interpreter.py may re-import normkit.kernels between modules
    from normkit.kernels import _launch_plans as launch_plans

    return launch_plans


@pytest.fixture(scope="module")
def table(plans):
    return plans.plan_table()


def test_the_docs_shapes_fill_the_device_and_never_fall_back(plans, table):
    assert plans.check(table) == []
    assert {r.device.multiprocessors for r in table} == {132, 108}
    for row in table:
        assert row.launches, row.case
        for launch in row.launches:
            assert launch.fills or launch.why, (row.case, launch)
    # the static goal: every ResNet-50 batch-norm launch has >= 2 programs per SM on an H100
    for row in table:
        if row.case.family == "bn" and row.device is plans.H100:
            for launch in row.launches:
                if launch.kernel not in plans.SECOND_STAGES:
                    assert launch.programs_per_sm >= 2, (row.case, launch)


def test_the_check_reports_an_unfilled_device_and_a_serial_fallback(plans):
    from normkit.kernels._utils import launch_overrides

    case = plans.Case("bn_fwd", (32, 64, 56, 56), "NCHW")
    assert plans.plan_row(case, plans.H100).problems == []
    # whole channels forced into one chunk: 64 programs, one per channel, each looping over its
    # 32 x 4 tiles, as a plan without the split would launch
    with launch_overrides(rows_per_chunk=10**9):
        row = plans.plan_row(case, plans.H100)
    assert row.launches[0].grid == (64, 1, 1)
    assert any("0.48 per SM" in p for p in row.problems), row.problems
    assert any("serial loop" in p for p in row.problems), row.problems
    assert plans.check([row])


def _tiles_covered(p, A, B):
    return math.ceil(A / p.block_a) * p.b_tiles


@settings(max_examples=40, deadline=None)
@given(
    P=st.integers(1, 4),
    A=st.integers(1, 5000),
    C=st.integers(1, 300),
    B=st.integers(1, 20000),
    interleaved=st.booleans(),
    sms=st.sampled_from([4, 108, 132]),
)
def test_plan_grid_covers_every_tile_once_and_fills_what_it_can(P, A, C, B, interleaved, sms):
    from normkit.kernels._utils import (
        DEFAULT_TILE,
        MIN_PROGRAMS_PER_SM,
        MIN_TILE,
        PROGRAMS_PER_SM,
        plan_grid,
    )

    if interleaved:
        B = 1
    p = plan_grid(P, A, C, B, interleaved, sms)
    tiles = _tiles_covered(p, A, B)
    assert p.block_a * p.block_cols <= DEFAULT_TILE
    assert p.chunks * p.items_per_chunk >= tiles > (p.chunks - 1) * p.items_per_chunk
    if not interleaved:
        assert p.block_cols <= triton_next_power_of_2(B) and p.channel_programs == C
    programs = P * p.channel_programs * p.chunks
    # fill: about PROGRAMS_PER_SM per SM, or every tile its own program
    assert programs >= min(PROGRAMS_PER_SM * sms, P * p.channel_programs * tiles) // 2
    # tiles shrink (not below MIN_TILE) while the tensor has too few of them
    if p.block_a * p.block_cols > MIN_TILE and p.block_a * p.block_cols < DEFAULT_TILE:
        assert P * p.channel_programs * tiles >= MIN_PROGRAMS_PER_SM * sms


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_a_long_channel_splits_along_its_contiguous_axis():
    """One 224 x 224 image of 3 channels (NCHW): instead of 3 programs each looping over its
    channel, the tiles of each channel (1024 values: the tensor is too small for 4096) are split
    into chunks along H*W, one tile each."""
    from normkit.kernels._utils import plan_grid

    p = plan_grid(1, 1, 3, 224 * 224, False, 132)
    assert p.channel_programs == 3 and p.block_cols == 1024 and p.b_tiles == 49
    assert p.chunks == 49 and p.items_per_chunk == 1
    big = plan_grid(8, 1, 3, 224 * 224, False, 132)  # 8 images: 4096-value tiles, 13 per image
    assert (big.block_cols, big.b_tiles, big.chunks) == (4096, 13, 13)


def test_small_tensors_get_smaller_tiles_to_fill_the_device():
    from normkit.kernels._utils import plan_grid

    # ResNet-50's last batch norm at batch 32, channels_last: 196 tiles of 4096 for 264 programs
    p = plan_grid(1, 32 * 49, 512, 1, True, 132)
    assert p.block_a * p.block_cols == 2048 and p.num_warps == 4
    assert p.channel_programs * p.chunks >= 2 * 132


def test_row_plan_keeps_a_row_in_registers_up_to_4096_values():
    from normkit.kernels.layer_norm import row_plan

    single = row_plan(4096, 1024, 132)
    assert single.single and (single.block_m, single.block_w, single.num_warps) == (4, 1024, 8)
    assert single.forward_programs == 1024
    # backward: about 4 programs per SM, each owning whole tiles of rows (8 rows = 2 tiles here)
    assert single.rows_per_program % single.block_m == 0
    assert 2 * 132 <= single.backward_programs <= 4 * 132
    assert single.backward_programs * single.rows_per_program >= 4096
    wide = row_plan(4096, 8192, 132)
    assert not wide.single and wide.block_w == 4096 and wide.forward_programs == 4096


def test_traffic_counts_every_sweep(plans):
    ts = 32 * 64 * 56 * 56 * 2  # bfloat16
    eval_row = plans.plan_row(plans.Case("bn_eval", (32, 64, 56, 56), "NCHW"), plans.H100)
    assert [r.kernel for r in eval_row.launches] == ["_normalize_kernel"]
    assert eval_row.bytes == 2 * ts + 4 * 64 * 4  # x, y; running mean and var, weight, bias read
    assert eval_row.bytes == pytest.approx(eval_row.minimum, rel=1e-3)
    split = plans.plan_row(plans.Case("bn_fwd", (32, 64, 56, 56), "NCHW"), plans.H100)
    assert [r.kernel for r in split.launches] == [
        "_moments_kernel", "_merge_moments_kernel", "_normalize_kernel",
    ]  # fmt: skip
    assert split.bytes == pytest.approx(3 * ts, rel=0.01)  # statistics sweep + normalize sweep
    backward = plans.plan_row(plans.Case("bn_bwd", (32, 64, 56, 56), "NHWC"), plans.H100)
    assert backward.bytes == pytest.approx(5 * ts, rel=0.02)  # sums sweep (x, dy) + dx sweep
    ln = plans.plan_row(plans.Case("ln_fwd", (4096, 1024), "rows"), plans.H100)
    assert ln.bytes == 2 * 4096 * 1024 * 2 + 2 * 4096 * 4 + 2 * 1024 * 4
    for row in (eval_row, split, backward, ln):
        assert row.ideal_us == pytest.approx(row.bytes / 3.35e12 * 1e6)


def test_plans_record_without_running_anything(plans):
    """Planning runs the entry points on meta tensors: nothing is launched or allocated."""
    from normkit.kernels._utils import recording

    case = plans.Case("gn_bwd", (2, 320, 64, 64), "NHWC", torch.float32)
    with recording() as outer:
        launches = plans.record_case(case, 132)
    assert outer == []  # the plan's own recordings are nested and separate
    assert [launch.name for launch in launches] == [
        "_grad_sums_kernel", "_grad_coefficients_kernel", "_input_grad_kernel",
    ]  # fmt: skip
    assert all(launch.compiled is None for launch in launches)
    x = launches[0].named_args()["src_ptr"]
    assert x.device.type == "meta" and x.dtype == torch.float32
