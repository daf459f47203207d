"""nk.LayerNorm and nk.LayerNorm2d: random configurations against torch.nn. Shared cases run in
test_parity_torch.py and test_state_dict.py; masks in tests/functional/test_masked.py."""

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import normkit as nk
from helpers import BACKENDS, DTYPES, compare_steps_with_torch, make_input, randomize_parameters

# The names these tests had in one file: derandomized hypothesis draws a test's examples from its
# source, so the same source keeps the same examples.
backends = BACKENDS
dtypes = DTYPES
_compare = compare_steps_with_torch


@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    normalized=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    affine=st.booleans(),
    bias=st.booleans(),
    backend=backends,
    dtype=dtypes,
)
def test_layer_norm(lead, normalized, affine, bias, backend, dtype):
    assume(math.prod(normalized) >= 2)  # groups of one element: tests/functional/test_numerics.py
    kwargs = dict(elementwise_affine=affine, bias=bias)
    _compare(
        nk.LayerNorm(normalized, **kwargs),
        torch.nn.LayerNorm(normalized, **kwargs),
        (*lead, *normalized),
        dtype,
        backend,
        [True, False],
    )


def test_layer_norm_2d_loads_layer_norm_over_channels():
    source = torch.nn.LayerNorm(5)
    randomize_parameters(source)
    layer = nk.LayerNorm2d(5)
    layer.load_state_dict(source.state_dict())
    x = make_input((2, 5, 3, 3))
    torch.testing.assert_close(layer(x), source(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
