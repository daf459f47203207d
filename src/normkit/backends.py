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
- ``compiled``: BatchNorm, the fused BatchNormAct, Batch-Layer, Ghost BN, Batch-Instance and
  Switchable maths compiled by ``torch.compile`` on the CPU, in the fewest passes over the tensor
  and in its own layout (needs a C++ compiler; the first call per shape compiles; BatchNorm and the
  per-plane family run ATen's kernels below ``_compiled.MIN_NUMEL`` elements, BatchNorm's float32
  C passes below ``_batch_norm_compiled.C_MIN_NUMEL``; under
  ``create_graph=True`` the backward differentiates the unfused definition, so double backward
  works).
- ``auto`` (default): the fastest backend verified for the input's device and dtype. On the CPU that
  is ``native`` for every op but these, where it is ``compiled``: BatchNormAct on float32 NCHW
  inputs, BatchNorm (training) on float32 NCHW and channels_last inputs, Ghost BN, Batch-Instance
  and Switchable on float32 inputs, and
  Batch-Layer on float32 and bfloat16 inputs (``_dispatch.AUTO_PREFERENCES``; docs/benchmarks.md
  has the measurements).

Choose with ``normkit.set_backend(name)`` for the process or ``with normkit.backend(name):`` for a
block (the block wins; it is local to the thread or task that enters it). Under torch.func's
transforms, forward-mode AD and torch.jit.trace, implementations that are not plain ATen ops give way
to ``reference`` (``COMPOSITE`` below; docs/transforms.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch

from normkit.functional import _dispatch
from normkit.functional._batch_instance_norm import (
    compiled_batch_instance_norm,
    native_batch_instance_norm,
    reference_batch_instance_norm,
)
from normkit.functional._batch_layer_norm import (
    compiled_batch_layer_norm,
    native_batch_layer_norm,
    reference_batch_layer_norm,
)
from normkit.functional._batch_norm import reference_batch_norm
from normkit.functional._batch_norm_act import (
    compiled_batch_norm_act,
    native_batch_norm_act,
    reference_batch_norm_act,
)
from normkit.functional._batch_norm_compiled import compiled_batch_norm
from normkit.functional._batch_renorm import native_batch_renorm, reference_batch_renorm
from normkit.functional._compiled import compiler_available
from normkit.functional._cross_iteration_batch_norm import (
    native_cross_iteration_batch_norm,
    reference_cross_iteration_batch_norm,
)
from normkit.functional._evo_norm_b0 import native_evo_norm_b0, reference_evo_norm_b0
from normkit.functional._evo_norm_s0 import native_evo_norm_s0, reference_evo_norm_s0
from normkit.functional._filter_response_norm import (
    native_filter_response_norm,
    reference_filter_response_norm,
)
from normkit.functional._ghost_batch_norm import (
    compiled_ghost_batch_norm,
    native_ghost_batch_norm,
    reference_ghost_batch_norm,
)
from normkit.functional._group_norm import reference_group_norm
from normkit.functional._inplace_abn import native_inplace_abn, reference_inplace_abn
from normkit.functional._layer_norm import reference_channel_layer_norm, reference_layer_norm
from normkit.functional._moving_average_batch_norm import (
    native_moving_average_batch_norm,
    reference_moving_average_batch_norm,
)
from normkit.functional._rms_norm import (
    native_channel_rms_norm,
    native_rms_norm,
    reference_channel_rms_norm,
    reference_rms_norm,
)
from normkit.functional._std_conv import (
    native_standardized_weight,
    reference_standardized_weight,
)
from normkit.functional._switchable_norm import (
    compiled_switchable_norm,
    native_switchable_norm,
    reference_switchable_norm,
)

# --- native: ATen (and cuDNN) ---------------------------------------------------------------------


def _cudnn() -> bool:
    return torch.backends.cudnn.enabled


def native_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    return torch.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps, _cudnn()
    )


def native_layer_norm(input, normalized_shape, weight, bias, eps):
    y = torch.layer_norm(input, normalized_shape, weight, bias, eps, _cudnn())
    # ATen returns a contiguous output; give strided inputs (e.g. channels_last) their layout back.
    return y if y.stride() == input.stride() else _like(input, y)


def native_group_norm(input, num_groups, weight, bias, eps):
    return torch.group_norm(input, num_groups, weight, bias, eps, _cudnn())


def native_channel_layer_norm(input, weight, bias, eps):
    # ATen's layer norm reduces over the last dim; with the channels moved last a channels_last
    # input is contiguous, so this is one kernel. Other layouts pay a copy in and one out. The dims
    # are spelled out (not -1): ONNX's Transpose takes no negative permutation.
    channels, last = input.shape[1], input.dim() - 1
    y = torch.layer_norm(input.movedim(1, last), (channels,), weight, bias, eps, _cudnn())
    y = y.movedim(last, 1)
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


# --- compiled: torch.compile on the CPU --------------------------------------------------------------


_COMPILER: list[bool] = []  # the answer, once looked up


def _compiler_available() -> bool:
    if not _COMPILER:
        _COMPILER.append(compiler_available())
    return _COMPILER[0]


