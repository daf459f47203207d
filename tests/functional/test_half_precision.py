"""float16 and bfloat16: every layer against the exact (float64) computation on the same input.

The exact values come from torch.nn's layer in float64, given the same parameters, inputs and output
gradients (all exactly representable in both).

- `reference` (normkit's own implementation) computes statistics and arithmetic in float32 and rounds
  once, so every element must be within two roundings (helpers.TOLERANCES).
- `native` runs torch's half kernels, which round some intermediates to the half type (on the CPU
  up to ~8 roundings in LayerNorm's weight gradient). Its promise is torch.nn's numbers, so it must be
  no less accurate than torch.nn's own layer: its largest error may exceed torch.nn's by at most 50%
  (summation order differs where normkit calls another kernel, e.g. InstanceNorm through group norm)
  or be within two roundings of the largest value (helpers.NORMWISE_HALF).
"""

import pytest
import torch

from helpers import (
    CASES,
    NORMWISE_HALF,
    assert_close,
    channels_last_format,
    compared_state,
    make_input,
    run_steps,
    with_layouts,
)

# (module dtype, input dtype): half modules, and half inputs into float32 parameters (autocast).
CONFIGS = {
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16": (torch.float16, torch.float16),
    "bf16_input_f32_params": (torch.float32, torch.bfloat16),
    "f16_input_f32_params": (torch.float32, torch.float16),
}
TRAIN_EVAL = [True, True, True, False]


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize(("case", "layout"), with_layouts(CASES))
def test_half_precision_against_float64(case, config, layout, backend):
    module_dtype, input_dtype = CONFIGS[config]
    channels_last = layout == "channels_last"
    ours, exact = case.build(module_dtype)
    exact.double()  # the half-rounded parameters, exactly, in float64
    inputs = [make_input(case.shape, input_dtype, channels_last, seed=s) for s in range(4)]
    mine = run_steps(ours, inputs, TRAIN_EVAL, grad_dtype=input_dtype)
    expected = run_steps(exact, [x.double() for x in inputs], TRAIN_EVAL, grad_dtype=input_dtype)
    if backend == "native":
        return _native_no_worse_than_torch(case, module_dtype, input_dtype, inputs, mine, expected)
    check = assert_close
    for step, ((y, dx, grads), (ey, edx, egrads)) in enumerate(zip(mine, expected, strict=True)):
        label = f"{case} step {step} ({'train' if TRAIN_EVAL[step] else 'eval'})"
        assert y.dtype == input_dtype, label
        check(y, ey, input_dtype, f"{label} output")
        check(dx, edx, input_dtype, f"{label} input grad")
        for name in grads:
            assert grads[name].dtype == module_dtype, f"{label} grad of {name}"
            check(grads[name], egrads[name], input_dtype, f"{label} grad of {name}")
        if channels_last:
            fmt = channels_last_format(y.dim())
            assert y.is_contiguous(memory_format=fmt), f"{label}: output lost channels_last"
    for key, value, exact_value in compared_state(ours, exact, case):
        if value.is_floating_point():
            assert value.dtype == module_dtype, key
            check(value, exact_value, input_dtype, f"{case} buffer {key}")


def _native_no_worse_than_torch(case, module_dtype, input_dtype, inputs, mine, expected):
    _, theirs = case.build(module_dtype)
    torch_results = run_steps(theirs, inputs, TRAIN_EVAL, grad_dtype=input_dtype)
    for step, (ours, exact, torch_nn) in enumerate(zip(mine, expected, torch_results, strict=True)):
        label = f"{case} step {step}"
        pairs = [
            ("output", ours[0], exact[0], torch_nn[0]),
            ("input grad", ours[1], exact[1], torch_nn[1]),
        ]
        pairs += [(f"grad of {k}", ours[2][k], exact[2][k], torch_nn[2][k]) for k in ours[2]]
        for what, value, truth, baseline in pairs:
            truth = truth.double()
            error = (value.double() - truth).abs().max().item()
            torch_error = (baseline.double() - truth).abs().max().item()
            allowed = max(1.5 * torch_error, NORMWISE_HALF[input_dtype] * truth.abs().max().item())
            assert error <= allowed, (
                f"{label} {what}: error {error:.3g} vs float64, torch.nn's {torch_error:.3g}"
            )
