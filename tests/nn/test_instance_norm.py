"""nk.InstanceNorm1d/2d/3d: random configurations against torch.nn. Shared cases run in
test_parity_torch.py and test_family.py."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import normkit as nk
from helpers import BACKENDS, DTYPES, compare_steps_with_torch

# The names these tests had in one file: derandomized hypothesis draws a test's examples from its
# source, so the same source keeps the same examples.
backends = BACKENDS
dtypes = DTYPES
_compare = compare_steps_with_torch


@given(
    n=st.integers(1, 4),
    c=st.integers(1, 4),
    h=st.integers(2, 5),
    w=st.integers(1, 5),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, 0.4]),
    channels_last=st.booleans(),
    backend=backends,
    dtype=dtypes,
)
def test_instance_norm_2d(n, c, h, w, affine, track, momentum, channels_last, backend, dtype):
    kwargs = dict(affine=affine, track_running_stats=track, momentum=momentum)
    ours = nk.InstanceNorm2d(c, **kwargs)
    theirs = torch.nn.InstanceNorm2d(c, **kwargs)
    if track:  # torch never counts InstanceNorm batches; copy our count so the states compare

        def copy_count(module, *_):
            module.num_batches_tracked.copy_(ours.num_batches_tracked)

        theirs.register_forward_hook(copy_count)
    _compare(ours, theirs, (n, c, h, w), dtype, backend, [True, True, False], channels_last)
