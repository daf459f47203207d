"""normkit's Triton layer norm (rows held in registers, and rows longer than one tile swept twice)
and its backward (per-program partial weight gradients), run on the CPU by triton's interpreter
against the float64 oracle (Ba et al. 2016, eq. 4); LayerNorm2d on channels_last inputs."""

from __future__ import annotations

import pytest
import torch

import normkit as nk
from helpers import assert_close
from kernels_interpreter import KERNEL_DEVICE, interpreted_kernels
from normkit import reference as R


@pytest.fixture(scope="module")
def ops():
    with interpreted_kernels() as module:
        yield module


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [  # shape, normalized shape, dtype, affine
    ((4, 7), (7,), F32, True),
    ((3, 5, 6), (5, 6), BF16, True),
    ((37, 33), (33,), F16, True),  # several programs, each with its own weight-gradient partial
    ((2, 20000), (20000,), F32, True),  # longer than one tile: the two-sweep path
    ((5, 3, 9), (9,), F32, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{str(c[2])[6:]}" for c in CASES])
def test_layer_norm_kernels_against_float64(ops, case):
    shape, normalized, dtype, affine = case
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(normalized, generator=g) * 0.4 + 1) if affine else None
    bias = (torch.randn(normalized, generator=g) * 0.3) if affine else None
    if affine:
        weight, bias = (
            weight.to(KERNEL_DEVICE).requires_grad_(),
            bias.to(KERNEL_DEVICE).requires_grad_(),
        )
    leaf = x.to(KERNEL_DEVICE, copy=True).requires_grad_()
    y = ops.layer_norm(leaf, normalized, weight, bias, 1e-5)
    y.backward(dy.to(KERNEL_DEVICE))
    gamma = weight.detach().double().cpu().numpy() if affine else 1.0
    beta = bias.detach().double().cpu().numpy() if affine else 0.0
    expected, cache = R.layer_norm(x.double().numpy(), len(normalized), gamma, beta)
    dx, dgamma, dbeta = R.normalize_backward(dy.double().numpy(), cache)
    assert y.dtype == dtype
    assert_close(y, torch.from_numpy(expected), dtype, "y")
    assert_close(leaf.grad, torch.from_numpy(dx), dtype, "dx")
    if affine:
        assert_close(weight.grad, torch.from_numpy(dgamma), F32, "dweight")
        assert_close(bias.grad, torch.from_numpy(dbeta), F32, "dbias")


def test_layer_norm_2d_on_channels_last_through_the_triton_backend(ops):
    ours = nk.LayerNorm2d(6).to(KERNEL_DEVICE)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, 6, 3, 5) * 2 + 1).to(KERNEL_DEVICE, memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with nk.backend("triton"):
        y = ours(a)
    with nk.backend("reference"):
        expected = ours(b)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected, F32, "y")
    assert_close(a.grad, b.grad, F32, "dx")
    # NCHW inputs have no contiguous rows of channels: the triton backend says it cannot run them
    with nk.backend("triton"), pytest.raises(nk.errors.BackendError, match="cannot run"):
        ours(x.contiguous())
