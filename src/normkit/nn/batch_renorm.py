"""Batch Renormalization layers: ``BatchRenorm`` for any rank, ``BatchRenorm1d/2d/3d``, and the
schedule of the clipping bounds (``RenormRamp``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from normkit.errors import ConfigError, NormkitError
from normkit.functional import batch_norm, batch_renorm
from normkit.functional._batch_renorm import check_bound
from normkit.functional._running_stats import DefaultMomentum
from normkit.functional._transforms import increment
from normkit.nn._base import NormBase, named

Schedule = float | Callable[[int], float]
# The moving averages' alpha in Ioffe (2017); a default that `decay=` may replace (DefaultMomentum).
PAPER_MOMENTUM = DefaultMomentum(0.01)


@dataclass(frozen=True)
class RenormRamp:
    """A clipping bound that ramps linearly with the training step: ``start`` until ``begin_step``,
    then linearly to ``end`` at ``end_step``, then ``end``.

    Ioffe (2017), §4: "we used r_max = 1, d_max = 0 [plain BatchNorm] for the first 5000 training
    steps, after which these were gradually relaxed to reach r_max = 3 at 40k steps, and d_max = 5
    at 25k steps". The paper does not give the ramp's shape; normkit's is linear.
    :meth:`paper_r_max` and :meth:`paper_d_max` are those two schedules.

    Called with an int it returns a float; with a step tensor it returns a tensor computed on the
    tensor's device (no host synchronisation, no graph break under ``torch.compile``).

    Example::

        >>> from normkit import RenormRamp
        >>> ramp = RenormRamp.paper_r_max()
        >>> ramp(0), ramp(5000), ramp(22500), ramp(40000), ramp(10**6)
        (1.0, 1.0, 2.0, 3.0, 3.0)
    """

    start: float
    end: float
    begin_step: int
    end_step: int

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"RenormRamp.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"RenormRamp.{name} must be finite, got {value!r}")
        for name in ("begin_step", "end_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"RenormRamp.{name} must be an int >= 0, got {value!r}")
        if self.end_step < self.begin_step:
            raise ConfigError(
                f"RenormRamp ends before it begins: end_step={self.end_step} < "
                f"begin_step={self.begin_step}"
            )

    @classmethod
    def paper_r_max(cls) -> RenormRamp:
        """r_max: 1 for 5000 steps, then up to 3 at step 40 000 (Ioffe 2017, §4)."""
        return cls(1.0, 3.0, 5000, 40000)

    @classmethod
    def paper_d_max(cls) -> RenormRamp:
        """d_max: 0 for 5000 steps, then up to 5 at step 25 000 (Ioffe 2017, §4)."""
        return cls(0.0, 5.0, 5000, 25000)

    def __call__(self, step: int | torch.Tensor) -> float | torch.Tensor:
        span = max(self.end_step - self.begin_step, 1)
        if isinstance(step, torch.Tensor):
            progress = ((step.double() - self.begin_step) / span).clamp(0.0, 1.0)
            return self.start + (self.end - self.start) * progress
        progress = min(max((step - self.begin_step) / span, 0.0), 1.0)
        return float(self.start + (self.end - self.start) * progress)


def check_schedule(value: Schedule, name: str, minimum: float) -> Schedule:
    """A bound is a number (checked now) or a callable of the step (its values checked when used)."""
    if isinstance(value, RenormRamp):
        check_bound(min(value.start, value.end), name, minimum)
    elif not callable(value):
        check_bound(value, name, minimum)
    return value


def evaluate(schedule: Schedule, step: torch.Tensor, name: str, minimum: float):
    """The bound at ``step``: a number, a tensor (a RenormRamp, on the device), or a checked number
    from any other callable (which is given the step as an int, a read of the counter)."""
    if isinstance(schedule, RenormRamp):
        return schedule(step)
    if callable(schedule):
        value = schedule(int(step))
        check_bound(value, f"{name} schedule's value at step {int(step)}", minimum)
        return float(value)
    return schedule


class BatchRenorm(NormBase):
    r"""Batch Renormalization over an input of any rank (N, C, \*) (Ioffe 2017).

    Paper: https://arxiv.org/abs/1702.03275 (Algorithm 1). BatchNorm's output depends on the other
    samples of the batch, which hurts with small or non-i.i.d. batches; Batch Renorm corrects the
    batch statistics toward the running ones, per channel:

    .. math::
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\left(\frac{\sigma_B}{\sigma}\right),\quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\left(\frac{\mu_B - \mu}{\sigma}\right),\quad
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) + \beta

    with :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}` (biased variance), r and d treated as
    constants by the backward pass, and :math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}`. In
    eval mode the layer *is* BatchNorm with the running statistics. With ``r_max=1, d_max=0`` the
    training output and gradients are BatchNorm's exactly.

    Decisions where the paper leaves room (tested):

    - Running statistics follow Algorithm 1: the moving average of the mean, and of the standard
      deviation :math:`\sigma` (not of the variance), written into BatchNorm's ``running_var`` as
      :math:`\sigma^2 - \epsilon`. So the ``state_dict`` keys, and the eval map, are BatchNorm's, and
      a BatchNorm checkpoint loads as is.
    - ``momentum`` defaults to the paper's 0.01 (PyTorch's convention, the weight of the new batch).
    - ``r_max`` and ``d_max`` are numbers or schedules, callables of the training step. The default
      is the paper's schedule (:class:`RenormRamp`: plain BatchNorm for 5000 steps, then r_max 1 → 3
      by step 40k and d_max 0 → 5 by 25k). The step is the buffer ``renorm_step``: it counts the
      training-mode forwards of non-empty batches. It is not in the ``state_dict``, whose keys
      are exactly BatchNorm's (a Batch Renorm checkpoint loads strictly into
      ``torch.nn.BatchNorm2d`` and back): loading restarts the schedule at the checkpoint's
      ``num_batches_tracked``, the batches its running statistics have seen, which is what the
      ramp waits for (the step itself, when an older checkpoint carries ``renorm_step``).
    - Statistics are computed in float32 for float16/bfloat16 inputs (mixed precision), and r, d in
      the statistics' dtype.

    Args:
        num_features: C.
        eps: added to the variance; must be > 0. Default: 1e-5.
        momentum: weight of each batch in the running statistics (the paper's alpha), or None for
            the cumulative average. Default: 0.01.
        affine: learn γ and β. Default: True.
        track_running_stats: must be True: r and d correct toward the running statistics.
        device, dtype: where and in what dtype parameters and buffers are created.
        r_max: bound on r (>= 1), a number or a schedule. Default: ``RenormRamp.paper_r_max()``.
        d_max: bound on |d| (>= 0), a number or a schedule. Default: ``RenormRamp.paper_d_max()``.
        bias, decay, on_nonfinite: as :class:`BatchNorm`.

    Shape:
        Input: (N, C, \*); output: the same shape, dtype and memory format.

    Example::

        >>> import torch, normkit as nk
        >>> brn = nk.BatchRenorm2d(4, r_max=1.0, d_max=0.0)  # plain BatchNorm
        >>> bn = torch.nn.BatchNorm2d(4)
        >>> x = torch.randn(8, 4, 3, 3)
        >>> bool(torch.allclose(brn(x), bn(x), atol=1e-5)), int(brn.renorm_step)
        (True, 1)
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = PAPER_MOMENTUM,
        affine: bool = True, track_running_stats: bool = True, *args,
        r_max: Schedule | None = None, d_max: Schedule | None = None, **kwargs,
    ) -> None:  # fmt: skip
        if not track_running_stats:
            raise ConfigError(
                f"{type(self).__name__} corrects the batch statistics toward the running ones, so "
                "it needs track_running_stats=True; without running statistics use BatchNorm"
            )
        r_max = check_schedule(RenormRamp.paper_r_max() if r_max is None else r_max, "r_max", 1.0)
        d_max = check_schedule(RenormRamp.paper_d_max() if d_max is None else d_max, "d_max", 0.0)
        super().__init__(num_features, eps, momentum, affine, True, *args, **kwargs)
        self.r_max, self.d_max = r_max, d_max
        step = torch.zeros_like(self.num_batches_tracked)
        self.register_buffer("renorm_step", step, persistent=False)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        step = getattr(self, "renorm_step", None)
        if step is not None:
            step.zero_()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            return self._normalize(batch_norm, input)  # Algorithm 1's output at inference
        step = self.renorm_step
        try:
            r_max = evaluate(self.r_max, step, "r_max", 1.0)
            d_max = evaluate(self.d_max, step, "d_max", 0.0)
        except NormkitError as error:
            raise named(self, error) from None
        y = self._normalize(batch_renorm, input, r_max=r_max, d_max=d_max)
        if input.numel() > 0:  # after the forward succeeded; an empty batch is no step
            increment(step)
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        step = state_dict.pop(prefix + "renorm_step", None)  # older checkpoints carry it
        if step is None:  # continue the schedule where the running statistics are
            step = state_dict.get(prefix + "num_batches_tracked")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():
            self.renorm_step.copy_(0 if step is None else step)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max!r}, d_max={self.d_max!r}"


class BatchRenorm1d(BatchRenorm):
    """:class:`BatchRenorm` on (N, C) or (N, C, L) inputs."""

    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchRenorm2d(BatchRenorm):
    """:class:`BatchRenorm` on (N, C, H, W) inputs."""

    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchRenorm3d(BatchRenorm):
    """:class:`BatchRenorm` on (N, C, D, H, W) inputs."""

    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
