"""Triton kernels for the normalization family; reached only through the ``triton`` backend.

The kernel modules import triton; nothing outside this package imports them except the dispatcher's
thin wrapper in :mod:`normkit.backends`, on the first call. The entry points in :mod:`normkit.kernels.ops`
have the same contracts as the other backends' implementations (``torch.batch_norm``'s for
``batch_norm``, and so on); the files hold one op each:

- ``batch_norm_forward``: training forward with statistics (per-program centred partials merged with
  Chan et al.'s formula in a second stage, or one program per channel when that fills the device);
- ``batch_norm_eval``: the normalize pass with given statistics (eval forward, and the second half of
  the split training forward and of group norm);
- ``batch_norm_backward``: the backward (sums, coefficients, input gradient), from the input or, for
  InPlace-ABN, from the output;
- ``group_norm``: group norm forward and backward on the same kernels (per-sample statistics over
  groups of channels);
- ``layer_norm``: row-wise layer norm forward and backward;
- ``_math``: device functions shared by the kernels (Chan's merge, activations); ``_utils``: launch
  helpers (views of an (N, C, *) tensor, block sizes, how to split a reduction, the launch call that
  can be recorded instead of run);
- ``_launch_plans``: every launch of the ops on the shapes of docs/benchmarks.md, planned for an
  H100's or an A100's multiprocessors on ``meta`` tensors, with the bytes each moves;
- ``_aot``: ahead-of-time compilation of any recorded launch for sm_80 or sm_90, without a GPU, with
  ptxas's registers and spills and the occupancy they allow (``benchmarks/aot_check.py``).

Kernels accumulate in float32 and save float32 statistics for any input dtype. They are tested on
the CPU under triton's interpreter (TRITON_INTERPRET=1), compiled ahead of time for sm_80 and sm_90
in the tests (tests/kernels/test_kernels_aot.py); ``benchmarks/gpu_check.py`` runs the same tests
compiled on a GPU and times them (docs/benchmarks.md says whether that has happened).
"""

import importlib

_ENTRY_POINTS = (
    "batch_norm",
    "batch_norm_act",
    "channel_layer_norm",
    "group_norm",
    "inplace_abn",
    "layer_norm",
)
__all__ = list(_ENTRY_POINTS)


def __getattr__(name: str):
    # The entry points (and triton with them) load on first use, so that walking the package,
    # e.g. for its docstrings, stays free of triton until a kernel is wanted.
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module("normkit.kernels.ops"), name)
    raise AttributeError(f"module 'normkit.kernels' has no attribute {name!r}")
