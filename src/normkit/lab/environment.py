"""What normkit runs on: versions, threads, devices, working backends and data sets.

``normkit env`` prints it; the lab records it with every run. Nothing here imports triton: its
presence and version come from the package metadata.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

import torch

import normkit
from normkit.backends import check_backends


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(check: bool = True) -> dict:
    """A JSON-ready description of this machine as normkit sees it.

    Args:
        check: also run each backend once per device and dtype (a few milliseconds).
    """
    from normkit.lab.datasets import fashion_mnist_candidates, find_fashion_mnist

    fashion = find_fashion_mnist()
    cuda = torch.cuda.is_available()
    info = {
        "normkit": normkit.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "triton": _version("triton"),
        "scikit-learn": _version("scikit-learn"),
        "matplotlib": _version("matplotlib"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "backend": normkit.get_backend(),
        "backends": normkit.available_backends(),
        "fashion_mnist": str(fashion) if fashion else None,
        "fashion_mnist_searched": [str(p) for p in fashion_mnist_candidates()],
        "digits": importlib.util.find_spec("sklearn") is not None,
    }
    if check:
        info["backend_check"] = check_backends()
    return info
