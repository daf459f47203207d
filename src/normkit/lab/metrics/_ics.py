"""Internal covariate shift as Santurkar et al. (2018) define it: how much a layer's gradient
changes when the layers before it take their update first.

Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help Optimization?"
(arXiv 1805.11604), Definition 2.1 and Fig. 3. For layer i at step t, on the step's batch (x, y):

    G_i  = grad_{W_i} L(W_1,  ..., W_{i-1},  W_i, ..., W_k; x, y)
    G'_i = grad_{W_i} L(W'_1, ..., W'_{i-1}, W_i, ..., W_k; x, y)
    ICS_i = ||G_i - G'_i||_2, reported with cos(G_i, G'_i)

where W' are the weights after this step's update of all layers at once (the update the optimizer
would apply given the gradients G: for SGD, W' = W - lr G; for momentum or Adam, their step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from normkit.errors import ConfigError
from normkit.lab.metrics._common import (
    LossFn,
    compute_loss,
    dot,
    gradients,
    norm,
    trainable,
    unpack_batch,
)
from normkit.lab.metrics._common import distance as l2_distance
from normkit.lab.metrics._state import preserved


@dataclass(frozen=True)
class LayerShift:
    """The ICS of one layer at one step: G (the gradient of a simultaneous update) against G' (the
    same gradient after the layers before it moved)."""

    l2: float  # ||G - G'||_2 (the paper's ICS)
    cosine: float  # cos(G, G'); NaN when either gradient is zero
    grad_norm: float  # ||G||_2
    shifted_grad_norm: float  # ||G'||_2

    @property
    def relative_l2(self) -> float:
        """||G - G'|| / ||G||: the shift on the scale of the gradient itself (NaN if G = 0)."""
        return self.l2 / self.grad_norm if self.grad_norm > 0 else math.nan

    def as_dict(self) -> dict:
        return {
            "l2": self.l2,
            "cosine": self.cosine,
            "grad_norm": self.grad_norm,
            "shifted_grad_norm": self.shifted_grad_norm,
            "relative_l2": self.relative_l2,
        }


@dataclass(frozen=True)
class CovariateShift:
    """What :func:`ics` measured: the loss on the batch and each layer's shift, in forward order."""

    loss: float
    layers: dict[str, LayerShift]

    def as_dict(self) -> dict:
        """JSON-ready: ``{"loss": ..., "layers": {name: {"l2", "cosine", ...}}}``."""
        return {"loss": self.loss, "layers": {k: v.as_dict() for k, v in self.layers.items()}}


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def layer_names(model: nn.Module) -> list[str]:
    """The names (as in ``model.named_modules()``) of the modules that own trainable parameters:
    the "layers" :func:`ics` can measure."""
    return [name for name, m in model.named_modules() if _own_parameters(m)]


