"""Instance normalization: drop-ins for ``torch.nn.InstanceNorm1d/2d/3d``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from normkit.errors import NormkitError
from normkit.functional import instance_norm
from normkit.functional._checks import check_channels
from normkit.nn._base import DEFAULT_MOMENTUM, NormBase, check_rank, named


class _InstanceNorm(NormBase):
    r"""Instance normalization (Ulyanov, Vedaldi & Lempitsky 2016): per sample and channel.

    Paper: https://arxiv.org/abs/1607.08022. Each (sample, channel) plane is normalized by its own
    mean and biased variance over the spatial dims; γ and β (``affine=True``) are per channel.
    With ``track_running_stats=True`` the layer also keeps running averages of the instance
    statistics and uses them in eval mode, as ``torch.nn.InstanceNorm*`` does.

    Differences from ``torch.nn`` (deliberate, tested):

    - channels_last inputs give channels_last outputs (torch returns a contiguous tensor);
    - ``momentum=None`` is the cumulative average, and ``num_batches_tracked`` counts the batches
      (torch never updates the running statistics with ``momentum=None`` and never counts);
    - an empty batch returns an empty output instead of raising.

    Args:
        num_features: C.
        eps: added to the variance; must be > 0. Default: 1e-5.
        momentum: weight of each batch in the running statistics, or None (cumulative). Default: 0.1.
        affine: learn per-channel γ and β. Default: False (as torch).
        track_running_stats: keep running statistics for eval mode. Default: False (as torch).
        device, dtype: where and in what dtype parameters and buffers are created.
        bias: learn β (with ``affine``). Default: True.
        decay: the Keras/Flax form of the momentum (``momentum = 1 - decay``).
        on_nonfinite: ``"skip"``, ``"warn"`` or ``"raise"`` for non-finite batch statistics.

    Shape:
        Input: (N, C, \*spatial) or unbatched (C, \*spatial); output: the same.
    """

    _ranks: tuple[int, ...]
    _layout: str

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = DEFAULT_MOMENTUM,
        affine: bool = False, track_running_stats: bool = False, *args, **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats, *args, **kwargs)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_rank(self, input, self._ranks, self._layout, "see InstanceNorm1d/2d/3d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        channel_dim = input.dim() - self._get_no_batch_dim()
        if input.shape[channel_dim] != self.num_features:
            if self.affine or self.track_running_stats:
                try:
                    check_channels(input, self.num_features, dim=channel_dim)
                except NormkitError as error:
                    raise named(self, error) from None
            warnings.warn(  # as torch.nn: num_features is unused without affine or running stats
                f"input's size at dim={channel_dim} does not match num_features "
                f"({self.num_features}); it is not used because affine=False and "
                "track_running_stats=False",
                stacklevel=2,
            )
        if input.dim() == self._get_no_batch_dim():
            return self._normalize(instance_norm, input.unsqueeze(0)).squeeze(0)
        return self._normalize(instance_norm, input)


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = _InstanceNorm.__doc__
    _ranks = (2, 3)
    _layout = "(N, C, L) or unbatched (C, L)"


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = _InstanceNorm.__doc__
    _ranks = (3, 4)
    _layout = "(N, C, H, W) or unbatched (C, H, W)"


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = _InstanceNorm.__doc__
    _ranks = (4, 5)
    _layout = "(N, C, D, H, W) or unbatched (C, D, H, W)"
