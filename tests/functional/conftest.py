"""Fixtures shared by the functional tests."""

from __future__ import annotations

import pytest

from normkit.functional import _compiled


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
