"""What the measurements share: checking a batch, computing a loss, and norms of gradient lists."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from normkit.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unpack_batch(batch, function: str) -> tuple:
    """``(inputs, targets)`` from a batch, or a ConfigError that says what a batch is."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ConfigError(
            f"{function}: batch must be a pair (inputs, targets), the loss being "
            f"loss_fn(model(inputs), targets); got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


def compute_loss(model: nn.Module, loss_fn: LossFn, batch: tuple, function: str) -> torch.Tensor:
    """``loss_fn(model(inputs), targets)``, checked to be a scalar tensor."""
    inputs, targets = batch
    loss = loss_fn(model(inputs), targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError(
            f"{function}: loss_fn must return a scalar tensor, got {shape}; reduce it "
            "(e.g. reduction='mean')"
        )
    if not loss.requires_grad:
        raise ConfigError(
            f"{function}: the loss does not depend on any parameter that requires a gradient "
            "(is the model frozen, or the loss detached?)"
        )
    return loss.reshape(())


def gradients(loss: torch.Tensor, parameters: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d parameter for each parameter (zeros where the loss does not depend on it)."""
    grads = torch.autograd.grad(loss, list(parameters), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]


def flat64(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The concatenation of ``tensors`` as one float64 vector (one copy, exact)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()


def norm(tensors: Sequence[torch.Tensor]) -> float:
    """The l2 norm of the concatenation of ``tensors``, accumulated in float64."""
    return float(flat64(tensors).norm())


def distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """||a - b||_2 over the concatenations, with the difference taken in float64 (exact)."""
    return float((flat64(a) - flat64(b)).norm())


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(flat64(a) @ flat64(b))


def trainable(model: nn.Module, function: str) -> list[nn.Parameter]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ConfigError(f"{function}: the model has no parameter that requires a gradient")
    return parameters