def ics(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple,
    optimizer: torch.optim.Optimizer,
    *,
    layers: Sequence[str] | None = None,
) -> CovariateShift:
    """Internal covariate shift of each layer for one step on ``batch`` (Santurkar et al. 2018,
    Definition 2.1); the model, the optimizer and torch's generators are restored exactly after.

    Args:
        model: any module; the loss is ``loss_fn(model(inputs), targets)``. Its train/eval mode is
            used as it is (training mode measures what training sees, BN with batch statistics).
        loss_fn: e.g. ``torch.nn.functional.cross_entropy``; must return a scalar.
        batch: ``(inputs, targets)``; G and G' use the same batch.
        optimizer: the one that trains ``model``; W' is the result of its ``step()`` on the
            gradients G (so momentum, weight decay and Adam's moments count, as in training).
        layers: names of modules (``model.named_modules()``) to report; default: every module that
            owns trainable parameters (:func:`layer_names`).

    Returns:
        :class:`CovariateShift`, layers in the order they are first called in the forward pass.

    Decisions, where the paper leaves room:

    - A *layer* is a module that owns parameters (a Linear or Conv layer with its bias; a BN layer
      with γ and β); G_i is the gradient of all its own parameters, concatenated. Layers are
      ordered by when they are first called in the forward pass, and "the layers before i" are
      those called before it (for a container that owns parameters, that is when the container
      is called).
    - Every forward pass starts from the same random state and the same buffers, so dropout masks
      (or injected noise) are identical in G and G', and BN's running statistics do not drift
      between the passes.
    - For the first layer nothing moves, so G' = G without another pass.

    Cost: one forward and backward for G, one ``optimizer.step()``, and per reported layer after
    the first one forward and a backward down to that layer only (docs/benchmarks.md).
    """
    batch = unpack_batch(batch, "ics")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"ics: optimizer must be a torch.optim.Optimizer (the one training the model), "
            f"got {type(optimizer).__name__}"
        )
    parameters = trainable(model, "ics")
    modules = dict(model.named_modules())
    available = layer_names(model)
    if layers is not None:
        layers = list(layers)
        unknown = [n for n in layers if n not in available]
        if unknown or not layers:
            raise ConfigError(
                f"ics: layers={layers!r}: {unknown or 'none given'} are not modules with trainable "
                f"parameters of this model; choose among {available}"
            )
    with torch.enable_grad(), preserved(model, optimizer) as rewind:
        # G, and the order in which layers are first called.
        order: list[str] = []
        names_of = {id(modules[n]): n for n in available}

        def record(module, _inputs):
            name = names_of[id(module)]
            if name not in order:
                order.append(name)

        hooks = [modules[n].register_forward_pre_hook(record) for n in available]
        try:
            rewind()
            loss = compute_loss(model, loss_fn, batch, "ics")
        finally:
            for hook in hooks:
                hook.remove()
        raw = torch.autograd.grad(loss, parameters, allow_unused=True)
        grads = {
            p: torch.zeros_like(p) if g is None else g.detach()
            for p, g in zip(parameters, raw, strict=True)
        }
        selected = [n for n in order if layers is None or n in layers]
        missing = [n for n in (layers or []) if n not in order]
        if missing:
            raise ConfigError(
                f"ics: layers {missing} are not called in the forward pass on this batch, so they "
                f"have no gradient; choose among {order}"
            )

        # W': what the optimizer's step would make of every parameter, given G.
        original = {p: p.detach().clone() for p in parameters}
        for p, g in zip(parameters, raw, strict=True):
            p.grad = None if g is None else g.detach().clone()
        try:
            optimizer.step()
        except TypeError as error:
            if "closure" in str(error):
                raise ConfigError(
                    f"ics: {type(optimizer).__name__}.step() needs a closure (it evaluates the "
                    "loss several times per step); ics supports optimizers that step from .grad"
                ) from error
            raise
        updated = {p: p.detach().clone() for p in parameters}
        with torch.no_grad():
            for p in parameters:
                p.copy_(original[p])
                p.grad = None

        # G' for each reported layer: the layers called before it take their update first.
        shifts: dict[str, LayerShift] = {}
        moved = 0  # layers order[:moved] hold their updated weights
        for name in selected:
            position = order.index(name)
            with torch.no_grad():
                for earlier in order[moved:position]:
                    for p in _own_parameters(modules[earlier]):
                        p.copy_(updated[p])
            moved = max(moved, position)
            own = _own_parameters(modules[name])
            g = [grads[p] for p in own]
            if position == 0:
                g_shifted = g
            else:
                rewind()
                shifted_loss = compute_loss(model, loss_fn, batch, "ics")
                g_shifted = gradients(shifted_loss, own)
            shifts[name] = _shift(g, g_shifted)
    return CovariateShift(float(loss.detach()), shifts)


def _shift(g: list[torch.Tensor], g_shifted: list[torch.Tensor]) -> LayerShift:
    a, b = norm(g), norm(g_shifted)
    cosine = dot(g, g_shifted) / (a * b) if a > 0 and b > 0 else math.nan
    return LayerShift(l2_distance(g, g_shifted), cosine, a, b)
