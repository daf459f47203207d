"""Batch-Layer's C passes over channels_last rows (normkit.functional._batch_layer_rows): the layer
through them against float64, training and eval, on shapes that are and are not multiples of the
64-row blocks and far from zero; against the compiled engine's Inductor maths; which inputs take
them."""

from __future__ import annotations

import copy

import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters
from normkit.functional import _batch_layer_rows

pytestmark = pytest.mark.skipif(
    _batch_layer_rows._library() is None, reason="no C compiler with OpenMP to build the C passes"
)


def _rows(shape, seed, scale=2.0, shift=0.5):
    x = make_input(shape, seed=seed, scale=scale, shift=shift)
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def _run(layer, x, dy, backend):
    leaf = x.clone().requires_grad_()
    with nk.backend(backend):
        y = layer(leaf)
    y.backward(dy)
    return [y, leaf.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape, offset",
    [((4, 6, 3, 5), 0.5), ((3, 16, 9, 17), 0.5), ((2, 64, 8, 8), 1000.0), ((2, 5, 130), 0.5),
     ((2, 3, 2, 5, 7), 50.0)],
)  # fmt: skip
def test_layer_through_the_c_passes_matches_float64(shape, offset, training, monkeypatch):
    """Output, input and parameter gradients and running statistics within float32 rounding of
    the float64 reference; the C passes are the ones that ran."""
    calls = []
    for name in ("forward", "backward"):
        real = getattr(_batch_layer_rows, name)
        monkeypatch.setattr(_batch_layer_rows, name, lambda *a, f=real, n=name: calls.append(n) or f(*a))
    layer = nk.BatchLayerNorm(shape[1], momentum=0.3)
    randomize_parameters(layer)
    with torch.no_grad():
        layer.running_mean.uniform_(offset - 1, offset + 1), layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    exact = copy.deepcopy(layer).double()
    x, dy = _rows(shape, 1, shift=offset), _rows(shape, 2, scale=1.0, shift=0.0)
    got = _run(layer, x, dy, "compiled")
    want = _run(exact, x.double(), dy.double(), "reference")
    assert calls == ["forward", "backward"]
    assert got[0].stride() == x.stride() == got[1].stride()
    names = ["output", "input gradient", "weight gradient", "bias gradient", "running_mean", "running_var"]
    for name, g, w in zip(names, got, want, strict=True):
        assert_close(g, w, torch.float32, name)


def test_c_passes_match_the_inductor_maths(monkeypatch):
    x, dy = _rows((4, 8, 9, 11), 3, shift=5.0), _rows((4, 8, 9, 11), 4, scale=1.0, shift=0.0)
    layer = nk.BatchLayerNorm(8)
    randomize_parameters(layer)
    c = _run(copy.deepcopy(layer), x, dy, "compiled")
    monkeypatch.setattr(_batch_layer_rows, "_library", lambda: None)
    inductor = _run(copy.deepcopy(layer), x, dy, "compiled")
    for index, (got, want) in enumerate(zip(c, inductor, strict=True)):
        assert_close(got, want, torch.float32, f"output/gradient/buffer {index}")


def test_other_cpus_match_this_ones(other_cpu_flags, monkeypatch):
    """The passes as built for a CPU with narrower vectors (the rows streamed out 8 floats, or 1,
    at a time; 13 channels: rows off the vector's alignment, with a head and a tail) give this
    build's outputs, gradients and statistics within float32 rounding."""
    x, dy = _rows((3, 13, 9, 7), 5, shift=5.0), _rows((3, 13, 9, 7), 6, scale=1.0, shift=0.0)
    layer = nk.BatchLayerNorm(13)
    randomize_parameters(layer)
    here = _run(copy.deepcopy(layer), x, dy, "compiled")
    library = _batch_layer_rows.build(other_cpu_flags)
    assert library is not None, f"the build with {other_cpu_flags} failed"
    monkeypatch.setattr(_batch_layer_rows, "_library", lambda: library)
    other = _run(copy.deepcopy(layer), x, dy, "compiled")
    for index, (got, want) in enumerate(zip(other, here, strict=True)):
        assert_close(got, want, torch.float32, f"output/gradient/buffer {index}")


def test_only_float32_channels_last_inputs_take_them():
    x = _rows((2, 3, 4, 5), 0)
    assert _batch_layer_rows.available(x) and _batch_layer_rows.available(x, x.clone())
    assert not _batch_layer_rows.available(x.contiguous())  # NCHW: Inductor's maths
    assert not _batch_layer_rows.available(x.to(torch.bfloat16))
    assert not _batch_layer_rows.available(x, x.contiguous())  # dy in another layout


@pytest.mark.parametrize("gradient", ["contiguous", "expanded"])
def test_a_gradient_in_another_layout_is_brought_to_the_rows(gradient):
    """The forward's per-position statistics are the C backward's, so a dy in another layout (a
    contiguous one, or the expanded ones of ``y.sum().backward()``) is copied into x's."""
    x = _rows((3, 8, 5, 7), 5, shift=3.0)
    dy = make_input((3, 8, 5, 7), seed=6) if gradient == "contiguous" else torch.ones(()).expand(3, 8, 5, 7)
    layer = nk.BatchLayerNorm(8)
    randomize_parameters(layer)
    got = _run(copy.deepcopy(layer), x, dy, "compiled")
    want = _run(copy.deepcopy(layer).double(), x.double(), dy.double(), "reference")
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(g, w, torch.float32, f"output/gradient/buffer {index}")
