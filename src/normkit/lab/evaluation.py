"""Measurements taken on a model: accuracy, loss, error, and the distribution of one unit's input.

All run under ``torch.no_grad`` in chunks, so a 10,000-image test set through a CNN stays within a
few hundred MB; the caller sets train/eval mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from normkit.lab.datasets import Dataset

EVAL_CHUNK = 1000


@torch.no_grad()
def accuracy_and_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = EVAL_CHUNK
) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``(x, y)``."""
    correct, loss = 0, 0.0
    for start in range(0, len(y), chunk):
        logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        correct += int((logits.argmax(dim=1) == target).sum())
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    return correct / len(y), loss / len(y)


def error_percent(accuracy: float | None) -> float | None:
    """Top-1 error in percent, from an accuracy fraction."""
    return None if accuracy is None else 100.0 * (1.0 - accuracy)


def on_test_set(
    model: nn.Module, data: Dataset, examples: int | None = None, error: bool = False
) -> dict[str, float]:
    """A metrics row's ``test_accuracy`` (with ``error``: ``test_error``, in %) and ``test_loss``
    of ``model`` on the first ``examples`` test images (all by default)."""
    accuracy, loss = accuracy_and_loss(model, data.x_test[:examples], data.y_test[:examples])
    first = {"test_error": error_percent(accuracy)} if error else {"test_accuracy": accuracy}
    return {**first, "test_loss": loss}


def error_on_test_set(model: nn.Module, data: Dataset, examples: int | None = None) -> float:
    """Top-1 error (%) of ``model`` on the first ``examples`` test images (all by default)."""
    return on_test_set(model, data, examples, error=True)["test_error"]


def forward_in_chunks(
    model: nn.Module, x: torch.Tensor, hooks: list, chunk: int = EVAL_CHUNK
) -> None:
    """Run ``x`` through ``model`` in chunks for what ``hooks`` record, then remove the hooks (their
    handles), also when a forward fails."""
    try:
        for start in range(0, len(x), chunk):
            model(x[start : start + chunk])
    finally:
        for handle in hooks:
            handle.remove()


@torch.no_grad()
def unit_percentiles(
    model: nn.Module,
    module: nn.Module,
    x: torch.Tensor,
    unit: int,
    quantiles: tuple[float, ...] = (0.15, 0.5, 0.85),
    chunk: int = EVAL_CHUNK,
) -> list[float]:
    """Quantiles, over the examples of ``x``, of feature ``unit`` of ``module``'s output.

    Ioffe & Szegedy (2015), Fig. 1(b, c): the {15, 50, 85}th percentiles of one sigmoid's input.
    """
    values: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: values.append(out[:, unit].clone()))
    forward_in_chunks(model, x, [handle], chunk)
    return torch.quantile(
        torch.cat(values).double(), torch.tensor(quantiles, dtype=torch.double)
    ).tolist()
