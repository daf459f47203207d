"""Moving Average Batch Normalization, MABN (Yan et al. 2020): BN whose four batch statistics are
replaced by moving averages, so that a batch of 1-4 samples trains like a large one.

:func:`moving_average_batch_norm` is the functional form of
:class:`normkit.MovingAverageBatchNorm`; see it for the algorithm and the decisions. Paper:
https://arxiv.org/abs/2001.06838 (ICLR 2020), §3-4 and its Algorithm 1; code:
github.com/megvii-model/MABN. BatchNorm depends on the batch through two statistics in the forward
pass (mean, variance) and two in the backward pass (g = mean(dL/dx_hat), Psi = mean(x_hat dL/dx_hat)).
MABN removes the mean and g by normalizing with the second moment chi = mean(x^2) alone (§4.2;
the weights of the layer before are centred instead, :class:`normkit.CenteredConv2d`), and replaces
chi and Psi by moving averages (§4.1): a simple moving average (SMA) over the last m iterations for
the normalization and the backward, an exponential one (EMA) for inference and for the
renormalization factor r (§4.3, Batch Renorm's trick), per channel:

    chi_B    = mean_{n,spatial}(x^2)
    chi_bar  = SMA_m(chi_B)                        (the batch's alone while warming up)
    r        = clip(sqrt(chi_bar + eps) / sqrt(chi_hat + eps), 1/r_max, r_max)   (1 while warming up)
    z        = x / sqrt(chi_bar + eps),   y = gamma * r * z + beta
    chi_hat <- (1 - momentum) * chi_hat + momentum * chi_bar       (``running_var``)
  backward, with g = dL/dy * gamma * r:
    Psi_B    = mean_{n,spatial}(g * z),   Psi_bar = SMA_m(Psi_B)
    dL/dx    = (g - z * Psi_bar) / sqrt(chi_bar + eps)

Inference: y = gamma * x / sqrt(chi_hat + eps) + beta, BatchNorm's eval map with mean 0.

The backward is MABN's rule, not the gradient of its forward (that is the method), and it writes
the SMA of Psi: the training step runs eagerly or under torch.func.grad (its state written through
aliases), and refuses the other program transforms (``MABN_TRAINING_STEP``).
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
    check_positive_int,
)
from normkit.functional._given_statistics import batch_norm_statistics
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import channel_view
from normkit.functional._running_stats import exponential_average_factor
from normkit.functional._transforms import (
    MABN_TRAINING_STEP,
    commit,
    increment,
    only_grad_transforms,
    transforming,
)


def moving_average_batch_norm(
    input: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.02,
    eps: float = 1e-5,
    *,
    second_moments: torch.Tensor | None = None,
    gradient_moments: torch.Tensor | None = None,
    iteration: torch.Tensor | None = None,
    warmup_iters: int = 100,
    renorm_iters: int = 1000,
    r_max: float = 5.0,
    num_batches_tracked: torch.Tensor | None = None,
    num_batches_skipped: torch.Tensor | None = None,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """MABN of an (N, C, \\*) input; see :class:`normkit.MovingAverageBatchNorm`.

    Args:
        input: (N, C, \\*).
        running_var: chi_hat, the EMA of the second moment (updated in place in training).
        weight, bias: per-channel gamma and beta, or None.
        training: MABN's training step; else the inference map with ``running_var``.
        momentum: the EMA's weight of each new chi_bar (PyTorch's convention; the authors' code
            writes the decay 0.98), or None for the cumulative average.
        eps: > 0.
        second_moments, gradient_moments: the SMA windows, (m, C) each; updated in place.
        iteration: a long scalar counting training steps; incremented here.
        warmup_iters: steps that use the batch's own statistics (the windows filling). Default 100.
        renorm_iters: steps with r = 1 (at least ``warmup_iters``). Default 1000.
        r_max: the bound of r after that. Default 5.
        num_batches_tracked, num_batches_skipped, on_nonfinite: as
            :func:`normkit.functional.batch_norm` (a non-finite chi_B enters neither the EMA nor the
            window).
    """
    check_floating(input)
    check_eps(eps)
    check_min_rank(input, 2, "(N, C, *)")
    check_per_channel(input, running_var=running_var, weight=weight, bias=bias)
    if running_var is None:
        raise ConfigError("moving_average_batch_norm needs running_var (chi_hat) for inference")
    if not training:
        zeros = torch.zeros_like(running_var)
        return torch.batch_norm(input, weight, bias, zeros, running_var, False, 0.0, eps, False)
    if second_moments is None or gradient_moments is None or iteration is None:
        raise ConfigError(
            "moving_average_batch_norm in training needs its state: second_moments and "
            "gradient_moments (the (m, C) windows) and the iteration counter"
        )
    check_positive_int(warmup_iters, "warmup_iters")
    check_positive_int(renorm_iters, "renorm_iters")
    if not r_max >= 1:
        raise ConfigError(f"r_max must be >= 1, got {r_max!r}")
    for name, window in (
        ("second_moments", second_moments),
        ("gradient_moments", gradient_moments),
    ):
        if window.dim() != 2 or window.shape[1] != input.shape[1]:
            raise ConfigError(
                f"{name} must have shape (m, C) with C = {input.shape[1]}, got "
                f"{tuple(window.shape)}"
            )
    check_batch_statistics_size(input)
    if transforming() and not only_grad_transforms():
        raise MABN_TRAINING_STEP.error()
    increment(iteration)  # state is written through aliases: torch.func.grad accepts them
    step = int(iteration)  # the schedule is on the host, as in the authors' code
    factor = exponential_average_factor(momentum, num_batches_tracked)
    impl = _dispatch.resolve("moving_average_batch_norm", input)
    schedule = _Schedule(step, second_moments.shape[0], warmup_iters, renorm_iters, r_max)
    y, accepted = impl(
        input, running_var, weight, bias, factor, eps, second_moments, gradient_moments, schedule
    )
    _count(accepted, num_batches_tracked, num_batches_skipped, on_nonfinite)
    return y


class _Schedule:
    """Where a step is in MABN's schedule (1-based step t, window m)."""

    def __init__(self, step: int, window: int, warmup: int, renorm: int, r_max: float) -> None:
        self.step, self.window, self.r_max = step, window, float(r_max)
        self.slot = step % window  # the authors' ring index
        self.batch_only = step <= window or step < warmup  # the SMA's window is not full yet
        self.renormalize = step > max(renorm, warmup)


