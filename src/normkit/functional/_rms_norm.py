"""Root mean square layer normalization (Zhang & Sennrich 2019): no centring, one statistic.

:func:`rms_norm` is ``torch.nn.functional.rms_norm`` (same arguments, dtype rules and default eps)
with normkit's checks; :func:`channel_rms_norm` normalizes over dim 1 of an (N, C, \\*) map at every
position. Paper: https://arxiv.org/abs/1910.07467, eqs. 3-4:

    RMS(a) = sqrt(1/n sum_i a_i^2),     y_i = a_i / RMS(a) * g_i

with eps inside the square root, as torch: ``y = a * rsqrt(mean(a^2) + eps) * g``.

Implementations (``normkit.backends``):

- ``native``: ``torch.rms_norm`` — ATen's composite maths on the CPU, fused kernels on CUDA.
- ``reference``: normkit's own: the mean square from one vectorized reduction
  (``torch.linalg.vector_norm``, no temporary of the input's size), the output in two elementwise
  passes, and a hand-derived backward (:class:`_RMSNorm`). On the CPU this is what ``auto`` picks
  (docs/benchmarks.md, "Small batches").

Numerics, as torch's: statistics in float32 for float16/bfloat16 inputs; ``eps=None`` is the
machine epsilon of that computation dtype (float32's for half inputs, as ATen does, although
torch's documentation says the input's); ``x * rsqrt(...)`` is rounded to the input's dtype and then
multiplied by the weight, so the output has the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from normkit.functional import _dispatch
from normkit.functional._checks import (
    check_eps,
    check_floating,
    check_min_rank,
    check_per_channel,
    check_trailing_shape,
)
from normkit.functional._moments import stats_dtype
from normkit.functional._transforms import composite_required, differentiable_backward, transforming


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """RMS normalization over the last dims; see :class:`normkit.RMSNorm`.

    The arguments and results of ``torch.nn.functional.rms_norm``.
    """
    check_floating(input)
    if eps is not None:
        check_eps(eps)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    check_trailing_shape(input, shape)
    if transforming():
        if torch.jit.is_tracing():  # the legacy ONNX exporter has no RMSNorm operator
            dims = tuple(range(input.dim() - len(shape), input.dim()))
            return composite_rms_norm(input, weight, dims, eps)
        return native_rms_norm(input, shape, weight, eps)
    impl = _dispatch.resolve("rms_norm", input)
    return impl(input, shape, weight, eps)


def channel_rms_norm(
    input: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None
) -> torch.Tensor:
    """RMS normalization over dim 1 of an (N, C, \\*) input, per sample and position; see
    :class:`normkit.RMSNorm2d`. The output keeps the input's memory format."""
    check_floating(input)
    if eps is not None:
        check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_per_channel(input, weight=weight)
    if transforming():
        if torch.jit.is_tracing():  # the legacy ONNX exporter has no RMSNorm operator
            return composite_rms_norm(input, _channel_weight(weight, input.dim()), (1,), eps)
        return native_channel_rms_norm(input, weight, eps)
    impl = _dispatch.resolve("channel_rms_norm", input)
    return impl(input, weight, eps)


def default_eps(dtype: torch.dtype) -> float:
    """torch's ``eps=None``: the machine epsilon of the dtype the statistics are computed in."""
    return torch.finfo(stats_dtype(dtype)).eps


# --- native: torch's own op --------------------------------------------------------------------------


def native_rms_norm(input, normalized_shape, weight, eps):
    return torch.rms_norm(input, list(normalized_shape), weight, eps)


def native_channel_rms_norm(input, weight, eps):
    # torch's op reduces the last dim: move the channels there (a view; channels_last is then
    # contiguous), and back.
    y = torch.rms_norm(input.movedim(1, -1), [input.shape[1]], weight, eps).movedim(-1, 1)
    return y if composite_required() else _like(input, y)


def composite_rms_norm(input, weight, dims, eps):
    """``torch.rms_norm``'s maths in plain tensor ops (ATen's CPU composite: statistics dtype,
    rounded to the input's dtype, then the gain): for the legacy ONNX exporter, which has no
    RMSNorm operator, and for double backward. ``weight`` broadcasts against the input."""
    x = input.to(stats_dtype(input.dtype))
    r = torch.rsqrt(x.square().mean(dims, keepdim=True) + _eps(eps, input))
    y = (x * r).to(input.dtype)
    return y if weight is None else y * weight


def _channel_weight(weight, ndim):
    return None if weight is None else weight.view((1, -1) + (1,) * (ndim - 2))


