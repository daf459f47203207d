"""``nk.accumulate``: BatchNorm's running statistics under gradient accumulation, exactly those of
the large batch.

A training loop that accumulates gradients over k micro-batches to reach an effective batch of k x m
samples (pytorch#46516, Lightning#17446) runs every BatchNorm k times per optimizer step: the
running mean and variance take k exponential-average updates per step, each from m samples, and
``momentum=None`` counts k batches. Inside :func:`accumulate` they take **one** update per step,
from the statistics of all k micro-batches together, merged exactly (Chan, Golub & LeVeque 1979):
after the step they are what one training-mode pass over the concatenated batch would have recorded
(Ioffe & Szegedy 2015, Algorithm 2's moving average; the variance of the whole batch unbiased by
M/(M-1)), to rounding.

How: during each micro-batch's training forward a taking-part layer normalizes as usual, but its
running buffers are swapped for scratch copies and its momentum set to 1, so the layer's own kernel
writes this micro-batch's mean and variance into the scratch (no extra pass over the data); the real
buffers are untouched until the step ends, when the merged statistics enter them by the layer's own
rule. Which layers take part, and how:

======================================== ==================================================================
BatchNorm (torch.nn's, normkit's, any     one EMA update per step with the merged mean and unbiased variance;
torch ``_BatchNorm`` subclass, e.g.       ``momentum=None`` counts one batch per step
timm's BatchNormAct2d), BatchNormAct,
InPlaceABN
BatchRenorm                               r and d from the running statistics at the step's start (they do
                                          not move during the step); one update of the moving mean and
                                          standard deviation with the merged batch statistics;
                                          ``renorm_step`` advances once per step
SyncBatchNorm (normkit's, torch's)        the same, with every rank's micro-batches: the merge weighs each
                                          micro-batch by its global count (one all-reduce of the counts
                                          per layer and step)
GhostBatchNorm                            left alone: one update per ghost batch is its definition
MovingAverageBatchNorm,                   left alone: every micro-batch is one of their iterations, as
CrossIterationBatchNorm                   their papers' algorithms have it
FrozenBatchNorm, eval mode,               nothing to do: no running statistics change
``track_running_stats=False``
anything else that keeps running         raises :class:`~normkit.errors.ConfigError` when it runs a
statistics (InstanceNorm with them,       training forward inside the context, instead of silently
EvoNormB0, the mixtures, ...)             differing from the large batch
======================================== ==================================================================

A micro-batch whose statistics are not finite makes the step's statistics non-finite: the step is
kept out of the running buffers and counted in ``num_batches_skipped`` (the layer's own
``on_nonfinite`` policy warned or raised during that micro-batch).

What is, and is not, the large batch (docs/accumulate.md has the measurements):

- the running statistics, hence eval-mode outputs, are the large batch's, to rounding;
- the normalization in training uses each micro-batch's statistics (m samples), as without
  ``nk.accumulate``: the forward outputs, the loss and the gradients are those of k batches of m.
  ``whole_batch=True`` with :meth:`Accumulation.prepare` normalizes every plain BatchNorm with the
  statistics of the whole accumulated batch instead, exactly (the forward equals the large
  batch's, and so are the running statistics of every layer, however deep); it costs one
  statistics-only forward pass per BatchNorm depth (a network with L BatchNorms in sequence:
  L + 1 passes without gradients over the k micro-batches, each stopping at the layer it
  measures). The gradient cannot be the large batch's: BatchNorm's backward subtracts the batch
  means of dL/dx_hat and dL/dx_hat * x_hat, which need the gradients of micro-batches not yet run.
  Each micro-batch's backward estimates them from itself (BatchNorm's backward formula at the whole
  batch's statistics); differentiating through its own share of the statistics instead would
  subtract 1/k of them and is much further from the large batch's gradient.
- without ``whole_batch``, a layer's running statistics are exactly those of the inputs it
  received, merged; the first BatchNorm's inputs are the large batch's, but a deeper layer's inputs
  were normalized upstream with micro-batch statistics, so its statistics differ from the large
  batch's by what that changes (about 1e-4 relative in docs/accumulate.md's ConvNet, against 0.13
  for plain accumulation).

Fits how loops are written: ``micro_batches=k`` ends a step after every k-th training forward of
each layer (plain loops; Lightning's ``accumulate_grad_batches``); ``optimizer=`` ends it when that
optimizer steps (accelerate's ``accelerator.accumulate``, Lightning, any loop); :meth:`step` ends
it by hand; leaving the block ends a partial one. Enter it once around the loop, or once per
optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.errors import ConfigError
from normkit.functional._running_stats import guarded_update, update_running_stats

# How a layer takes part (see the module docstring's table).
_EMA, _RENORM, _OWN_RULE, _UNSUPPORTED = "ema", "renorm", "own rule", "unsupported"
_SCRATCH = (
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "num_batches_skipped",
    "renorm_step",
)


def accumulate(
    model: nn.Module,
    micro_batches: int | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    whole_batch: bool = False,
) -> Accumulation:
    """A context in which ``model``'s batch-norm layers record the running statistics of the
    accumulated batch: one update per optimizer step, from the merged statistics of the k
    micro-batches' inputs — for the first BatchNorm (and with ``whole_batch=True`` for every one)
    exactly those of one training pass over the concatenated batch (module docstring).

    Args:
        model: any model (or a single layer).
        micro_batches: k; a layer ends its step after every k-th training forward. None: the step
            ends only by ``optimizer``, :meth:`Accumulation.step` or leaving the block.
        optimizer: end the step whenever this optimizer steps (a step pre-hook).
        whole_batch: normalize plain BatchNorm layers with the statistics of the whole
            accumulated batch, computed by :meth:`Accumulation.prepare` before the micro-batches
            run (module docstring: what it costs and what it changes).

    Returns:
        An :class:`Accumulation`, to use with ``with``.

    Example::

        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> batch = torch.randn(16, 3, 8, 8)
        >>> with nk.accumulate(model, micro_batches=4):
        ...     for micro in batch.chunk(4):
        ...         model(micro).square().mean().backward()
        >>> large = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> large.load_state_dict(model.state_dict()); large[1].reset_running_stats()
        <All keys matched successfully>
        >>> _ = large(batch)  # one pass over the concatenated batch
        >>> bool(torch.allclose(model[1].running_var, large[1].running_var, atol=1e-6))
        True
        >>> int(model[1].num_batches_tracked)
        1
    """
    return Accumulation(model, micro_batches, optimizer=optimizer, whole_batch=whole_batch)


@dataclass
class _Pending:
    """One layer's micro-batches since its last step: local counts, means, unbiased variances."""

    counts: list[int] = field(default_factory=list)
    means: list[torch.Tensor] = field(default_factory=list)
    variances: list[torch.Tensor] = field(default_factory=list)
    accepted: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.counts)