def _count(accepted, tracked, skipped, on_nonfinite) -> None:
    from normkit.errors import NonFiniteStatisticsError

    with torch.no_grad():
        if tracked is not None:
            increment(tracked, accepted.long())
        if skipped is not None:
            increment(skipped, (~accepted).long())
    if on_nonfinite != "skip" and not bool(accepted):
        message = (
            "the batch's second moment is not finite (NaN or Inf); MABN's running statistic and "
            "moving-average window were left unchanged"
        )
        if on_nonfinite == "raise":
            raise NonFiniteStatisticsError(message)
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=4)


@torch.no_grad()
def _forward_statistics(chi_b, running_var, second_moments, factor, eps, schedule):
    """Store chi_B in the window (when finite), and return (chi_bar, r, accepted); update the EMA."""
    finite = torch.isfinite(chi_b).all()
    slot = second_moments[schedule.slot]
    commit(slot, torch.where(finite, chi_b.to(slot.dtype), slot))
    chi_bar = chi_b if schedule.batch_only else second_moments.mean(0).to(chi_b.dtype)
    s = torch.sqrt(chi_bar + eps)
    if schedule.renormalize:
        r = (s / torch.sqrt(running_var.to(s.dtype) + eps)).clamp_(
            1 / schedule.r_max, schedule.r_max
        )
    else:
        r = torch.ones_like(s)
    new = torch.lerp(running_var, chi_bar.to(running_var.dtype), factor)
    commit(running_var, torch.where(finite, new, running_var))
    return chi_bar, r, finite


def _gradient_statistic(psi_b, gradient_moments, schedule):
    finite = torch.isfinite(psi_b).all()
    slot = gradient_moments[schedule.slot]
    commit(slot, torch.where(finite, psi_b.to(slot.dtype), slot))
    return psi_b if schedule.batch_only else gradient_moments.mean(0).to(psi_b.dtype)


def native_moving_average_batch_norm(
    input, running_var, weight, bias, factor, eps, second_moments, gradient_moments, schedule
):
    """ATen's batch-norm kernels: the statistics kernel for chi_B, the eval kernel to normalize,
    the eval backward's fused reductions; MABN's backward by hand (:class:`_MovingAverageBN`)."""
    mean, var = batch_norm_statistics(input)
    chi_b = var + mean.square()
    chi_bar, r, accepted = _forward_statistics(
        chi_b, running_var, second_moments, factor, eps, schedule
    )
    y = _MovingAverageBN.apply(input, weight, bias, chi_bar, r, eps, gradient_moments, schedule)
    return y, accepted


def reference_moving_average_batch_norm(
    input, running_var, weight, bias, factor, eps, second_moments, gradient_moments, schedule
):
    """normkit's own maths on torch tensors (the statistics as in the module docstring), with
    the same hand-written backward rule."""
    dtype = stats_dtype(input.dtype)
    dims = (0, *range(2, input.dim()))
    chi_b = input.to(dtype).square().mean(dims)
    chi_bar, r, accepted = _forward_statistics(
        chi_b, running_var, second_moments, factor, eps, schedule
    )
    y = _MovingAverageBN.apply(input, weight, bias, chi_bar, r, eps, gradient_moments, schedule)
    return y, accepted


