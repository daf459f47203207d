"""Shared by the fused-layer tests: inputs in every layout, and the float64 oracle's answers.

Inputs are drawn in float64 and rounded to the tested dtype, so the oracle (normkit.reference, in
float64) sees exactly the values the implementation sees. Parameters and running statistics are
float32, as in a layer under autocast; their gradients are float32 results of exact inputs and are
held to the float32 tolerance, everything of the input's dtype to that dtype's (helpers.TOLERANCES).
"""

from __future__ import annotations

import numpy as np
import torch

from helpers import TOLERANCES, assert_close
from normkit import reference as R

PARAMS = {"leaky_relu": 0.1, "elu": 0.7}  # non-default values, so a forgotten parameter shows


def layout_tensor(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (N, C, *) in a memory layout: contiguous, channels_last (4-D/5-D), channels
    innermost for any rank (a permuted view), or strided (every other element of a wider tensor)."""
    if layout == "contiguous":
        return values.contiguous()
    if layout == "channels_last":
        fmt = torch.channels_last if values.dim() == 4 else torch.channels_last_3d
        return values.contiguous(memory_format=fmt)
    if layout == "channels_inner":
        return values.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":
        wide = values.new_zeros(*values.shape[:-1], 2 * values.shape[-1])
        wide[..., ::2] = values
        return wide[..., ::2]
    raise ValueError(layout)


def make_case(shape, dtype, layout="contiguous", seed=0, shift=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]

    def draw(s, sc=1.0, sh=0.0):
        return torch.randn(s, generator=g, dtype=torch.float64) * sc + sh

    return {
        "layout": layout,
        "x": draw(shape, scale, shift).to(dtype),
        "z": draw(shape).to(dtype),
        "dy": draw(shape).to(dtype),
        "weight": (draw(c, 0.4, 1.0)).float(),
        "bias": (draw(c, 0.3)).float(),
        "running_mean": draw(c, 0.2).float(),
        "running_var": (draw(c, 0.2).abs() + 0.5).float(),
    }


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().double().numpy()


def expected_batch_norm_act(case, *, training, activation, residual, momentum=0.1, eps=1e-5):
    """y, dx, dz, dweight, dbias and the new running statistics, in float64."""
    param = PARAMS.get(activation, 0.01)
    x, z, dy = _np(case["x"]), _np(case["z"]) if residual else None, _np(case["dy"])
    gamma, beta = _np(case["weight"]), _np(case["bias"])
    mean0, var0 = _np(case["running_mean"]), _np(case["running_var"])
    if training:
        y, cache, pre = R.batch_norm_act_train(x, gamma, beta, activation, param, z, eps)
        dx, dz, dgamma, dbeta = R.batch_norm_act_backward(dy, cache, pre, activation, param)
        mean, var = R.running_average(mean0, var0, x, momentum)
    else:
        bn = R.batch_norm_inference(x, mean0, var0, gamma, beta, eps)
        pre = bn if z is None else bn + z
        y = R.activation(pre, activation, param)
        dz = dy * R.activation_derivative(pre, activation, param)
        ndim = x.ndim
        shape = (1, -1) + (1,) * (ndim - 2)
        invstd = 1 / np.sqrt(var0.reshape(shape) + eps)
        dx = dz * gamma.reshape(shape) * invstd
        axes = (0, *range(2, ndim))
        dgamma = (dz * (x - mean0.reshape(shape)) * invstd).sum(axis=axes)
        dbeta = dz.sum(axis=axes)
        mean, var = mean0, var0
    out = {"y": y, "dx": dx, "dweight": dgamma, "dbias": dbeta, "mean": mean, "var": var}
    if residual:
        out["dz"] = dz
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def run_batch_norm_act(fn, case, *, training, residual, device="cpu"):
    """Forward and backward of ``fn(x, z, running_mean, running_var, weight, bias)``."""
    x = layout_input(case["x"].to(device), case["layout"])
    z = layout_input(case["z"].to(device), case["layout"]) if residual else None
    weight = case["weight"].to(device, copy=True).requires_grad_()  # the case stays untouched
    bias = case["bias"].to(device, copy=True).requires_grad_()
    mean = case["running_mean"].to(device, copy=True)
    var = case["running_var"].to(device, copy=True)
    y = fn(x, z, mean, var, weight, bias)
    y.backward(case["dy"].to(device=device, dtype=y.dtype))
    out = {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": weight.grad,
        "dbias": bias.grad,
        "mean": mean,
        "var": var,
        "x_stride": x.stride(),
        "y_stride": y.stride(),
        "dx_stride": x.grad_strides[0],
    }
    if residual:
        out["dz"] = z.grad
    return out


def layout_input(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-leaf input in ``layout`` whose own gradient is kept (to check its layout too)."""
    leaf = values.detach().clone().requires_grad_()  # on the device of ``values``
    x = layout_tensor(leaf, layout) if layout != "contiguous" else leaf * 1
    x.retain_grad()
    x.grad_strides = []
    x.register_hook(lambda grad: x.grad_strides.append(grad.stride()))
    return x


def compare(actual, expected, dtype, label):
    """Input-dtype results at that dtype's tolerance; float32 parameters and buffers at float32's."""
    for key, value in expected.items():
        tolerance_dtype = dtype if key in ("y", "dx", "dz") else torch.float32
        assert actual[key] is not None, f"{label}: no {key}"
        if key in ("y", "dx", "dz"):
            assert actual[key].dtype == dtype, f"{label}: {key} has dtype {actual[key].dtype}"
        assert_close(actual[key], value, tolerance_dtype, f"{label} {key}")


__all__ = ["PARAMS", "TOLERANCES", "compare", "expected_batch_norm_act", "make_case"]
