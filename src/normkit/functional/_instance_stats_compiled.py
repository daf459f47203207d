"""The ``compiled`` engine of the per-plane family: Ghost BN, Batch-Instance and Switchable Norm.

Each of those layers is ``y = x * scale[n, c] + shift[n, c]`` with ``(scale, shift)`` a small
differentiable function (the *mixer*) of the instance statistics ``(mean, var)`` of every (n, c)
plane and of the layer's parameters (:mod:`normkit.functional._instance_stats`). Only four steps
touch every element, and here each is one pass of pure tensor maths fused by torch.compile
(Inductor) in the input's own layout, so that a channels_last input is reduced along its rows of
contiguous channels instead of through strided planes (for float32 channels_last the two
reductions run :mod:`normkit.functional._plane_sums`' one pass over the rows, which Inductor's
loops take 2-3× longer to do):

- forward: the plane moments (one pass of shifted sums: read x), then ``x * scale + shift`` (read
  x, write y): 3 passes;
- backward: the plane sums ``sum(dy * x)`` and ``sum(dy)`` (read dy and x), then
  ``dx = dy * scale + a[n, c] * x + b[n, c]`` (read dy and x, write dx): 5 passes,

8 passes in all, the least a two-pass normalization needs (BatchNorm's count). With
``dscale = sum(dy * x)`` and ``dshift = sum(dy)`` per plane, autograd differentiates the mixer on
the (N, C) tensors alone, giving ``dmean``, ``dvar`` and the parameters' gradients, and
``mean = sum(x) / S``, ``var = sum((x - mean)^2) / S`` give

    dL/dx = dy * scale + dmean / S + 2 dvar (x - mean) / S

(the mean's term in d var / dx sums to zero over the plane): ``a = 2 dvar / S`` and
``b = dmean / S - a * mean``. The affine form loses about u * |mean| / std of relative precision for
inputs far from zero (u the unit roundoff), as the ``native`` engine's does. Statistics and
arithmetic run in float32 for half inputs. A gradient of the gradient (``create_graph=True``)
recomputes the layer with the ``native`` engine's differentiable passes and differentiates that.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from normkit.functional import _plane_sums
from normkit.functional._batch_norm_compiled import row_block, sample_mean, shifted_moments
from normkit.functional._compiled import CompiledMaths, like_input
from normkit.functional._moments import stats_dtype
from normkit.functional._running_stats import compiling

Mixer = Callable[..., tuple[torch.Tensor, ...]]


def _spatial(ndim: int) -> tuple[int, ...]:
    return tuple(range(2, ndim))


def _plane(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(t.shape + (1,) * (ndim - 2))


def _blocks(t: torch.Tensor) -> torch.Tensor | None:
    """A channels-innermost (N, C, *) tensor as (N, S / K, K, C) blocks of K positions, or None.

    Reduced over its K positions first and then over the blocks, a channels_last plane is read
    once, in order (:func:`~normkit.functional._batch_norm_compiled.row_block`).
    """
    if t.dim() < 3 or not t.movedim(1, -1).is_contiguous() or t.is_contiguous():
        return None
    size = math.prod(t.shape[2:])
    rows = row_block(size)
    if not rows:
        return None
    return t.movedim(1, -1).reshape(t.shape[0], size // rows, rows, t.shape[1])


def _plane_sum(t: torch.Tensor, blocked: bool) -> torch.Tensor:
    """Per plane sums, (N, C): of blocks (N, S / K, K, C), or of an (N, C, *) tensor."""
    return t.sum(2).sum(1) if blocked else t.sum(_spatial(t.dim()))


def _moments_maths(x):
    """Mean and biased variance of every (n, c) plane, (N, C), in the statistics dtype: one pass
    of shifted sums (:func:`~normkit.functional._batch_norm_compiled.shifted_moments`)."""
    xf = x.to(stats_dtype(x.dtype))
    if x.dim() == 2:  # planes of one element: (N, C) itself, no spread
        return xf, torch.zeros_like(xf)
    blocks = _blocks(xf)
    if blocks is None:
        mean, var = shifted_moments(xf, _spatial(x.dim()))
        return mean.flatten(1), var.flatten(1)
    size = math.prod(x.shape[2:])
    k = sample_mean(xf, _spatial(x.dim())).flatten(1)  # (N, C)
    d = blocks - k[:, None, None, :]
    s1, s2 = _plane_sum(d, True), _plane_sum(d * d, True)
    return k + s1 / size, ((s2 - s1 * s1 / size) / size).clamp_min(0.0)


def _moments(x):
    """:func:`_moments_maths`, by :mod:`._plane_sums`' one pass over the rows for float32
    channels_last inputs (the shift: a sampled mean of each plane, as :func:`_moments_maths`)."""
    if compiling() or not _plane_sums.available(x):
        return CompiledMaths.call(_moments_maths, x)
    return _plane_sums.plane_moments(x, sample_mean(x, _spatial(x.dim())).flatten(1))


def _sums(dy, x, dtype: torch.dtype):
    """:func:`_sums_maths`, by :mod:`._plane_sums` for float32 channels_last inputs."""
    if compiling() or dtype != torch.float32 or not _plane_sums.available(dy, x):
        return CompiledMaths.call(_sums_maths, dy, x, dtype)
    return _plane_sums.plane_sums(dy, x)


def _affine_maths(x, scale, shift):
    ndim = x.dim()
    y = x.to(scale.dtype) * _plane(scale, ndim) + _plane(shift, ndim)
    return y.to(x.dtype)


def _sums_maths(dy, x, dtype: torch.dtype):
    """Per plane: sum(dy * x) and sum(dy), (N, C) each, in ``dtype``."""
    g = dy.to(dtype)
    if x.dim() == 2:  # (N, C): every plane is one element (a sum over no dims would sum them all)
        return g * x.to(dtype), g
    blocks = _blocks(x)
    if blocks is not None:
        g = g.movedim(1, -1).reshape(blocks.shape)
        return _plane_sum(g * blocks.to(dtype), True), _plane_sum(g, True)
    return _plane_sum(g * x.to(dtype), False), _plane_sum(g, False)


def _input_grad_maths(dy, x, scale, a, b):
    ndim = x.dim()
    dx = dy.to(scale.dtype) * _plane(scale, ndim) + x.to(scale.dtype) * _plane(a, ndim)
    return (dx + _plane(b, ndim)).to(x.dtype)


class _CompiledPlaneNorm(torch.autograd.Function):
    """y = x * scale + shift with (scale, shift, *extras) = mixer(mean, var, *params); returns y and
    the mixer's extras (statistics for the running averages, not differentiable)."""

    @staticmethod
    def forward(ctx, x, mixer: Mixer, *params):
        mean, var = _moments(x)
        with torch.enable_grad():
            leaves = [mean.detach().requires_grad_(), var.detach().requires_grad_()]
            inputs = [p.detach().requires_grad_() if _trainable(p) else p for p in params]
            scale, shift, *extras = mixer(*leaves, *inputs)
        y = like_input(CompiledMaths.call(_affine_maths, x, scale.detach(), shift.detach()), x)
        tensors = [p for p in params if isinstance(p, torch.Tensor)]
        ctx.save_for_backward(x, mean, *tensors)
        ctx.graph = (leaves, inputs, scale, shift)
        ctx.mixer, ctx.params = mixer, [None if isinstance(p, torch.Tensor) else p for p in params]
        extras = [e.detach() for e in extras]
        ctx.mark_non_differentiable(*extras)
        return (y, *extras)

    @staticmethod
    def backward(ctx, dy, *_):
        if torch.is_grad_enabled():  # create_graph: differentiate the native engine instead
            return _differentiable_backward(ctx, dy)
        return _fused_backward(ctx, dy)


