"""Put a model and its optimizer back exactly as they were: the ground the measurements stand on.

A measurement such as internal covariate shift takes an optimizer step that training never took,
moves the weights along the gradient, and runs forwards in training mode that update BatchNorm's
running statistics and draw dropout masks. :func:`preserved` lets it do all of that and then undoes
every trace, bit for bit, so a run that measures every few steps trains exactly as one that never
measures.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

_SIMPLE = (bool, int, float, str, type(None))


def _saved(value):
    """A value and, for a tensor, a copy of its contents (the object itself is kept too)."""
    if isinstance(value, torch.Tensor):
        return value, value.detach().clone()
    return value, copy.deepcopy(value)


def _restored(saved):
    original, copy_ = saved
    if isinstance(original, torch.Tensor):
        with torch.no_grad():
            original.copy_(copy_)
        return original
    return copy_


class PinnedRng:
    """The state of torch's CPU generator and of the CUDA generators of ``devices``, to go back to.

    ``reset()`` rewinds the generators to the pinned state: every forward pass of a measurement then
    draws the same dropout masks and noise, so two gradients differ only by the weights that moved.
    """

    def __init__(self, devices: list[torch.device]):
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devices}

    def reset(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


def cuda_devices(model: nn.Module) -> list[torch.device]:
    """The CUDA devices the model's parameters and buffers live on."""
    devices = {t.device for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"}
    return sorted(devices, key=lambda d: d.index or 0)


@dataclass
class ModelState:
    """Every parameter (its values and its ``.grad``), every buffer and every train/eval flag of a
    model, with the tensor objects themselves, so that ``restore()`` puts the same objects back with
    the same contents."""

    model: nn.Module

    def __post_init__(self):
        self.parameters = [
            (module, name, _saved(p), None if p.grad is None else _saved(p.grad))
            for module in self.model.modules()
            for name, p in module._parameters.items()
            if p is not None
        ]
        self.buffers = [
            (module, name, _saved(b))
            for module in self.model.modules()
            for name, b in module._buffers.items()
            if b is not None
        ]
        self.training = [(module, module.training) for module in self.model.modules()]

    def restore_buffers(self) -> None:
        """Only the buffers (running statistics, counters): cheap enough to do before every pass
        (one ``no_grad`` block and one copy per buffer: a 25-layer BN network has 72 buffers)."""
        with torch.no_grad():
            for module, name, (original, contents) in self.buffers:
                original.copy_(contents)
                module._buffers[name] = original

    def restore(self) -> None:
        for module, name, saved, grad in self.parameters:
            parameter = _restored(saved)
            parameter.grad = None if grad is None else _restored(grad)
            module._parameters[name] = parameter
        self.restore_buffers()
        for module, training in self.training:
            module.training = training


@dataclass
class OptimizerState:
    """An optimizer's per-parameter state (momentum buffers, Adam's moments and step counts), its
    parameter groups' settings and its simple attributes, kept so that ``restore()`` undoes any
    number of ``step()`` calls in place (the same dicts and tensors, the same contents)."""

    optimizer: torch.optim.Optimizer

    def __post_init__(self):
        optimizer = self.optimizer
        self.state = {
            p: (entry, {k: _saved(v) for k, v in entry.items()})
            for p, entry in optimizer.state.items()
        }
        self.groups = [
            (group, {k: _saved(v) for k, v in group.items() if k != "params"})
            for group in optimizer.param_groups
        ]
        self.group_list = list(optimizer.param_groups)
        self.attributes = {k: v for k, v in vars(optimizer).items() if isinstance(v, _SIMPLE)}

    def restore(self) -> None:
        optimizer = self.optimizer
        for p in [p for p in optimizer.state if p not in self.state]:
            del optimizer.state[p]
        for p, (entry, items) in self.state.items():
            entry.clear()
            entry.update({k: _restored(v) for k, v in items.items()})
            optimizer.state[p] = entry
        for group, items in self.groups:
            params = group["params"]
            group.clear()
            group.update({"params": params, **{k: _restored(v) for k, v in items.items()}})
        optimizer.param_groups[:] = self.group_list
        for key in [k for k, v in vars(optimizer).items() if isinstance(v, _SIMPLE)]:
            if key not in self.attributes:
                delattr(optimizer, key)
        for key, value in self.attributes.items():
            setattr(optimizer, key, value)


class Rewind:
    """What a measurement inside :func:`preserved` may go back to between its forward passes: the
    buffers and the random generators as they were on entry (not the parameters)."""

    def __init__(self, state: ModelState, rng: PinnedRng):
        self._state, self.rng = state, rng

    def __call__(self) -> None:
        """Rewind buffers (running statistics feed BatchRenorm's training forward, for one) and the
        generators (dropout masks, noise), so every pass sees the same model state but its weights."""
        self._state.restore_buffers()
        self.rng.reset()


@contextlib.contextmanager
def preserved(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[Rewind]:
    """A block after which ``model``, ``optimizer`` and torch's random generators are exactly as
    before it, whatever happened inside (an exception included).

    Restored: every parameter's values and ``.grad`` (the same tensor objects), every buffer (BN's
    running statistics and ``num_batches_tracked``), every module's train/eval flag, the optimizer's
    state, parameter-group settings and simple attributes, and the CPU and CUDA generators. Python's
    and NumPy's generators are not touched by torch models and are not saved.

    Yields a :class:`Rewind`: calling it puts the buffers and generators back to the moment of entry,
    which a measurement does before each of its forward passes. Example::

        with preserved(model, optimizer):
            optimizer.step()          # a step training never takes
            loss_after = loss_fn(model(x), y)
        # model and optimizer are as they were, bit for bit
    """
    state = ModelState(model)
    optimizer_state = None if optimizer is None else OptimizerState(optimizer)
    rng = PinnedRng(cuda_devices(model))
    try:
        yield Rewind(state, rng)
    finally:
        state.restore()
        if optimizer_state is not None:
            optimizer_state.restore()
        rng.reset()
