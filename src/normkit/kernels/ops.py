"""The ``triton`` backend's entry points: autograd Functions around the kernels.

Each entry point has the contract of the other backends' implementation of the same op (see
:mod:`normkit.functional._dispatch`): ``batch_norm`` is ``torch.batch_norm``'s (running statistics
updated in place), ``batch_norm_act`` adds a residual and an activation, ``inplace_abn`` keeps only
its output for backward, and ``group_norm``/``layer_norm``/``channel_layer_norm`` are the functional
ops' arithmetic. The backward passes are written by hand and are not themselves differentiable
(``once_differentiable``: no double backward; the ``reference`` backend has it).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from normkit.kernels._math import ACTIVATIONS
from normkit.kernels._utils import batch_view, channels_innermost
from normkit.kernels.batch_norm_backward import normalization_backward
from normkit.kernels.batch_norm_eval import batch_norm_eval_forward
from normkit.kernels.batch_norm_forward import batch_norm_train_forward
from normkit.kernels.group_norm import group_norm_backward, group_norm_forward
from normkit.kernels.layer_norm import layer_norm_backward, layer_norm_forward


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None or like is None else grad.to(like.dtype).view_as(like)


def _eval_statistics(running_mean, running_var, eps):
    return running_mean.float().view(1, -1), torch.rsqrt(running_var.float() + eps).view(1, -1)


class _BatchNormAct(torch.autograd.Function):
    """y = act(BN(x) + z); saves x (and z), the parameters and the float32 per-channel statistics:
    the pre-activation is recomputed in backward, never stored."""

    @staticmethod
    def forward(
        ctx, x, z, weight, bias, running_mean, running_var, training, momentum, eps, act, act_param
    ):  # fmt: skip
        kept_z = z if act != ACTIVATIONS["identity"] else None  # only to recompute act'
        if training:
            y, mean, invstd = batch_norm_train_forward(
                x, z, weight, bias, running_mean, running_var, momentum, eps, act, act_param
            )
            ctx.save_for_backward(x, kept_z, weight, bias, mean, invstd)
        else:
            y = batch_norm_eval_forward(
                x, z, running_mean, running_var, weight, bias, eps, act, act_param
            )
            ctx.save_for_backward(x, kept_z, weight, bias, running_mean, running_var)
        ctx.has_residual = z is not None
        ctx.training, ctx.eps, ctx.act, ctx.act_param = training, eps, act, act_param
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, z, weight, bias, first, second = ctx.saved_tensors
        if ctx.training:
            mean, invstd = first.view(1, -1), second.view(1, -1)
        else:
            mean, invstd = _eval_statistics(first, second, ctx.eps)
        needs = ctx.needs_input_grad
        dx, dz, dweight, dbias = normalization_backward(
            batch_view(x), dy, z, weight, bias, mean, invstd,
            groups=x.shape[1], training=ctx.training, act=ctx.act, act_param=ctx.act_param,
            needs_input_grad=needs[0], needs_param_grads=needs[2] or needs[3],
        )  # fmt: skip
        if needs[1] and dz is None:  # identity: dL/dz is dL/dy itself
            dz = dy
        dz = dz if needs[1] else None
        dweight = _cast(dweight, weight) if needs[2] else None
        dbias = _cast(dbias, bias) if needs[3] else None
        return dx, dz, dweight, dbias, None, None, None, None, None, None, None


class _InPlaceABN(torch.autograd.Function):
    """act(BN(x)) written over x when allowed; saves only the output and per-channel statistics,
    and recovers x_hat from the output in backward (Rota Bulò et al. 2018)."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, act, act_param,
        inplace,
    ):  # fmt: skip
        out = x if inplace and batch_view(x).tensor is x else None
        if training:
            y, _, invstd = batch_norm_train_forward(
                x, None, weight, bias, running_mean, running_var, momentum, eps, act, act_param,
                out=out,
            )  # fmt: skip
        else:
            y = batch_norm_eval_forward(
                x, None, running_mean, running_var, weight, bias, eps, act, act_param, out=out
            )
            invstd = torch.rsqrt(running_var.float() + eps)
        if out is not None:
            ctx.mark_dirty(x)
        ctx.save_for_backward(y, weight, bias, invstd)
        ctx.training, ctx.act, ctx.act_param = training, act, act_param
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, weight, bias, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        invstd = invstd.view(1, -1)
        dx, _, dweight, dbias = normalization_backward(
            batch_view(y), dy, None, weight, bias, invstd, invstd,
            groups=y.shape[1], training=ctx.training, act=ctx.act, act_param=ctx.act_param,
            from_output=True, needs_input_grad=needs[0], needs_param_grads=needs[1] or needs[2],
        )  # fmt: skip
        dweight = _cast(dweight, weight) if needs[1] else None
        dbias = _cast(dbias, bias) if needs[2] else None
        return dx, dweight, dbias, None, None, None, None, None, None, None, None


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        y, mean, invstd = group_norm_forward(x, num_groups, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dweight, dbias = group_norm_backward(
            dy, x, ctx.num_groups, weight, bias, mean, invstd,
            needs_input_grad=needs[0], needs_param_grads=needs[2] or needs[3],
        )  # fmt: skip
        return dx, None, _cast(dweight, weight), _cast(dbias, bias), None


class _LayerNorm(torch.autograd.Function):
    """Layer norm over the last ``width`` values of each row of a contiguous tensor."""

    @staticmethod
    def forward(ctx, x, width, weight, bias, eps):
        rows = x.view(-1, width)
        w = weight.reshape(-1) if weight is not None else None
        b = bias.reshape(-1) if bias is not None else None
        y, mean, invstd = layer_norm_forward(rows, w, b, eps)
        ctx.save_for_backward(rows, weight, bias, mean, invstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        rows, weight, bias, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        w = weight.reshape(-1) if weight is not None else None
        dx, dweight, dbias = layer_norm_backward(
            dy.reshape(rows.shape), rows, w, mean, invstd, needs_input_grad=needs[0]
        )
        dx = dx.view(ctx.shape) if dx is not None else None
        dweight = _cast(dweight, weight) if needs[2] else None
        dbias = _cast(dbias, bias) if needs[3] else None
        return dx, None, dweight, dbias, None


def _empty_result(input, weight, bias, view):
    """The empty output of an empty batch, connected to weight and bias like the other backends."""
    y = input.clone()
    if weight is not None:
        y = y * view(weight).to(input.dtype)
    if bias is not None:
        y = y + view(bias).to(input.dtype)
    return y


def _channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def activation_code(activation: str) -> int:
    return ACTIVATIONS[activation]


def batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """``torch.batch_norm``'s contract on the Triton kernels."""
    return batch_norm_act(
        input,
        None,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        "identity",
        0.0,
    )


def batch_norm_act(
    input, residual, running_mean, running_var, weight, bias, training, momentum, eps,
    activation, activation_param,
):  # fmt: skip
    """y = act(batch_norm(input) + residual), one pass forward and one backward."""
    if input.numel() == 0:
        y = _empty_result(input, weight, bias, lambda t: _channel(t, input.dim()))
        return y if residual is None else y + residual
    return _BatchNormAct.apply(
        input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
        activation_code(activation), float(activation_param),
    )  # fmt: skip


def inplace_abn(
    input, running_mean, running_var, weight, bias, training, momentum, eps,
    activation, activation_param, inplace,
):  # fmt: skip
    """act(batch_norm(input)), over ``input`` when ``inplace``; backward from the output only."""
    if input.numel() == 0:
        return _empty_result(input, weight, bias, lambda t: _channel(t, input.dim()))
    return _InPlaceABN.apply(
        input, weight, bias, running_mean, running_var, training, momentum, eps,
        activation_code(activation), float(activation_param), inplace,
    )  # fmt: skip


def group_norm(input, num_groups, weight, bias, eps):
    if input.numel() == 0:
        return _empty_result(input, weight, bias, lambda t: _channel(t, input.dim()))
    return _GroupNorm.apply(input, num_groups, weight, bias, eps)


def layer_norm(input, normalized_shape, weight, bias, eps):
    if input.numel() == 0:
        return _empty_result(input, weight, bias, lambda t: t)
    width = math.prod(normalized_shape)
    y = _LayerNorm.apply(input.contiguous(), width, weight, bias, eps)
    return y if input.is_contiguous() else y.contiguous(memory_format=_format(input))


def channel_layer_norm(input, weight, bias, eps):
    """Layer norm over dim 1; runs on channels-innermost inputs (channels_last), where the channels
    of each position are one contiguous row."""
    if input.numel() == 0:
        return _empty_result(input, weight, bias, lambda t: _channel(t, input.dim()))
    if not channels_innermost(input):
        raise ValueError("the triton channel_layer_norm runs on channels_last inputs only")
    rows = input.movedim(1, -1)
    return layer_norm(rows, (input.shape[1],), weight, bias, eps).movedim(-1, 1)


def _format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
