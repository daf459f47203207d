"""Test configuration: deterministic seeds, hypothesis profiles, and the backend fixture."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import normkit as nk

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
