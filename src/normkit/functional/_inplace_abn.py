"""In-Place Activated Batch Normalization (Rota Bulò, Porzi & Kontschieder, CVPR 2018).

https://arxiv.org/abs/1712.02616. y = act(BN(x)) with an invertible activation, computed over x's
memory, and a backward that needs only y and per-channel statistics (§3.2, eqs. 7-9): the
pre-activation is recovered as act^-1(y), then x_hat = (act^-1(y) - beta) / gamma, and the usual
batch-norm gradient follows from (dL/dy * act'(act^-1(y)), x_hat). Batch norm followed by an
activation keeps x (for the batch norm) and y (for the activation); this keeps y alone, about half
of the activation memory of the pair (the paper's "up to 50%").

Decisions, each documented on :class:`normkit.InPlaceABN` and tested:

- gamma must not be 0 (x_hat = (pre - beta) / gamma). The reference implementation replaces gamma by
  |gamma| + eps, which changes the output of any channel with gamma < 0. Here the forward uses
  ``effective_weight(gamma)``: gamma itself where |gamma| >= ``min_abs_weight``, else
  ``min_abs_weight`` with gamma's sign (+ for 0), and the gradient passes straight through to gamma.
  A plain BatchNorm's weights therefore give the same output in every channel with
  |gamma| >= min_abs_weight, and a zero-initialised gamma still learns.
- The input is overwritten only when that is safe for autograd (not a leaf that requires grad, nor
  a view of one) and ``inplace`` is True; otherwise the result is a new tensor (the memory saving
  of keeping only y holds either way).
"""

from __future__ import annotations

import torch

from normkit.errors import ConfigError
from normkit.functional import _activation, _dispatch
from normkit.functional._batch_norm import batch_dims, reference_batch_norm
from normkit.functional._checks import (
    check_batch_statistics_size,
    check_eps,
    check_floating,
    check_min_rank,
    check_per_channel,
)
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import channel_view
from normkit.functional._running_stats import (
    average_into,
    exponential_average_factor,
    guarded_update,
)
from normkit.functional._transforms import INPLACE_DOUBLE_BACKWARD, capturing


def inplace_abn(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    min_abs_weight: float = 1e-3,
    inplace: bool = True,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """``act(batch_norm(input))`` over ``input``'s memory, saving only the output for backward.

    Arguments as :func:`~normkit.functional.batch_norm`, plus ``activation`` (``"leaky_relu"``,
    ``"elu"`` or ``"identity"``), ``activation_param`` (the slope or alpha, > 0),
    ``min_abs_weight`` (see the module docstring) and ``inplace``. See :class:`normkit.InPlaceABN`.
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_per_channel(
        input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    _activation.check_activation(
        activation, activation_param, _activation.INVERTIBLE_ACTIVATIONS, "InPlaceABN"
    )
    if isinstance(min_abs_weight, bool) or not isinstance(min_abs_weight, (int, float)):
        raise ConfigError(f"min_abs_weight must be a positive number, got {min_abs_weight!r}")
    if not min_abs_weight > 0:
        raise ConfigError(
            f"min_abs_weight must be > 0 (InPlaceABN divides by the weight), got {min_abs_weight!r}"
        )
    if training:
        check_batch_statistics_size(input)
    elif running_mean is None or running_var is None:
        raise ConfigError(
            "inplace_abn with training=False normalizes with running_mean and running_var, but "
            "they were not given; pass them, or training=True to use the batch's statistics"
        )
    impl = _dispatch.resolve("inplace_abn", input)
    weight = None if weight is None else effective_weight(weight, float(min_abs_weight))
    inplace = bool(inplace) and can_overwrite(input)
    activation_param = float(activation_param)

    def run(mean, var, factor):
        return impl(
            input, mean, var, weight, bias, training, factor, eps, activation, activation_param,
            inplace,
        )  # fmt: skip

    if not training:
        return run(running_mean, running_var, 0.0)
    if running_mean is None or running_var is None or input.numel() == 0:
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


def can_overwrite(input: torch.Tensor) -> bool:
    """Autograd forbids writing over a leaf that requires grad or a view of one, and inference
    tensors can be written only in inference mode. A captured graph (torch.compile, export, trace)
    plans its own memory: there the output is a new tensor (keeping only it for backward still
    halves the saved memory)."""
    if capturing():
        return False
    if input.is_inference() and not torch.is_inference_mode_enabled():
        return False
    base = input if input._base is None else input._base
    return not (input.requires_grad and base.is_leaf and base.requires_grad)


def effective_weight(weight: torch.Tensor, min_abs_weight: float) -> torch.Tensor:
    """gamma where |gamma| >= min_abs_weight, else min_abs_weight with gamma's sign (+ for 0); the
    gradient passes straight through to gamma (``weight - weight.detach()`` is exactly 0 with
    gradient 1). Plain ATen ops, so every transform and exporter sees through it."""
    sign = (weight >= 0).to(weight.dtype) * 2.0 - 1.0
    floor = min_abs_weight * sign + (weight - weight.detach())
    return torch.where(weight.abs() < min_abs_weight, floor, weight)


def reference_inplace_abn(
    input, running_mean, running_var, weight, bias, training, momentum, eps,
    activation, activation_param, inplace,
):  # fmt: skip
    """The unfused computation InPlace-ABN must match: batch norm, then the activation."""
    y = reference_batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )
    return _activation.apply(y, activation, activation_param)


class InPlaceABNFunction(torch.autograd.Function):
    """ATen's batch norm forward, the activation in place, the result over x; a backward from the
    output (module docstring). Saves y, gamma, beta and float32 1/std per channel."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, act, param,
        inplace,
    ):  # fmt: skip
        if training:
            y, _, invstd = torch.native_batch_norm(
                x, weight, bias, running_mean, running_var, True, momentum, eps
            )
        else:
            y = torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, False)
            invstd = torch.rsqrt(running_var.to(stats_dtype(x.dtype)) + eps)
        y = _activation.apply_(y, act, param)
        if inplace:
            y = x.copy_(y)  # one pass; x's memory now holds the output
            ctx.mark_dirty(x)
        ctx.save_for_backward(y, weight, bias, invstd)
        ctx.config = (training, act, param)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, weight, bias, invstd = ctx.saved_tensors
        training, act, param = ctx.config
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: double backward
            if training:  # the batch statistics' dependence on the overwritten input is gone
                raise INPLACE_DOUBLE_BACKWARD.error()
            grads = _differentiable_eval_backward(dy, y, weight, bias, invstd, act, param, needs)
            return (*grads, None, None, None, None, None, None, None, None)
        ndim, dims, dtype = y.dim(), batch_dims(y.dim()), stats_dtype(y.dtype)
        # Few full-size temporaries: this layer exists to save memory.
        g = _grad_from_output(dy, y, act, param).to(dtype)  # dL/d(pre-activation), new
        x_hat = _inverse_from_output(y, act, param, dtype)  # act^-1(y), new
        if bias is not None:
            x_hat.sub_(channel_view(bias.to(dtype), ndim))
        if weight is not None:
            x_hat.div_(channel_view(weight.to(dtype), ndim))
        sum_g = g.sum(dims, keepdim=True)
        sum_gx = (g * x_hat).sum(dims, keepdim=True)
        dweight = sum_gx.reshape(-1).to(weight.dtype) if weight is not None and needs[1] else None
        dbias = sum_g.reshape(-1).to(bias.dtype) if bias is not None and needs[2] else None
        dx = None
        if needs[0]:
            scale = channel_view(invstd, ndim)
            if weight is not None:
                scale = scale * channel_view(weight.to(dtype), ndim)
            if training:  # in place over g: (g - sum_g / n - x_hat * sum_gx / n) * scale
                n = y.numel() // y.shape[1]
                g.sub_(sum_g / n).addcmul_(x_hat, sum_gx / n, value=-1.0)
            dx = g.mul_(scale).to(y.dtype)
        return dx, dweight, dbias, None, None, None, None, None, None, None, None


