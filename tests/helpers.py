"""Shared test machinery: tolerances (stated and justified once), the comparison helper, and the
declarative table of layer cases that the generic tests run over."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import nn

import normkit as nk

# --- Tolerances -------------------------------------------------------------------------------------
# An element passes when |actual - expected| <= rtol * |expected| + atol * max(rms(expected), 1),
# where `expected` is computed in float64 from the same (exactly representable) input, or by
# torch.nn. The rms scaling makes one number work for outputs (rms ~ 1) and for gradient sums of any
# size; the floor of 1 is the scale of the tests' inputs and output gradients (both O(1)): a result
# much smaller than that is a cancellation (a group of one element normalizes to exactly 0), whose
# rounding error scales with the inputs, not with itself.
#
# float64: unit roundoff u = 1.1e-16; reductions over <= 1e4 terms and the cancellation in the BN
#          backward cost a few hundred u at most. 1e-10 leaves a margin of > 1e3.
# float32: u = 6e-8; the worst errors observed against float64 are ~4e-7 on unit-scale outputs and
#          gradients (the backward subtracts three O(1) terms). 1e-5 is a margin of ~25.
# bfloat16 / float16: statistics and arithmetic run in float32, so the error is the final rounding of
#          each element to the half type, at most u|y| (u = 2^-8 for bfloat16, 2^-11 for float16),
#          plus float32-level noise. Two roundings (ours and the one we compare with) allow 2u.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2.0**-7, 2.0**-7),
    torch.float16: (2.0**-10, 2.0**-10),
}


# torch's own half-precision CPU kernels (the `native` backend) round some intermediates to the half
# type, so single elements can be ~2 ulp off; they are held to a normwise bound instead:
# max|actual - expected| <= 2u * max|expected|, two roundings of the largest value.
NORMWISE_HALF: dict[torch.dtype, float] = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_normwise_close(actual, expected, dtype: torch.dtype, what: str = "") -> None:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    if a.numel() == 0:
        return
    error, scale = (a - e).abs().max().item(), e.abs().max().item()
    bound = NORMWISE_HALF[dtype] * scale
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} (2u x max {scale:.3g})"


def assert_close(actual, expected, dtype: torch.dtype | None = None, what: str = "") -> None:
    """Compare with the tolerance of ``dtype`` (default: the actual tensor's); report the worst element."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.numel() == 0:
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(e).all(), f"{what}: expected values are not finite"
    rms = e.pow(2).mean().sqrt().item()
    bound = rtol * e.abs() + atol * max(rms, 1.0)
    excess = (a - e).abs() - bound
    worst = int(excess.flatten().argmax())
    if excess.flatten()[worst] > 0 or not torch.isfinite(a).all():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{what}: mismatch at {index}: actual {a.flatten()[worst]:.8g}, expected "
            f"{e.flatten()[worst]:.8g} (|diff| {abs(a.flatten()[worst] - e.flatten()[worst]):.3g}, "
            f"allowed {bound.flatten()[worst]:.3g}; rtol={rtol}, atol={atol} x rms {rms:.3g}, "
            f"dtype {dtype})"
        )


# --- Layer cases ------------------------------------------------------------------------------------


