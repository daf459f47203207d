"""How normkit's ops behave under PyTorch's transforms, and the transforms a layer refuses.

Besides plain eager autograd, three kinds of caller see an op, and each needs one thing:

- Graph capture — ``torch.compile`` and ``torch.export`` (Dynamo), ``torch.jit.trace`` and the
  legacy ONNX exporter built on it — records one path through the code: a decision that reads a
  tensor on the host would be baked in. Under :func:`capturing` the non-finite guard decides on
  the device instead (``torch.where``).
- ``torch.func``'s transforms (grad, vmap, jvp, jacrev, hessian, ...), forward-mode AD and
  ``torch.jit.trace`` cannot look inside a hand-written ``torch.autograd.Function`` (nor inside a
  Triton kernel or a ``torch.compile``'d function). Under :func:`composite_required` an op runs its
  composite definition instead: the one-kernel ATen implementations (``torch.batch_norm`` and its
  kin) as they are, every other op normkit's ``reference`` implementation, whose every step is an
  ATen op that torch knows how to vmap, differentiate to any order, trace and export. The
  hand-written Functions serve plain autograd, where they save memory or time.
- Running statistics are written by :func:`commit` and counted by :func:`increment`, through an
  alias: ``torch.func.grad`` and ``jvp`` refuse an in-place write to a tensor created outside
  them, and accept it through a view made inside, as ATen's own ``instance_norm`` writes its
  running statistics. So a training step under ``grad`` or ``jvp`` updates them as in eager mode.

What cannot work is refused with an :class:`~normkit.errors.UnsupportedTransformError` whose message
says why and what to do instead. Each refusal is declared once, as a :class:`Refusal`; layers list
theirs in ``transform_refusals``, and the transform matrix test and docs/transforms.md are made from
those declarations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from normkit.errors import UnsupportedTransformError

# The columns of the transform matrix (docs/transforms.md), in order: key -> what it means.
TRANSFORMS: dict[str, str] = {
    "eager": "forward and backward, train and eval",
    "compile": "`torch.compile(fullgraph=True)`: no graph break, train and eval",
    "grad": "`torch.func.grad` (through `functional_call`), w.r.t. parameters and input",
    "vmap": "`torch.func.vmap` of `grad`: per-sample gradients (Opacus-style DP-SGD)",
    "jvp": "`torch.func.jvp`: forward-mode AD",
    "functional_call": "`torch.func.functional_call` with other parameters and buffers",
    "export": "`torch.export.export`, train and eval",
    "onnx_dynamo": "`torch.onnx.export(dynamo=True)`, eval, run by onnxruntime",
    "onnx_legacy": "`torch.onnx.export(dynamo=False)`, eval, run by onnxruntime",
    "jit_trace": "`torch.jit.trace`, train and eval",
    "jit_script": "`torch.jit.script`",
    "copy": "`copy.deepcopy` and `pickle`",
    "double_backward": "double backward (`create_graph=True`) on the default backend",
}
MODES = ("train", "eval", "any")


def _always(_layer) -> bool:
    return True


@dataclass(frozen=True)
class Refusal:
    """A transform (or several) that a layer refuses, in which mode and configuration, and why.

    ``reason`` is the error's message (what the tests match and the docs show); ``when`` says in
    words for which configurations (empty: always), and ``applies(layer)`` decides it for a layer.
    """

    transforms: tuple[str, ...]
    mode: str
    reason: str
    when: str = ""
    applies: Callable[[object], bool] = _always

    def __post_init__(self) -> None:
        unknown = set(self.transforms) - set(TRANSFORMS)
        if unknown or self.mode not in MODES:
            raise ValueError(f"unknown transform {sorted(unknown)} or mode {self.mode!r}")

    def error(self, where: str = "") -> UnsupportedTransformError:
        """The error to raise, its message prefixed with ``where`` (e.g. the layer)."""
        return UnsupportedTransformError(f"{where}{self.reason}")

    def covers(self, transform: str, training: bool, layer) -> bool:
        """Whether this refusal is what ``layer`` answers ``transform`` with in this mode."""
        mode_matches = self.mode == "any" or self.mode == ("train" if training else "eval")
        return transform in self.transforms and mode_matches and self.applies(layer)


def _tracks_running_stats(layer) -> bool:
    return bool(getattr(layer, "track_running_stats", False))


def _reads_flag_on_host(layer) -> bool:
    return _tracks_running_stats(layer) and getattr(layer, "on_nonfinite", "skip") != "skip"


JIT_SCRIPT = Refusal(
    ("jit_script",),
    "any",
    "torch.jit.script cannot compile normkit's layers: their forward chooses an implementation "
    "at run time (backends, context variables, keyword-only options, hand-written autograd "
    "Functions), which TorchScript's static subset of Python cannot express, and TorchScript is "
    "in maintenance mode. Use torch.jit.trace, torch.export or torch.compile, or convert the "
    "model to torch.nn's layers first: nk.tools.convert(model, 'torch')",
)

VMAP_RUNNING_STATISTICS = Refusal(
    ("vmap",),
    "train",
    "torch.func.vmap over the batch in training mode would update the running statistics once "
    "per mapped sample, which one buffer cannot hold (torch.nn's BatchNorm refuses too). For "
    "per-sample gradients set layer.track_running_stats = False for that pass (what "
    "torch.func.replace_all_batch_norm_modules_ does to BatchNorm layers), or use eval mode",
    when="with running statistics",
    applies=_tracks_running_stats,
)

HOST_POLICY_UNDER_CAPTURE = Refusal(
    ("compile", "export", "jit_trace"),
    "train",
    "on_nonfinite='warn' and 'raise' read the finiteness of the batch's statistics on the host, "
    "which a captured graph cannot do: torch.compile runs that step eagerly (a graph break, an "
    "error with fullgraph=True), torch.export and torch.jit.trace refuse it. Use "
    "on_nonfinite='skip' (the default, decided on the device) and read num_batches_skipped",
    when="with on_nonfinite='warn' or 'raise'",
    applies=_reads_flag_on_host,
)


def _synchronizes(layer) -> bool:
    """Whether a SyncBatchNorm's training step runs collectives (a process group of 2+ ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    group = getattr(layer, "process_group", None)
    return dist.get_world_size(group) > 1


