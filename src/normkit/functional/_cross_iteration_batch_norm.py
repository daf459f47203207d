"""Cross-Iteration Batch Normalization, CBN (Yao et al. 2021): BatchNorm whose statistics pool the
last k iterations, those of past iterations compensated for the weights having changed since.

:func:`cross_iteration_batch_norm` normalizes with the pooled statistics; :func:`compensated_statistics`
is the Taylor compensation; :func:`statistics_jacobians` differentiates this batch's statistics with
respect to the weights of the layer that produced the input. See
:class:`normkit.CrossIterationBatchNorm` for the layer and the decisions. Paper:
https://arxiv.org/abs/2002.05712 (CVPR 2021), §3.2-3.3; code: github.com/Howal/Cross-iterationBatchNorm.

Per channel, with mu the mean and nu = E[x^2] of a batch, theta the producer's weights (row c of
theta makes channel c), and tau = 1..k-1 the past iterations kept:

    mu_{t-tau}(theta_t) ~= mu_{t-tau} + <d mu_{t-tau} / d theta, theta_t - theta_{t-tau}>     (§3.2)
    nu_{t-tau}(theta_t) ~= nu_{t-tau} + <d nu_{t-tau} / d theta, theta_t - theta_{t-tau}>
    mu_bar   = 1/k sum_{tau=0}^{k-1} mu_{t-tau}(theta_t)                                      (§3.3)
    nu_bar   = 1/k sum_{tau=0}^{k-1} max(nu_{t-tau}(theta_t), mu_{t-tau}(theta_t)^2)
    sigma2   = nu_bar - mu_bar^2,   y = gamma * (x - mu_bar) / sqrt(sigma2 + eps) + beta

computed without forming E[x^2] - E[x]^2 (which loses every digit for inputs far from zero): each
iteration's variance var = nu - mu^2 is kept centred, compensated as var + d_nu - d_mu (2 mu + d_mu),
and sigma2 = mean(max(var, 0)) + the variance of the k means (the law of total variance). Only the
current batch's statistics carry a gradient (the past are constants), so the backward is
BatchNorm's with every mean over the batch divided by k:

    dL/dx = gamma / sqrt(sigma2 + eps) * (dL/dy - sum(dL/dy) / (k m) - x_hat * sum(dL/dy * x_hat) / (k m))

and with k = 1 the layer is BatchNorm exactly.
"""

from __future__ import annotations

import torch

from normkit.errors import ConfigError
from normkit.functional import _dispatch
from normkit.functional._batch_sums import gradient_sums, scaled_gradient
from normkit.functional._checks import (
    check_batch_statistics_size,
    check_eps,
    check_floating,
    check_min_rank,
    check_per_channel,
)
from normkit.functional._given_statistics import batch_norm_statistics
from normkit.functional._moments import moments, stats_dtype
from normkit.functional._normalize import channel_view, empty_output
from normkit.functional._running_stats import (
    exponential_average_factor,
    guarded_update,
    update_running_stats,
)
from normkit.functional._transforms import differentiable_backward


