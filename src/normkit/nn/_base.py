"""What every normkit layer shares: one constructor for the layers with running statistics, and the
small pieces that keep the drop-ins compatible with the installed torch.

normkit's drop-ins subclass their ``torch.nn`` namesakes, so parameters, buffers, ``state_dict`` keys,
``reset_parameters``, state-dict version migration and ``isinstance`` checks in other libraries are
torch's own; normkit overrides ``__init__`` (checks and extra options) and ``forward`` (the functional
op).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from normkit.errors import NormkitError, ShapeError
from normkit.functional._checks import check_eps, check_policy, check_positive_int, shape_str
from normkit.functional._running_stats import DefaultMomentum, momentum_argument
from normkit.functional._transforms import (
    HOST_POLICY_UNDER_CAPTURE,
    JIT_SCRIPT,
    VMAP_RUNNING_STATISTICS,
    Refusal,
    batched,
)
from normkit.nn._origin import mark_origin


def _accepts_bias(cls: type) -> bool:
    return "bias" in inspect.signature(cls.__init__).parameters


# torch added `bias=` to the BatchNorm/InstanceNorm/GroupNorm constructors after 2.3; normkit
# accepts it everywhere and applies it itself where the installed torch does not.
NORM_BASE_HAS_BIAS = _accepts_bias(_NormBase)
GROUP_NORM_HAS_BIAS = _accepts_bias(nn.GroupNorm)

DEFAULT_MOMENTUM = DefaultMomentum(0.1)


def bias_kwargs(has_bias: bool, bias: bool) -> dict:
    """The ``bias=`` keyword for the parent constructor, when the installed torch takes one."""
    return {"bias": bias} if has_bias else {}


def drop_bias_if_unsupported(module: nn.Module, has_bias: bool, bias: bool) -> None:
    """Emulate ``bias=False`` on a torch whose constructor lacks it (the key then disappears)."""
    if not has_bias and not bias and getattr(module, "bias", None) is not None:
        module.register_parameter("bias", None)


class NormLayer:
    """What every normkit layer declares about PyTorch's transforms (docs/transforms.md).

    ``transform_refusals``: the :class:`~normkit.functional._transforms.Refusal` s the layer answers
    some transforms with, in some modes and configurations; everything else works, and the
    transform matrix test (tests/test_transform_matrix.py) holds every public layer to both. A
    layer adds its own to its base's: ``transform_refusals = NormBase.transform_refusals + (...)``.
    ``torch.jit.script`` is refused here, before TorchScript reads the forward.
    """

    transform_refusals: tuple[Refusal, ...] = (JIT_SCRIPT,)

    def __prepare_scriptable__(self):  # torch.jit.script calls it first, on every submodule
        raise named(self, JIT_SCRIPT.error())


class NormBase(NormLayer, _NormBase):
    r"""The base of normkit's layers with running statistics: BatchNorm and its family.

    It owns the constructor, as torch's ``_NormBase`` does: torch's arguments ``(num_features,
    eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None, *,
    bias=True)`` plus normkit's ``decay=None`` (the Keras/Flax momentum) and ``on_nonfinite="skip"``
    (the guard's policy), checked with named errors; and the non-persistent buffer
    ``num_batches_skipped`` (batches the guard kept out of the running statistics; not in the
    ``state_dict``, whose keys stay exactly torch's).

    Declaring a layer — a subclass states only what is its own:

    - No arguments of its own: no ``__init__``. ``_ranks`` (e.g. ``(4,)``) and ``_layout`` restrict
      the input's rank with a named error; the default takes any (N, C, \*).
    - Extra arguments: an ``__init__`` naming only them (and any base argument whose default it
      changes, in the base's order; a momentum default as a ``DefaultMomentum``, which ``decay=``
      may replace), passing the rest on; then it stores them::

          class TwoGroupNorm(NormBase):
              def __init__(self, num_features, groups: int = 2, *args, clip: float = 3.0, **kwargs):
                  check_positive_int(groups, "groups")  # check before building anything
                  super().__init__(num_features, *args, **kwargs)
                  self.groups, self.clip = groups, clip

      ``groups`` is then positional after ``num_features`` (``TwoGroupNorm(8, 4, 1e-3)``) and ``clip``
      keyword-only. The class's signature (``help``, ``inspect.signature``) is the base's with the
      extras in place: ``__init_subclass__`` writes it, so it reads as if spelled out.
    - Parameters of its own: created in ``_init_parameters(factory)`` (``factory`` is the
      ``device``/``dtype`` keywords) and reset in ``reset_parameters``.
    - ``forward``: ``return self._normalize(op, input, *leading, **options)`` calls a functional op of
      the family with this layer's state under torch.nn's rules (see :meth:`_normalize`) and names
      the layer in any error.

    Which base a layer joins (isinstance compatibility): a layer that computes plain BatchNorm also
    subclasses torch's ``_BatchNorm`` (``class BatchNorm(NormBase, _BatchNorm)``), so that weight-decay
    filters, freezers and converters that look for batch norms find it. A layer whose training maths
    or output differ (Batch Renorm, Ghost BN, BatchNormAct, InPlaceABN, the mixtures) does not:
    ``isinstance(m, _BatchNorm)`` is how other code asks "may I treat this as BatchNorm?", and
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (and timm's, apex's, ...) answer by replacing
    it with plain SyncBatchNorm — silently dropping an activation or the renormalization. Such a
    layer is still a torch ``_NormBase``, with BatchNorm's parameters, buffers and ``state_dict``
    keys. docs/distributed.md has the details.
    """

    _ranks: tuple[int, ...] | None = None
    _layout = "(N, C, *)"
    transform_refusals = (*NormLayer.transform_refusals, VMAP_RUNNING_STATISTICS,
                          HOST_POLICY_UNDER_CAPTURE)  # fmt: skip

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = DEFAULT_MOMENTUM,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        decay: float | None = None,
        on_nonfinite: str = "skip",
    ) -> None:
        check_positive_int(num_features, "num_features")
        check_eps(eps)
        check_policy(on_nonfinite)
        momentum = momentum_argument(momentum, decay)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            **bias_kwargs(NORM_BASE_HAS_BIAS, bias),
        )  # fmt: skip
        drop_bias_if_unsupported(self, NORM_BASE_HAS_BIAS, bias)
        self.on_nonfinite = on_nonfinite
        counter = torch.zeros((), dtype=torch.long, device=device) if track_running_stats else None
        self.register_buffer("num_batches_skipped", counter, persistent=False)
        self._init_parameters({"device": device, "dtype": dtype})
        mark_origin(self)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            init.__signature__ = _spelled_out(init, super(cls, cls).__init__)

    def _init_parameters(self, factory: dict) -> None:
        """Create the layer's own parameters (beyond γ and β) with ``factory``'s device and dtype."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if self._ranks is not None:
            check_rank(self, input, self._ranks, self._layout, "nk.BatchNorm takes any (N, C, *)")

    def _uses_batch_statistics(self) -> bool:
        """torch.nn's rule: batch statistics in training, and in eval without running ones."""
        return self.training or self.running_mean is None

    def _normalize(
        self, op: Callable[..., torch.Tensor], input: torch.Tensor, *leading, **options
    ) -> torch.Tensor:
        """``op(input, *leading, running_mean, running_var, weight, bias, training, momentum, eps,
        **counters, **options)``: a functional op of the family (their arguments share this order)
        given this layer's state, any error it raises named after the layer.

        torch.nn's rules: the running statistics (and ``num_batches_tracked``,
        ``num_batches_skipped``) are updated only in training with ``track_running_stats``; they
        are used, instead of the batch's, in eval when the layer keeps them. An update under
        ``torch.func.vmap`` over the input is refused (``VMAP_RUNNING_STATISTICS``).
        """
        update = self.training and self.track_running_stats
        if update and batched(input):
            raise named(self, VMAP_RUNNING_STATISTICS.error())
        running_mean, running_var = (
            (None, None) if self.training and not update else (self.running_mean, self.running_var)
        )
        counters = {
            "num_batches_tracked": self.num_batches_tracked if update else None,
            "num_batches_skipped": self.num_batches_skipped if update else None,
            "on_nonfinite": self.on_nonfinite,
        }
        try:
            return op(
                input, *leading, running_mean, running_var, self.weight, self.bias,
                self.training or running_mean is None, self.momentum, self.eps,
                **counters, **options,
            )  # fmt: skip
        except NormkitError as error:
            raise named(self, error) from None

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        mark_origin(self)  # moving to a device or dtype makes new buffers: mark them too
        return module

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return (
            text if self.on_nonfinite == "skip" else f"{text}, on_nonfinite={self.on_nonfinite!r}"
        )


def _spelled_out(init: Callable, parent_init: Callable) -> inspect.Signature:
    """The signature of a subclass ``__init__(self, <own>, *args, <own keywords>, **kwargs)`` that
    passes ``*args``/``**kwargs`` on to ``parent_init``: its own parameters with the parent's that
    it forwards in their place (positional after its own, keywords before its own)."""
    own = inspect.signature(init)
    params = list(own.parameters.values())
    kinds = {p.kind for p in params}
    if not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        return own
    named_here = {p.name for p in params}
    inherited = [
        p for p in inspect.signature(parent_init).parameters.values() if p.name not in named_here
    ]
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keywords = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        positional += [p for p in inherited if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    if inspect.Parameter.VAR_KEYWORD in kinds:
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        forwarded = [p for p in inherited if p not in positional and p.kind not in variadic]
        keywords = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in forwarded] + keywords
    return own.replace(parameters=positional + keywords)


def named(module: nn.Module, error: NormkitError) -> NormkitError:
    """The same error, its message prefixed with the layer that raised it."""
    return type(error)(f"{module._get_name()}({module.extra_repr()}): {error}")


def check_rank(
    module: nn.Module, input: torch.Tensor, ranks: tuple[int, ...], layout: str, hint: str
) -> None:
    """Raise a ShapeError naming the layer, the expected layout and the fix for a wrong rank."""
    if input.dim() not in ranks:
        expected = " or ".join(f"{r}-D" for r in ranks)
        raise named(
            module,
            ShapeError(
                f"expected a {expected} input {layout}, got a {input.dim()}-D input of shape "
                f"{shape_str(input.shape)}; {hint}"
            ),
        )
