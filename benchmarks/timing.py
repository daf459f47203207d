"""Timing one call the way every CPU benchmark of docs/benchmarks.md does: torch's Timer, at
torch's own thread count (Timer's default is one thread), with the process's CPU time beside the
wall time; and, for runs that measure the passes rather than the allocator, :func:`keep_freed_memory`."""

from __future__ import annotations

import ctypes
import resource
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


def alternate(calls: dict[str, Callable[[], object]], rounds: int, min_run_time: float,
              warm: int = 1) -> dict[str, list[float]]:  # fmt: skip
    """Milliseconds per call of each of ``calls``, one :func:`time_call` per round, the providers
    alternating within a round so that the machine's drift hits them all alike; each is called
    ``warm`` times first (compilation, caches)."""
    for call in calls.values():
        for _ in range(warm):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(time_call(call, min_run_time)[0] * 1e3)
    return times


def train_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``layer`` on a fresh leaf of ``x`` with output gradient ``dy``."""

    def step():
        leaf = x.detach().requires_grad_(True)
        layer(leaf).backward(dy)

    return step


def faults_per_call(fn: Callable[[], object], calls: int) -> float:
    """Minor page faults of the process per call of ``fn`` over ``calls`` calls (``getrusage``):
    the pages of fresh outputs that the kernel had to map and zero."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory a process frees (``mallopt``: trim threshold 2 GiB,
    mmap threshold 32 MiB, its maximum) rather than return it to the system; False where the C
    library has no ``mallopt``.

    By default glibc gives a large freed block back when the free space at the top of its heap
    exceeds a threshold that it adapts as blocks come and go, and the next step's output then
    faults its pages in again, zeroed by the kernel (about 6,300 faults, several ms, per 25 MB
    tensor on the machine of docs/benchmarks.md). Which provider's steps hit that depends on the
    order of its allocations, not on its passes over memory, so the same ATen kernel measured 20-40%
    apart from one provider to the next. With this set, every provider's outputs reuse warm pages,
    as under jemalloc or tcmalloc (which PyTorch's CPU performance guides recommend) and as in the
    copy that the memory bound is measured with."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
    return bool(mallopt(trim_threshold, 2**31 - 1)) and bool(mallopt(mmap_threshold, 32 << 20))