def cross_iteration_batch_norm(
    input: torch.Tensor,
    past_means: torch.Tensor | None,
    past_vars: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
    batch_statistics: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """BatchNorm with this batch's statistics pooled with past ones; see
    :class:`normkit.CrossIterationBatchNorm`.

    Args:
        input: (N, C, \\*).
        past_means, past_vars: (h, C), the means and biased variances of h earlier iterations,
            already compensated (:func:`compensated_statistics`); None or h = 0: BatchNorm.
        running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
        num_batches_skipped, on_nonfinite: as :func:`normkit.functional.batch_norm`. The running
            statistics follow this batch's own statistics (BatchNorm's rule), as the authors'
            code has it.
        batch_statistics: this batch's per-channel mean and biased variance when the caller has
            them already (the ``native`` implementation then skips its statistics pass).
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_per_channel(
        input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    if (past_means is None) != (past_vars is None):
        raise ConfigError("past_means and past_vars go together: give both or neither")
    if past_means is not None:
        channels = input.shape[1]
        for name, past in (("past_means", past_means), ("past_vars", past_vars)):
            if past.dim() != 2 or past.shape[1] != channels:
                raise ConfigError(
                    f"{name} must have shape (h, C) with C = {channels}, got {tuple(past.shape)}"
                )
    if not training:
        if running_mean is None or running_var is None:
            raise ConfigError(
                "cross_iteration_batch_norm with training=False uses the running statistics, "
                "which were not given"
            )
        return torch.batch_norm(
            input, weight, bias, running_mean, running_var, False, 0.0, eps, False
        )
    check_batch_statistics_size(input)
    if input.numel() == 0:  # an empty batch: an empty output, no statistics recorded
        return empty_output(input, _channels(weight, input.dim()), _channels(bias, input.dim()))
    resolved = _dispatch.resolve("cross_iteration_batch_norm", input)

    def impl(*args):
        return resolved(*args, batch_statistics=batch_statistics)

    if running_mean is None or running_var is None:
        return impl(input, past_means, past_vars, weight, bias, eps, None)
    factor = exponential_average_factor(momentum, num_batches_tracked)
    count = input.numel() // input.shape[1]

    def run(mean_out, var_out):
        def record(mean, var):
            update_running_stats(mean_out, var_out, mean, var, count, factor)

        return impl(input, past_means, past_vars, weight, bias, eps, record)

    return guarded_update(
        running_mean,
        running_var,
        run,
        num_batches_tracked=num_batches_tracked,
        num_batches_skipped=num_batches_skipped,
        on_nonfinite=on_nonfinite,
    )


def _channels(tensor, ndim):
    return None if tensor is None else channel_view(tensor, ndim)


def pooled_statistics(mean, var, past_means, past_vars):
    """(mu_bar, sigma2) over this batch and the past: §3.3, in the centred form (module docstring)."""
    if past_means is None or past_means.shape[0] == 0:
        return mean, var
    means = torch.cat((mean.unsqueeze(0), past_means.to(mean.dtype)))  # (k, C)
    vars_ = torch.cat((var.unsqueeze(0), past_vars.to(var.dtype).clamp(min=0.0)))
    mu_bar = means.mean(0)
    return mu_bar, vars_.mean(0) + (means - mu_bar).square().mean(0)


def native_cross_iteration_batch_norm(
    input, past_means, past_vars, weight, bias, eps, record, batch_statistics=None
):
    """ATen's statistics kernel, the eval kernel with the pooled statistics, and the eval
    backward's fused reductions; the backward of the module docstring by hand."""
    with torch.no_grad():
        if batch_statistics is None:
            mean, var = batch_norm_statistics(input)
        else:
            mean, var = batch_statistics
        if record is not None:
            record(mean, var)
        mu_bar, sigma2 = pooled_statistics(mean, var, past_means, past_vars)
    k = 1 if past_means is None else past_means.shape[0] + 1
    return pooled_batch_norm(input, weight, bias, mu_bar, sigma2, k, eps)


def reference_cross_iteration_batch_norm(
    input, past_means, past_vars, weight, bias, eps, record, batch_statistics=None
):
    """The pooled statistics with autograd through this batch's mean and variance (computed here,
    with autograd: ``batch_statistics`` is not used)."""
    ndim = input.dim()
    dims = (0, *range(2, ndim))
    x = input.to(stats_dtype(input.dtype))
    mean, var = moments(x, dims, keepdim=False)
    if record is not None:
        record(mean.detach(), var.detach())
    mu_bar, sigma2 = pooled_statistics(mean, var, past_means, past_vars)
    y = (x - channel_view(mu_bar, ndim)) * channel_view(torch.rsqrt(sigma2 + eps), ndim)
    if weight is not None:
        y = y * channel_view(weight, ndim).to(y.dtype)
    if bias is not None:
        y = y + channel_view(bias, ndim).to(y.dtype)
    return y.to(input.dtype)


def pooled_batch_norm(x, weight, bias, mean, var, k, eps) -> torch.Tensor:
    """BatchNorm in training with given per-channel statistics of which this batch is a share
    1/k: the backward is BatchNorm's with every mean over the batch divided by k (k = 1: the
    gradient statistics are this batch's own). Used by CBN, and by ``nk.accumulate``'s
    whole-batch normalization."""
    return _PooledBatchNorm.apply(x, weight, bias, mean, var, k, eps)


class _PooledBatchNorm(torch.autograd.Function):
    """y = gamma * (x - mu_bar) / sqrt(sigma2 + eps) + beta, the statistics differentiated through
    this batch's share 1/k (module docstring). Under ``create_graph=True`` the gradients are
    autograd's of :func:`_pooled_composite`, differentiable again (double backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mu_bar, sigma2, k, eps):
        dtype = sigma2.dtype  # ATen's mixed-dtype rule: parameters in the statistics' dtype
        w = None if weight is None else weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        y = torch.batch_norm(x, w, b, mu_bar, sigma2, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mu_bar, sigma2)
        ctx.k, ctx.eps = k, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mu_bar, sigma2 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: double backward
            inputs = (x, weight, mu_bar.detach(), sigma2.detach(), ctx.k, ctx.eps)
            needs = ctx.needs_input_grad
            dx, dweight = differentiable_backward(_pooled_composite, inputs, needs[:2], dy)[:2]
            dbias = None
            if ctx.bias_dtype is not None and needs[2]:  # dL/dbeta = sum(dL/dy), linear in it
                dbias = dy.sum((0, *range(2, x.dim()))).to(ctx.bias_dtype)
            return dx, dweight, dbias, None, None, None, None
        eps, ndim = ctx.eps, x.dim()
        km = ctx.k * (x.numel() // x.shape[1])
        sum_dy, sum_dy_xhat = gradient_sums(dy, x, mu_bar, sigma2, eps)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            gamma = torch.ones_like(sigma2) if weight is None else weight.to(sigma2.dtype)
            invstd = torch.rsqrt(sigma2 + eps)
            a = gamma * invstd  # (C,)
            # dx = a * dy - a * sum_dy / km - a * x_hat * sum_dy_xhat / km, x_hat = (x - mu_bar) * invstd
            slope = -a * invstd * sum_dy_xhat / km  # times x
            shift = -a * sum_dy / km - slope * mu_bar
            g = scaled_gradient(dy, x, gamma, sigma2, eps)  # a * dy
            slope, shift = channel_view(slope, ndim), channel_view(shift, ndim)
            if g.dtype == slope.dtype:
                dx = g.addcmul_(x, slope).add_(shift)
            else:  # half: the sum in float32, rounded once
                dx = torch.empty_like(x)
                torch.addcmul(g + shift, x, slope, out=dx)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = sum_dy.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None


def _pooled_composite(x, weight, mu_bar, sigma2, k, eps):
    """gamma * (x - mu_bar) / sqrt(sigma2 + eps) in plain tensor ops, the pooled statistics as
    functions of this batch's mean m and variance v with this batch a share 1/k (the module
    docstring): mu_bar + (m - m0) / k and sigma2 + (v - v0) / k + (m - m0) / k * (m + m0 - mu -
    mu_bar) (the law of total variance, exact in (m, v)), m0 and v0 their values here. The same
    numbers as the forward, with the derivatives of the statistics to every order: what double
    backward differentiates. Without beta (its gradient is sum(dL/dy))."""
    ndim, dtype = x.dim(), sigma2.dtype
    xs = x.to(dtype)
    m, v = moments(xs, (0, *range(2, ndim)), keepdim=False)
    dm, dv = m - m.detach(), v - v.detach()
    mu = mu_bar + dm / k
    var = sigma2 + dv / k + dm / k * (m + m.detach() - mu - mu_bar)
    y = (xs - channel_view(mu, ndim)) * channel_view(torch.rsqrt(var + eps), ndim)
    if weight is not None:
        y = y * channel_view(weight, ndim).to(dtype)
    return y.to(x.dtype)


# --- the Taylor compensation (§3.2) ------------------------------------------------------------------


def compensated_statistics(
    means: torch.Tensor,
    vars_: torch.Tensor,
    mean_grads: torch.Tensor,
    second_moment_grads: torch.Tensor,
    weights: torch.Tensor,
    weight_now: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics of h past iterations as they would be under the current weights (§3.2).

    Args:
        means, vars_: (h, C), each iteration's mean and biased variance.
        mean_grads, second_moment_grads: (h, C, ...), d mu_c / d theta_c and d nu_c / d theta_c
            (row c of the producer's weight makes channel c; :func:`statistics_jacobians`).
        weights: (h, C, ...), the producer's weight at each of those iterations.
        weight_now: (C, ...), its weight now.

    Returns:
        ``(means, vars)`` compensated, (h, C): mu + d_mu and var + d_nu - d_mu * (2 mu + d_mu) with
        d_mu = <d mu / d theta, theta_t - theta_{t-tau}> per channel (likewise d_nu).
    """
    change = (weight_now.unsqueeze(0) - weights).flatten(2)  # (h, C, J)
    d_mu = (mean_grads.flatten(2) * change).sum(-1)
    d_nu = (second_moment_grads.flatten(2) * change).sum(-1)
    return means + d_mu, vars_ + d_nu - d_mu * (2.0 * means + d_mu)


