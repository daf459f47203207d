"""The per-plane sums of float32 tensors (normkit.functional._plane_sums), channels_last (rows) and
contiguous (planes): against float64 sums on shapes that are and are not multiples of the 64-row
and 1,024-value blocks and of the vector, 3-, 4- and 5-d, far from zero, as built for this CPU and
for narrower vectors; which inputs take them; the family's and
BatchNorm's gradients through them against the native engine; and the compiled reductions where
no library can be built."""

from __future__ import annotations

import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input
from normkit.functional import _compiled, _native, _plane_sums
from normkit.functional._batch_norm_compiled import sample_mean

pytestmark = pytest.mark.skipif(
    _plane_sums._library() is None, reason="no C compiler with OpenMP to build the plane sums"
)

# (2, 3, 41, 53): 2,173 values per plane, three blocks of 1,024; (2, 1100, 3, 5): rows of
# 1,100 channels
# (2, 16, 5, 7) ... (2, 48, 70, 3): rows of one to four vectors of channels (AVX-512), summed in
# registers, the last over four blocks of 64 rows
SHAPES = [(2, 3, 5, 7), (3, 5, 9, 17), (2, 1, 8, 8), (1, 64, 16, 16), (4, 6, 130), (2, 3, 2, 5, 7),
          (2, 3, 41, 53), (2, 1100, 3, 5), (2, 16, 5, 7), (3, 32, 9, 9), (2, 48, 70, 3)]  # fmt: skip
LAYOUTS = ["rows", "planes"]


def _rows_layout(shape, dtype=torch.float32, seed=0, scale=2.0, shift=0.5, layout="rows"):
    """``make_input`` in the rows-of-channels layout for any rank (channels moved innermost), or
    contiguous (``layout="planes"``)."""
    x = make_input(shape, dtype, seed=seed, scale=scale, shift=shift)
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if layout == "rows" else x


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.5, 1000.0])
def test_plane_moments_match_float64(shape, offset, layout):
    """Mean and biased variance per plane within float32's tolerance of float64 sums, also far
    from zero (offset 1000, standard deviation 2: the shifted sums keep the variance)."""
    x = _rows_layout(shape, shift=offset, layout=layout)
    spatial = tuple(range(2, x.dim()))
    mean, var = _plane_sums.plane_moments(x, sample_mean(x, spatial).flatten(1))
    x64 = x.double()
    assert_close(mean, x64.mean(spatial), torch.float32, "mean")
    assert_close(var, x64.var(spatial, unbiased=False), torch.float32, "variance")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_plane_sums_match_float64(shape, layout):
    x = _rows_layout(shape, seed=1, layout=layout)
    dy = _rows_layout(shape, seed=2, scale=1.0, shift=0.0, layout=layout)
    sum_gx, sum_g = _plane_sums.plane_sums(dy, x)
    spatial = tuple(range(2, x.dim()))
    assert_close(sum_gx, (dy.double() * x.double()).sum(spatial), torch.float32, "sum(dy * x)")
    assert_close(sum_g, dy.double().sum(spatial), torch.float32, "sum(dy)")


def test_other_cpus_sums_match_float64(other_cpu_flags, monkeypatch):
    """The sums as built for a CPU with narrower vectors (8 floats, or 1: other rows than this
    machine's sum in registers) within float32 rounding of float64, every shape, both layouts."""
    library = _plane_sums.build(other_cpu_flags)
    assert library is not None, f"the build with {other_cpu_flags} failed"
    monkeypatch.setattr(_plane_sums, "_library", lambda: library)
    for shape, layout in ((shape, layout) for shape in SHAPES for layout in LAYOUTS):
        x = _rows_layout(shape, seed=3, shift=100.0, layout=layout)
        dy = _rows_layout(shape, seed=4, scale=1.0, shift=0.0, layout=layout)
        spatial = tuple(range(2, x.dim()))
        _, var = _plane_sums.plane_moments(x, sample_mean(x, spatial).flatten(1))
        assert_close(var, x.double().var(spatial, unbiased=False), torch.float32, f"{shape} var")
        sum_gx, sum_g = _plane_sums.plane_sums(dy, x)
        assert_close(sum_gx, (dy.double() * x.double()).sum(spatial), torch.float32, f"{shape}")
        assert_close(sum_g, dy.double().sum(spatial), torch.float32, f"{shape} sum(dy)")