SYNCHRONIZED_STEP = Refusal(
    ("compile", "grad", "vmap", "jvp", "export", "jit_trace", "double_backward"),
    "train",
    "SyncBatchNorm's synchronized training step runs collectives (one all-gather forward, one "
    "all-reduce backward) around a hand-written backward: torch.compile runs it eagerly (a graph "
    "break, an error with fullgraph=True), and torch.export, torch.jit.trace, torch.func's "
    "transforms and double backward refuse it. Use them on one process (where the layer is "
    "BatchNorm) or in eval mode",
    when="synchronizing over two or more ranks",
    applies=_synchronizes,
)

INPLACE_DOUBLE_BACKWARD = Refusal(
    ("double_backward",),
    "train",
    "InPlaceABN keeps only its output for backward (it overwrites its input), so its training "
    "gradient cannot be differentiated again: the batch statistics' dependence on the input is "
    "gone. For double backward use nk.BatchNormAct (the same maths, keeping its input)",
)


MABN_TRAINING_STEP = Refusal(
    ("compile", "vmap", "jvp", "export", "jit_trace"),
    "train",
    "MovingAverageBatchNorm's training step cannot run under torch.compile, vmap, jvp, export or "
    "tracing: its backward is MABN's rule, not the gradient of its forward (forward-mode AD would "
    "compute another derivative), it writes the moving average of the gradient statistics once "
    "per step (not per mapped sample), and its schedule is read on the host (a captured graph "
    "would fix one step's). torch.compile runs the step eagerly (a graph break, an error with "
    "fullgraph=True); the others refuse it. torch.func.grad works (the rule, as in eager mode). "
    "Compile the rest of the model around it, or trace, export and map in eval mode (BatchNorm's "
    "eval map)",
)


def _pools_iterations(layer) -> bool:
    return getattr(layer, "window", 1) > 1


