"""Choosing the implementation: set_backend, the context manager, auto, and the registry."""

import threading

import pytest
import torch

import normkit as nk
from normkit.functional import _dispatch
from normkit.functional._compiled import compiler_available


def _which_backend_runs(op: str, x: torch.Tensor) -> str:
    fn = _dispatch.resolve(op, x)
    return next(name for name, impl in _dispatch.implementations(op).items() if impl.fn is fn)


def test_available_backends():
    assert nk.available_backends()[:3] == ["auto", "native", "reference"]


def test_auto_picks_native_on_cpu_and_compiled_for_batch_norm_training():
    for op in ("layer_norm", "group_norm", "channel_layer_norm"):
        assert _which_backend_runs(op, torch.zeros(2, 3, 4)) == "native"
    # BatchNorm's training step on float32 maps: the compiled engine where a C++ compiler exists
    # (it hands inputs below its size threshold to ATen itself), else ATen's kernel.
    expected = "compiled" if compiler_available() else "native"
    assert _which_backend_runs("batch_norm", torch.zeros(2, 3, 4)) == expected


def test_set_backend_and_context_manager_nest():
    assert nk.get_backend() == "auto"
    nk.set_backend("reference")
    assert nk.get_backend() == "reference"
    with nk.backend("native"):
        assert nk.get_backend() == "native"
        with nk.backend("reference"):
            assert _which_backend_runs("batch_norm", torch.zeros(2, 3)) == "reference"
        assert nk.get_backend() == "native"
    assert nk.get_backend() == "reference"


def test_context_manager_restores_after_an_error():
    with pytest.raises(RuntimeError), nk.backend("reference"):
        raise RuntimeError("inside")
    assert nk.get_backend() == "auto"


def test_context_is_local_to_its_thread():
    seen = {}
    with nk.backend("reference"):
        thread = threading.Thread(target=lambda: seen.setdefault("other", nk.get_backend()))
        thread.start()
        thread.join()
        assert nk.get_backend() == "reference"
    assert seen["other"] == "auto"


def test_the_reference_backend_really_runs(monkeypatch):
    calls = []
    original = _dispatch.implementations("batch_norm")["reference"]

    def spy(*args):
        calls.append(args[0].shape)
        return original.fn(*args)

    monkeypatch.setitem(
        _dispatch._REGISTRY["batch_norm"],
        "reference",
        _dispatch.Implementation(spy, original.supports),
    )
    bn = nk.BatchNorm2d(3)
    with nk.backend("reference"):
        bn(torch.randn(2, 3, 4, 4))
    bn(torch.randn(2, 3, 4, 4))  # auto: native, not the spy
    assert calls == [torch.Size([2, 3, 4, 4])]


def test_a_backend_that_cannot_run_an_input_says_so(monkeypatch):
    monkeypatch.setitem(
        _dispatch._REGISTRY["layer_norm"],
        "native",
        _dispatch.Implementation(lambda *a: None, lambda x: x.dtype != torch.float64),
    )
    with nk.backend("native"), pytest.raises(nk.errors.BackendError, match="cannot run layer_norm"):
        nk.LayerNorm(3).double()(torch.randn(2, 3, dtype=torch.float64))
    # auto falls back to the next verified backend
    y = nk.LayerNorm(3).double()(torch.randn(2, 3, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_check_backends_reports_each_backend():
    report = nk.backends.check_backends(["cpu"])
    expected = {"native": "ok", "reference": "ok"} | ({"compiled": "ok"} if compiler_available() else {})
    assert report["cpu/float32"] == expected
    assert set(report) == {"cpu/float32", "cpu/float16", "cpu/bfloat16"}
