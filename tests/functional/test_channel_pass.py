"""The per-channel elementwise pass in C (normkit.functional._channel_pass): against float64 in both
layouts, with and without its first term, far from zero, at any address, as built for this CPU and
for narrower vectors (AVX2, AVX, plain C); which inputs take it; and the compiled batch norm through
it, against the native engine, and without it."""

from __future__ import annotations

import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input
from normkit.functional import _channel_pass

pytestmark = pytest.mark.skipif(
    _channel_pass._library() is None, reason="no C compiler with OpenMP to build the channel pass"
)

# Rows of fewer channels than a vector (16 floats with AVX-512), or of a number that is not a
# multiple of it, wrap around the coefficient tables; rows of one to four whole vectors (16-64
# channels with AVX-512, 8-32 with AVX) keep them in registers; planes shorter than a vector, or
# not a multiple of it, straddle; fewer outputs than a vector, one row of 2,500 channels.
SHAPES = [(2, 3, 5, 7), (3, 5, 9, 17), (2, 1, 8, 8), (4, 6, 130), (2, 3, 2, 5, 7), (2, 3, 41, 53),
          (2, 2500, 3), (1, 3, 1, 1), (2, 20, 1, 1), (3, 17, 33), (2, 16, 4, 4), (3, 32, 5, 7),
          (3, 48, 3, 3), (2, 64, 7, 5), (5, 8, 3, 3), (2, 24, 1, 3)]  # fmt: skip


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if layout == "rows" else t.contiguous()


def _float64(a, b, k, A, B, D) -> torch.Tensor:
    """A[c] a + B[c] (b - k[c]) + D[c] in float64 (``a`` None: no first term)."""
    view = (1, b.shape[1], *[1] * (b.dim() - 2))
    want = B.double().view(view) * (b.double() - k.double().view(view)) + D.double().view(view)
    return want if a is None else want + A.double().view(view) * a.double()