class _MovingAverageBN(torch.autograd.Function):
    """y = gamma * r * x / sqrt(chi_bar + eps) + beta; MABN's backward (module docstring)."""

    @staticmethod
    def forward(x, weight, bias, chi_bar, r, eps, gradient_moments, schedule):
        scale = r if weight is None else r * weight.to(r.dtype)
        shift = None if bias is None else bias.to(r.dtype)  # ATen's mixed-dtype rule: all float32
        zeros = torch.zeros_like(chi_bar)
        return torch.batch_norm(x, scale, shift, zeros, chi_bar, False, 0.0, eps, False)

    @staticmethod
    def setup_context(ctx, inputs, output):  # apart from forward: torch.func.grad runs it
        x, weight, bias, chi_bar, r, eps, gradient_moments, schedule = inputs
        ctx.save_for_backward(x, weight, chi_bar, r)
        # the window is written by every backward: kept outside autograd's version checks
        ctx.gradient_moments, ctx.eps, ctx.schedule = gradient_moments, eps, schedule
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, dy):
        x, weight, chi_bar, r = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: double backward
            return (*_differentiable_backward(ctx, dy, x, weight, chi_bar, r), *(None,) * 5)
        eps, ndim = ctx.eps, x.dim()
        count = x.numel() // x.shape[1]
        zeros = torch.zeros_like(chi_bar)
        sum_dy, sum_dy_z = gradient_sums(dy, x, zeros, chi_bar, eps)  # z = x / sqrt(chi_bar + eps)
        scale = r if weight is None else r * weight.to(r.dtype)  # gamma * r
        with torch.no_grad():
            psi_b = scale * sum_dy_z / count
            psi_bar = _gradient_statistic(psi_b, ctx.gradient_moments, ctx.schedule)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            g = scaled_gradient(dy, x, scale, chi_bar, eps)  # g / sqrt(chi_bar + eps)
            slope = channel_view(
                -psi_bar / (chi_bar + eps), ndim
            )  # z * Psi_bar / sqrt(...) = x * slope
            if g.dtype == slope.dtype:
                dx = g.addcmul_(x, slope)
            else:  # half: the sum in float32, rounded once
                dx = torch.empty_like(x)
                torch.addcmul(g, x, slope, out=dx)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (r * sum_dy_z).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = sum_dy.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None, None


def _differentiable_backward(ctx, dy, x, weight, chi_bar, r):
    """MABN's backward rule (the class docstring) as a function of dL/dy, x and gamma that autograd
    differentiates again (double backward; a gradient penalty through an MABN layer).

    The rule's statistics depend on this batch as the forward computed them: chi_bar on chi_B(x)
    (wholly while the window fills, by its share 1/m after), r on chi_bar (where it is not
    clipped), Psi_bar on Psi_B(dL/dy, x, gamma) likewise; the other iterations' entries are
    constants. Each is written as its value plus share * (s - s.detach()): the same numbers as the
    plain backward, with the derivatives of the statistics' dependence. Writes Psi_B into the
    window as the plain backward does."""
    eps, schedule, ndim = ctx.eps, ctx.schedule, x.dim()
    chi_bar, r = (
        chi_bar.detach(),
        r.detach(),
    )  # the values (the reference computes them with autograd)
    dtype = chi_bar.dtype
    dims = (0, *range(2, ndim))
    count = x.numel() // x.shape[1]
    share = 1.0 if schedule.batch_only else 1.0 / schedule.window
    xs, dys = x.to(dtype), dy.to(dtype)
    chi_b = xs.square().mean(dims)
    std = torch.sqrt(chi_bar + share * (chi_b - chi_b.detach()) + eps)
    if schedule.renormalize:  # r = clip(std / sqrt(chi_hat + eps)): std's derivative inside
        inside = (r > 1 / schedule.r_max) & (r < schedule.r_max)
        r = torch.where(inside, r * std / std.detach(), r)
    scale = r if weight is None else r * weight.to(dtype)
    z = xs / channel_view(std, ndim)
    sum_dy_z = (dys * z).sum(dims)
    psi_b = scale * sum_dy_z / count
    with torch.no_grad():
        psi_fixed = _gradient_statistic(psi_b.detach(), ctx.gradient_moments, schedule)
    psi_bar = psi_fixed + share * (psi_b - psi_b.detach())
    needs = ctx.needs_input_grad
    dx = dweight = dbias = None
    if needs[0]:
        dx = (dys * channel_view(scale, ndim) - z * channel_view(psi_bar, ndim)) / channel_view(
            std, ndim
        )
        dx = dx.to(x.dtype)
    if weight is not None and needs[1]:
        dweight = (r * sum_dy_z).to(weight.dtype)
    if ctx.bias_dtype is not None and needs[2]:
        dbias = dys.sum(dims).to(ctx.bias_dtype)
    return dx, dweight, dbias
