"""normkit's Triton batch-norm kernels (training forward with statistics, eval forward, backward,
with the fused residual and activation), run on the CPU by triton's interpreter against the float64
oracle: output, every gradient and the running statistics, in float32/float16/bfloat16, contiguous
and channels_last, 2- to 5-D inputs with odd sizes, on both the one-program-per-channel path and the
split path (partials per chunk, merged in a second stage), forced at small sizes by small tiles."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit as nk
from fused_oracle import PARAMS, compare, expected_batch_norm_act, make_case, run_batch_norm_act
from helpers import assert_close
from kernels_interpreter import KERNEL_DEVICE, interpreted_kernels
from normkit import reference as R


@pytest.fixture(scope="module")
def ops():
    with interpreted_kernels() as module:
        yield module


def overrides(**sizes):
    """Force the tile and the rows per chunk (imported here: the kernels load under the fixture)."""
    from normkit.kernels._utils import launch_overrides

    return launch_overrides(**sizes)


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    activation: str = "identity"
    residual: bool = False
    training: bool = True
    split: tuple[int, int] | None = None  # (tile, rows per chunk): force the two-stage path

    def __str__(self):
        path = f"split{self.split}" if self.split else "fused"
        mode = "train" if self.training else "eval"
        res = "+z" if self.residual else ""
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.shape}-{dtype}-{self.layout}-{self.activation}{res}-{mode}-{path}"


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [
    Case((4, 6, 5, 5), F32, "contiguous", "relu", residual=True),
    Case((4, 6, 5, 5), F32, "channels_last", "leaky_relu", split=(16, 8)),
    Case((4, 6, 5, 5), BF16, "channels_last", "relu", residual=True),
    Case((4, 6, 5, 5), F16, "contiguous", "gelu", split=(16, 2)),
    Case((3, 5, 7), F32, "contiguous", "silu", split=(8, 1)),
    Case((3, 5, 7), BF16, "channels_inner", "identity", split=(16, 4)),
    Case((2, 3, 3, 4, 5), F32, "channels_last", "identity", residual=True, split=(32, 8)),
    Case((2, 3, 3, 4, 5), F16, "contiguous", "relu"),
    Case((9, 5), F32, "contiguous", "identity"),
    Case((9, 5), BF16, "contiguous", "leaky_relu", split=(8, 2)),
    Case((4, 6, 5, 5), F32, "strided", "relu"),
    Case((1, 3, 33, 1), F32, "contiguous", "silu", split=(16, 1)),
    Case((4, 6, 5, 5), F32, "contiguous", "relu", residual=True, training=False),
    Case((4, 6, 5, 5), BF16, "channels_last", "silu", training=False, split=(16, 4)),
    Case((3, 5, 7), F16, "contiguous", "gelu", training=False),
]


def _kernel_fn(ops, case):
    param = PARAMS.get(case.activation, 0.0)

    def fn(x, z, mean, var, weight, bias):
        return ops.batch_norm_act(
            x, z, mean, var, weight, bias, case.training, 0.1, 1e-5, case.activation, param
        )

    return fn


@pytest.mark.parametrize("case", CASES, ids=str)
def test_batch_norm_kernels_against_float64(ops, case):
    tensors = make_case(case.shape, case.dtype, case.layout)
    tile, rows = case.split if case.split else (None, None)
    with overrides(tile=tile, rows_per_chunk=rows):
        actual = run_batch_norm_act(
            _kernel_fn(ops, case),
            tensors,
            training=case.training,
            residual=case.residual,
            device=KERNEL_DEVICE,
        )
    expected = expected_batch_norm_act(
        tensors, training=case.training, activation=case.activation, residual=case.residual
    )
    compare(actual, expected, case.dtype, str(case))
    if case.layout != "strided":  # outputs and gradients keep the input's memory layout
        assert actual["y_stride"] == actual["x_stride"], str(case)
        assert actual["dx_stride"] == actual["x_stride"], str(case)


def test_batch_norm_entry_without_affine(ops):
    """``batch_norm`` (torch.batch_norm's contract): no weight or bias, running statistics None."""
    x = (torch.randn(3, 5, 7, dtype=torch.float64) * 3 + 1).float().to(KERNEL_DEVICE)
    x.requires_grad_()
    y = ops.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected, cache = R.batch_norm_train(x.detach().double().cpu().numpy(), np.ones(5), np.zeros(5))
    dx, _, _ = R.batch_norm_backward(dy.double().cpu().numpy(), cache)
    assert_close(y, torch.from_numpy(expected), torch.float32, "y")
    assert_close(x.grad, torch.from_numpy(dx), torch.float32, "dx")


@pytest.mark.parametrize("split", [None, (16, 4)], ids=["fused", "split"])
def test_statistics_stay_exact_far_from_zero(ops, split):
    """Mean 1e4, standard deviation 1, in float32: centred partials merged with Chan's formula keep
    the variance to float32 accuracy; E[x^2] - E[x]^2 would lose it entirely (ulp(1e8) = 8)."""
    x = (torch.randn(16, 2, 8, 8, dtype=torch.float64) + 1e4).float().to(KERNEL_DEVICE)
    exact = x.double().var(dim=(0, 2, 3), correction=1)
    mean, var = x.new_zeros(2), x.new_ones(2)
    tile, rows = split if split else (None, None)
    with overrides(tile=tile, rows_per_chunk=rows):
        ops.batch_norm(x, mean, var, None, None, True, 1.0, 1e-5)  # momentum 1: var = batch's
    relative = ((var.double() - exact).abs() / exact).max().item()
    assert relative < 1e-3, relative
    assert_close(mean, x.double().mean(dim=(0, 2, 3)), torch.float32, "mean")


def test_split_path_is_deterministic_and_agrees_with_fused(ops):
    x = torch.randn(6, 4, 7, 3).to(KERNEL_DEVICE, memory_format=torch.channels_last)
    weight, bias = torch.rand(4, device=x.device) + 0.5, torch.randn(4, device=x.device)

    def run():
        return ops.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)

    with overrides(tile=8, rows_per_chunk=3):
        first, second = run(), run()
    assert torch.equal(first, second)  # a fixed merge order: no atomics, no run-to-run noise
    fused = run()
    assert_close(first, fused, torch.float32, "split vs fused")


