"""``SyncBatchNorm``: batch normalization with exact statistics over every rank of a process group,
and the conversions of a model's batch norms to it and back (:func:`to_sync_batch_norm`,
:func:`to_batch_norm`), beside the class as torch keeps ``convert_sync_batchnorm``."""

from __future__ import annotations

import datetime
import inspect

import torch
from torch import nn

from normkit.distributed._collectives import as_timeout
from normkit.distributed._sync_batch_norm import (
    check_check_ranks,
    synchronized_batch_norm,
    synchronizing_group,
)
from normkit.errors import ConfigError, NormkitError
from normkit.functional._transforms import SYNCHRONIZED_STEP, composite_required, exporting
from normkit.nn import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normkit.nn._base import DEFAULT_MOMENTUM, NormBase, named
from normkit.nn._origin import forget_origin, mark_origin


class SyncBatchNorm(BatchNorm):
    r"""Batch normalization whose batch statistics span every rank of a process group.

    Paper: Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167 (Algorithms 1-2, §3). When the
    batch on each device is small, the statistics of one device are too noisy; this layer
    normalizes every rank's part with the mean and variance of the union of all parts, as one
    process would on the concatenated batch:

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta,
        \quad \mathrm{E}, \mathrm{Var} \text{ over (N, *) of every rank's batch}

    Each rank sends its per-channel (count, mean, M2) in ONE all-gather per layer and step, and every
    rank merges them in the same order with Chan et al.'s centred formula (Chan, Golub & LeVeque
    1979, eq. 2.1), in float64: the statistics are exact, ranks of different batch sizes and
    ranks with no samples at all take part, and the running statistics (the variance unbiased
    with the global count) are bit-identical on every rank. Backward is ONE all-reduce of the
    per-channel (sum dy, sum dy * x_hat), and gives exactly the input gradient of single-process
    BN on the concatenated batch; the weight and bias gradients are each rank's share, which
    ``DistributedDataParallel`` sums across ranks. Works with gloo (CPU tensors) and NCCL (CUDA).

    In eval mode, or when torch.distributed is not initialised or the group has one rank, it is
    :class:`normkit.BatchNorm` exactly (no communication; with ``track_running_stats=False`` eval
    mode uses each rank's own batch statistics, as torch.nn.SyncBatchNorm does). Unlike
    ``torch.nn.SyncBatchNorm`` it runs on the CPU, inside ``DistributedDataParallel`` on gloo too.
    Precision: each rank's mean is rounded once to its statistics dtype before the float64 merge,
    a relative error of the variance of about |mean|/std x 2^-24 for float32 and half inputs.

    Failing instead of hanging: a rank whose input fails a check (dtype, rank, channels) still
    joins the collective with an error code, and every rank raises. The header travels in the same
    all-gather, so it also checks at no extra communication that the ranks agree on the input
    dtype, eps, momentum, ``track_running_stats``, whether the input needs a gradient, and the
    number of synchronized steps this layer has run. Reading it is a host synchronisation, free on
    the CPU; on accelerators it is read on the layer's first training step only
    (``check_ranks="auto"``), and afterwards a failed rank turns the others' statistics to NaN
    (their running statistics are then kept by the guard). What cannot be checked in one collective:

    - a rank that does not call the layer at all (eval mode on one rank, control flow that skips it):
      the others wait in the collective until ``timeout`` (or the process group's timeout) and
      raise :class:`~normkit.distributed.RankSyncError` naming the likely causes;
    - layers of different ``num_features`` on different ranks: the collectives differ in size,
      which gloo reports by aborting the receiving process ("Received data size doesn't match").

    Decisions where torch.nn.SyncBatchNorm differs or is silent: a global batch of exactly one value
    per channel raises ``BatchTooSmallError`` on every rank (when the headers are read; otherwise its
    statistics are NaN and the guard skips it); if every rank is empty the output is empty and the
    running statistics and ``num_batches_tracked`` are unchanged (on accelerators without a header
    read: counted in ``num_batches_skipped``). Not supported while synchronizing: nk.BatchNorm's
    padding ``mask``. Under ``torch.compile`` the synchronized step runs eagerly (a graph break);
    torch.export, torch.jit.trace, torch.func's transforms and double backward refuse it
    (docs/transforms.md). docs/distributed.md has the details.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, decay,
            on_nonfinite: as :class:`normkit.BatchNorm` (and in torch.nn.SyncBatchNorm's order).
        process_group: the ranks that share statistics; default: the whole world.
        check_ranks: ``"auto"`` (default), ``"always"`` or ``"never"``: when to read the gathered
            headers on the host to check that the ranks agree (see above).
        timeout: seconds (or a ``timedelta``) each collective may take before
            :class:`~normkit.distributed.RankSyncError`; default ``None``, the process group's
            timeout. A bounded wait is a host wait: free on the CPU, a synchronisation on GPUs.

    Shape:
        Input: (N, C, \*), N may differ between ranks and be 0; output: the same shape, dtype and
        memory format.

    Raises:
        RankMismatchError, RankSyncError: the ranks disagree, or a collective did not complete.
        BatchTooSmallError, ChannelMismatchError, DtypeError, ShapeError, ConfigError: as
        :class:`normkit.BatchNorm`, on every rank when any rank's input is at fault.

    Example::

        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = nk.SyncBatchNorm.convert_sync_batchnorm(model)  # before wrapping in DDP
        >>> type(model[1]).__name__, isinstance(model[1], torch.nn.BatchNorm2d)
        ('SyncBatchNorm', False)
        >>> y = model(torch.randn(4, 3, 8, 8))  # no process group here: plain BatchNorm
        >>> type(nk.SyncBatchNorm.revert_sync_batchnorm(model)[1]).__name__
        'BatchNorm2d'
    """

    transform_refusals = (*NormBase.transform_refusals, SYNCHRONIZED_STEP)

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = DEFAULT_MOMENTUM,
        affine: bool = True, track_running_stats: bool = True, process_group=None, *args,
        check_ranks: str = "auto", timeout: float | datetime.timedelta | None = None, **kwargs,
    ) -> None:  # fmt: skip
        check_check_ranks(check_ranks)
        as_timeout(timeout)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, *args, **kwargs)
        self.process_group = process_group
        self.check_ranks = check_ranks
        self.timeout = timeout
        self._synchronized_steps = 0  # sent with the statistics: ranks must stay in step

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        local = {} if mask is None else {"mask": mask}  # BatchNorm's padding mask, local only
        if not self.training:
            return super().forward(input, **local)
        try:
            group = synchronizing_group(self.process_group)
            if group is not None and mask is not None:
                raise ConfigError(
                    "a padding mask is not supported while synchronizing statistics across ranks; "
                    "pass mask=None, or use nk.BatchNorm (statistics per rank) for padded inputs"
                )
        except NormkitError as error:
            raise named(self, error) from None
        if group is None:
            return super().forward(input, **local)
        if exporting() or composite_required():  # torch.export, torch.func, jit.trace
            raise named(self, SYNCHRONIZED_STEP.error())
        if torch.compiler.is_compiling():  # collectives and host checks run eagerly (graph break)
            torch._dynamo.graph_break(msg=SYNCHRONIZED_STEP.reason)
            return torch.compiler.disable(self._synchronized_forward)(input, group)
        return self._synchronized_forward(input, group)

    def _synchronized_forward(self, input: torch.Tensor, group) -> torch.Tensor:
        step = self._synchronized_steps
        self._synchronized_steps += 1
        track = self.track_running_stats
        try:
            return synchronized_batch_norm(
                input,
                self.running_mean if track else None,
                self.running_var if track else None,
                self.weight,
                self.bias,
                True,
                self.momentum,
                self.eps,
                process_group=group,
                num_batches_tracked=self.num_batches_tracked if track else None,
                num_batches_skipped=self.num_batches_skipped if track else None,
                on_nonfinite=self.on_nonfinite,
                check_ranks=self.check_ranks,
                timeout=self.timeout,
                step=step,
                layer=f"{self._get_name()}({self.num_features})",
            )
        except NormkitError as error:
            raise named(self, error) from error.__cause__

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch norm in ``module`` by this class, sharing parameters and buffers.

        The same call as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``; see
        :func:`to_sync_batch_norm` for which layers convert.
        """
        return to_sync_batch_norm(module, process_group, layer=cls)

    @classmethod
    def revert_sync_batchnorm(cls, module: nn.Module, layer: type | None = None) -> nn.Module:
        """The reverse: every synchronized batch norm (normkit's or torch's) back to a local one;
        see :func:`to_batch_norm`."""
        return to_batch_norm(module, layer)


# --- Conversions between local and synchronized batch norm, both ways, with the same state --------
# The converted layer *shares* the original's parameters and buffers (as
# torch.nn.SyncBatchNorm.convert_sync_batchnorm does), so an optimizer built before the conversion
# keeps working and state_dict keys and values are unchanged.

# Layers that *are* batch norm (exact types). The family layers whose maths differ (Batch Renorm,
# Ghost BN, BatchNormAct, InPlaceABN, frozen BN, the mixtures) are left alone: synchronizing them
# would silently turn them into plain BN.
LOCAL_BATCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
)


def to_sync_batch_norm(
    module: nn.Module, process_group=None, *, layer: type | None = None, **options
) -> nn.Module:
    """Replace each batch norm in ``module`` (recursively) by a synchronized one.

    Converts torch.nn's and normkit's ``BatchNorm``/``BatchNorm1d/2d/3d`` and
    ``torch.nn.SyncBatchNorm`` (exact types). Returns the new layer when ``module`` itself is one,
    else ``module`` with its children replaced in place.

    Args:
        module: a layer or a model.
        process_group: the group the new layers synchronize over (default: the whole world; a
            ``torch.nn.SyncBatchNorm`` keeps its own when this is ``None``).
        layer: the class to build (default :class:`normkit.SyncBatchNorm`).
        **options: extra keywords for it (``check_ranks``, ``timeout``, ``on_nonfinite``).
    """
    layer = SyncBatchNorm if layer is None else layer
    output = module
    if type(module) in LOCAL_BATCH_NORMS or type(module) is nn.SyncBatchNorm:
        group = process_group
        if group is None:
            group = getattr(module, "process_group", None)
        output = _rebuild(module, layer, process_group=group, **options)
        if type(module) is not nn.SyncBatchNorm:
            output._converted_from = type(module)  # what to_batch_norm gives back by default
    for name, child in module.named_children():
        new = to_sync_batch_norm(child, process_group, layer=layer, **options)
        if new is not child:
            output.add_module(name, new)
    return output


def to_batch_norm(module: nn.Module, layer: type | None = None) -> nn.Module:
    """Replace each synchronized batch norm (normkit's or ``torch.nn.SyncBatchNorm``) by a local one.

    Args:
        module: a layer or a model.
        layer: the class to build; default: the class a layer was converted from by
            :func:`to_sync_batch_norm`, else :class:`normkit.BatchNorm` (any rank, as SyncBN is).
    """
    output = module
    if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        target = layer or getattr(module, "_converted_from", None) or BatchNorm
        output = _rebuild(module, target)
    for name, child in module.named_children():
        new = to_batch_norm(child, layer)
        if new is not child:
            output.add_module(name, new)
    return output


def _rebuild(source: nn.Module, cls: type, **extra) -> nn.Module:
    """A ``cls`` with ``source``'s configuration, sharing its parameters and buffers."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {
        "eps": source.eps,
        "momentum": source.momentum,
        "affine": source.affine,
        "track_running_stats": source.track_running_stats,
    }
    if "bias" in accepted:
        kwargs["bias"] = not source.affine or source.bias is not None
    if "on_nonfinite" in accepted and hasattr(source, "on_nonfinite"):
        kwargs["on_nonfinite"] = source.on_nonfinite
    kwargs.update({k: v for k, v in extra.items() if k in accepted})
    tensors = [*source.parameters(recurse=False), *source.buffers(recurse=False)]
    device = tensors[0].device if tensors else None
    target = cls(source.num_features, device=device, **kwargs)
    with torch.no_grad():
        for name in ("weight", "bias"):
            if name in target._parameters:
                setattr(target, name, getattr(source, name, None))
        for name in ("running_mean", "running_var", "num_batches_tracked", "num_batches_skipped"):
            if name in target._buffers and getattr(source, name, None) is not None:
                setattr(target, name, getattr(source, name))
    (mark_origin if isinstance(target, NormBase) else forget_origin)(target)  # the tensors' owner
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target
