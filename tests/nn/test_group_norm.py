"""nk.GroupNorm: random configurations against torch.nn. Shared cases run in test_parity_torch.py;
the identities with LayerNorm and InstanceNorm in tests/functional/test_identities.py."""

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import normkit as nk
from helpers import BACKENDS, DTYPES, SPATIAL, compare_steps_with_torch

# The names these tests had in one file: derandomized hypothesis draws a test's examples from its
# source, so the same source keeps the same examples.
backends = BACKENDS
dtypes = DTYPES
spatial = SPATIAL
_compare = compare_steps_with_torch


@given(
    n=st.integers(1, 4),
    groups=st.integers(1, 4),
    per_group=st.integers(1, 3),
    rest=spatial,
    affine=st.booleans(),
    backend=backends,
    dtype=dtypes,
)
def test_group_norm(n, groups, per_group, rest, affine, backend, dtype):
    assume(per_group * math.prod(rest) >= 2)  # groups of one: tests/functional/test_numerics.py
    c = groups * per_group
    _compare(
        nk.GroupNorm(groups, c, affine=affine),
        torch.nn.GroupNorm(groups, c, affine=affine),
        (n, c, *rest),
        dtype,
        backend,
        [True, False],
    )
