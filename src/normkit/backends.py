"""Which implementation computes each normalization op, and the switch users turn.

Backends:

- ``native``: ATen (and cuDNN on GPUs) through ``torch.batch_norm``, ``torch.layer_norm`` and
  ``torch.group_norm``: PyTorch's own kernels, used wherever their semantics match normkit's.
- ``reference``: normkit's own implementation in torch (:mod:`normkit.functional`), with the backward
  derived by hand. The readable one; the tests hold it to the float64 oracle.
- ``triton``: normkit's Triton kernels (:mod:`normkit.kernels`) for batch norm (and its fused and
  in-place activated forms), group norm and layer norm, on CUDA tensors (and on CPU tensors under
  ``TRITON_INTERPRET=1``, which is how the tests run them). Importing normkit never imports
  triton: the kernels load on the first call.
- ``compiled``: the fused BatchNormAct and Batch-Layer maths compiled by ``torch.compile`` on the
  CPU (needs a C++ compiler; the first call per shape compiles; not twice differentiable).
- ``auto`` (default): the fastest backend verified for the input's device and dtype. On the CPU that
  is ``native`` for every op but BatchNormAct on float32 NCHW inputs and Batch-Layer on float32 and
  bfloat16 inputs, where it is ``compiled`` (``_dispatch.AUTO_PREFERENCES``; docs/benchmarks.md has
  the measurements).

Choose with ``normkit.set_backend(name)`` for the process or ``with normkit.backend(name):`` for a
block (the block wins; it is local to the thread or task that enters it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from normkit.functional import (
    _batch_instance,
    _batch_layer,
    _batch_norm_act,
    _batch_norm_compiled,
    _compiled,
    _dispatch,
    _ghost,
    _inplace_abn,
    _renorm,
    _switchable,
)


def _cudnn() -> bool:
    return torch.backends.cudnn.enabled


def _native_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    return torch.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps, _cudnn()
    )


def _native_layer_norm(input, normalized_shape, weight, bias, eps):
    y = torch.layer_norm(input, normalized_shape, weight, bias, eps, _cudnn())
    # ATen returns a contiguous output; give strided inputs (e.g. channels_last) their layout back.
    return y if y.stride() == input.stride() else _like(input, y)


def _native_group_norm(input, num_groups, weight, bias, eps):
    return torch.group_norm(input, num_groups, weight, bias, eps, _cudnn())


def _native_channel_layer_norm(input, weight, bias, eps):
    # ATen's layer norm reduces over the last dim; with the channels moved last a channels_last
    # input is contiguous, so this is one kernel. Other layouts pay a copy in and one out.
    channels = input.shape[1]
    y = torch.layer_norm(input.movedim(1, -1), (channels,), weight, bias, eps, _cudnn())
    y = y.movedim(-1, 1)
    return y if y.stride() == input.stride() else _like(input, y)


def _like(layout: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` in the memory format of ``layout``: channels_last (2-D or 3-D) or contiguous."""
    return values.contiguous(memory_format=memory_format_of(layout))


def memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    """The named memory format a tensor is in, as ``torch.preserve_format`` would keep it."""
    if tensor.is_contiguous():
        return torch.contiguous_format
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


_dispatch.register("batch_norm", "native", _native_batch_norm)
_dispatch.register("layer_norm", "native", _native_layer_norm)
_dispatch.register("group_norm", "native", _native_group_norm)
_dispatch.register("channel_layer_norm", "native", _native_channel_layer_norm)
# The family beyond BatchNorm: ATen kernels (batch norm's statistics, inference and training-backward
# kernels; vectorized reductions) composed with hand-written backward passes. Each lives beside its
# op in normkit.functional and is registered here, as the `native` implementation.
_dispatch.register("batch_renorm", "native", _renorm._native_batch_renorm)
_dispatch.register("ghost_batch_norm", "native", _ghost._native_ghost_batch_norm)
_dispatch.register("batch_instance_norm", "native", _batch_instance._native_batch_instance_norm)
_dispatch.register("batch_layer_norm", "native", _batch_layer._native_batch_layer_norm)
_dispatch.register("switchable_norm", "native", _switchable._native_switchable_norm)
# Fused and memory-saving batch norm: ATen's kernels with hand-written fused backward passes
# (native), the same maths compiled by torch.compile (compiled, CPU only).
_dispatch.register("batch_norm_act", "native", _batch_norm_act.native_batch_norm_act)
_dispatch.register("inplace_abn", "native", _inplace_abn.native_inplace_abn)


