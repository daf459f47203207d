"""Batch norm fused with a residual add and an activation: y = act(BN(x) + z).

:func:`batch_norm_act` is :func:`~normkit.functional.batch_norm` (same checks, guard, running
statistics and cumulative average) with the activation and the optional residual ``z`` fused in;
see :class:`normkit.BatchNormAct` for the layer. Three implementations are registered:

- ``reference`` (here): the unfused computation, batch norm then ``+ z`` then the activation, each
  differentiated by autograd: the definition the fused versions are tested against.
- ``native`` (:class:`FusedBatchNormAct` with ATen pieces): ATen's batch norm, the residual and the
  activation applied in place on its output; backward through ATen's activation and batch-norm
  backward kernels.
- ``compiled`` (:class:`FusedBatchNormAct` with torch.compile'd pure-tensor maths): one statistics
  pass plus one normalize pass forward, one reduction plus one elementwise pass backward, fused by
  Inductor. The first call for a new shape, dtype or layout compiles (seconds; docs/benchmarks.md).

What is saved for backward: x, the parameters and float32 per-channel mean and 1/std, plus
- ``compiled`` (and ``triton``): z when the activation is not the identity, and nothing else: the
  pre-activation is recomputed inside the fused backward, so nothing of the output's size is kept
  (BatchNorm followed by ReLU keeps x and the output);
- ``native``: for relu and leaky_relu the output itself, whose sign is the activation's derivative
  (the output is the next layer's input, kept anyway, as torch's ReLU keeps it); for silu and gelu z,
  and the pre-activation is recomputed (one extra ATen pass).
Where recomputation rounds differently from the forward, the activation's derivative can differ
only for pre-activations within rounding of a kink (relu at 0), where the derivative is a
convention anyway.
"""

from __future__ import annotations

import torch

from normkit.errors import ConfigError, ShapeError
from normkit.functional import _activation, _dispatch
from normkit.functional._batch_norm import batch_dims, reference_batch_norm
from normkit.functional._checks import (
    check_batch_statistics_size,
    check_eps,
    check_floating,
    check_min_rank,
    check_per_channel,
    shape_str,
)
from normkit.functional._compiled import CompiledMaths, like_input
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import channel_view
from normkit.functional._running_stats import (
    average_into,
    exponential_average_factor,
    guarded_update,
    update_running_stats,
)


