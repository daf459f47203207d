"""``MovingAverageBatchNorm``: MABN, BatchNorm with moving-average statistics in both passes."""

from __future__ import annotations

import torch

from normkit.errors import ConfigError, NormkitError
from normkit.functional import moving_average_batch_norm
from normkit.functional._checks import check_positive_int
from normkit.functional._running_stats import DefaultMomentum
from normkit.functional._transforms import MABN_TRAINING_STEP, compiling, exporting
from normkit.nn._base import NormBase, NormLayer, named

# The authors' EMA decay 0.98, in PyTorch's convention (the weight of the new value).
PAPER_MOMENTUM = DefaultMomentum(0.02)


class MovingAverageBatchNorm(NormBase):
    r"""Moving Average Batch Normalization, MABN (Yan et al. 2020): BatchNorm for batches of 1-8.

    Paper: https://arxiv.org/abs/2001.06838 (ICLR 2020), §3-4; the authors' code:
    github.com/megvii-model/MABN. With a small batch, BatchNorm's statistics are noisy, in the
    forward pass (mean, variance) and — the paper's finding — in the backward pass too (the mean
    of the gradient and of its product with the normalized input). MABN (§4):

    - normalizes with the second moment χ = E[x²] alone: no mean is subtracted, so the two
      statistics that come with it (the mean, and the mean of the gradient) are gone; the weights
      of the layer before are centred instead (:class:`normkit.CenteredConv2d`, or
      ``nk.tools.convert(model, "mabn")``, which swaps both);
    - replaces χ and the backward's Ψ = E[ẑ ∂L/∂ẑ] by their simple moving averages over the last
      ``window`` iterations, and renormalizes with r = sqrt(χ̄ + ε)/sqrt(χ̂ + ε), χ̂ the
      exponential moving average (Batch Renorm's trick), so that the forward uses the EMA:

    .. math::
        y = \gamma\, r \frac{x}{\sqrt{\bar\chi + \epsilon}} + \beta, \qquad
        \frac{\partial L}{\partial x} = \frac{g - z\,\bar\Psi}{\sqrt{\bar\chi + \epsilon}}, \quad
        g = \frac{\partial L}{\partial y}\gamma r

    At inference, y = γ x / sqrt(χ̂ + ε) + β: BatchNorm's eval map with mean 0, so it folds into
    the convolution before it like BN (``nk.tools.fold_batchnorm``). The paper reports MABN
    "can completely restore the performance of vanilla BN in small batch cases" on ImageNet and
    COCO (abstract; its Tables 2-4).

    Decisions where the paper leaves room (tested), all as the authors' code has them:

    - the EMA χ̂ (``running_var``) follows χ̄, the SMA, with ``momentum`` 0.02 (the code's decay
      0.98); r uses χ̂ before this step's update and is clipped to [1/r_max, r_max] = [1/5, 5];
    - for the first ``warmup_iters`` steps, and until the window is full, χ̄ and Ψ̄ are the batch's
      own; r is 1 for the first max(``renorm_iters``, ``warmup_iters``) steps;
    - the window is a ring indexed by step mod ``window``; the windows (``second_moments``,
      ``gradient_moments``) and the step (``iteration``) are buffers in the ``state_dict``, so a
      resumed run continues exactly;
    - statistics in float32 for half inputs. There is no ``running_mean`` (MABN has none).

    The backward is MABN's rule, not the gradient of its forward, and it updates Ψ's window: the
    training step runs eagerly (torch.compile: a graph break) and refuses torch.func's vmap and
    jvp, export and tracing with a clear error; ``torch.func.grad`` runs it as eager mode does,
    and double backward differentiates the rule. Eval mode goes everywhere, as BatchNorm's eval
    map does (docs/transforms.md). Under
    ``nk.accumulate`` each micro-batch is one of MABN's iterations, as the paper's algorithm has it.

    Args:
        num_features, eps, affine, device, dtype, bias, decay, on_nonfinite: as
            :class:`normkit.BatchNorm`.
        momentum: the EMA's weight of each step's χ̄, or None for the cumulative average.
            Default: 0.02.
        track_running_stats: must be True (inference uses χ̂).
        window: m, the iterations the simple moving averages span — the authors set it to the
            batch size to simulate divided by the real one. Default: 16.
        warmup_iters: steps with the batch's own statistics. Default: 100.
        renorm_iters: steps with r = 1. Default: 1000.
        r_max: the bound of r. Default: 5.

    Shape:
        Input: (N, C, \*); output: the same shape, dtype and memory format.

    Example::

        >>> import torch, normkit as nk
        >>> mabn = nk.MovingAverageBatchNorm(8, window=4, warmup_iters=2)
        >>> for _ in range(6):
        ...     mabn(torch.randn(2, 8, 5, 5)).sum().backward()
        >>> int(mabn.iteration), tuple(mabn.second_moments.shape)
        (6, (4, 8))
    """

    # The training step refuses every transform that would record it (MABN_TRAINING_STEP, which
    # also covers vmap: the advice of NormBase's refusal does not apply, the layer needs its
    # running statistics; and on_nonfinite's host read, inside the same step).
    transform_refusals = (*NormLayer.transform_refusals, MABN_TRAINING_STEP)

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = PAPER_MOMENTUM,
        affine: bool = True, track_running_stats: bool = True, *args, window: int = 16,
        warmup_iters: int = 100, renorm_iters: int = 1000, r_max: float = 5.0, **kwargs,
    ) -> None:  # fmt: skip
        if not track_running_stats:
            raise ConfigError(
                f"{type(self).__name__} normalizes at inference with the moving average of the "
                "second moment, so it needs track_running_stats=True"
            )
        for name, value in (("window", window), ("warmup_iters", warmup_iters),
                            ("renorm_iters", renorm_iters)):  # fmt: skip
            check_positive_int(value, name)
        if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not r_max >= 1:
            raise ConfigError(f"r_max must be a number >= 1, got {r_max!r}")
        self.window = window
        super().__init__(num_features, eps, momentum, affine, True, *args, **kwargs)
        self.warmup_iters, self.renorm_iters, self.r_max = warmup_iters, renorm_iters, float(r_max)

    def _init_parameters(self, factory: dict) -> None:
        self.register_buffer("running_mean", None)  # MABN subtracts no mean
        window = (self.window, self.num_features)
        self.register_buffer("second_moments", torch.zeros(window, **factory))
        self.register_buffer("gradient_moments", torch.zeros(window, **factory))
        device = factory.get("device")
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        for name in ("second_moments", "gradient_moments", "iteration", "num_batches_skipped"):
            buffer = getattr(self, name, None)
            if buffer is not None:
                buffer.zero_()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training and compiling() and not exporting():  # runs eagerly: a graph break
            torch._dynamo.graph_break(msg=MABN_TRAINING_STEP.reason)
            return torch.compiler.disable(self._forward)(input)
        return self._forward(input)

    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        try:
            return moving_average_batch_norm(
                input, self.running_var, self.weight, self.bias, self.training, self.momentum,
                self.eps, second_moments=self.second_moments,
                gradient_moments=self.gradient_moments, iteration=self.iteration,
                warmup_iters=self.warmup_iters, renorm_iters=self.renorm_iters, r_max=self.r_max,
                num_batches_tracked=self.num_batches_tracked,
                num_batches_skipped=self.num_batches_skipped, on_nonfinite=self.on_nonfinite,
            )  # fmt: skip
        except NormkitError as error:
            raise named(self, error) from None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, window={self.window}, warmup_iters={self.warmup_iters}, "
            f"renorm_iters={self.renorm_iters}, r_max={self.r_max}"
        )