@functools.cache
def _compiler_available() -> bool:
    return _compiled.compiler_available()


# A constant for torch.compile, which cannot trace the PATH lookup (see _dispatch.current).
_compiler_available._dynamo_marked_constant = True


def _compiled_supports(input: torch.Tensor) -> bool:
    return input.device.type == "cpu" and _compiler_available()


_dispatch.register(
    "batch_norm_act", "compiled", _batch_norm_act.compiled_batch_norm_act, _compiled_supports
)
_dispatch.register(
    "batch_norm", "compiled", _batch_norm_compiled.compiled_batch_norm, _compiled_supports
)
_dispatch.register(
    "batch_layer_norm", "compiled", _batch_layer._compiled_batch_layer_norm, _compiled_supports
)
# The per-plane family in four fused passes (normkit.functional._plane_compiled).
_dispatch.register(
    "ghost_batch_norm", "compiled", _ghost._compiled_ghost_batch_norm, _compiled_supports
)
_dispatch.register(
    "batch_instance_norm",
    "compiled",
    _batch_instance._compiled_batch_instance_norm,
    _compiled_supports,
)
_dispatch.register(
    "switchable_norm", "compiled", _switchable._compiled_switchable_norm, _compiled_supports
)

# The Triton kernels: registered for every op they implement, imported (with triton) on first use.
_TRITON_OPS = (
    "batch_norm",
    "batch_norm_act",
    "inplace_abn",
    "group_norm",
    "layer_norm",
    "channel_layer_norm",
)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_supports(input: torch.Tensor) -> bool:
    """CUDA tensors; CPU tensors only under triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    if input.dtype not in _TRITON_DTYPES or not _triton_installed():
        return False
    if input.device.type == "cuda":
        return True
    return input.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _triton_channel_layer_norm_supports(input: torch.Tensor) -> bool:
    # the kernel reads each position's channels as one contiguous row (channels_last inputs)
    return _triton_supports(input) and input.movedim(1, -1).is_contiguous()


def _triton(op: str):
    def run(*args):
        return getattr(importlib.import_module("normkit.kernels.ops"), op)(*args)

    run.__name__ = f"triton_{op}"
    return run


for _op in _TRITON_OPS:
    _dispatch.register(
        _op,
        "triton",
        _triton(_op),
        _triton_channel_layer_norm_supports if _op == "channel_layer_norm" else _triton_supports,
    )


def set_backend(name: str) -> None:
    """Use backend ``name`` ("auto", "native", "reference", ...) from now on in this process."""
    _dispatch.set_default(name)


def get_backend() -> str:
    """The backend in force here: the innermost ``with backend(...)``, else the process default."""
    return _dispatch.current()


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Use backend ``name`` inside the block, then restore the previous choice.

    Example::

        with normkit.backend("reference"):
            y = layer(x)  # normkit's own implementation, whatever the global choice
    """
    token = _dispatch.override(name)
    try:
        yield name
    finally:
        _dispatch.reset_override(token)


def available_backends() -> list[str]:
    """Every backend name ``set_backend`` accepts."""
    return _dispatch.known_backends()


def check_backends(devices: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Run each backend once per device and dtype on a tiny batch norm: ``"ok"`` or the error.

    Backends without a batch norm, or that cannot run on a device and dtype (triton on the CPU),
    are left out of that row. Returns ``{"cpu/float32": {"native": "ok", "reference": "ok"},
    ...}``; used by ``normkit env``.
    """
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict[str, dict[str, str]] = {}
    from normkit.functional import batch_norm  # the public op, with its checks

    for device in devices:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            row = report.setdefault(f"{device}/{str(dtype).removeprefix('torch.')}", {})
            for name in available_backends()[1:]:
                impl = _dispatch.implementations("batch_norm").get(name)
                probe = torch.empty(0, device=device, dtype=dtype)
                if impl is None or not impl.supports(probe):
                    continue  # no batch norm in this backend, or not for this device and dtype
                try:
                    x = torch.randn(4, 3, 5, device=device, dtype=dtype)
                    mean, var = torch.zeros(3, device=device), torch.ones(3, device=device)
                    with backend(name):
                        y = batch_norm(x, mean, var, training=True)
                    row[name] = "ok" if bool(torch.isfinite(y).all()) else "non-finite output"
                except Exception as error:  # a report, not a failure: say what went wrong
                    row[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return report