def batch_norm_act(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "relu",
    activation_param: float = 0.01,
    residual: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """``act(batch_norm(input) + residual)`` in one pass forward and one backward.

    Arguments as :func:`~normkit.functional.batch_norm`, plus ``activation`` (one of
    ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``, ``"identity"``), ``activation_param``
    (leaky_relu's negative slope) and ``residual`` (a tensor of the input's shape added before the
    activation, as in a ResNet block's last norm, or None).
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_per_channel(
        input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    _activation.check_activation(
        activation, activation_param, _activation.FUSED_ACTIVATIONS, "BatchNormAct"
    )
    if residual is not None:
        check_floating(residual, "residual")
        if residual.shape != input.shape:
            raise ShapeError(
                f"residual must have the input's shape {shape_str(input.shape)}, got "
                f"{shape_str(residual.shape)}; it is added to the normalized input elementwise"
            )
    if training:
        check_batch_statistics_size(input)
    elif running_mean is None or running_var is None:
        raise ConfigError(
            "batch_norm_act with training=False normalizes with running_mean and running_var, but "
            "they were not given; pass them, or training=True to use the batch's statistics"
        )
    impl = _dispatch.resolve("batch_norm_act", input)
    activation_param = float(activation_param)

    def run(mean, var, factor):
        return impl(
            input, residual, mean, var, weight, bias, training, factor, eps,
            activation, activation_param,
        )  # fmt: skip

    tracked = training and running_mean is not None and running_var is not None
    if not training:
        return run(running_mean, running_var, 0.0)
    if not tracked or input.numel() == 0:
        return run(None, None, 0.0)
    factor = exponential_average_factor(momentum, num_batches_tracked)
    return guarded_update(
        running_mean,
        running_var,
        lambda mean, var: average_into(mean, var, factor, run),
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )


def reference_batch_norm_act(
    input, residual, running_mean, running_var, weight, bias, training, momentum, eps,
    activation, activation_param,
):  # fmt: skip
    """The unfused definition: batch norm, then the residual, then the activation."""
    y = reference_batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )
    if residual is not None:
        y = y + residual
    return _activation.apply(y, activation, activation_param)


# --- the fused implementations ---------------------------------------------------------------------


class _EagerEngine:
    """ATen's kernels: batch norm forward, then the residual and the activation in place on its
    output; backward through ATen's activation backward and batch-norm backward.

    relu and leaky_relu (slope >= 0) read their derivative from the output's sign, so this engine
    keeps the output, which the next layer keeps anyway (it is its input), as torch's ReLU does;
    silu and gelu recompute the pre-activation from x (and z) in one extra pass.
    """

    name = "native"

    @staticmethod
    def keeps_output(act, param) -> bool:
        return act == "relu" or (act == "leaky_relu" and param >= 0)

    @staticmethod
    def forward(x, z, weight, bias, running_mean, running_var, training, momentum, eps, act, param):
        if training:
            pre, mean, invstd = torch.native_batch_norm(
                x, weight, bias, running_mean, running_var, True, momentum, eps
            )
        else:
            pre = torch.batch_norm(
                x, weight, bias, running_mean, running_var, False, 0.0, eps, False
            )
            dtype = stats_dtype(x.dtype)  # float64 stays float64: the backward reads them
            mean, invstd = running_mean.to(dtype), torch.rsqrt(running_var.to(dtype) + eps)
        if z is not None:
            pre.add_(z)
        return _activation.apply_(pre, act, param), mean, invstd

    @staticmethod
    def backward_from_output(dy, y, act, param):
        """dL/dpre for relu and leaky_relu (slope >= 0) from the output's sign, one ATen pass."""
        if act == "relu":
            return torch.ops.aten.threshold_backward(dy, y, 0)
        return torch.ops.aten.leaky_relu_backward(dy, y, param, True)

    @classmethod
    def backward(cls, dy, x, z, y, weight, bias, mean, invstd, training, eps, act, param, needs):
        ndim = x.dim()
        if act == "identity":
            g = dy
        elif y is not None:  # relu / leaky_relu: the derivative from the output's sign
            g = cls.backward_from_output(dy, y, act, param)
        else:
            # the pre-activation, recomputed: (x - mean) * invstd * w + b (+ z), one ATen pass
            scale = invstd if weight is None else invstd * weight.float()
            shift = -mean * scale if bias is None else bias.float() - mean * scale
            pre = torch.empty_like(x, dtype=scale.dtype)  # x's layout
            torch.addcmul(channel_view(shift, ndim), x, channel_view(scale, ndim), out=pre)
            if z is not None:
                pre = pre.add_(z)
            g = _activation.backward(dy.to(pre.dtype), pre, act, param).to(x.dtype)
        dz = g if needs[1] else None
        mask = [needs[0], needs[2] and weight is not None, needs[3] and bias is not None]
        if training:
            dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
                g, x, weight, None, None, mean, invstd, True, eps, mask
            )
        else:
            dx, dweight, dbias = _eval_backward(g, x, weight, mean, invstd, mask)
        dx = None if dx is None else like_input(dx, x)  # gradients keep the input's layout
        return dx, dz, dweight, dbias


def _eval_backward(g, x, weight, mean, invstd, mask):
    """Frozen statistics: dL/dx = g * w * invstd; dL/dw = sum(g * x_hat); dL/db = sum(g)."""
    ndim, dims = x.dim(), batch_dims(x.dim())
    dtype = stats_dtype(x.dtype)
    scale = invstd if weight is None else invstd * weight.to(dtype)
    dx = (g.to(dtype) * channel_view(scale, ndim)).to(x.dtype) if mask[0] else None
    dweight = dbias = None
    if mask[1]:
        x_hat = (x.to(dtype) - channel_view(mean, ndim)) * channel_view(invstd, ndim)
        dweight = (g.to(dtype) * x_hat).sum(dims).to(weight.dtype)
    if mask[2]:
        dbias = g.to(dtype).sum(dims)
    return dx, dweight, dbias


