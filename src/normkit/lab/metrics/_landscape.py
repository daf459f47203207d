"""The loss landscape along the gradient: how far the loss and the gradient move when one steps.

Santurkar, Tsipras, Ilyas & Madry 2018 (arXiv 1805.11604), §3.1 and Fig. 4. At parameters θ with
gradient g = ∇L(θ) on a batch, for each step size η of a grid, on the same batch:

    loss landscape            the range [min_η, max_η] of L(θ - η g)
    gradient predictiveness   the range of ||∇L(θ - η g) - g||_2 over η
    effective β-smoothness    max_η ||∇L(θ - η g) - g||_2 / ||η g||_2

The last is the Lipschitz constant of the gradient along the gradient direction; for a quadratic
L(θ) = ½ θᵀAθ it is ||A g|| / ||g||, which is A's largest eigenvalue when g lies along its
eigenvector (the tests check both).
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
    distance,
    gradients,
    norm,
    trainable,
    unpack_batch,
)
from normkit.lab.metrics._state import preserved


@dataclass(frozen=True)
class LandscapeProbe:
    """What :func:`landscape_probe` measured at one point, one entry per step size."""

    step_sizes: tuple[float, ...]
    loss: float  # L(θ)
    grad_norm: float  # ||g||_2
    losses: tuple[float, ...]  # L(θ - η g)
    grad_changes: tuple[float, ...]  # ||∇L(θ - η g) - g||_2

    @property
    def loss_range(self) -> tuple[float, float]:
        """(min, max) of L(θ - η g) over the step sizes: one slice of Fig. 4(a)'s band."""
        return _range(self.losses)

    @property
    def grad_change_range(self) -> tuple[float, float]:
        """(min, max) of ||∇L(θ - η g) - g|| over the step sizes: Fig. 4(b)."""
        return _range(self.grad_changes)

    @property
    def beta_smoothness(self) -> float:
        """max_η ||∇L(θ - η g) - g|| / (η ||g||): Fig. 4(c). NaN when g = 0 (no direction)."""
        if self.grad_norm == 0:
            return math.nan
        return _range(
            [
                change / (eta * self.grad_norm)
                for eta, change in zip(self.step_sizes, self.grad_changes, strict=True)
            ]
        )[1]

    def as_dict(self) -> dict:
        low, high = self.loss_range
        change_low, change_high = self.grad_change_range
        return {
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "step_sizes": list(self.step_sizes),
            "losses": list(self.losses),
            "grad_changes": list(self.grad_changes),
            "loss_min": low,
            "loss_max": high,
            "grad_change_min": change_low,
            "grad_change_max": change_high,
            "beta_smoothness": self.beta_smoothness,
        }


def _range(values) -> tuple[float, float]:
    """(min, max); a non-finite value (a step that made the loss overflow) makes the max +inf, and
    the min is that of the finite values (+inf if none)."""
    finite = [v for v in values if math.isfinite(v)]
    low = min(finite, default=math.inf)
    return low, (max(finite) if len(finite) == len(values) else math.inf)


def _check_step_sizes(step_sizes: Sequence[float]) -> tuple[float, ...]:
    try:
        sizes = tuple(float(s) for s in step_sizes)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"landscape_probe: step_sizes must be a sequence of numbers, got {step_sizes!r}"
        ) from error
    if not sizes or not all(math.isfinite(s) and s > 0 for s in sizes):
        raise ConfigError(
            f"landscape_probe: step_sizes={step_sizes!r} must be a non-empty sequence of finite "
            "positive numbers, e.g. (0.05, 0.1, 0.2, 0.3, 0.4)"
        )
    return sizes


def landscape_probe(
    model: nn.Module, loss_fn: LossFn, batch: tuple, step_sizes: Sequence[float]
) -> LandscapeProbe:
    """Loss and gradient along the gradient direction (Santurkar et al. 2018, §3.1, Fig. 4); the
    model and torch's generators are restored exactly after.

    Args:
        model: any module; the loss is ``loss_fn(model(inputs), targets)``, its train/eval mode as
            it is. All parameters that require a gradient move together: θ - η g.
        loss_fn: must return a scalar tensor.
        batch: ``(inputs, targets)``, used for every evaluation.
        step_sizes: the grid of η (positive), e.g. the paper's (0.05, 0.1, 0.2, 0.3, 0.4); they
            multiply the raw gradient, like a learning rate.

    Every evaluation starts from the same buffers and random state (dropout masks and injected
    noise repeat), so the loss and gradient change only because the weights moved. A step too far
    (a non-finite loss or gradient) is kept as it is in ``losses``/``grad_changes`` and makes the
    upper end of the bands and β +inf.

    Cost: 1 + len(step_sizes) forward and backward passes (docs/benchmarks.md).
    """
    batch = unpack_batch(batch, "landscape_probe")
    sizes = _check_step_sizes(step_sizes)
    parameters = trainable(model, "landscape_probe")
    losses, changes = [], []
    with torch.enable_grad(), preserved(model) as rewind:
        rewind()
        loss = compute_loss(model, loss_fn, batch, "landscape_probe")
        g = gradients(loss, parameters)
        original = [p.detach().clone() for p in parameters]
        for eta in sizes:
            with torch.no_grad():
                for p, start, step in zip(parameters, original, g, strict=True):
                    p.copy_(start).add_(step, alpha=-eta)
            rewind()
            moved_loss = compute_loss(model, loss_fn, batch, "landscape_probe")
            losses.append(float(moved_loss.detach()))
            changes.append(distance(gradients(moved_loss, parameters), g))
    return LandscapeProbe(sizes, float(loss.detach()), norm(g), tuple(losses), tuple(changes))
