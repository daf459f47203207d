"""nk.BatchNorm (any rank) and nk.BatchNorm1d/2d/3d: random configurations against torch.nn, and the
torch _BatchNorm that code looking for batch norms finds. Shared cases run in test_parity_torch.py,
test_family.py and test_state_dict.py."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normkit as nk
from helpers import BACKENDS, DTYPES, SPATIAL, TorchBatchNormAnyRank, compare_steps_with_torch

# The names these tests had in one file: derandomized hypothesis draws a test's examples from its
# source, so the same source keeps the same examples.
backends = BACKENDS
dtypes = DTYPES
spatial = SPATIAL
_compare = compare_steps_with_torch


@given(
    n=st.integers(2, 5),
    c=st.integers(1, 5),
    rest=spatial,
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, 1.0, None]),
    eps=st.sampled_from([1e-5, 1e-3]),
    backend=backends,
    dtype=dtypes,
)
def test_batch_norm_any_rank(n, c, rest, affine, track, momentum, eps, backend, dtype):
    kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    _compare(
        nk.BatchNorm(c, **kwargs),
        TorchBatchNormAnyRank(c, **kwargs),
        (n, c, *rest),
        dtype,
        backend,
        [True, True, False],
    )


@pytest.mark.parametrize("layer_cls", [nk.BatchNorm1d, nk.BatchNorm2d, nk.BatchNorm3d])
def test_is_a_torch_batch_norm(layer_cls):
    """Code that special-cases torch's BN (weight-decay filters, converters) keeps working."""
    layer = layer_cls(3)
    assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
    assert isinstance(layer, nk.BatchNorm)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(layer))
    assert isinstance(converted[0], torch.nn.SyncBatchNorm)
