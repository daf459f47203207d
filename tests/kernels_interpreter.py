"""Running normkit's Triton kernels on the CPU with triton's interpreter (TRITON_INTERPRET=1), or,
with NORMKIT_KERNEL_DEVICE=cuda (benchmarks/gpu_check.py sets it), compiled on a GPU.

Kernels decide at import whether they are interpreted, so :func:`interpreted_kernels` sets the
variable, (re)imports ``normkit.kernels`` under it, and restores the environment afterwards: the
``triton`` backend claims CPU tensors only while the variable is set, so the rest of the suite
keeps seeing the backends it expects.

triton 3.6's interpreter converts loop bounds with ``int(array)``, which NumPy >= 2.4 refuses for
1-element arrays (triton-lang/triton#9171, fixed upstream after 3.6). :func:`_patch_loop_bounds`
applies the upstream fix (take the single element first) for the duration of a kernel launch.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest

KERNEL_DEVICE = os.environ.get("NORMKIT_KERNEL_DEVICE", "cpu")


def _import_triton_interpreted():
    """Import triton with TRITON_INTERPRET=1 set, so that triton.language's own jitted helpers
    (tl.zeros, tl.sum, ...) are interpreted too; the variable is unset again afterwards."""
    if "triton" in sys.modules or KERNEL_DEVICE != "cpu":
        return pytest.importorskip("triton", reason="triton is not installed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        return pytest.importorskip(
            "triton",
            reason="triton is not installed: the Triton kernel tests need it "
            "(pip install triton==3.6.0, as in the dev extra)",
        )


triton = _import_triton_interpreted()


def _kernel_types(module) -> set[str]:
    names = {type(obj).__name__ for obj in vars(module).values()}
    return names & {"JITFunction", "InterpretedFunction"}


def _patch_loop_bounds() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_normkit_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._normkit_fixed = True
    interpreter._patch_lang_tensor = patched


@contextlib.contextmanager
def interpreted_kernels():
    """``normkit.kernels`` imported under TRITON_INTERPRET=1, with the variable set inside (on a
    GPU: imported as it is)."""
    if KERNEL_DEVICE != "cpu":
        yield importlib.import_module("normkit.kernels.ops")
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        if "JITFunction" in _kernel_types(sys.modules["triton.language.standard"]):
            # triton was imported before this module, without the interpreter: import it again
            # (its compiled extension, triton._C, is kept; it does not depend on the mode)
            for name in [m for m in sys.modules if m.split(".")[0] == "triton"]:
                if not name.startswith("triton._C"):
                    del sys.modules[name]
            importlib.import_module("triton.language")
        _patch_loop_bounds()
        kernels = [name for name in sys.modules if name.startswith("normkit.kernels.")]
        if any("JITFunction" in _kernel_types(sys.modules[name]) for name in kernels):
            for name in kernels:  # imported earlier without the interpreter (e.g. a doctest walk)
                del sys.modules[name]
        yield importlib.import_module("normkit.kernels.ops")