def _fused_forward_maths(x, z, weight, bias, mean, var, training: bool, eps: float, act, param):
    """Statistics (Welford in Inductor; float32 for half inputs) and the normalize pass."""
    ndim, dtype = x.dim(), stats_dtype(x.dtype)
    xf = x.to(dtype)
    if training:
        var, mean = torch.var_mean(xf, dim=batch_dims(ndim), correction=0, keepdim=True)
    else:
        mean, var = channel_view(mean.to(dtype), ndim), channel_view(var.to(dtype), ndim)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * channel_view(weight.to(dtype), ndim)
    pre = (xf - mean) * scale
    if bias is not None:
        pre = pre + channel_view(bias.to(dtype), ndim)
    if z is not None:
        pre = pre + z.to(dtype)
    y = _activation.apply(pre, act, param).to(x.dtype)
    return y, mean.reshape(-1), invstd.reshape(-1), var.reshape(-1)


def _fused_backward_maths(dy, x, z, weight, bias, mean, invstd, training: bool, act, param):
    """One reduction (sum g, sum g * x_hat) and one elementwise pass, fused by Inductor."""
    ndim, dims, dtype = x.dim(), batch_dims(x.dim()), stats_dtype(x.dtype)
    n = x.numel() // x.shape[1]
    xf, g = x.to(dtype), dy.to(dtype)
    mean, invstd = channel_view(mean, ndim), channel_view(invstd, ndim)
    w = None if weight is None else channel_view(weight.to(dtype), ndim)
    x_hat = (xf - mean) * invstd
    if act != "identity":
        scale = invstd if w is None else invstd * w
        pre = (xf - mean) * scale
        if bias is not None:
            pre = pre + channel_view(bias.to(dtype), ndim)
        if z is not None:
            pre = pre + z.to(dtype)
        g = g * _activation.derivative(pre, act, param)
    sum_g = g.sum(dims, keepdim=True)
    sum_gx = (g * x_hat).sum(dims, keepdim=True)
    scale = invstd if w is None else invstd * w
    dx = scale * (g - sum_g / n - x_hat * (sum_gx / n)) if training else scale * g
    return dx.to(x.dtype), g, sum_gx.reshape(-1), sum_g.reshape(-1)


class _CompiledEngine:
    """Pure tensor maths compiled by torch.compile (Inductor); running statistics updated after."""

    name = "compiled"

    @staticmethod
    def keeps_output(act, param) -> bool:
        return False  # the pre-activation is recomputed inside the fused backward

    @classmethod
    def forward(
        cls, x, z, weight, bias, running_mean, running_var, training, momentum, eps, act, param
    ):
        y, mean, invstd, var = CompiledMaths.call(
            _fused_forward_maths, x, z, weight, bias, running_mean, running_var, training, eps,
            act, param,
        )  # fmt: skip
        if training and running_mean is not None and running_var is not None:
            update_running_stats(
                running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum
            )
        return like_input(y, x), mean, invstd

    @classmethod
    def backward(cls, dy, x, z, y, weight, bias, mean, invstd, training, eps, act, param, needs):
        dx, g, sum_gx, sum_g = CompiledMaths.call(
            _fused_backward_maths, dy, x, z, weight, bias, mean, invstd, training, act, param
        )
        dz = g.to(x.dtype) if needs[1] else None
        dweight = sum_gx.to(weight.dtype) if weight is not None and needs[2] else None
        dbias = sum_g.to(bias.dtype) if bias is not None and needs[3] else None
        return (dx if needs[0] else None), dz, dweight, dbias


