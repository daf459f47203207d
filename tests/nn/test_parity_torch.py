"""Every layer against its torch.nn namesake: outputs, gradients and state after train and eval steps.

One generic test runs over the declarative cases in helpers.CASES, each backend, each dtype
configuration and both memory formats: three training steps (running statistics move), then one eval
step (they are used), comparing every output, input gradient, parameter gradient and buffer.
"""

import pytest
import torch

from helpers import (
    CASES,
    assert_close,
    channels_last_format,
    compared_state,
    make_input,
    run_steps,
    with_layouts,
)

# Exact precisions only: half precision is held to the float64 oracle in test_half_precision.py,
# because torch's own half-precision results are further from the exact values than ours.
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TRAIN_EVAL = [True, True, True, False]


@pytest.mark.parametrize("dtypes", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize(("case", "layout"), with_layouts(CASES))
def test_matches_torch(case, dtypes, layout, backend):
    module_dtype = input_dtype = DTYPES[dtypes]
    channels_last = layout == "channels_last"
    ours, theirs = case.build(module_dtype)
    inputs = [make_input(case.shape, input_dtype, channels_last, seed=s) for s in range(4)]
    mine = run_steps(ours, inputs, TRAIN_EVAL)
    reference = run_steps(theirs, inputs, TRAIN_EVAL)
    for step, ((y, dx, grads), (ty, tdx, tgrads)) in enumerate(zip(mine, reference, strict=True)):
        label = f"{case} step {step} ({'train' if TRAIN_EVAL[step] else 'eval'})"
        assert y.dtype == ty.dtype == input_dtype, label
        assert_close(y, ty, input_dtype, f"{label} output")
        assert_close(dx, tdx, input_dtype, f"{label} input grad")
        assert grads.keys() == tgrads.keys(), label
        for name in grads:
            assert_close(grads[name], tgrads[name], input_dtype, f"{label} grad of {name}")
        if channels_last:
            fmt = channels_last_format(y.dim())
            assert y.is_contiguous(memory_format=fmt), f"{label}: output lost channels_last"
            assert dx.is_contiguous(memory_format=fmt), f"{label}: input grad lost channels_last"
    for key, value, expected in compared_state(ours, theirs, case):
        if value.is_floating_point():
            assert_close(value, expected, module_dtype, f"{case} buffer {key}")
        else:
            assert torch.equal(value, expected), f"{case} buffer {key}: {value} != {expected}"


BATCHED = [c for c in CASES if "unbatched" not in c.name]


@pytest.mark.parametrize("case", BATCHED, ids=str)
def test_zero_size_batch(case, backend):
    """An empty batch: an empty output, gradients that exist, and no change of state.

    torch.nn agrees except for InstanceNorm, which raises on empty batches (normkit returns them).
    """
    ours, theirs = case.build()
    shape = (0, *case.shape[1:])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for training in (True, False):
        ours.train(training)
        x = torch.randn(shape, requires_grad=True)
        y = ours(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        if not case.name.startswith("in"):
            theirs.train(training)
            assert theirs(torch.randn(shape)).shape == y.shape
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key
