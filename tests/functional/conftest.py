"""Fixtures shared by the functional tests."""

from __future__ import annotations

import platform

import pytest

from normkit.functional import _compiled, _native

# The C loops' builds for other x86 CPUs than this one: AVX2 with FMA and AVX (8 floats a vector),
# plain C (SSE2 only: 1), selected by the compiler's flags in place of -march=native.
OTHER_CPUS = {"avx2": ("-mavx2", "-mfma", "-mno-avx512f"), "avx": ("-mavx", "-mno-avx2", "-mno-fma"),
              "plain": ("-march=x86-64", "-mtune=generic")}  # fmt: skip


@pytest.fixture(params=sorted(OTHER_CPUS))
def other_cpu_flags(request):
    """The compiler flags of one of OTHER_CPUS (x86 machines only)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 vector flags")
    return tuple(f for f in _native.FLAGS if f != "-march=native") + OTHER_CPUS[request.param]


@pytest.fixture
def compile_small(monkeypatch):
    """The compiled engines take inputs of any size (``_compiled.MIN_NUMEL`` = 0); returns the
    names of the maths they compile, in call order."""
    monkeypatch.setattr(_compiled, "MIN_NUMEL", 0)
    calls = []
    real = _compiled.CompiledMaths.call
    monkeypatch.setattr(
        _compiled.CompiledMaths, "call", lambda fn, *a: calls.append(fn.__name__) or real(fn, *a)
    )
    return calls