def _like(layout: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if layout.dim() == 4 and layout.is_contiguous(memory_format=torch.channels_last):
        return values.contiguous(memory_format=torch.channels_last)
    if layout.dim() == 5 and layout.is_contiguous(memory_format=torch.channels_last_3d):
        return values.contiguous(memory_format=torch.channels_last_3d)
    return values.contiguous()


# --- reference: normkit's own, with a hand-derived backward ----------------------------------------


def reference_rms_norm(input, normalized_shape, weight, eps):
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    if input.numel() == 0:
        return native_rms_norm(input, normalized_shape, weight, eps)
    return _RMSNorm.apply(input, weight, dims, _eps(eps, input))


def reference_channel_rms_norm(input, weight, eps):
    if input.numel() == 0:
        return native_channel_rms_norm(input, weight, eps)
    return _RMSNorm.apply(input, _channel_weight(weight, input.dim()), (1,), _eps(eps, input))


def _eps(eps: float | None, input: torch.Tensor) -> float:
    return default_eps(input.dtype) if eps is None else float(eps)


def inverse_rms(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over ``dims`` (kept as size 1), in the statistics dtype.

    One reduction pass: the 2-norm accumulates the squares without a temporary of x's size.
    """
    n = math.prod(x.shape[d] for d in dims)
    norm = torch.linalg.vector_norm(x, 2, dims, keepdim=True, dtype=stats_dtype(x.dtype))
    return torch.rsqrt(norm.square_().div_(n).add_(eps))


class _RMSNorm(torch.autograd.Function):
    """y = (x * r) * g with r = 1/sqrt(mean(x^2) + eps) over ``dims``.

    Backward, with n the number of elements that share r (d r / d x_j = -r^3 x_j / n):

        dL/dx = r * (dL/dy * g + k * x),   k = -r^2 / n * sum(dL/dy * g * x)
        dL/dg = sum(dL/dy * x * r)          (summed to the shape of g)

    Saves x, g and r (one value per normalized group). For half inputs every intermediate is
    float32 and each gradient is rounded to its dtype once. Under ``create_graph=True`` the
    gradients are autograd's of :func:`composite_rms_norm`, differentiable again.
    """

    @staticmethod
    def forward(ctx, x, weight, dims, eps):
        # half inputs: one conversion to float32 first (ATen's mixed-dtype kernels are not
        # vectorized on the CPU; two float32 passes are faster than two mixed ones)
        xs = x.to(stats_dtype(x.dtype))
        r = inverse_rms(xs, dims, eps)  # (..., 1) in the statistics dtype
        y = torch.empty_like(x)
        torch.mul(xs, r, out=y)  # computed in float32 for half inputs, rounded once to x's dtype
        if weight is not None:
            y = y.mul_(weight.to(y.dtype))
        ctx.save_for_backward(x, weight, r)
        ctx.dims, ctx.eps = dims, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        dims = ctx.dims
        if torch.is_grad_enabled():  # create_graph=True: double backward
            return differentiable_backward(
                composite_rms_norm, (x, weight, dims, ctx.eps), ctx.needs_input_grad, dy
            )
        n = math.prod(x.shape[d] for d in dims)
        dtype = r.dtype  # float32 for half inputs: x and dL/dy converted once (see forward)
        out_dtype = x.dtype
        x, dy = x.to(dtype), dy.to(dtype)
        trailing = dims == tuple(range(x.dim() - len(dims), x.dim()))
        if weight is not None and trailing and weight.dim() == len(dims):
            return _trailing_backward(ctx, dy, x, weight, r, n, out_dtype)
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            h = dy if weight is None else dy * weight.to(dtype)
            k = -(r**2) * _dot(h, x, dims, dtype) / n  # per group
            dx = torch.empty_like(x, dtype=out_dtype)
            torch.mul(torch.mul(x, k).add_(h), r, out=dx)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = torch.mul(dy, r).mul_(x).sum_to_size(weight.shape).to(weight.dtype)
        return dx, dweight, None, None


def _trailing_backward(ctx, dy, x, weight, r, n, out_dtype):
    """The backward over the trailing dims with a gain of their shape, as rows of n values
    (x and dL/dy in the statistics dtype): t = dL/dy * x once, then sum(t * g) per row and
    dL/dg = sum over rows of r * t as two matrix-vector products; dL/dx in three elementwise
    passes, rounded once to ``out_dtype``."""
    rows = r.numel()
    x2, dy2, r2 = x.reshape(rows, n), dy.reshape(rows, n), r.reshape(rows, 1)
    w = weight.reshape(n).to(r.dtype)
    t = dy2 * x2  # (rows, n)
    dx = dweight = None
    if ctx.needs_input_grad[0]:
        k = t.mv(w).unsqueeze(1).mul_(-r2.square() / n)  # (rows, 1)
        u = torch.mul(x2, k).addcmul_(dy2, w)  # dL/dy * g + k * x
        dx = torch.empty((rows, n), dtype=out_dtype, device=x.device)
        dx = torch.mul(u, r2, out=dx).view(x.shape)
    if ctx.needs_input_grad[1]:
        dweight = r2.reshape(1, rows).mm(t).reshape(weight.shape).to(weight.dtype)
    return dx, dweight, None, None


def _dot(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...], dtype) -> torch.Tensor:
    """sum(a * b) over ``dims`` (kept), accumulated in ``dtype``; one pass when ``dims`` is the last."""
    if dims == (a.dim() - 1,) and a.dtype == b.dtype == dtype:
        return torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1)
    return (a.to(dtype) * b.to(dtype)).sum(dims, keepdim=True)