def _differentiable_eval_backward(dy, y, weight, bias, invstd, act, param, needs):
    """Eval mode's backward in ops autograd differentiates again: the running statistics are
    constants, so the output y, a differentiable function of the input, is all it reads."""
    ndim, dims, dtype = y.dim(), batch_dims(y.dim()), stats_dtype(y.dtype)
    g = _grad_from_output(dy, y, act, param).to(dtype)
    scale = channel_view(invstd, ndim)
    if weight is not None:
        scale = scale * channel_view(weight.to(dtype), ndim)
    dx = (g * scale).to(y.dtype) if needs[0] else None
    dweight = dbias = None
    if weight is not None and needs[1]:
        x_hat = _activation.inverse(y.to(dtype), act, param)
        if bias is not None:
            x_hat = x_hat - channel_view(bias.to(dtype), ndim)
        x_hat = x_hat / channel_view(weight.to(dtype), ndim)
        dweight = (g * x_hat).sum(dims).to(weight.dtype)
    if bias is not None and needs[2]:
        dbias = g.sum(dims).to(bias.dtype)
    return dx, dweight, dbias


def _grad_from_output(dy, y, act, param):
    """dL/dpre from dL/dy and the output, with ATen's fused kernels (one pass, one new tensor)."""
    if act == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(dy, y, param, True)
    if act == "elu":
        return torch.ops.aten.elu_backward(dy, param, 1, 1, True, y)
    return dy.clone()


def _inverse_from_output(y, act, param, dtype):
    """act^-1(y) as a new ``dtype`` tensor: leaky_relu's inverse is leaky_relu with slope
    1/slope; elu's is log1p(min(y, 0) / alpha) + max(y, 0). Computed in ``dtype`` (float32 for
    half outputs), so the inversion adds no rounding of its own beyond float32's."""
    if act == "elu":
        return y.clamp(max=0).to(dtype).div_(param).log1p_().add_(y.clamp(min=0))
    x = y.to(dtype, copy=True)
    return torch.nn.functional.leaky_relu_(x, 1.0 / param) if act == "leaky_relu" else x


def native_inplace_abn(
    input, running_mean, running_var, weight, bias, training, momentum, eps,
    activation, activation_param, inplace,
):  # fmt: skip
    if input.numel() == 0:
        return reference_inplace_abn(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            activation, activation_param, inplace,
        )  # fmt: skip
    return InPlaceABNFunction.apply(
        input, weight, bias, running_mean, running_var, training, momentum, eps,
        activation, activation_param, inplace,
    )  # fmt: skip