CBN_TRAINING_STEP = Refusal(
    ("compile", "grad", "vmap", "jvp", "export", "jit_trace"),
    "train",
    "CrossIterationBatchNorm's training step cannot run under torch.compile, torch.func, export "
    "or tracing: it keeps a window of past statistics (read and rewritten on the host every step) "
    "and differentiates the batch statistics inside the forward. torch.compile runs the step "
    "eagerly (a graph break, an error with fullgraph=True); the others refuse it. Compile around "
    "it, or trace in eval mode (window=1 is BatchNorm and traces)",
    when="with window > 1",
    applies=_pools_iterations,
)


# --- where the caller stands ----------------------------------------------------------------------


def compiling() -> bool:
    """Whether torch.compile (or torch.export) is tracing this call."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def exporting() -> bool:
    """Whether torch.export is tracing this call (strict or not; False on torch versions without
    the query, whose torch.export is Dynamo's and fails at the graph break instead)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def capturing() -> bool:
    """Whether a graph is being recorded (Dynamo, or torch.jit.trace and the legacy ONNX
    exporter): decisions must then be taken on the device, not read on the host."""
    return compiling() or torch.jit.is_tracing()


def composite_required() -> bool:
    """Whether this call must use composite ATen ops rather than hand-written Functions: under
    torch.func's transforms, forward-mode AD and torch.jit.trace (Dynamo traces the Functions
    themselves, so torch.compile and torch.export keep them)."""
    if compiling():
        return False
    if torch.jit.is_tracing():
        return True
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return torch.autograd.forward_ad._current_level >= 0


def only_grad_transforms() -> bool:
    """Whether the only transforms recording this call are torch.func's reverse-mode ones (grad,
    vjp, jacrev; any depth): no vmap, no forward-mode AD, no graph capture. There a hand-written
    Function runs as in eager mode, its backward included (it needs ``setup_context``)."""
    if capturing() or torch.autograd.forward_ad._current_level >= 0:
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    grad = torch._C._functorch.TransformType.Grad
    return all(i.key() == grad for i in retrieve_all_functorch_interpreters())


def batched(tensor: torch.Tensor) -> bool:
    """Whether torch.func.vmap maps over ``tensor``, at any depth of nested transforms."""
    if compiling():
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


# --- writing state --------------------------------------------------------------------------------


@torch.no_grad()
def commit(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """``buffer[...] = value`` in place, through an alias (see the module docstring)."""
    torch.ops.aten.alias(buffer).copy_(value)


@torch.no_grad()
def increment(counter: torch.Tensor, amount: int | torch.Tensor = 1) -> None:
    """``counter += amount`` in place, through an alias (see the module docstring)."""
    torch.ops.aten.alias(counter).add_(amount)


def transforming() -> bool:
    """Whether any program transform records this call: graph capture (Dynamo, torch.jit) or
    torch.func. The small-batch layers' hand-written Functions give way to their plain tensor maths
    then, which every transform differentiates, batches or fuses (Inductor fuses it better than it
    could a hand-written backward)."""
    return capturing() or torch.jit.is_scripting() or composite_required()


# A constant for Dynamo, which need not trace the query itself (see _dispatch.current).
transforming._dynamo_marked_constant = True


# --- double backward ------------------------------------------------------------------------------


def differentiable_backward(
    composite: Callable[..., torch.Tensor],
    inputs: tuple,
    needs_input_grad: tuple[bool, ...],
    grad_output: torch.Tensor,
) -> tuple:
    """The gradients of ``composite(*inputs)`` with respect to the tensors of ``inputs`` that need
    one, by autograd and themselves differentiable: what a hand-written Function's backward returns
    under ``create_graph=True`` (double backward, gradient penalties), where its own maths would be
    a dead end. ``composite`` is the op's plain tensor maths (its ``reference`` form), evaluated
    at the saved inputs; entries that are not tensors, or need no gradient, get None."""
    wanted = [
        i
        for i, (value, need) in enumerate(zip(inputs, needs_input_grad, strict=False))
        if need and isinstance(value, torch.Tensor)
    ]
    grads: list = [None] * len(inputs)
    if not wanted:
        return tuple(grads)
    with torch.enable_grad():
        output = composite(*inputs)
        found = torch.autograd.grad(
            output, [inputs[i] for i in wanted], grad_output, create_graph=True, allow_unused=True
        )
    for i, grad in zip(wanted, found, strict=True):
        grads[i] = torch.zeros_like(inputs[i]) if grad is None else grad
    return tuple(grads)
