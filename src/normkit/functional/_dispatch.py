"""The table of implementations behind each op, and the choice of backend.

The functional ops (``batch_norm``, ``layer_norm``, ...) do their checks and running-statistics
bookkeeping themselves and hand the arithmetic to ``resolve(op, input)``. What fills the registry is
one table, ``IMPLEMENTATIONS`` in :mod:`normkit.backends` (every op, every backend, and the inputs
each can run on), which also holds the user-facing switch. The registry sits here, below the ops,
so that imports run one way (functional <- backends <- nn): the ops look implementations up at call
time, never import them.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import torch

from normkit.errors import BackendError
from normkit.functional._instance_stats import channels_innermost
from normkit.functional._transforms import composite_required

Supports = Callable[[torch.Tensor], bool]


@dataclass(frozen=True)
class Implementation:
    """One backend's version of one op; ``supports`` says whether it can run on an input, and
    ``composite`` whether it is made of ATen ops only (no hand-written autograd.Function, compiled
    function or kernel), so that every PyTorch transform sees through it (:mod:`._transforms`)."""

    fn: Callable
    supports: Supports
    composite: bool = False


def _always(_: torch.Tensor) -> bool:
    return True


_REGISTRY: dict[str, dict[str, Implementation]] = {}
# The order in which `auto` tries backends: fastest verified first (see docs/benchmarks.md).
_AUTO_ORDER: list[str] = ["native", "reference"]
# Where a benchmark measured another backend faster for an op on a device, dtype and layout
# ("contiguous"; "channels_last", channels innermost and dense; "strided", any other layout, or
# channels_last where it has no entry of its own), `auto` uses the order given here instead:
# (op, device type, dtype, layout) -> order. Every entry is a row of docs/benchmarks.md ("Kernels
# and fused layers"); nothing else changes `auto`. CUDA has no entry yet: it stays on native
# (ATen/cuDNN) until benchmarks/gpu_check.py, run on an H100/H200, shows a triton kernel faster for
# an op and dtype, and the figure is recorded in docs/benchmarks.md.
AUTO_PREFERENCES: dict[tuple[str, str, torch.dtype, str], list[str]] = {
    # BatchNormAct on the CPU, float32 NCHW: compiled 0.59x-1.01x torch's BatchNorm2d -> ReLU
    # (forward + backward); slower in channels_last and bfloat16, which stay native.
    ("batch_norm_act", "cpu", torch.float32, "contiguous"): ["compiled", "native", "reference"],
    # Batch-Layer on the CPU: compiled 1.23-1.42x torch's BatchNorm2d (forward + backward) in
    # float32 NCHW, where native's channels-last copies make it 2.5x, and 1.19-1.33x in float32
    # channels_last (C loops over the rows); faster than native in every measured row (float32 and
    # bfloat16, NCHW and channels_last). float16 and float64 stay native.
    **{
        ("batch_layer_norm", "cpu", dtype, layout): ["compiled", "native", "reference"]
        for dtype in (torch.float32, torch.bfloat16)
        for layout in ("contiguous", "strided")
    },
    # BatchNorm on the CPU, float32, training: compiled (8 passes, C loops) 0.52-0.63x torch's
    # BatchNorm2d forward + backward at (32, 64, 56, 56) NCHW and 0.83-0.97x in channels_last
    # (bench_layers.py); in channels_last 0.53-0.96x native on seven of ResNet-50's eight shapes
    # from 1M elements, 1.03-1.11x on 32x128x28x28 (bench_bn_shapes.py; docs/benchmarks.md, "The
    # step between the passes"). Other strided layouts, which the C passes do not take, stay
    # native. Below 1M elements and in evaluation it runs ATen's kernels either way
    # (_batch_norm_compiled).
    **{
        ("batch_norm", "cpu", torch.float32, layout): ["compiled", "native", "reference"]
        for layout in ("contiguous", "channels_last")
    },
    # Ghost BN, Batch-Instance and Switchable on the CPU, float32: compiled (4 fused passes per
    # direction, channels_last reduced in its own layout) faster than native in both layouts
    # (docs/benchmarks.md, "The layers beyond BatchNorm"). Both run native below 4M elements.
    **{
        (op, "cpu", torch.float32, layout): ["compiled", "native", "reference"]
        for op in ("ghost_batch_norm", "batch_instance_norm", "switchable_norm")
        for layout in ("contiguous", "strided")
    },
    # RMSNorm on the CPU: normkit's own (one reduction, a hand-derived backward) 0.4x-0.9x
    # torch.nn.RMSNorm, whose CPU path is composite maths (docs/benchmarks.md, "Small batches").
    **{
        ("rms_norm", "cpu", dtype, layout): ["reference", "native"]
        for dtype in (torch.float32, torch.bfloat16)
        for layout in ("contiguous", "strided")
    },
}
_DEFAULT = "auto"
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "normkit_backend", default=None
)


def register(
    op: str, backend: str, fn: Callable, supports: Supports | None = None, composite: bool = False
) -> None:
    """Make ``fn`` the ``backend`` implementation of ``op``; ``composite``: see Implementation."""
    _REGISTRY.setdefault(op, {})[backend] = Implementation(fn, supports or _always, composite)
    _known.clear()


def unregister(op: str, backend: str) -> None:
    """Remove the ``backend`` implementation of ``op`` (tests' spies)."""
    del _REGISTRY[op][backend]
    _known.clear()


_known: list[str] = []  # known_backends(), until the next (un)register or set_auto_order


def known_backends() -> list[str]:
    """``auto`` and every backend that implements at least one op."""
    if not _known:  # every ``with nk.backend(...)`` asks: built once, not per call
        names = {name for table in _REGISTRY.values() for name in table}
        _known.extend(
            ["auto", *[n for n in _AUTO_ORDER if n in names], *sorted(names - set(_AUTO_ORDER))]
        )
    return list(_known)


def implementations(op: str) -> dict[str, Implementation]:
    return dict(_REGISTRY.get(op, {}))


def current() -> str:
    """The backend in force: the innermost ``with backend(...)``, else the global choice.

    Under ``torch.compile`` the answer is taken once, at compile time: a compiled graph keeps the
    backend it was traced with (Dynamo cannot trace a ContextVar, and need not).
    """
    name = _override.get()
    return _DEFAULT if name is None else name


# What torch.compiler.assume_constant_result(current) does, without importing torch._dynamo here:
# Dynamo imports triton when it is installed, and `import normkit` must not (DESIGN.md).
current._dynamo_marked_constant = True


def set_default(name: str) -> None:
    global _DEFAULT
    _DEFAULT = validate(name)


def validate(name: str) -> str:
    if name not in known_backends():
        raise BackendError(f"unknown backend {name!r}; choose one of {known_backends()}")
    return name


def set_auto_order(order: list[str]) -> None:
    _AUTO_ORDER[:] = order
    _known.clear()


def resolve(op: str, input: torch.Tensor, backend: str | None = None) -> Callable:
    """The function that computes ``op`` on ``input`` under the chosen backend.

    Under torch.func's transforms, forward-mode AD and torch.jit.trace
    (:func:`~normkit.functional._transforms.composite_required`) the choice is kept when it is
    composite, and is ``reference`` otherwise; ``auto`` then takes the first composite backend of
    its order (ATen's batch norm where ``compiled`` is preferred outside transforms).
    """
    name = current() if backend is None else backend
    table = _REGISTRY[op]
    if composite_required():
        if name == "auto":
            for candidate in auto_order(op, input):
                impl = table.get(candidate)
                if impl is not None and impl.composite and impl.supports(input):
                    return impl.fn
            return table["reference"].fn
        impl = _choose(op, input, name, table)
        return impl.fn if impl.composite else table["reference"].fn
    return _choose(op, input, name, table).fn


def _choose(op: str, input: torch.Tensor, name: str, table: dict[str, Implementation]):
    if name == "auto":
        for candidate in auto_order(op, input):
            impl = table.get(candidate)
            if impl is not None and impl.supports(input):
                return impl
        raise BackendError(f"no backend can run {op} on a {input.dtype} tensor on {input.device}")
    impl = table.get(name)
    if impl is None:
        raise BackendError(
            f"backend {name!r} has no implementation of {op}; it implements "
            f"{sorted(op for op, t in _REGISTRY.items() if name in t)}. Use backend 'auto'"
        )
    if not impl.supports(input):
        raise BackendError(
            f"backend {name!r} cannot run {op} on a {input.dtype} tensor on {input.device}; "
            "use backend 'auto' to fall back to one that can"
        )
    return impl


def auto_order(op: str, input: torch.Tensor) -> list[str]:
    """The backends `auto` tries for ``op`` on ``input``, fastest measured first."""
    if not AUTO_PREFERENCES:
        return _AUTO_ORDER
    for layout in _layouts(input):
        order = AUTO_PREFERENCES.get((op, input.device.type, input.dtype, layout))
        if order is not None:
            return order
    return _AUTO_ORDER


def _layouts(input: torch.Tensor) -> tuple[str, ...]:
    """The keys of ``input``'s layout in AUTO_PREFERENCES, the most specific first."""
    if input.is_contiguous():
        return ("contiguous",)
    if channels_innermost(input):
        return ("channels_last", "strided")
    return ("strided",)


def override(name: str) -> contextvars.Token:
    return _override.set(validate(name))


def reset_override(token: contextvars.Token) -> None:
    _override.reset(token)
