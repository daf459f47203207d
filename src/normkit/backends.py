"""Which implementation computes each normalization op, and the switch users turn.

Backends:

- ``native``: ATen (and cuDNN on GPUs) through ``torch.batch_norm``, ``torch.layer_norm`` and
  ``torch.group_norm``: PyTorch's own kernels, used wherever their semantics match normkit's.
- ``reference``: normkit's own implementation in torch (:mod:`normkit.functional`), with the backward
  derived by hand. The readable one; the tests hold it to the float64 oracle.
- ``auto`` (default): the fastest backend verified for the input's device and dtype. On the CPU that
  is ``native`` for every op (docs/benchmarks.md has the measurements).

Choose with ``normkit.set_backend(name)`` for the process or ``with normkit.backend(name):`` for a
block (the block wins; it is local to the thread or task that enters it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from normkit.functional import _dispatch


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

    Returns ``{"cpu/float32": {"native": "ok", "reference": "ok"}, ...}``; used by ``normkit env``.
    """
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict[str, dict[str, str]] = {}
    from normkit.functional import batch_norm  # the public op, with its checks

    for device in devices:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            row = report.setdefault(f"{device}/{str(dtype).removeprefix('torch.')}", {})
            for name in available_backends()[1:]:
                try:
                    x = torch.randn(4, 3, 5, device=device, dtype=dtype)
                    mean, var = torch.zeros(3, device=device), torch.ones(3, device=device)
                    with backend(name):
                        y = batch_norm(x, mean, var, training=True)
                    row[name] = "ok" if bool(torch.isfinite(y).all()) else "non-finite output"
                except Exception as error:  # a report, not a failure: say what went wrong
                    row[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return report
