"""``CrossIterationBatchNorm``: CBN, BatchNorm with statistics pooled over recent iterations."""

from __future__ import annotations

import torch
from torch import nn

from normkit.errors import ConfigError, NormkitError
from normkit.functional import cross_iteration_batch_norm
from normkit.functional._checks import (
    check_batch_statistics_size,
    check_channels,
    check_floating,
    check_per_channel,
    check_positive_int,
)
from normkit.functional._cross_iteration_batch_norm import (
    compensated_statistics,
    statistics_jacobians,
)
from normkit.functional._given_statistics import batch_norm_statistics
from normkit.functional._moments import stats_dtype
from normkit.functional._transforms import (
    CBN_TRAINING_STEP,
    compiling,
    exporting,
    increment,
    transforming,
)
from normkit.nn._base import NormBase, NormLayer, named

_HISTORY = ("means", "vars", "mean_grads", "second_moment_grads", "weights")


class CrossIterationBatchNorm(NormBase):
    r"""Cross-Iteration Batch Normalization, CBN (Yao et al. 2021): statistics from k iterations.

    Paper: https://arxiv.org/abs/2002.05712 (CVPR 2021), §3.2-3.3; the authors' code:
    github.com/Howal/Cross-iterationBatchNorm. A batch of 1-4 images gives BatchNorm noisy
    statistics; CBN pools them with those of the k - 1 previous iterations. Those were computed
    under older weights, so each is first compensated, by a first-order Taylor expansion, for how
    the weights θ of the layer that produces this layer's input have changed since:

    .. math::
        \mu_{t-\tau}(\theta_t) \approx \mu_{t-\tau}(\theta_{t-\tau})
            + \frac{\partial \mu_{t-\tau}}{\partial \theta_{t-\tau}}(\theta_t - \theta_{t-\tau}),
        \qquad \bar\mu_t = \frac{1}{k}\sum_{\tau=0}^{k-1} \mu_{t-\tau}(\theta_t)

    and likewise the second moment ν, pooled as the mean of max(ν, μ²); σ² = ν̄ - μ̄². The
    gradients of earlier layers are neglected (the paper shows they are small), so only the
    producer's own ∂μ/∂θ and ∂ν/∂θ are computed — through autograd, two weight-gradient passes of
    the producer per step, as the authors' code does. The paper reports CBN beating BN and GN at
    small batches on ImageNet and COCO, and the naive average without compensation (its Tables
    1-4).

    Give the producer's weight: ``layer.attach(conv)`` once (or ``layer(x, weight=conv.weight)``
    each call); ``nk.tools.convert(model, "cbn")`` attaches every converted layer to the
    convolution that feeds it. Its weight's row c must make channel c (convolutions and linear
    layers; not transposed convolutions).

    Decisions where the paper leaves room (tested):

    - a burn-in of ``burn_in`` training steps uses the batch alone (k = 1, BatchNorm); then the
      window fills from empty, pooling 1, 2, ..., k iterations. ``iteration`` (in the
      ``state_dict``) counts the training steps with a window (k > 1; an empty batch is none);
    - a training step that raises (a wrong input) stores and counts nothing;
    - the statistics are pooled in a centred form (each iteration's variance kept as such and
      merged by the law of total variance), which is the paper's formula without its
      cancellation; max(ν, μ²) is max(variance, 0);
    - normalization uses the biased pooled variance inside the square root with eps (BatchNorm's
      form; the authors' code adds eps to the standard deviation);
    - the running statistics follow each step's own batch, BatchNorm's rule (as the authors' code),
      so eval mode is BatchNorm's eval map;
    - the window (stored statistics, their derivatives and the weights) is not in the
      ``state_dict``: after loading, it refills over k steps. ``compensate=False`` pools without
      compensation (the paper's naive baseline) and needs no producer.

    The training step computes derivatives inside the forward, so it runs eagerly and refuses
    program transforms (torch.compile, torch.func, export, tracing) with a clear error; eval mode
    traces as BatchNorm does. Under ``nk.accumulate`` every micro-batch is one of CBN's iterations
    (the weights do not change between them, so their compensation is zero), as the paper's
    algorithm has it.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, decay,
        on_nonfinite: as :class:`normkit.BatchNorm`.
        window: k, the iterations pooled (this one included). Default: 8.
        burn_in: training steps before the window is used. Default: 0.
        compensate: apply the Taylor compensation (needs the producer). Default: True.

    Shape:
        Input: (N, C, \*); output: the same shape, dtype and memory format.

    Example::

        >>> import torch, normkit as nk
        >>> conv = torch.nn.Conv2d(3, 8, 3, bias=False)
        >>> cbn = nk.CrossIterationBatchNorm(8, window=4).attach(conv)
        >>> for _ in range(5):
        ...     cbn(conv(torch.randn(2, 3, 8, 8))).square().mean().backward()
        >>> int(cbn.history_size), int(cbn.iteration)
        (3, 5)
    """

    # CBN_TRAINING_STEP first: with window > 1 it is what a training step answers (window=1 is
    # BatchNorm, with BatchNorm's refusals).
    transform_refusals = (
        *NormLayer.transform_refusals,
        CBN_TRAINING_STEP,
        *NormBase.transform_refusals[len(NormLayer.transform_refusals) :],
    )

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, *args, window: int = 8,
        burn_in: int = 0, compensate: bool = True, **kwargs,
    ) -> None:  # fmt: skip
        check_positive_int(window, "window")
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ConfigError(f"burn_in must be an int >= 0, got {burn_in!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, *args, **kwargs)
        self.window, self.burn_in, self.compensate = window, burn_in, bool(compensate)
        object.__setattr__(self, "_producer", None)  # not a submodule: its weights are its own
        if window > 1:  # the stored statistics exist from the start (torch.func.functional_call
            # takes them with the other buffers); the derivatives wait for the producer's shape
            for name in ("means", "vars"):
                entries = torch.zeros(window - 1, num_features, **self._history_factory)
                setattr(self, f"history_{name}", entries)

    def _init_parameters(self, factory: dict) -> None:
        device = factory.get("device")
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long, device=device))
        for name in ("history_size", "history_next"):  # entries kept; the slot written next
            counter = torch.zeros((), dtype=torch.long, device=device)
            self.register_buffer(name, counter, persistent=False)
        for name in _HISTORY:
            self.register_buffer(f"history_{name}", None, persistent=False)
        dtype = stats_dtype(factory.get("dtype") or torch.get_default_dtype())
        self._history_factory = {"device": device, "dtype": dtype}

    def attach(self, producer: nn.Module) -> CrossIterationBatchNorm:
        """Use ``producer.weight`` (the layer whose output this one normalizes) for the
        compensation; returns this layer. Not a submodule: no ``state_dict`` key is added."""
        weight = getattr(producer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            raise ConfigError(
                f"CrossIterationBatchNorm compensates for a producer's weight, whose row c makes "
                f"channel c; {type(producer).__name__} has no such weight"
            )
        if weight.shape[0] != self.num_features or isinstance(
            producer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        ):
            raise ConfigError(
                f"the producer's weight rows must be this layer's {self.num_features} channels; "
                f"{type(producer).__name__} has weight {tuple(weight.shape)}"
            )
        object.__setattr__(self, "_producer", producer)
        return self

    @property
    def producer(self) -> nn.Module | None:
        return self._producer

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "iteration", None) is not None:
            self.iteration.zero_()
            self.history_size.zero_()
            self.history_next.zero_()

    def forward(self, input: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.window > 1 and transforming():
            if compiling() and not exporting():  # the step runs eagerly: a graph break
                torch._dynamo.graph_break(msg=CBN_TRAINING_STEP.reason)
                return torch.compiler.disable(self._forward)(input, weight)
            raise named(self, CBN_TRAINING_STEP.error())
        return self._forward(input, weight)

    def _forward(self, input: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        self._check_input_dim(input)
        store = None
        try:
            past_means = past_vars = statistics = None
            if self.training:
                check_floating(input)
                check_channels(input, self.num_features)
                past_means, past_vars, statistics, store = self._window(input, weight)
            y = self._normalize(
                cross_iteration_batch_norm, input, past_means, past_vars,
                batch_statistics=statistics,
            )  # fmt: skip
        except NormkitError as error:
            raise named(self, error) from None
        if store is not None:  # only once the step has succeeded: a failing call changes nothing
            store()
        return y

    def _window(self, input: torch.Tensor, weight: torch.Tensor | None):
        """The compensated statistics of the stored iterations; returns ``(past_means, past_vars,
        (mean, var) of this batch, store)`` (Nones outside the window), where ``store()`` counts
        the step and stores this batch over the oldest entry. Changes nothing itself."""
        stored = self.window - 1
        if stored == 0 or input.numel() == 0:  # BatchNorm; an empty batch is no step
            return None, None, None, None
        check_per_channel(
            input, running_mean=self.running_mean, running_var=self.running_var,
            weight=self.weight, bias=self.bias,
        )  # fmt: skip
        check_batch_statistics_size(input)
        if int(self.iteration) + 1 <= self.burn_in:
            return None, None, None, lambda: increment(self.iteration)
        if weight is None and self._producer is not None:
            weight = self._producer.weight
        if self.compensate and weight is None:
            raise ConfigError(
                "the Taylor compensation needs the weight of the layer that produces this input: "
                "call layer.attach(conv) once, pass layer(x, weight=conv.weight), or build the "
                "layer with compensate=False (the paper's uncompensated average)"
            )
        means, vars_ = batch_norm_statistics(input)
        d_mu = d_nu = None
        if self.compensate:
            d_mu, d_nu = statistics_jacobians(input, weight)
        size = int(self.history_size) if self._history_fits(stored, weight, means.dtype) else 0
        past = None, None
        if size and self.compensate:
            history = [getattr(self, f"history_{name}")[:size] for name in _HISTORY]
            past = compensated_statistics(*history, weight.detach())
        elif size:  # copies: this step is written over the oldest entry once it has run
            past = self.history_means[:size].clone(), self.history_vars[:size].clone()

        @torch.no_grad()
        def store() -> None:  # this step over the oldest entry (the order is irrelevant)
            increment(self.iteration)
            self._ensure_history(stored, weight, means.dtype)
            size, slot = int(self.history_size), int(self.history_next)
            self.history_next.fill_((slot + 1) % stored)
            self.history_means[slot] = means
            self.history_vars[slot] = vars_
            if self.compensate:
                self.history_mean_grads[slot] = d_mu
                self.history_second_moment_grads[slot] = d_nu
                self.history_weights[slot] = weight.detach()
            self.history_size.fill_(min(size + 1, stored))

        return (*past, (means, vars_), store)

    def _history_fits(self, stored: int, weight: torch.Tensor | None, dtype) -> bool:
        """Whether the stored entries are of this window, dtype and producer weight's shape."""
        shape = None if weight is None or not self.compensate else tuple(weight.shape)
        current = self.history_means
        grads = self.history_mean_grads
        return (
            current is not None
            and current.shape[0] == stored
            and current.dtype == dtype
            and (shape is None or (grads is not None and tuple(grads.shape[1:]) == shape))
        )

    def _ensure_history(self, stored: int, weight: torch.Tensor | None, dtype) -> None:
        if self._history_fits(stored, weight, dtype):
            return
        shape = None if weight is None or not self.compensate else tuple(weight.shape)
        factory = {"device": self.iteration.device, "dtype": dtype}
        self.history_means = torch.zeros(stored, self.num_features, **factory)
        self.history_vars = torch.zeros(stored, self.num_features, **factory)
        if shape is not None:
            factory["dtype"] = weight.dtype if weight.is_floating_point() else torch.float32
            for name in ("mean_grads", "second_moment_grads", "weights"):
                setattr(self, f"history_{name}", torch.zeros((stored, *shape), **factory))
        self.history_size.zero_()
        self.history_next.zero_()

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, window={self.window}, burn_in={self.burn_in}"
        return text + ("" if self.compensate else ", compensate=False")