def statistics_jacobians(
    input: torch.Tensor, producer_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """d mu_c / d theta_c and d nu_c / d theta_c (nu = E[x^2]) of this batch, for the weight
    ``producer_weight`` whose row c makes channel c (a convolution's or a linear layer's).

    Through autograd, as the authors' code: the sum over channels of mu (and of nu) differentiated
    once with respect to the weight gives every row's own derivative, since mu_c depends on row c
    alone. Costs two backward passes of the producer with respect to its weight (for a
    convolution, two weight-gradient convolutions) and two passes over the input. Needs ``input``
    to have been computed from ``producer_weight`` with autograd recording.
    """
    if not (torch.is_grad_enabled() and input.requires_grad and producer_weight.requires_grad):
        raise ConfigError(
            "the Taylor compensation differentiates this batch's statistics with respect to the "
            "producer's weight, so the input must come from that weight with autograd recording "
            "(grad enabled, weight.requires_grad)"
        )
    dims = (0, *range(2, input.dim()))
    x = input.to(stats_dtype(input.dtype))
    (d_mu,) = torch.autograd.grad(x.mean(dims).sum(), producer_weight, retain_graph=True)
    (d_nu,) = torch.autograd.grad(x.square().mean(dims).sum(), producer_weight, retain_graph=True)
    return d_mu, d_nu
