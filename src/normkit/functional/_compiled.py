"""The ``compiled`` backend's engine: pure tensor maths fused by torch.compile (Inductor) on the CPU.

An op's compiled implementation writes its forward and backward as plain tensor functions and runs
them through :meth:`CompiledMaths.call`: compiled on first use for each shape, dtype and layout
(seconds; docs/benchmarks.md), and run eagerly, with one warning, where the compiler fails at run
time, so training goes on with the same maths.
"""

from __future__ import annotations

import functools
import shutil
import warnings

import torch

from normkit.functional._running_stats import compiling
from normkit.functional._transforms import transforming

# Below this many elements a layer runs ATen's kernels even under the compiled backend: a compiled
# call costs tens of microseconds of guards and each new shape seconds of compilation, more than
# ATen needs for the whole layer (4M elements: 16 MB of float32, a layer of a few milliseconds).
MIN_NUMEL = 1 << 22

# Every op, dtype, layout, mode and (before shapes turn dynamic) shape is a guard of the same
# function: a model has more than torch's default 8 of them, past which Dynamo would run the maths
# eagerly, several times slower than ATen.
RECOMPILE_LIMIT = 64


@functools.cache
def compiled(fn):
    """``torch.compile(fn)``, once per function. Not fullgraph: past the recompile limit (many
    shapes, thread-count changes) Dynamo runs the function eagerly for the new case."""
    return torch.compile(fn)


def worth_compiling(input: torch.Tensor) -> bool:
    """Whether a compiled implementation compiles ``input``'s layer rather than running ATen's:
    at least MIN_NUMEL elements, and no program transform recording the call
    (:func:`~normkit.functional._transforms.transforming`): the user's own torch.compile fuses
    ATen's ops into its graph, and torch.jit.trace and torch.func need differentiable, batchable
    ops (the dispatcher already hands the latter ``reference``; this keeps direct calls safe)."""
    return input.numel() >= MIN_NUMEL and not transforming()


def like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` with ``x``'s strides: the compiled engines' outputs and gradients keep the input's
    layout, and their C passes read dy in x's (a copy only where the strides differ, e.g. a kernel
    that chose others, or the expanded gradient of ``y.sum()``)."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def compiler_available() -> bool:
    """torch.compile on the CPU builds C++: a compiler must be on PATH."""
    return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))


class CompiledMaths:
    """Runs pure tensor maths compiled; after a compiler failure, eagerly (``broken``)."""

    broken = False

    @classmethod
    def call(cls, fn, *args):
        if compiling():  # inside the user's torch.compile: it fuses the maths
            return fn(*args)
        if not CompiledMaths.broken:
            try:
                from torch import _dynamo  # here, not at import: it imports triton when installed

                with _dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    return compiled(fn)(*args)
            except Exception as error:  # a compiler that fails at run time: keep training, eagerly
                CompiledMaths.broken = True
                warnings.warn(
                    f"normkit's compiled backend could not compile ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}); running the same maths eagerly. Use "
                    "nk.set_backend('native') to silence this",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return fn(*args)