@pytest.mark.parametrize("layout", ["rows", "planes"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_a", [True, False])
def test_channel_pass_matches_float64(shape, layout, with_a):
    """A[c] a + B[c] (b - k[c]) + D[c] within float32 rounding of float64 (b far from zero, k
    near its mean: the subtraction comes first, as in the reference), in b's layout."""
    c = shape[1]
    generator = torch.Generator().manual_seed(len(shape) + c)
    a = _layout(make_input(shape, seed=1, scale=1.0, shift=0.0), layout) if with_a else None
    b = _layout(make_input(shape, seed=2, shift=1000.0), layout)
    k, A, B, D = (torch.randn(c, generator=generator) for _ in range(4))
    k = k + 1000.0
    out = _channel_pass.channel_pass(a, b, k, A, B, D)
    assert out.stride() == b.stride()
    assert_close(out, _float64(a, b, k, A, B, D), torch.float32, "channel pass")


@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_inputs_at_any_address(layout):
    """Inputs that start off the vector's alignment (views one float into their storage) give the
    same outputs as aligned copies: loads take any address, only the output must be aligned."""
    n, c, h, w = 3, 19, 7, 5
    storage = torch.randn(2, 1 + n * c * h * w, generator=torch.Generator().manual_seed(3))
    if layout == "rows":
        a, b = (row[1:].view(n, h, w, c).permute(0, 3, 1, 2) for row in storage)
    else:
        a, b = (row[1:].view(n, c, h, w) for row in storage)
    assert a.data_ptr() % 64 and b.data_ptr() % 64 and _channel_pass.available(a, b)
    k, A, B, D = (torch.randn(c, generator=torch.Generator().manual_seed(i)) for i in range(4))
    out = _channel_pass.channel_pass(a, b, k, A, B, D)
    assert out.stride() == b.stride()
    copies = (t.clone(memory_format=torch.preserve_format) for t in (a, b))
    assert torch.equal(out, _channel_pass.channel_pass(*copies, k, A, B, D))


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("channels", [16, 32, 48, 64, 80])
def test_any_split_of_the_rows_among_threads(channels, threads):
    """Each thread's range of vectors starts and ends anywhere in a row: the rows kept in
    registers begin after the part of a row before them and leave the rest to the tables; the
    outputs are the same whatever the thread count."""
    shape = (1, channels, 61, 1)  # 61 rows, a prime: the ranges of 2, 3 and 7 threads cut rows
    k, A, B, D = (torch.randn(channels, generator=torch.Generator().manual_seed(i)) for i in range(4))
    a = _layout(make_input(shape, seed=1, scale=1.0, shift=0.0), "rows")
    b = _layout(make_input(shape, seed=2, shift=10.0), "rows")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for first in (a, None):
            out = _channel_pass.channel_pass(first, b, k, A, B, D)
            want = _float64(first, b, k, A, B, D)
            assert_close(out, want, torch.float32, f"{threads} threads, first term {first is not None}")
    finally:
        torch.set_num_threads(before)


def test_other_cpus_vector_loops_match_float64(other_cpu_flags, monkeypatch):
    """The pass as built for a CPU with narrower vectors (8 floats, or 1) gives the same outputs
    within float32 rounding of float64, on every shape of SHAPES, both layouts, with and without
    the first term, at an odd address."""
    library = _channel_pass.build(other_cpu_flags)
    assert library is not None, f"the build with {other_cpu_flags} failed"
    monkeypatch.setattr(_channel_pass, "_library", lambda: library)
    for shape in SHAPES:
        c = shape[1]
        k, A, B, D = (torch.randn(c, generator=torch.Generator().manual_seed(i)) for i in range(4))
        for layout in ("rows", "planes"):
            a = _layout(make_input(shape, seed=1, scale=1.0, shift=0.0), layout)
            b = _layout(make_input(shape, seed=2, shift=100.0), layout)
            for first in (a, None):
                out = _channel_pass.channel_pass(first, b, k, A, B, D)
                want = _float64(first, b, k, A, B, D)
                assert_close(out, want, torch.float32, f"channel pass {shape} {layout}")


def test_only_float32_inputs_of_one_layout_take_it():
    x = make_input((2, 3, 4, 5))
    rows = _layout(x, "rows")
    assert _channel_pass.available(x) and _channel_pass.available(rows, rows.clone())
    assert not _channel_pass.available(x, rows)  # dy in another layout than x
    assert not _channel_pass.available(x.double()) and not _channel_pass.available(x.half())
    assert not _channel_pass.available(x[:, :, ::2])  # neither layout
    assert not _channel_pass.available(torch.zeros(0, 3, 4, 5))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_through_the_c_passes(channels_last, affine, monkeypatch, compile_small):
    """BatchNorm2d's compiled engine, float32, runs its normalize and dx passes in C, compiles
    nothing, and matches the native engine: output, input and parameter gradients, running
    statistics."""
    calls = []
    real = _channel_pass.channel_pass
    monkeypatch.setattr(_channel_pass, "channel_pass", lambda *a: calls.append(a[0] is None) or real(*a))
    x = make_input((4, 8, 9, 11), channels_last=channels_last, seed=5, shift=50.0)
    dy = make_input((4, 8, 9, 11), channels_last=channels_last, seed=6, scale=1.0, shift=0.0)
    results = {}
    for backend in ("native", "compiled"):
        layer = nk.BatchNorm2d(8, affine=affine)
        if affine:
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
                layer.bias.normal_(generator=torch.Generator().manual_seed(1))
        leaf = x.clone().requires_grad_()
        with nk.backend(backend):
            y = layer(leaf)
            y.backward(dy)
        results[backend] = [y, leaf.grad, *(p.grad for p in layer.parameters()), *layer.buffers()]
    assert calls == [True, False] and compile_small == []  # the normalize pass, then dx
    assert results["compiled"][0].stride() == x.stride() == results["compiled"][1].stride()
    for index, (got, want) in enumerate(zip(results["compiled"], results["native"], strict=True)):
        assert_close(got, want, torch.float32, f"output/gradient/buffer {index}")


def test_without_the_library_batch_norm_runs_inductors_passes(monkeypatch, compile_small):
    monkeypatch.setattr(_channel_pass, "_library", lambda: None)
    x = make_input((4, 8, 9, 11)).requires_grad_()
    with nk.backend("compiled"):
        nk.BatchNorm2d(8)(x).backward(torch.ones_like(x))
    assert compile_small == ["_forward_maths", "_backward_maths"]
