"""Test configuration: deterministic seeds, hypothesis profiles, the backend fixture, and the
torchvision shim that lets timm import beside a CPU-only torch."""

import importlib.machinery
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import normkit as nk


def _let_torchvision_import_without_its_extension() -> None:
    """Define torchvision::nms and torchvision::qnms when torchvision's compiled ops cannot load.

    Why: PyPI's torchvision wheels for Linux are CUDA builds. Beside the CPU-only torch that the
    dev install uses, their extension (torchvision/_C) does not load, and ``import torchvision``
    then fails in torchvision/_meta_registrations.py, which registers fake kernels for
    torchvision::nms and torchvision::qnms without checking that the ops exist ("operator
    torchvision::nms does not exist"). Defining the two schemas first lets torchvision's
    pure-Python parts import (timm needs only those: no test calls nms). Applied only when the
    extension really fails to load: a torchvision whose ops load is left alone.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return  # no torchvision: the tests that need timm skip
    folder = Path(next(iter(spec.submodule_search_locations)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        library = folder / f"_C{suffix}"
        if library.exists():
            try:
                torch.ops.load_library(str(library))  # what torchvision does first on import
                return
            except (ImportError, OSError):
                break
    for name in ("nms", "qnms"):
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            torch.library.define(
                f"torchvision::{name}",
                "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            )


_let_torchvision_import_without_its_extension()

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("NORMKIT_HYPOTHESIS_EXAMPLES", "30")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["native", "reference"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    nk.set_backend("auto")
    yield
    nk.set_backend("auto")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test under each backend, through the public context manager."""
    with nk.backend(request.param):
        yield request.param
