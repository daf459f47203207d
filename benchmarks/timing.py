"""Timing one call the way every CPU benchmark of docs/benchmarks.md does: torch's Timer, at
torch's own thread count (Timer's default is one thread), with the process's CPU time beside the
wall time."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.benchmark import Timer


def time_call(fn: Callable[[], object], min_run_time: float) -> tuple[float, float]:
    """(median wall seconds, process CPU seconds) per call of ``fn``. CPU time is the steadier
    measure on a shared machine: waiting for a core does not count. (The few calibration calls of
    blocked_autorange count in the CPU time: a bias of a few percent at most.)"""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    start = time.process_time()
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    calls = len(measurement.raw_times) * measurement.number_per_run
    return measurement.median, (time.process_time() - start) / calls


def train_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``layer`` on a fresh leaf of ``x`` with output gradient ``dy``."""

    def step():
        leaf = x.detach().requires_grad_(True)
        layer(leaf).backward(dy)

    return step