class _Stop(Exception):
    """Ends a statistics-only pass of :meth:`Accumulation.prepare` at the layer it measures."""


class Accumulation:
    """The context returned by :func:`accumulate`; see its module for the semantics."""

    def __init__(self, model, micro_batches=None, *, optimizer=None, whole_batch=False) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if micro_batches is not None and (
            isinstance(micro_batches, bool) or not isinstance(micro_batches, int)
            or micro_batches < 1
        ):  # fmt: skip
            raise ConfigError(
                f"micro_batches must be a positive int or None, got {micro_batches!r}"
            )
        if optimizer is not None and not hasattr(optimizer, "register_step_pre_hook"):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.model, self.micro_batches, self.optimizer = model, micro_batches, optimizer
        self.whole_batch = bool(whole_batch)
        self.kinds: dict[nn.Module, str] = {}
        self._pending: dict[nn.Module, _Pending] = {}
        self._originals: dict[nn.Module, Callable | None] = {}
        self._hook = None
        self._active = False
        # whole_batch: the statistics of the accumulated batch per plain BatchNorm, and prepare()'s
        # state (the layer being measured, its running merge)
        self._whole: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._whole_runs: dict[nn.Module, int] = {}
        self._measuring: object | None = None
        self._measured: _Pending | None = None

    # --- the context -----------------------------------------------------------------------------

    def __enter__(self) -> Accumulation:
        if self._active:
            raise ConfigError("this nk.accumulate context is already active; enter it once")
        for module in self.model.modules():
            kind = layer_kind(module)
            if kind is None or module in self.kinds:
                continue
            self.kinds[module] = kind
            if kind != _OWN_RULE:
                self._wrap(module)
        if self.optimizer is not None:
            self._hook = self.optimizer.register_step_pre_hook(lambda *_: self.step())
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.step()
        finally:
            for module, original in self._originals.items():
                if original is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = original
            self._originals.clear()
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            self._pending.clear()
            self._whole.clear()
            self._whole_runs.clear()
            self._active = False

    def step(self) -> None:
        """End the step now: every layer's pending micro-batches enter its running statistics
        as one batch (call it where the optimizer steps, if neither ``micro_batches`` nor
        ``optimizer`` says when)."""
        for module in list(self._pending):
            self._flush(module)
        for module in list(self._whole_runs):
            self._flush_whole(module)
        self._whole.clear()

    @property
    def pending(self) -> dict[str, int]:
        """Micro-batches recorded since the last step, per layer name (layers with any)."""
        names = {module: name for name, module in self.model.named_modules()}
        return {names.get(m, type(m).__name__): len(p) for m, p in self._pending.items() if p}

    # --- per-layer forward -------------------------------------------------------------------------

    def _wrap(self, module: nn.Module) -> None:
        original = module.__dict__.get("forward")
        self._originals[module] = original
        call = module.forward

        def forward(*args, **kwargs):
            return self._forward(module, call, args, kwargs)

        module.forward = forward

    def _forward(self, module, call, args, kwargs):
        if not (module.training and _tracks(module)):
            return call(*args, **kwargs)
        kind = self.kinds[module]
        if kind == _UNSUPPORTED:
            raise ConfigError(
                f"{type(module).__name__} keeps running statistics that nk.accumulate cannot make "
                "those of the accumulated batch (its update rule is not BatchNorm's); it would "
                "differ from the large batch silently. Put it in eval mode, build it with "
                "track_running_stats=False, or leave it out of the model given to nk.accumulate"
            )
        input = args[0] if args else next(iter(kwargs.values()))
        if self._measuring is not None:
            return self._measure(module, call, input, args, kwargs)
        if self.whole_batch:
            return self._normalize_whole(module, call, input, args, kwargs)
        return self._record(module, call, input, args, kwargs)

    def _record(self, module, call, input, args, kwargs):
        """Run the layer with scratch buffers and momentum 1: its kernel writes this micro-batch's
        statistics there; the real buffers stay as they were at the step's start."""
        saved, scratch = _swap_in_scratch(module)
        momentum = module.momentum
        module.momentum = 1.0
        try:
            output = call(*args, **kwargs)
        finally:
            module.momentum = momentum
            module._buffers.update(saved)
        count = input.numel() // input.shape[1] if input.dim() > 1 else input.numel()
        pending = self._pending.setdefault(module, _Pending())
        with torch.no_grad():
            mean = scratch["running_mean"].detach().double()
            variance = scratch["running_var"].detach().double()
            if self.kinds[module] == _RENORM:  # running_var held sigma_B^2 - eps: the biased one
                variance = variance * (count / (count - 1)) if count > 1 else variance
            accepted = scratch["num_batches_tracked"] > saved["num_batches_tracked"]
        pending.counts.append(count)
        pending.means.append(mean)
        pending.variances.append(variance)
        pending.accepted.append(accepted)
        if self.micro_batches is not None and len(pending) >= self.micro_batches:
            self._flush(module)
        return output

    # --- the end of a step -------------------------------------------------------------------------

    def _flush(self, module: nn.Module) -> None:
        pending = self._pending.pop(module, None)
        if not pending:
            return
        device = module.running_mean.device
        counts = torch.tensor(pending.counts, dtype=torch.float64, device=device)
        group = _synchronizing_group(module)
        if group is not None:  # each micro-batch's statistics span the ranks: weigh them so
            from normkit.distributed._collectives import all_reduce_sum

            all_reduce_sum(
                counts, group, None, f"nk.accumulate's counts of {type(module).__name__}"
            )
        means = torch.stack(pending.means)
        m2s = torch.stack(pending.variances) * (counts - 1).clamp(min=0).unsqueeze(1)
        from normkit.distributed._moments import merge_moments

        n, mean, var = merge_moments(counts, means, m2s)  # Chan's merge, float64
        total = int(n.item())
        if not bool(torch.stack(pending.accepted).all()):
            var = torch.full_like(var, float("nan"))  # a non-finite micro-batch: skip the step
        self._update(module, mean, var, total)

    def _update(self, module, mean, var, total) -> None:
        """The layer's own rule, once, with the accumulated batch's mean and biased variance."""
        tracked = getattr(module, "num_batches_tracked", None)
        if module.momentum is None:
            factor = 1.0 / (float(tracked) + 1.0) if tracked is not None else 1.0
        else:
            factor = module.momentum
        running_mean, running_var = module.running_mean.data, module.running_var.data
        if self.kinds[module] == _RENORM:
            from normkit.functional._batch_renorm import update_renorm_statistics

            def update(m, v):
                update_renorm_statistics(
                    m, v, mean.to(m.dtype), var.to(m.dtype), module.eps, factor
                )

        else:

            def update(m, v):
                update_running_stats(m, v, mean, var, total, factor)

        guarded_update(
            running_mean,
            running_var,
            update,
            num_batches_tracked=None if tracked is None else tracked.data,
            num_batches_skipped=_data(getattr(module, "num_batches_skipped", None)),
        )
        step = getattr(module, "renorm_step", None)
        if self.kinds[module] == _RENORM and isinstance(step, torch.Tensor):
            step.data.add_(1)

    # --- whole_batch: normalize with the accumulated batch's statistics ---------------------------

    def prepare(self, inputs: Iterable, forward: Callable | None = None) -> int:
        """Compute the statistics of the whole accumulated batch for every plain BatchNorm, for
        ``whole_batch=True``: statistics-only passes (no gradients) over ``inputs``, the k
        micro-batches' model inputs (tensors, or tuples of positional arguments), each pass
        measuring the next BatchNorm in call order and stopping there. ``forward(model, input)``
        replaces ``model(input)`` when given. Returns the number of passes made.
        """
        if not self.whole_batch:
            raise ConfigError("prepare() is for nk.accumulate(..., whole_batch=True)")
        if not self._active:
            raise ConfigError("call prepare() inside the `with nk.accumulate(...)` block")
        inputs = list(inputs)
        if not inputs:
            raise ConfigError("prepare() needs the micro-batches' inputs")
        run = forward or (lambda model, x: model(*x) if isinstance(x, tuple) else model(x))
        self._whole.clear()
        passes = 0
        try:
            while True:
                passes += 1
                self._measured, stopped = _Pending(), None
                self._measuring = _NEXT
                with torch.no_grad():
                    for x in inputs:
                        try:
                            run(self.model, x)
                        except _Stop as stop:
                            stopped = stop.args[0]
                if stopped is None:
                    return passes
                counts = torch.tensor(self._measured.counts, dtype=torch.float64)
                counts = counts.to(self._measured.means[0].device)
                m2s = torch.stack(self._measured.variances) * counts.unsqueeze(1)
                from normkit.distributed._moments import merge_moments

                n, mean, var = merge_moments(counts, torch.stack(self._measured.means), m2s)
                self._whole[stopped] = (mean, var, int(n.item()))
        finally:
            self._measuring, self._measured = None, None

    def _measure(self, module, call, input, args, kwargs):
        """In a statistics-only pass: measured layers normalize with the whole batch's statistics;
        the first one not measured yet records this micro-batch's moments and stops the pass."""
        if module in self._whole:
            return self._normalize_whole(module, call, input, args, kwargs)
        if self._measuring is not _NEXT and self._measuring is not module:
            raise ConfigError(
                "prepare(): the micro-batches reach the BatchNorm layers in different orders "
                "(control flow that depends on the data); whole_batch=True needs the same order"
            )
        _check_whole_batch_layer(module)
        self._measuring = module
        from normkit.functional._moments import moments

        dims = (0, *range(2, input.dim()))
        mean, var = moments(input, dims, keepdim=False)
        self._measured.counts.append(input.numel() // input.shape[1])
        self._measured.means.append(mean.double())
        self._measured.variances.append(var.double())
        raise _Stop(module)

    def _normalize_whole(self, module, call, input, args, kwargs):
        """BatchNorm with the accumulated batch's statistics (the large batch's forward, exactly).
        The backward is BatchNorm's formula at those statistics with the two gradient statistics,
        mean(dL/dx_hat) and mean(dL/dx_hat * x_hat), estimated from this micro-batch: the large
        batch's need every micro-batch's dL/dy, which do not exist yet (module docstring)."""
        _check_whole_batch_layer(module)
        if module not in self._whole:
            raise ConfigError(
                f"whole_batch=True: {type(module).__name__} has no statistics of the accumulated "
                "batch; call prepare(micro_batch_inputs) before running the micro-batches"
            )
        from normkit.functional._cross_iteration_batch_norm import pooled_batch_norm

        mean, var, total = self._whole[module]
        dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        output = pooled_batch_norm(
            input, module.weight, module.bias, mean.to(dtype), var.to(dtype), 1, module.eps
        )
        if self._measuring is None:  # a training micro-batch: the step's statistics are known
            runs = self._whole_runs[module] = self._whole_runs.get(module, 0) + 1
            if self.micro_batches is not None and runs >= self.micro_batches:
                self._flush_whole(module)
        return output

    def _flush_whole(self, module: nn.Module) -> None:
        if not self._whole_runs.pop(module, 0):
            return
        mean, var, total = self._whole.pop(module)
        self._update(module, mean, var, total)


_NEXT = object()  # prepare(): no layer measured yet in this pass


def layer_kind(module: nn.Module) -> str | None:
    """How ``module`` takes part in :func:`accumulate` (module docstring), or None when it keeps
    no running statistics."""
    import normkit as nk

    own = tuple(
        getattr(nk, name)
        for name in ("GhostBatchNorm", "MovingAverageBatchNorm", "CrossIterationBatchNorm")
    )
    if isinstance(module, own):
        return _OWN_RULE
    if isinstance(module, nk.FrozenBatchNorm):
        return None
    if isinstance(module, nk.BatchRenorm):
        return _RENORM
    if isinstance(module, (_BatchNorm, nk.BatchNormAct, nk.InPlaceABN, nk.SyncBatchNorm)):
        return _EMA
    if isinstance(getattr(module, "running_var", None), torch.Tensor) or getattr(
        module, "track_running_stats", False
    ):
        return _UNSUPPORTED
    return None


def _tracks(module: nn.Module) -> bool:
    return bool(getattr(module, "track_running_stats", True)) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def _swap_in_scratch(module: nn.Module):
    """Copies of the layer's running buffers in their place (straight into ``_buffers``: this
    runs per layer and micro-batch); returns ``(the real buffers, the copies)``."""
    buffers = module._buffers
    saved = {name: buffers[name] for name in _SCRATCH if buffers.get(name) is not None}
    scratch = {name: tensor.detach().clone() for name, tensor in saved.items()}
    buffers.update(scratch)
    return saved, scratch


def _synchronizing_group(module: nn.Module):
    if not isinstance(module, nn.SyncBatchNorm) and type(module).__name__ != "SyncBatchNorm":
        return None
    from normkit.distributed._sync_batch_norm import synchronizing_group

    return synchronizing_group(getattr(module, "process_group", None))


def _check_whole_batch_layer(module: nn.Module) -> None:
    import normkit as nk

    plain = isinstance(module, _BatchNorm) and type(module).forward in (
        _BatchNorm.forward,
        nk.BatchNorm.forward,
    )
    if not plain or isinstance(module, (nn.SyncBatchNorm, nk.SyncBatchNorm)):
        raise ConfigError(
            f"whole_batch=True normalizes plain BatchNorm with the accumulated batch's "
            f"statistics; {type(module).__name__} computes more (or across ranks) and cannot. Use "
            "whole_batch=False (exact running statistics only) for this model"
        )


def _data(tensor):
    return None if tensor is None else tensor.data