@settings(max_examples=6, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    channels_last=st.booleans(),
    tile=st.sampled_from([8, 16, 64]),
    rows=st.integers(1, 6),
)
def test_random_shapes(ops, n, c, spatial, channels_last, tile, rows):
    shape = (n, c, *spatial)
    if n * max(1, int(np.prod(spatial))) < 2:
        n, shape = 2, (2, c, *spatial)
    layout = "channels_inner" if channels_last and spatial else "contiguous"
    tensors = make_case(shape, torch.float32, layout, seed=n + c)
    case = Case(shape, torch.float32, layout, "leaky_relu", residual=True, split=(tile, rows))
    with overrides(tile=tile, rows_per_chunk=rows):
        actual = run_batch_norm_act(
            _kernel_fn(ops, case), tensors, training=True, residual=True, device=KERNEL_DEVICE
        )
    expected = expected_batch_norm_act(
        tensors, training=True, activation="leaky_relu", residual=True
    )
    compare(actual, expected, torch.float32, str(case))


def test_layer_through_the_triton_backend_matches_torch(ops):
    """nk.BatchNorm2d under nk.backend("triton"): torch.nn's outputs, gradients and buffers over
    training and eval steps, including a non-finite batch that the guard keeps out."""
    ours, theirs = nk.BatchNorm2d(4).to(KERNEL_DEVICE), torch.nn.BatchNorm2d(4).to(KERNEL_DEVICE)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    for step, training in enumerate([True, True, False]):
        x = torch.randn(3, 4, 5, 2, generator=torch.Generator().manual_seed(step)) * 2 + 1
        x = x.to(KERNEL_DEVICE)
        ours.train(training)
        theirs.train(training)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        with nk.backend("triton"):
            y = ours(a)
        y_torch = theirs(b)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_torch.backward(dy)
        assert_close(y, y_torch, torch.float32, f"step {step} y")
        assert_close(a.grad, b.grad, torch.float32, f"step {step} dx")
        assert_close(ours.weight.grad, theirs.weight.grad, torch.float32, "dweight")
        for name, buffer in theirs.named_buffers():
            assert_close(getattr(ours, name), buffer, torch.float32, name)
        ours.zero_grad()
        theirs.zero_grad()
    ours.train()
    before = ours.running_var.clone()
    with nk.backend("triton"):
        ours(torch.full((3, 4, 5, 2), float("nan"), device=KERNEL_DEVICE))
    assert torch.equal(ours.running_var, before)
    assert int(ours.num_batches_skipped) == 1


@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="about the interpreter on the CPU")
def test_triton_backend_claims_cpu_tensors_only_under_the_interpreter(ops, monkeypatch):
    from normkit.functional import _dispatch

    x = torch.randn(2, 3)
    assert _dispatch.implementations("batch_norm")["triton"].supports(x)
    assert not _dispatch.implementations("batch_norm")["triton"].supports(x.double())
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not _dispatch.implementations("batch_norm")["triton"].supports(x)
    with nk.backend("triton"), pytest.raises(nk.errors.BackendError, match="cannot run"):
        nk.BatchNorm1d(3)(x)