class FusedBatchNormAct(torch.autograd.Function):
    """y = act(BN(x) + z) with a hand-written backward (see the module docstring for what is
    saved). ``engine`` is ``_EagerEngine`` (ATen) or ``_CompiledEngine`` (torch.compile)."""

    @staticmethod
    def forward(
        ctx, x, z, weight, bias, running_mean, running_var, training, momentum, eps, act, param,
        engine,
    ):  # fmt: skip
        y, mean, invstd = engine.forward(
            x, z, weight, bias, running_mean, running_var, training, momentum, eps, act, param
        )
        keep = engine.keeps_output(act, param)
        recompute = act != "identity" and not keep
        ctx.save_for_backward(
            x, z if recompute else None, y if keep else None, weight, bias, mean, invstd
        )
        ctx.config = (training, eps, act, param, engine)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, y, weight, bias, mean, invstd = ctx.saved_tensors
        training, eps, act, param, engine = ctx.config
        backward = _differentiable_backward if torch.is_grad_enabled() else engine.backward
        dx, dz, dweight, dbias = backward(
            dy, x, z, y, weight, bias, mean, invstd, training, eps, act, param,
            ctx.needs_input_grad,
        )  # fmt: skip
        return dx, dz, dweight, dbias, None, None, None, None, None, None, None, None


def _pre_activation(x, weight, bias, mean, invstd, training: bool, eps: float):
    """BN(x) as a function autograd differentiates to any order: in training the statistics are
    recomputed from x (ATen's batch norm, whose double backward is torch's), in eval the running
    ones (saved as mean and 1/std) are constants. In the statistics' dtype."""
    ndim, dtype = x.dim(), stats_dtype(x.dtype)
    w = None if weight is None else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    if training:
        return torch.nn.functional.batch_norm(x.to(dtype), None, None, w, b, True, 0.0, eps)
    scale = invstd if w is None else invstd * w
    pre = (x.to(dtype) - channel_view(mean, ndim)) * channel_view(scale, ndim)
    return pre if b is None else pre + channel_view(b, ndim)


def _differentiable_backward(
    dy, x, z, y, weight, bias, mean, invstd, training, eps, act, param, needs
):  # fmt: skip
    """The backward under ``create_graph=True`` (double backward, gradient penalties): the
    gradients of the unfused definition by autograd, so that they are differentiable again. With
    the output kept (relu, leaky_relu) the activation's derivative is read from its sign, as in
    the fused backward; otherwise the pre-activation is recomputed from x (and z, saved then)."""
    if act == "identity":
        g = dy
    elif y is not None:  # relu / leaky_relu: the derivative from the output's sign
        g = _EagerEngine.backward_from_output(dy, y, act, param)
    else:
        g = None
    tensors = (x, z, weight, bias)
    wanted = [
        t if need and t is not None else None for t, need in zip(tensors, needs[:4], strict=True)
    ]
    if g is not None:
        wanted[1] = None  # z enters after the normalization: its gradient is g itself
    with torch.enable_grad():
        out = _pre_activation(x, weight, bias, mean, invstd, training, eps)
        if g is None:
            out = _activation.apply(out if z is None else out + z.to(out.dtype), act, param)
        out, grad_out = out.to(x.dtype), (dy if g is None else g)
        inputs = [t for t in wanted if t is not None]
        grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True))
    dx, dz, dweight, dbias = (next(grads) if t is not None else None for t in wanted)
    if g is not None and needs[1]:
        dz = g
    return dx, dz, dweight, dbias


def _fused(engine):
    def batch_norm_act_impl(
        input, residual, running_mean, running_var, weight, bias, training, momentum, eps,
        activation, activation_param,
    ):  # fmt: skip
        if input.numel() == 0:
            return reference_batch_norm_act(
                input, residual, running_mean, running_var, weight, bias, training, momentum, eps,
                activation, activation_param,
            )  # fmt: skip
        return FusedBatchNormAct.apply(
            input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
            activation, activation_param, engine,
        )  # fmt: skip

    batch_norm_act_impl.__name__ = f"{engine.name}_batch_norm_act"
    return batch_norm_act_impl


native_batch_norm_act = _fused(_EagerEngine)
compiled_batch_norm_act = _fused(_CompiledEngine)