def test_only_float32_inputs_of_one_layout_take_them():
    x = _rows_layout((2, 3, 4, 5))
    assert _plane_sums.available(x) and _plane_sums.available(x, x.clone())
    assert not _plane_sums.available(x.contiguous())  # the family's NCHW keeps Inductor's
    assert _plane_sums.available(x.contiguous(), contiguous=True)  # BatchNorm's takes them
    assert not _plane_sums.available(x[:, :, ::2], contiguous=True)  # neither layout
    wide = _rows_layout((1, _plane_sums.MAX_ROW_CHANNELS + 1, 2, 1))  # accumulators off the stack
    assert not _plane_sums.available(wide) and _plane_sums.available(wide.contiguous(), contiguous=True)
    assert not _plane_sums.available(x.to(torch.bfloat16)) and not _plane_sums.available(x.double())
    assert not _plane_sums.available(x, x.contiguous())  # dy in another layout
    assert not _plane_sums.available(torch.zeros(4, 3))  # no positions
    assert not _plane_sums.available(_rows_layout((0, 3, 4, 5)))  # nothing to sum


LAYERS = {  # layer: (constructor, the plane-sums functions its compiled engine calls, in order)
    "ghost": (lambda: nk.GhostBatchNorm(8, virtual_batch_size=2), ["plane_moments", "plane_sums"]),
    "batch_instance": (lambda: nk.BatchInstanceNorm(8), ["plane_moments", "plane_sums"]),
    "switchable": (lambda: nk.SwitchableNorm(8), ["plane_moments", "plane_sums"]),
    "batch": (lambda: nk.BatchNorm2d(8), ["shifted_sums", "shifted_sums"]),
    "batch, NCHW": (lambda: nk.BatchNorm2d(8), ["shifted_sums", "shifted_sums"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_through_the_plane_sums(name, monkeypatch):
    """Float32 forward + backward of the compiled engine, channels_last (and NCHW for BatchNorm),
    its reductions from the plane sums, against the native engine: output, every gradient and the
    running statistics."""
    make, expected = LAYERS[name]
    channels_last = "NCHW" not in name
    monkeypatch.setattr(_compiled, "MIN_NUMEL", 0)
    used = []
    for fn in {*expected, "plane_moments", "plane_sums"}:
        real = getattr(_plane_sums, fn)
        monkeypatch.setattr(_plane_sums, fn, lambda *a, f=real, n=fn: used.append(n) or f(*a))
    x = make_input((4, 8, 9, 11), channels_last=channels_last, seed=5)
    dy = make_input((4, 8, 9, 11), channels_last=channels_last, seed=6, scale=1.0, shift=0.0)
    results = {}
    for backend in ("native", "compiled"):
        torch.manual_seed(0)
        layer = make()
        leaf = x.clone().requires_grad_()
        with nk.backend(backend):
            y = layer(leaf)
            y.backward(dy)
        results[backend] = [y, leaf.grad, *(p.grad for p in layer.parameters()), *layer.buffers()]
    assert used == expected
    for index, (got, want) in enumerate(zip(results["compiled"], results["native"], strict=True)):
        assert_close(got, want, torch.float32, f"{name}: output/gradient/buffer {index}")


def test_without_the_library_the_compiled_reductions_run(monkeypatch, compile_small):
    monkeypatch.setattr(_plane_sums, "_library", lambda: None)
    x = make_input((4, 8, 9, 11), channels_last=True).requires_grad_()
    dy = make_input((4, 8, 9, 11), channels_last=True, seed=1)  # the layout the plane sums take
    with nk.backend("compiled"):
        nk.BatchInstanceNorm(8)(x).backward(dy)
        nk.BatchNorm2d(8)(x).backward(dy)
    assert {"_moments_maths", "_sums_maths", "_forward_maths", "_backward_maths"} <= set(compile_small)


def test_no_compiler_no_library(monkeypatch):
    monkeypatch.setattr(_native.shutil, "which", lambda name: None)
    assert _native.library.__wrapped__("plane_sums", _plane_sums._SOURCE) is None