def _fused_backward(ctx, dy):
    """Two passes over the input (see the module docstring); the mixer by autograd."""
    x, mean, *_ = ctx.saved_tensors
    leaves, inputs, scale, shift = ctx.graph
    dscale, dshift = _sums(dy, x, scale.dtype)
    wanted = leaves + [p for p in inputs if _trainable(p)]
    grads = torch.autograd.grad(
        (scale, shift), wanted, (dscale, dshift), allow_unused=True, materialize_grads=True
    )
    dmean, dvar, *param_grads = grads
    dx = None
    if ctx.needs_input_grad[0]:
        size = math.prod(x.shape[2:])
        a = dvar * (2.0 / size)
        b = dmean / size - a * mean
        dx = like_input(CompiledMaths.call(_input_grad_maths, dy, x, scale.detach(), a, b), x)
    param_grads = iter(param_grads)
    out = [next(param_grads).to(p.dtype) if _trainable(p) else None for p in inputs]
    return (dx, None, *out)


def _differentiable_backward(ctx, dy):
    """The gradients as functions of the inputs (for a gradient of the gradient): the layer
    recomputed with the native engine's twice-differentiable passes, then differentiated."""
    from normkit.functional._instance_stats import instance_affine, instance_moments

    x, _, *tensors = ctx.saved_tensors
    tensors = iter(tensors)
    params = [next(tensors) if p is None and _was_tensor(q) else p
              for p, q in zip(ctx.params, ctx.graph[1], strict=True)]  # fmt: skip
    mean, var = instance_moments(x)
    scale, shift, *_ = ctx.mixer(mean, var, *params)
    y = instance_affine(x, scale, shift)
    needs = ctx.needs_input_grad  # (x, mixer, *params)
    slots = [i for i in range(len(needs)) if needs[i]]
    inputs = [x if i == 0 else params[i - 2] for i in slots]
    grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def _was_tensor(p) -> bool:
    return isinstance(p, torch.Tensor)


def _trainable(p) -> bool:
    return isinstance(p, torch.Tensor) and p.requires_grad


def plane_norm(x: torch.Tensor, mixer: Mixer, *params) -> tuple[torch.Tensor, ...]:
    """``(y, *extras)`` of a per-plane normalizer (see the module docstring): ``mixer(mean, var,
    *params)`` returns ``(scale, shift, *extras)`` from the (N, C) instance statistics, in their
    dtype. ``params`` may hold tensors (differentiated when they require grad), None or numbers.
    """
    return _CompiledPlaneNorm.apply(x, mixer, *params)