class ChannelsLastLayerNorm(nn.Module):
    """What users write without LayerNorm2d: permute, torch.nn.LayerNorm(C), permute back."""

    def __init__(self, num_channels: int, **kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(num_channels, **kwargs)

    def forward(self, x):
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class TorchBatchNormAnyRank(nn.modules.batchnorm._BatchNorm):
    """torch.nn's BatchNorm without its rank check (F.batch_norm itself takes any rank)."""

    def _check_input_dim(self, input):
        pass


@dataclass(frozen=True)
class LayerCase:
    """One configuration of one layer: how to build ours and torch's, and what input it takes."""

    name: str
    ours: Callable[..., nn.Module]
    theirs: Callable[..., nn.Module]
    args: tuple
    kwargs: dict = field(default_factory=dict)
    shape: tuple[int, ...] = (4, 6, 5, 5)
    # buffers where normkit deliberately differs from torch.nn (documented in the layer docstring)
    differs: frozenset[str] = frozenset()

    def build(self, dtype=torch.float32) -> tuple[nn.Module, nn.Module]:
        ours = self.ours(*self.args, **self.kwargs).to(dtype)
        theirs = self.theirs(*self.args, **self.kwargs).to(dtype)
        randomize_parameters(ours)
        _copy_state(ours, theirs)
        return ours, theirs

    @property
    def has_running_stats(self) -> bool:
        return bool(self.kwargs.get("track_running_stats", self.ours in _TRACKING_DEFAULT))

    def __str__(self) -> str:
        return self.name


_TRACKING_DEFAULT = {nk.BatchNorm1d, nk.BatchNorm2d, nk.BatchNorm3d, nk.BatchNorm}


def randomize_parameters(module: nn.Module, seed: int = 7) -> None:
    """γ and β away from 1 and 0, so a test cannot pass by ignoring them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.5 + 1.0)


def _copy_state(source: nn.Module, target: nn.Module) -> None:
    state = {k.removeprefix("norm."): v for k, v in source.state_dict().items()}
    if isinstance(target, ChannelsLastLayerNorm):
        target.norm.load_state_dict(state)
    else:
        target.load_state_dict(state)


IN_DIFFERS = frozenset({"num_batches_tracked"})  # torch's InstanceNorm never counts batches

CASES: list[LayerCase] = [
    LayerCase("bn2d", nk.BatchNorm2d, nn.BatchNorm2d, (6,)),
    LayerCase("bn2d_momentum_none", nk.BatchNorm2d, nn.BatchNorm2d, (6,), {"momentum": None}),
    LayerCase("bn2d_not_affine", nk.BatchNorm2d, nn.BatchNorm2d, (6,), {"affine": False}),
    LayerCase("bn2d_no_bias", nk.BatchNorm2d, nn.BatchNorm2d, (6,), {"bias": False}),
    LayerCase(
        "bn2d_not_tracking", nk.BatchNorm2d, nn.BatchNorm2d, (6,), {"track_running_stats": False}
    ),
    LayerCase(
        "bn2d_eps_momentum", nk.BatchNorm2d, nn.BatchNorm2d, (6,), {"eps": 1e-3, "momentum": 0.3}
    ),
    LayerCase("bn1d_2d_input", nk.BatchNorm1d, nn.BatchNorm1d, (6,), shape=(8, 6)),
    LayerCase("bn1d_3d_input", nk.BatchNorm1d, nn.BatchNorm1d, (6,), shape=(3, 6, 7)),
    LayerCase("bn3d", nk.BatchNorm3d, nn.BatchNorm3d, (6,), shape=(2, 6, 3, 4, 5)),
    LayerCase(
        "bn_any_rank_6d", nk.BatchNorm, TorchBatchNormAnyRank, (6,), shape=(2, 6, 3, 2, 2, 3)
    ),
    LayerCase("bn_any_rank_2d", nk.BatchNorm, TorchBatchNormAnyRank, (6,), shape=(5, 6)),
    LayerCase("ln_last", nk.LayerNorm, nn.LayerNorm, (5,)),
    LayerCase("ln_two_dims", nk.LayerNorm, nn.LayerNorm, ([5, 5],)),
    LayerCase("ln_no_affine", nk.LayerNorm, nn.LayerNorm, (5,), {"elementwise_affine": False}),
    LayerCase("ln_no_bias", nk.LayerNorm, nn.LayerNorm, ([6, 5, 5],), {"bias": False}),
    LayerCase("ln_3d_input", nk.LayerNorm, nn.LayerNorm, (8,), shape=(3, 7, 8)),
    LayerCase("ln2d", nk.LayerNorm2d, ChannelsLastLayerNorm, (6,)),
    LayerCase("ln2d_1d_map", nk.LayerNorm2d, ChannelsLastLayerNorm, (6,), shape=(3, 6, 7)),
    LayerCase("gn", nk.GroupNorm, nn.GroupNorm, (3, 6)),
    LayerCase("gn_one_group", nk.GroupNorm, nn.GroupNorm, (1, 6)),
    LayerCase("gn_instance_groups", nk.GroupNorm, nn.GroupNorm, (6, 6), {"affine": False}),
    LayerCase("gn_no_bias", nk.GroupNorm, nn.GroupNorm, (2, 6), {"bias": False}),
    LayerCase("gn_3d", nk.GroupNorm, nn.GroupNorm, (2, 6), shape=(2, 6, 3, 4, 3)),
    LayerCase("gn_1d", nk.GroupNorm, nn.GroupNorm, (3, 6), shape=(4, 6, 9)),
    LayerCase("in2d", nk.InstanceNorm2d, nn.InstanceNorm2d, (6,)),
    LayerCase("in2d_affine", nk.InstanceNorm2d, nn.InstanceNorm2d, (6,), {"affine": True}),
    LayerCase(
        "in2d_tracking",
        nk.InstanceNorm2d,
        nn.InstanceNorm2d,
        (6,),
        {"affine": True, "track_running_stats": True},
        differs=IN_DIFFERS,
    ),
    LayerCase(
        "in1d", nk.InstanceNorm1d, nn.InstanceNorm1d, (6,), {"affine": True}, shape=(3, 6, 9)
    ),
    LayerCase("in1d_unbatched", nk.InstanceNorm1d, nn.InstanceNorm1d, (6,), shape=(6, 9)),
    LayerCase(
        "in3d_tracking",
        nk.InstanceNorm3d,
        nn.InstanceNorm3d,
        (6,),
        {"track_running_stats": True},
        shape=(2, 6, 3, 3, 4),
        differs=IN_DIFFERS,
    ),
    LayerCase(
        "in2d_unbatched",
        nk.InstanceNorm2d,
        nn.InstanceNorm2d,
        (6,),
        {"affine": True},
        shape=(6, 4, 5),
    ),
]


def case_ids(cases) -> list[str]:
    return [c.name for c in cases]


def with_layouts(cases):
    """pytest params (case, layout): channels_last only where it exists (4-D and 5-D inputs)."""
    import pytest

    return [
        pytest.param(case, layout, id=f"{case.name}-{layout}")
        for case in cases
        for layout in ("contiguous", "channels_last")
        if layout == "contiguous" or supports_channels_last(case.shape)
    ]


def make_input(shape, dtype=torch.float32, channels_last=False, seed=0, scale=2.0, shift=0.5):
    """A deterministic input away from zero mean and unit variance (so normalization matters)."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift).to(dtype)
    if channels_last:
        x = x.to(memory_format=channels_last_format(len(shape)))
    return x


def channels_last_format(ndim: int) -> torch.memory_format:
    return {4: torch.channels_last, 5: torch.channels_last_3d}[ndim]


def supports_channels_last(shape) -> bool:
    return len(shape) in (4, 5)


def run_steps(module: nn.Module, inputs, train_flags, grad_seed=1, grad_dtype=None):
    """Forward and backward through ``module`` for each (input, training) pair.

    Output gradients are drawn in float64 and rounded to ``grad_dtype`` (default: the output's), so
    two runs in different precisions can be given exactly the same gradients. Returns a list of
    (output, input grad, {param name: grad}) per step; parameter grads are zeroed between steps.
    """
    results = []
    generator = torch.Generator().manual_seed(grad_seed)
    for x, training in zip(inputs, train_flags, strict=True):
        module.train(training)
        module.zero_grad(set_to_none=True)
        leaf = x.detach().clone().requires_grad_(True)
        y = module(leaf)
        dy = torch.randn(y.shape, generator=generator, dtype=torch.float64)
        dy = dy.to(grad_dtype or y.dtype).to(y.dtype)
        y.backward(dy)
        grads = {
            n.removeprefix("norm."): p.grad.detach().clone()
            for n, p in module.named_parameters()
            if p.grad is not None
        }
        results.append((y.detach(), leaf.grad.detach(), grads))
    return results


def compared_state(ours: nn.Module, theirs: nn.Module, case: LayerCase):
    """Pairs (key, our tensor, torch's tensor) of torch's state_dict, minus documented differences."""
    mine = {k.removeprefix("norm."): v for k, v in ours.state_dict().items()}
    for key, value in theirs.state_dict().items():
        key = key.removeprefix("norm.")
        if key not in case.differs:
            yield key, mine[key], value


def rms(t: torch.Tensor) -> float:
    return math.sqrt(float(t.double().pow(2).mean()))


def reference_directional_derivative(f, inputs, directions, weights, step=1e-3) -> float:
    """d/dt of sum(weights * f(*(inputs + t * directions))) at t = 0, by central differences of a
    float64 NumPy function ``f`` (normkit.reference): the gradient test for layers whose oracle has
    no backward written out. Richardson's extrapolation of the steps h and h/2 leaves a truncation
    error O(h^4) and a rounding error ~1e-16/h: both below 1e-10 relative for the O(1) inputs of
    the tests, even where a normalized group's variance is small."""
    import numpy as np

    def value(t):
        shifted = [np.asarray(a, np.float64) + t * np.asarray(d, np.float64)
                   for a, d in zip(inputs, directions, strict=True)]  # fmt: skip
        return float((np.asarray(weights, np.float64) * f(*shifted)).sum())

    def central(h):
        return (value(h) - value(-h)) / (2 * h)

    return (4 * central(step / 2) - central(step)) / 3


# --- Random configurations against torch.nn (hypothesis) --------------------------------------------

SPATIAL = st.lists(st.integers(1, 4), min_size=0, max_size=3)
BACKENDS = st.sampled_from(["native", "reference"])
DTYPES = st.sampled_from([torch.float32, torch.float64])


def compare_steps_with_torch(ours, theirs, shape, dtype, backend, steps, channels_last=False):
    """Train/eval ``steps`` of a normkit layer and its torch namesake on the same random inputs:
    outputs, input and parameter gradients, and the final state agree within ``assert_close``."""
    randomize_parameters(ours)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    generator = torch.Generator().manual_seed(len(shape))
    for step, training in enumerate(steps):
        x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        ours.train(training)
        theirs.train(training)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        with nk.backend(backend):
            ya = ours(a)
        yb = theirs(b)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(ya, yb, dtype, f"step {step} output")
        assert_close(a.grad, b.grad, dtype, f"step {step} input grad")
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert_close(p.grad, q.grad, dtype, f"step {step} grad of {name}")
            p.grad, q.grad = None, None
    for (key, value), expected in zip(
        ours.state_dict().items(), theirs.state_dict().values(), strict=True
    ):
        assert_close(value, expected, value.dtype if value.is_floating_point() else dtype, key)
