"""normkit's Triton group norm, run on the CPU by triton's interpreter against the float64 oracle
(Wu & He 2018, eqs. 1-3, with the backward of §3 of Ioffe & Szegedy over each group): output and
every gradient, float32/float16/bfloat16, contiguous and channels_last, 2- to 5-D, odd sizes, one
group (layer norm over (C, *)) and C groups (instance norm), with the split path forced."""

from __future__ import annotations

import pytest
import torch

import normkit as nk
from fused_oracle import layout_tensor
from helpers import assert_close
from kernels_interpreter import KERNEL_DEVICE, interpreted_kernels
from normkit import reference as R


@pytest.fixture(scope="module")
def ops():
    with interpreted_kernels() as module:
        yield module


def overrides(**sizes):
    from normkit.kernels._utils import launch_overrides

    return launch_overrides(**sizes)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [  # shape, groups, dtype, layout, affine, (tile, rows per chunk) or None
    ((4, 6, 5, 5), 3, F32, "contiguous", True, None),
    ((4, 6, 5, 5), 2, BF16, "channels_last", True, (16, 4)),
    ((3, 5, 7), 5, F16, "contiguous", True, (8, 1)),
    ((2, 6, 3, 4, 5), 1, F32, "channels_last", True, (32, 8)),
    ((5, 12), 3, F32, "contiguous", True, None),
    ((2, 4, 7, 3), 2, F32, "contiguous", False, None),
    ((3, 6, 9), 2, BF16, "channels_inner", True, (16, 2)),
]


def _ids(case):
    shape, groups, dtype, layout, affine, split = case
    return f"{shape}-G{groups}-{str(dtype)[6:]}-{layout}{'' if affine else '-no_affine'}-{split}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_group_norm_kernels_against_float64(ops, case):
    shape, groups, dtype, layout, affine, split = case
    g = torch.Generator().manual_seed(3)
    values = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(shape[1], generator=g) * 0.4 + 1) if affine else None
    bias = (torch.randn(shape[1], generator=g) * 0.3) if affine else None
    if affine:
        weight, bias = (
            weight.to(KERNEL_DEVICE).requires_grad_(),
            bias.to(KERNEL_DEVICE).requires_grad_(),
        )
    leaf = values.to(KERNEL_DEVICE, copy=True).requires_grad_()
    x = layout_tensor(leaf, layout)
    tile, rows = split if split else (None, None)
    with overrides(tile=tile, rows_per_chunk=rows):
        y = ops.group_norm(x, groups, weight, bias, 1e-5)
        y.backward(dy.to(KERNEL_DEVICE))
    gamma = weight.detach().double().cpu().numpy() if affine else 1.0
    beta = bias.detach().double().cpu().numpy() if affine else 0.0
    expected, cache = R.group_norm(values.double().numpy(), groups, gamma, beta)
    grouped_dy = dy.double().numpy().reshape(cache.x.shape)
    dx, dgamma, dbeta = R.normalize_backward(grouped_dy, cache)
    label = _ids(case)
    assert y.dtype == dtype and y.stride() == x.stride(), label
    assert_close(y, torch.from_numpy(expected), dtype, f"{label} y")
    assert_close(leaf.grad, torch.from_numpy(dx.reshape(shape)), dtype, f"{label} dx")
    if affine:
        assert_close(weight.grad, torch.from_numpy(dgamma.reshape(-1)), F32, f"{label} dweight")
        assert_close(bias.grad, torch.from_numpy(dbeta.reshape(-1)), F32, f"{label} dbias")


def test_group_norm_layer_through_the_triton_backend_matches_torch(ops):
    ours, theirs = nk.GroupNorm(2, 6).to(KERNEL_DEVICE), torch.nn.GroupNorm(2, 6).to(KERNEL_DEVICE)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    x = (torch.randn(3, 6, 4, 5) * 3 + 2).to(KERNEL_DEVICE, memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with nk.backend("triton"):
        y = ours(a)
    y_torch = theirs(b)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_torch.backward(dy)
    assert y.is_contiguous(
        memory_format=torch.channels_last
    )  # torch's CUDA kernel once lost it (pytorch#111824)
    assert_close(y, y_torch, F32, "y")
    assert_close(a.grad, b.grad, F32, "dx")
    assert_close(ours.weight.grad, theirs.weight.grad, F32, "dweight")
    assert_close(ours.bias.grad, theirs.bias.grad, F32, "dbias")
