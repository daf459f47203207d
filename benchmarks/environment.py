"""The machine and versions a benchmark ran on, written beside its results (docs/benchmarks.md
quotes them with every table)."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import torch

import normkit as nk


def environment(**extra) -> dict:
    """Date, command, machine, threads, load and versions, plus what a benchmark adds (``extra``)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "normkit": nk.__version__,
        "python": platform.python_version(),
        **extra,
    }