# A constant for torch.compile, which cannot trace the PATH lookup (see _dispatch.current). A plain
# function: Dynamo reads the mark on functions, not through functools.cache's wrapper.
_compiler_available._dynamo_marked_constant = True


def _compiled_supports(input: torch.Tensor) -> bool:
    return input.device.type == "cpu" and _compiler_available()


# --- triton: normkit's kernels, imported (with triton) on first use -----------------------------------

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


# --- The table: which implementation computes each op under each backend ---------------------------
# op -> backend -> the implementation, or (implementation, the inputs it can run on); without the
# latter it runs on any. The reference, native and compiled implementations of the family live
# beside their op in normkit.functional; `auto` tries the backends in _dispatch's order
# (_AUTO_ORDER, and AUTO_PREFERENCES where a benchmark measured another one faster).
IMPLEMENTATIONS: dict[str, dict[str, Callable | tuple[Callable, _dispatch.Supports]]] = {
    "batch_norm": {
        "native": native_batch_norm,
        "compiled": (compiled_batch_norm, _compiled_supports),
        "reference": reference_batch_norm,
        "triton": (_triton("batch_norm"), _triton_supports),
    },
    "layer_norm": {
        "native": native_layer_norm,
        "reference": reference_layer_norm,
        "triton": (_triton("layer_norm"), _triton_supports),
    },
    "channel_layer_norm": {
        "native": native_channel_layer_norm,
        "reference": reference_channel_layer_norm,
        "triton": (_triton("channel_layer_norm"), _triton_channel_layer_norm_supports),
    },
    "group_norm": {
        "native": native_group_norm,
        "reference": reference_group_norm,
        "triton": (_triton("group_norm"), _triton_supports),
    },
    # The family beyond BatchNorm: ATen kernels (batch norm's statistics, inference and
    # training-backward kernels; vectorized reductions) composed with hand-written backward passes
    # (native); Ghost BN, Batch-Instance and Switchable also in four passes fused by torch.compile
    # in the input's layout (compiled: functional/_instance_stats_compiled.py).
    "batch_renorm": {"native": native_batch_renorm, "reference": reference_batch_renorm},
    "ghost_batch_norm": {
        "native": native_ghost_batch_norm,
        "compiled": (compiled_ghost_batch_norm, _compiled_supports),
        "reference": reference_ghost_batch_norm,
    },
    "batch_instance_norm": {
        "native": native_batch_instance_norm,
        "compiled": (compiled_batch_instance_norm, _compiled_supports),
        "reference": reference_batch_instance_norm,
    },
    "batch_layer_norm": {
        "native": native_batch_layer_norm,
        "compiled": (compiled_batch_layer_norm, _compiled_supports),
        "reference": reference_batch_layer_norm,
    },
    "switchable_norm": {
        "native": native_switchable_norm,
        "compiled": (compiled_switchable_norm, _compiled_supports),
        "reference": reference_switchable_norm,
    },
    # Small batches (issue "Small batches, solved"): the batch-independent normalizers.
    "rms_norm": {"native": native_rms_norm, "reference": reference_rms_norm},
    "channel_rms_norm": {
        "native": native_channel_rms_norm,
        "reference": reference_channel_rms_norm,
    },
    "evo_norm_b0": {"native": native_evo_norm_b0, "reference": reference_evo_norm_b0},
    "evo_norm_s0": {"native": native_evo_norm_s0, "reference": reference_evo_norm_s0},
    "moving_average_batch_norm": {
        "native": native_moving_average_batch_norm,
        "reference": reference_moving_average_batch_norm,
    },
    "cross_iteration_batch_norm": {
        "native": native_cross_iteration_batch_norm,
        "reference": reference_cross_iteration_batch_norm,
    },
    "standardized_weight": {
        "native": native_standardized_weight,
        "reference": reference_standardized_weight,
    },
    "filter_response_norm": {
        "native": native_filter_response_norm,
        "reference": reference_filter_response_norm,
    },
    # Fused and memory-saving batch norm: ATen's kernels with hand-written fused backward passes.
    "batch_norm_act": {
        "native": native_batch_norm_act,
        "compiled": (compiled_batch_norm_act, _compiled_supports),
        "reference": reference_batch_norm_act,
        "triton": (_triton("batch_norm_act"), _triton_supports),
    },
    "inplace_abn": {
        "native": native_inplace_abn,
        "reference": reference_inplace_abn,
        "triton": (_triton("inplace_abn"), _triton_supports),
    },
}

# Made of ATen ops alone, as every `reference` implementation is: torch's transforms (torch.func,
# forward-mode AD, jit.trace) see through them, so they keep running there; the others (hand-written
# autograd.Functions, compiled maths, kernels) give way to `reference` (functional/_transforms.py).
COMPOSITE = {native_batch_norm, native_layer_norm, native_group_norm, native_channel_layer_norm}

for _op, _table in IMPLEMENTATIONS.items():
    for _backend, _entry in _table.items():
        _fn, *_supports = _entry if isinstance(_entry, tuple) else (_entry,)
        _composite = _backend == "reference" or _fn in COMPOSITE
        _dispatch.register(_op, _backend, _fn, *(_supports or [None]), composite=_composite)


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
