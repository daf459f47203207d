"""Whether a program transform is recording the current call.

normkit's hand-written ``autograd.Function`` s are the fast eager path. Under a transform — Dynamo
(``torch.compile``, ``torch.export`` and the ONNX exporter built on it), ``torch.func`` (grad, vmap,
jvp), ``torch.jit.trace`` / ``torch.jit.script`` — the ops built on :func:`transforming` run their
plain tensor maths instead: every transform differentiates, batches or fuses plain maths, and
Inductor fuses it better than it could a hand-written backward.
"""

from __future__ import annotations

import torch

from normkit.functional._running_stats import compiling


def transforming() -> bool:
    """True while torch.compile/export, torch.func or TorchScript is recording this call."""
    if compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


# A constant for Dynamo, which need not trace the query itself (see _dispatch.current).
transforming._dynamo_marked_constant = True
