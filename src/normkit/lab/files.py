"""Writing run files safely: strict JSON, and atomic replacement (temporary file, fsync, rename)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def json_ready(value):
    """Rows as strict JSON: NaN and infinities become null; tensors and NumPy scalars become numbers."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
        return json_ready(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file, fsync it, and rename it over ``path`` (atomic on POSIX)."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json(path: Path, value) -> None:
    write_atomic(
        path,
        lambda p: p.write_text(json.dumps(json_ready(value), indent=2) + "\n", encoding="utf-8"),
    )
