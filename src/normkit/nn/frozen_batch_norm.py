"""Frozen BatchNorm: BatchNorm's inference map with fixed statistics and affine, for fine-tuning."""

from __future__ import annotations

import torch
from torch import nn

from normkit.errors import ConfigError, NormkitError
from normkit.functional import batch_norm
from normkit.functional._checks import check_channels, check_eps, check_min_rank, check_positive_int
from normkit.functional._moments import stats_dtype
from normkit.functional._transforms import composite_required
from normkit.nn._base import NormLayer, named


class FrozenBatchNorm(NormLayer, nn.Module):
    r"""BatchNorm with frozen statistics and affine: the same map in training and eval mode.

    Detection and segmentation models fine-tune with batches of one or two images per device, too
    few for batch statistics; they freeze the pre-trained BatchNorms instead (Detectron's
    ``FrozenBatchNorm2d``; Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §5). This layer is
    Ioffe & Szegedy (2015), Algorithm 2, step 11, for any rank (N, C, \*):

    .. math::
        y = \frac{x - \mathrm{running\_mean}}{\sqrt{\mathrm{running\_var} + \epsilon}}
            \cdot \mathrm{weight} + \mathrm{bias}

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers, not parameters: they are
    saved and moved with the layer, never trained, and the input gradient passes through. It equals
    a BatchNorm in eval mode with the same state, and ``load_state_dict`` takes a BatchNorm's
    ``state_dict`` (its ``num_batches_tracked`` is accepted and ignored), or a Caffe2/Detectron
    one of ``weight`` and ``bias`` alone (statistics folded in: they load as mean 0, variance 1,
    as in detectron2's ``FrozenBatchNorm2d``). ``eps`` must be > 0: with
    ``eps=0`` a channel whose running variance is 0 divides by zero (a default that once produced
    NaNs in a widely used frozen BatchNorm). channels_last inputs give channels_last outputs.

    Args:
        num_features: C.
        eps: added to the running variance; must be > 0. Default: 1e-5.
        device, dtype: where and in what dtype the buffers are created.

    Shape:
        Input: (N, C, \*); output: the same shape, dtype and memory format.

    Example::

        >>> import torch, normkit as nk
        >>> bn = torch.nn.BatchNorm2d(4)
        >>> _ = bn(torch.randn(8, 4, 3, 3) * 2 + 1)  # running statistics from a batch
        >>> frozen = nk.FrozenBatchNorm.from_batch_norm(bn)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> bool(torch.allclose(frozen(x), bn.eval()(x)))
        True
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        check_positive_int(num_features, "num_features")
        check_eps(eps)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_batch_norm(cls, bn: nn.Module, eps: float | None = None) -> FrozenBatchNorm:
        """A frozen copy of a BatchNorm (torch.nn's, normkit's, or any with the same buffers).

        Copies γ and β (1 and 0 for a layer without them), the running statistics and ``eps``; pass
        ``eps`` to override it (needed when the BatchNorm's is 0). Raises ConfigError for a layer
        without running statistics, which has nothing to freeze.
        """
        mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
        if mean is None or var is None:
            raise ConfigError(
                f"{type(bn).__name__} has no running statistics (track_running_stats=False), so "
                "there is nothing to freeze; train it with running statistics, or keep it as is"
            )
        eps = bn.eps if eps is None else eps
        if not eps > 0:
            raise ConfigError(
                f"{type(bn).__name__} has eps={eps!r}; FrozenBatchNorm needs eps > 0 (a channel "
                "with running_var 0 would divide by zero). Pass eps=, e.g. "
                "FrozenBatchNorm.from_batch_norm(bn, eps=1e-5)"
            )
        frozen = cls(mean.numel(), eps, device=mean.device, dtype=mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(mean)
            frozen.running_var.copy_(var)
            if getattr(bn, "weight", None) is not None:
                frozen.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        try:
            check_min_rank(input, 2, "(N, C, *)")
            check_channels(input, self.num_features)
            if not input.requires_grad or composite_required():  # torch's transforms: ATen's op
                return batch_norm(
                    input, self.running_mean, self.running_var, self.weight, self.bias,
                    False, 0.0, self.eps,
                )  # fmt: skip
            return _FrozenBatchNorm.apply(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        except NormkitError as error:
            raise named(self, error) from None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm's counter: not needed
        statistics = (prefix + "running_mean", prefix + "running_var")
        if prefix + "weight" in state_dict and not any(key in state_dict for key in statistics):
            # Caffe2/Detectron checkpoints: the statistics are folded into weight and bias, so
            # they load with mean 0 and variance 1, as detectron2's FrozenBatchNorm2d does.
            state_dict[statistics[0]] = torch.zeros_like(self.running_mean)
            state_dict[statistics[1]] = torch.ones_like(self.running_var)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class _FrozenBatchNorm(torch.autograd.Function):
    """The fixed per-channel affine map y = x * scale + shift with scale = weight / sqrt(var + eps):
    forward by the backend's BatchNorm inference op, backward ``dx = dy * scale`` in one pass (the
    buffers get no gradient), cheaper than differentiating the inference op."""

    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, eps):
        dtype = stats_dtype(input.dtype)  # float32 for half inputs
        ctx.save_for_backward(weight.to(dtype) * torch.rsqrt(running_var.to(dtype) + eps))
        return batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, dy):
        (scale,) = ctx.saved_tensors
        view = (1, -1) + (1,) * (dy.dim() - 2)
        dx = (dy.to(scale.dtype) * scale.view(view)).to(dy.dtype)
        return dx, None, None, None, None, None
